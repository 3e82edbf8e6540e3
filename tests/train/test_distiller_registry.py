"""The distiller registry (ckakd.train.distillers.registry): decorator registration, lookups, the package's names."""

from __future__ import annotations

import pytest
import torch

import ckakd.train.distillers as distillers
from ckakd.train import create_model
from ckakd.train.distillers import (
    DISTILLERS,
    Distiller,
    FeatureDistiller,
    build_distiller,
    get_distiller,
    register_distiller,
)
from ckakd.train.distillers import registry as registry_module

K = 10
IN8 = (3, 8, 8)
# Registration order: the order of DISTILLERS and of the "valid names" in error messages.
ORDER = [
    "ce", "kd", "lskd", "dkd", "dist", "fitnet", "at", "fcka", "lcka", "rcka", "patch_cka", "mmd",
    "wkd_l", "wkd_f", "wkd_lf", "ensemble_kd",
]  # fmt: skip
# dir() of the single-module ckakd.train.distillers (public part) before it became a package
# The old single module's own names (not the stdlib and torch modules it happened to import).
OLD_PUBLIC = [
    "AT", "CEOnly", "DIST", "DISTILLERS", "DKD", "Distiller", "EnsembleKD", "FCKA", "FeatureHooks", "FitNet", "KD",
    "LCKA", "LSKD", "MIN_PATCHES", "MMD", "PATCH_RESIZE", "PatchCKA", "RCKA", "STUDENT_VIEW", "WKDFeature",
    "WKDLogit", "WKDLogitFeature", "at_loss", "build_distiller", "cosine_decay_weight", "dist_loss", "dkd_loss",
    "fit_patch_size", "gather_batch", "kd_loss", "module_names", "patch_grid", "rcka_logit_options",
    "resolve_module", "standardize_logits",
]  # fmt: skip
FEATURE_NAMES = {"fitnet", "at", "fcka", "rcka", "patch_cka", "mmd", "wkd_f", "wkd_lf"}


def _zoo(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=K)


def _cost() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    a = torch.rand(K, K, generator=g)
    cost = (a + a.T) / 2
    cost.fill_diagonal_(0.0)
    return cost


@pytest.fixture
def scratch_names():
    """Names a test registers; removed from the registry afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        DISTILLERS.pop(name, None)
        registry_module._TEACHERS.pop(name, None)


def test_registration_order_and_old_names_kept():
    assert list(DISTILLERS) == ORDER
    missing = [n for n in OLD_PUBLIC if not hasattr(distillers, n)]
    assert not missing
    assert set(distillers.__all__) <= set(dir(distillers))
    assert {"FeatureDistiller", "register_distiller", "get_distiller"} <= set(distillers.__all__)


@pytest.mark.parametrize("name", ORDER)
def test_every_registered_name_builds_and_steps(name):
    cls = get_distiller(name)
    assert cls is DISTILLERS[name] and issubclass(cls, Distiller)
    assert issubclass(cls, FeatureDistiller) == (name in FEATURE_NAMES)
    s, t = _zoo("resnet8", 1), _zoo("resnet8x4", 2).eval()
    teachers = [t, _zoo("resnet8", 6)] if name == "ensemble_kd" else t
    kwargs = {"cost": _cost()} if name in ("wkd_l", "wkd_lf") else {}
    d = build_distiller(name, s, teachers, input_shape=IN8, **kwargs)
    assert type(d) is cls and d.num_classes == K
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, *IN8, generator=g), torch.randint(0, K, (8,), generator=g)
    logits, losses = d.forward_train(x, y)
    assert logits.shape == (8, K) and "ce" in losses and len(losses) >= 1
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    d.remove_hooks()


def test_registry_refuses_a_duplicate_name(scratch_names):
    @register_distiller("scratch_dup")
    class First(Distiller):
        pass

    scratch_names.append("scratch_dup")
    with pytest.raises(ValueError, match=r"'scratch_dup' is already registered \(to .*First\)"):

        @register_distiller("scratch_dup")
        class Second(Distiller):
            pass

    assert DISTILLERS["scratch_dup"] is First
    with pytest.raises(ValueError, match="'kd' is already registered"):
        register_distiller("kd")(First)
    assert DISTILLERS["kd"] is distillers.KD


def test_register_distiller_checks_its_arguments():
    with pytest.raises(ValueError, match="non-empty string"):
        register_distiller("")
    with pytest.raises(ValueError, match="teachers must be one of"):
        register_distiller("scratch_bad", teachers="two")
    with pytest.raises(TypeError, match="decorates Distiller subclasses"):
        register_distiller("scratch_bad")(torch.nn.Linear)
    assert "scratch_bad" not in DISTILLERS


def test_a_registered_class_is_built_by_name(scratch_names):
    @register_distiller("scratch_ce", teachers="optional")
    class ScratchCE(Distiller):
        def __init__(self, student, teacher=None, *, ce_weight: float = 2.0, input_shape=None) -> None:
            super().__init__(student, teacher, ce_weight=ce_weight, input_shape=input_shape)

    scratch_names.append("scratch_ce")
    d = build_distiller("scratch_ce", _zoo("resnet8", 1), None, input_shape=IN8)
    assert isinstance(d, ScratchCE) and d.ce_weight == 2.0 and len(d.teachers) == 0
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['T'\]"):
        build_distiller("scratch_ce", _zoo("resnet8", 1), None, T=4.0)


def test_get_distiller_unknown_name():
    with pytest.raises(ValueError, match=r"unknown distiller 'crd'; valid names: ce, kd, lskd, .*, ensemble_kd$"):
        get_distiller("crd")
