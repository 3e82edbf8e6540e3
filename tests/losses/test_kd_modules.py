"""The ``ckakd.nn`` modules of the KD baselines (KDLoss, LSKDLoss, DKDLoss, DISTLoss, ATLoss, FitNetLoss): the
functional value times the weight, options validated in the constructor, the temperature's old spelling, and
the functional namespace re-exporting the one implementation."""

from __future__ import annotations

import typing

import pytest
import torch

import ckakd
import ckakd.functional as CF
from ckakd import feature_kd, logit_kd
from ckakd import nn as knn

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    y = torch.randint(0, 6, (5,), generator=g)
    fs, ft = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 4, 4, 4, generator=g)
    return zs, zt, y, fs, ft


def test_modules_equal_the_functional_losses():
    zs, zt, y, fs, ft = _data()
    assert torch.equal(knn.KDLoss(0.9, temperature=3.0)(zs, zt), 0.9 * CF.kd_loss(zs, zt, 3.0))
    assert torch.equal(knn.LSKDLoss(9.0)(zs, zt), 9.0 * CF.lskd_loss(zs, zt, 2.0))
    assert torch.equal(knn.DKDLoss(1.0, 8.0, temperature=4.0)(zs, zt, y), CF.dkd_loss(zs, zt, y, 1.0, 8.0, 4.0))
    assert torch.equal(knn.DISTLoss(2.0, 0.5, temperature=4.0)(zs, zt), CF.dist_loss(zs, zt, 2.0, 0.5, 4.0))
    assert torch.equal(knn.ATLoss(1000.0)(fs, ft), 1000.0 * CF.at_loss(fs, ft))
    pairs = knn.ATLoss(2.0, p=3.0)([fs, fs], [ft, fs])
    torch.testing.assert_close(pairs, 2.0 * (CF.at_loss(fs, ft, 3.0) + CF.at_loss(fs, fs, 3.0)))
    f4 = torch.randn(5, 4, 8, 8)
    assert torch.equal(knn.FitNetLoss(0.5)(f4, ft), 0.5 * CF.fitnet_loss(f4, ft))
    none = knn.DKDLoss(reduction="none")(zs, zt, y)
    assert none.shape == (5,) and torch.equal(none, CF.dkd_loss(zs, zt, y, reduction="none"))
    assert knn.KDLoss(reduction="sum")(zs, zt).shape == ()


def test_gradients_flow_to_the_student_only():
    zs, zt, y, _, _ = _data()
    zs = zs.clone().requires_grad_()
    knn.DKDLoss()(zs, zt, y).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and not zt.requires_grad


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda: knn.KDLoss(temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: knn.KDLoss(-1.0), ValueError, "weight must be >= 0"),
        (lambda: knn.KDLoss(standardize=1), TypeError, "standardize must be a bool"),
        (lambda: knn.LSKDLoss(reduction="avg"), ValueError, "reduction must be one of 'mean', 'sum', 'none'"),
        (lambda: knn.DKDLoss(alpha=float("nan")), ValueError, "alpha must be a finite number"),
        (lambda: knn.DKDLoss(temperature=-2.0), ValueError, "temperature must be > 0"),
        (lambda: knn.DISTLoss(gamma="1"), TypeError, "gamma must be a real number"),
        (lambda: knn.ATLoss(p=0.0), ValueError, "p must be > 0"),
        (lambda: knn.FitNetLoss(reduction="batchmean"), ValueError, "reduction must be one of"),
        (lambda: knn.WKDFeatureLoss(reduction="x"), ValueError, "reduction must be one of"),
        (lambda: knn.WKDLogitLoss(torch.zeros(3, 3), reduction="x"), ValueError, "reduction must be one of"),
    ],
)
def test_constructors_validate(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize("cls", [knn.KDLoss, knn.LSKDLoss, knn.DKDLoss, knn.DISTLoss])
def test_old_temperature_spelling_warns(cls):
    with pytest.warns(DeprecationWarning, match=f"{cls.__name__}: the argument 'T' is deprecated, use 'temperature'"):
        module = cls(T=3.0)
    assert module.temperature == 3.0 and "temperature=3.0" in repr(module)
    with pytest.raises(TypeError, match="both 'temperature'"):
        cls(T=3.0, temperature=3.0)


def test_one_implementation_behind_every_name():
    for name in ("kd_loss", "lskd_loss", "dkd_loss", "dist_loss", "standardize_logits"):
        assert getattr(CF, name) is getattr(logit_kd, name) is getattr(ckakd, name)
    for name in ("at_loss", "fitnet_loss"):
        assert getattr(CF, name) is getattr(feature_kd, name) is getattr(ckakd, name)
    for name in ("KDLoss", "LSKDLoss", "DKDLoss", "DISTLoss", "ATLoss", "FitNetLoss"):
        assert name in knn.__all__ and issubclass(getattr(knn, name), torch.nn.Module)


def test_literal_types_match_the_checked_choices():
    from ckakd._checks import REDUCTIONS, Reduction
    from ckakd.ops._backend import BACKENDS, SINKHORN_BACKENDS
    from ckakd.ops.alignment_stats import MODES
    from ckakd.ops.patch_alignment_stats import REDUCTIONS as PATCH_PROBLEMS
    from ckakd.wasserstein import COVARIANCES, Covariance
    from ckakd.wkd import SinkhornBackend

    assert typing.get_args(Reduction) == REDUCTIONS
    assert typing.get_args(CF.CKAMode) == tuple(MODES)
    assert typing.get_args(CF.Backend) == BACKENDS
    assert typing.get_args(CF.PatchProblems) == tuple(PATCH_PROBLEMS)
    assert typing.get_args(CF.PatchReduce) == tuple(PATCH_PROBLEMS) + ("mix",)
    assert typing.get_args(CF.PatchResize) == CF.PATCH_RESIZE
    assert typing.get_args(Covariance) == COVARIANCES
    assert typing.get_args(SinkhornBackend) == SINKHORN_BACKENDS
    hints = typing.get_type_hints(logit_kd.kd_loss)
    assert hints["reduction"] == Reduction
