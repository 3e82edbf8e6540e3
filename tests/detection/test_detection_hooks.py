"""DetectionDistiller's feature capture by forward hooks on module paths (defaults: the FPN levels)."""

from __future__ import annotations

import pytest
import torch

from ckakd.detection.data import SyntheticDigitsDetection, make_detection_loader
from ckakd.detection.distill import pcka_loss
from ckakd.detection.models import FCOS, RetinaNet
from ckakd.detection.trainer import DetectionDistiller


def tiny(cls=RetinaNet, width: int = 8, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(10, depth=18, width=width, out_channels=16, num_convs=1, **kw)


@pytest.fixture(scope="module")
def batch():
    data = SyntheticDigitsDetection(4, image_size=64, max_objects=2, scales=(16, 32))
    return next(iter(make_detection_loader(data, 4, False, 0)))


def test_default_paths_are_the_fpn_levels_and_match_explicit_ones(batch, one_thread):
    images, targets, sizes = batch
    student, teacher = tiny(), tiny(width=16, seed=1)
    d = DetectionDistiller(student, teacher, method="pcka")
    assert d.feature_paths_s == [f"backbone.fpn_levels.{i}" for i in range(5)] == d.feature_paths_t
    torch.manual_seed(0)
    default = d.forward_train(images, targets, sizes)
    explicit = DetectionDistiller(
        student, teacher, method="pcka", feature_paths_s=d.feature_paths_s, feature_paths_t=d.feature_paths_t
    ).forward_train(images, targets, sizes)
    for k in default:
        assert torch.equal(default[k], explicit[k]), k
    # and the value is PCKA on the FPN levels themselves (P6, P7 of a 64x64 image have one position: skipped)
    with torch.no_grad():
        f_s, f_t = student.features(images), teacher.features(images)
    ref = pcka_loss(f_s[:3], f_t[:3], patch_size=(4, 4), reduce="channel", gamma=10.0)
    torch.testing.assert_close(default["distill"], ref)


def test_backbone_stage_paths_get_a_projector_and_gradients(batch, one_thread):
    images, targets, sizes = batch
    student, teacher = tiny(), tiny(width=16, seed=1)
    d = DetectionDistiller(
        student, teacher, method="pcka", feature_paths_s=["backbone.layer3"], feature_paths_t=["backbone.layer3"]
    )
    assert d.channels_differ and d.extra is not None  # layer3: 4*8=32 vs 4*16=64 channels
    assert d.extra.proj[0].weight.shape[:2] == (64, 32)
    losses = d.forward_train(images, targets, sizes)
    losses["distill"].backward()
    assert student.backbone.layer3[0].conv1.weight.grad.abs().sum() > 0
    assert student.backbone.layer4[0].conv1.weight.grad is None  # PCKA on layer3 does not reach layer4
    assert all(p.grad is None for p in teacher.parameters())


def test_fcos_student_retinanet_teacher_on_a_subset_of_levels(batch, one_thread):
    images, targets, sizes = batch
    student, teacher = tiny(FCOS), tiny(width=16, seed=1, levels=(3, 4, 5, 6))
    paths = ["backbone.fpn_levels.0", "backbone.fpn_levels.1"]
    with pytest.raises(ValueError, match="same number of FPN levels"):
        DetectionDistiller(student, teacher, method="pcka")
    d = DetectionDistiller(student, teacher, method="pcka_mimic", feature_paths_s=paths, feature_paths_t=paths)
    losses = d.forward_train(images, targets, sizes)
    assert {"cls", "box", "centerness", "distill", "mimic"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_bad_paths_are_named(one_thread):
    student, teacher = tiny(), tiny(seed=1)
    with pytest.raises((ValueError, AttributeError), match="backbone.nope"):
        DetectionDistiller(student, teacher, feature_paths_s=["backbone.nope"], feature_paths_t=["backbone.layer3"])
    with pytest.raises(ValueError, match="pair up"):
        DetectionDistiller(
            student,
            teacher,
            feature_paths_s=["backbone.layer2", "backbone.layer3"],
            feature_paths_t=["backbone.layer3"],
        )
    with pytest.raises(TypeError, match="DenseDetector protocol"):
        DetectionDistiller(torch.nn.Linear(2, 2), teacher)


def test_old_path_spelling_warns_and_builds_the_same(one_thread):
    """The hook paths are ``feature_paths_s`` / ``feature_paths_t`` as in the classification distillers; the old
    ``student_paths`` / ``teacher_paths`` still work (from Python and through the registry), with a warning."""
    from ckakd.train.distillers.registry import build_distiller

    student, teacher = tiny(), tiny(width=16, seed=1)
    paths = ["backbone.layer3"]
    with pytest.warns(DeprecationWarning, match="'student_paths' is deprecated, use 'feature_paths_s'"):
        old = DetectionDistiller(student, teacher, method="pcka", student_paths=paths, teacher_paths=paths)
    assert old.feature_paths_s == paths == old.feature_paths_t
    with pytest.warns(DeprecationWarning, match="'teacher_paths' is deprecated, use 'feature_paths_t'"):
        built = build_distiller("pcka", student, teacher, task="detection", student_paths=paths, teacher_paths=paths)
    assert built.feature_paths_t == paths
    with pytest.raises(TypeError, match="both 'feature_paths_s' and its deprecated spelling 'student_paths'"):
        DetectionDistiller(student, teacher, method="pcka", student_paths=paths, feature_paths_s=paths)
