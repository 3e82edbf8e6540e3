"""The detection distillers in the shared distiller registry (``task="detection"``): names, the factory, extras."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ckakd.detection.distillers import DISTILL_METHODS, DetectionDistiller, detection_distiller
from ckakd.detection.models import RetinaNet
from ckakd.train.distillers import DISTILLERS, Distiller
from ckakd.train.distillers.registry import (
    build_distiller,
    distiller_name,
    get_distiller,
    register_distiller,
    registered_distillers,
)
from ckakd.train.engine.checkpoint import model_identity

PACKAGE = Path(__file__).resolve().parents[2] / "ckakd"
COST = torch.full((3, 3), 0.5).fill_diagonal_(0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(out_channels: int = 8, seed: int = 0) -> RetinaNet:
    torch.manual_seed(seed)
    return RetinaNet(3, depth=18, width=8, out_channels=out_channels, num_convs=1, levels=(3, 4, 5))


def kwargs_for(method: str) -> dict:
    return {"cost": COST} if method in ("wkd_l", "wkd_lf") else {}


def test_every_detection_method_is_registered_under_the_detection_task():
    assert DISTILL_METHODS == (
        "none",
        "pcka",
        "pcka_mimic",
        "kd_patch",
        "at_patch",
        "dist_patch",
        "mmd_patch",
        "wkd_f",
        "wkd_l",
        "wkd_lf",
    )
    table = registered_distillers("detection")
    assert tuple(table) == DISTILL_METHODS
    for name, cls in table.items():
        assert issubclass(cls, DetectionDistiller) and issubclass(cls, Distiller)
        assert get_distiller(name, "detection") is cls and distiller_name(cls, "detection") == name
    # the classification table is untouched: no detection class in it, and shared names mean different classes
    assert not any(issubclass(c, DetectionDistiller) for c in DISTILLERS.values())
    for name in ("wkd_l", "wkd_f", "wkd_lf"):
        assert get_distiller(name) is not get_distiller(name, "detection")
    assert registered_distillers() == DISTILLERS


@pytest.mark.parametrize("method", DISTILL_METHODS)
def test_the_three_ways_of_building_give_the_same_distiller(method):
    built = []
    for build in (
        lambda s, t: DetectionDistiller(s, t, method=method, **kwargs_for(method)),
        lambda s, t: detection_distiller(s, t, method=method, **kwargs_for(method)),
        lambda s, t: build_distiller(method, s, t, task="detection", **kwargs_for(method)),
    ):
        d = build(tiny(8), tiny(16, seed=1))
        assert type(d) is get_distiller(method, "detection") and isinstance(d, DetectionDistiller)
        assert d.method == method
        built.append(d)
    states = [(d.extra.state_dict() if d.extra is not None else {}) for d in built]
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)


@pytest.mark.parametrize("method", DISTILL_METHODS)
def test_projectors_are_reported_as_extra_parameters(method):
    student, teacher = tiny(8), tiny(16, seed=1)  # channels differ
    d = DetectionDistiller(student, teacher, method=method, **kwargs_for(method))
    has_projector = method not in ("none", "wkd_l")
    assert (d.extra is not None) == has_projector
    assert d.extra_parameters() == ([d.extra] if has_projector else [])
    n_extra = sum(p.numel() for p in d.extra.parameters()) if has_projector else 0
    assert d.num_extra_parameters() == n_extra
    learnable = list(d.learnable_parameters())
    assert learnable == [*student.parameters(), *(d.extra.parameters() if has_projector else [])]
    assert not any(p.requires_grad for p in teacher.parameters())
    # what the trainer optimizes is what it optimized before: the trainable parameters in module order
    assert [id(p) for p in learnable] == [id(p) for p in d.parameters() if p.requires_grad]


def test_same_channels_build_no_projector_except_for_mimic():
    for method in DISTILL_METHODS:
        d = DetectionDistiller(tiny(8), tiny(8, seed=1), method=method, **kwargs_for(method))
        assert (d.extra is not None) == (method == "pcka_mimic"), method


def test_options_of_other_methods_and_unknown_options_are_refused():
    s, t = tiny(), tiny(seed=1)
    with pytest.raises(ValueError, match=r"mimic_weight: PCKA options \(pcka_mimic\); method='kd_patch'"):
        DetectionDistiller(s, t, method="kd_patch", mimic_weight=1.0)
    with pytest.raises(ValueError, match=r"temperature: WKD-L options \(wkd_l, wkd_lf\); method='pcka'"):
        DetectionDistiller(s, t, method="pcka", temperature=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        DetectionDistiller(s, t, method="pcka", nope=1)
    with pytest.raises(ValueError, match="method must be one of"):
        DetectionDistiller(s, t, method="kd")  # a classification name
    with pytest.raises(ValueError, match="unknown detection distiller 'kd'"):
        build_distiller("kd", s, t, task="detection")


def test_a_name_is_unique_per_task_only():
    with pytest.raises(ValueError, match="already registered for task 'detection'"):
        register_distiller("pcka", task="detection")(type("Again", (DetectionDistiller,), {}))
    with pytest.raises(ValueError, match="no distillers are registered for task 'segmentation'"):
        get_distiller("pcka", "segmentation")
    assert registered_distillers("segmentation") == {}


def test_no_method_string_switch_remains_in_the_detection_package():
    """The methods are classes: no ``method == "..."`` / ``method in (...)`` comparison in ckakd/detection."""
    hits = []
    for path in sorted((PACKAGE / "detection").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                names = [n for n in (node.left, *node.comparators) if isinstance(n, ast.Attribute | ast.Name)]
                if any((n.attr if isinstance(n, ast.Attribute) else n.id) == "method" for n in names) and any(
                    isinstance(c, ast.Constant)
                    and isinstance(c.value, str)
                    or isinstance(c, ast.Tuple | ast.List | ast.Set)
                    for c in (node.left, *node.comparators)
                ):
                    hits.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not hits, hits


@pytest.mark.parametrize("method", ["none", "pcka_mimic", "wkd_lf"])
def test_checkpoints_record_every_method_as_detection_distiller(method):
    """The identity a checkpoint records is the one the single class had: older checkpoints still resume."""
    d = DetectionDistiller(tiny(8), tiny(16, seed=1), method=method, **kwargs_for(method))
    assert model_identity(d) == {"model": "DetectionDistiller", "student": "RetinaNet"}
