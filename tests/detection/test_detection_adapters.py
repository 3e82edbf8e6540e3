"""torchvision detectors (RetinaNet, FCOS, Faster R-CNN) behind ckakd's detector protocol.

torchvision comes from a plain import where it works (the GPU machine); otherwise, with
``CKAKD_TORCHVISION_SHIM=1``, from ``tests/torchvision_shim.py`` (torchvision's Python code with pure-PyTorch
``nms`` / ``roi_align`` operators); otherwise these tests skip. Models are tiny (ResNet-18/34 + 64-channel FPN,
64x64 images) so the whole file runs on a CPU.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from ckakd.detection.adapters import (
    TORCHVISION_DETECTORS,
    TorchvisionDetector,
    build_torchvision_detector,
    from_torchvision_labels,
    to_torchvision_labels,
    torchvision_available,
)
from tests.torchvision_shim import load_torchvision

K = 10
ARCHS = ("retinanet", "fcos", "fasterrcnn")
LOSS_KEYS = {
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "fasterrcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
}


@pytest.fixture(scope="module")
def tv():
    module, how = load_torchvision()
    if module is None:
        pytest.skip(how)
    return module


def build(arch: str, net: str = "resnet18", **kwargs) -> TorchvisionDetector:
    kwargs.setdefault("fpn_channels", 64)
    return build_torchvision_detector(f"{arch}_{net}_fpn", K, min_size=64, max_size=64, **kwargs)


def batch(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 64, 64, generator=g)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0], [30.0, 28.0, 60.0, 58.0]]), "labels": torch.tensor([0, 3])},
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([K - 1])},
    ][:b]
    return images, targets


def tv_targets(targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


def silence_background(m: TorchvisionDetector) -> None:
    """Make torchvision's background column (0) of a dense head never score, so that torchvision's own
    post-processing (which considers it) and the adapter's (which leaves it out) see the same candidates."""
    conv = m.model.head.classification_head.cls_logits
    with torch.no_grad():
        conv.bias.view(-1, K + 1)[:, 0] = -1e4


# ------------------------------------------------------------------------------- without torchvision


def test_import_does_not_import_torchvision():
    code = (
        "import sys, ckakd.detection, ckakd.detection.adapters, ckakd.detection.trainer; "
        "assert 'torchvision' not in sys.modules, sorted(m for m in sys.modules if 'torchvision' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_missing_torchvision_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now raises ImportError
    assert torchvision_available() is False
    with pytest.raises(ImportError, match="pip install torchvision matching your torch"):
        build_torchvision_detector("retinanet_resnet50_fpn", 3)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="retinanet_resnet50_fpn") as err:
        build_torchvision_detector("yolo_v8", 3)
    assert "name must be one of" in str(err.value) and "fasterrcnn_mobilenet_v3_large_fpn" in str(err.value)
    with pytest.raises(ValueError, match="num_classes"):
        build_torchvision_detector("retinanet_resnet50_fpn", 0)


def test_label_mapping_round_trip():
    labels = torch.tensor([0, 3, K - 1])
    tv_labels = to_torchvision_labels(labels)
    assert tv_labels.tolist() == [1, 4, K]
    assert torch.equal(from_torchvision_labels(tv_labels), labels)
    with pytest.raises(ValueError, match="background"):
        from_torchvision_labels(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=">= 0"):
        to_torchvision_labels(torch.tensor([-1]))


# ---------------------------------------------------------------------------------- with torchvision


@pytest.mark.parametrize("arch", ARCHS)
def test_training_losses_are_torchvisions_and_backward(tv, arch):
    torch.manual_seed(0)
    m = build(arch).train()
    images, targets = batch()
    torch.manual_seed(1)
    for _ in images:  # torchvision's training transform first draws a resize size per image
        torch.empty(1).uniform_()
    ours = m(images, targets)
    torch.manual_seed(1)
    theirs = m.model(list(images), tv_targets(targets))  # min_size = max_size = 64: no resize
    assert set(ours) == LOSS_KEYS[arch] == set(theirs)
    for k in ours:
        assert torch.isfinite(ours[k]), k
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    sum(ours.values()).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match=r"labels'\] must lie in \[0, 10\)"):
        m(images, [{"boxes": targets[0]["boxes"], "labels": torch.tensor([0, K])}, targets[1]])


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_detections_are_torchvisions_with_zero_based_labels(tv, arch):
    torch.manual_seed(0)
    thresh = {"box_score_thresh": 0.0} if arch == "fasterrcnn" else {"score_thresh": 0.0, "topk_candidates": 100}
    m = build(arch, **thresh).eval()
    if arch != "fasterrcnn":
        silence_background(m)
    images, _ = batch()
    ours = m(images)
    theirs = m.model(list(images))
    n = 0
    for o, t in zip(ours, theirs, strict=True):
        assert set(o) == {"boxes", "scores", "labels"} and o["labels"].dtype == torch.long
        torch.testing.assert_close(o["labels"], t["labels"] - 1)
        torch.testing.assert_close(o["boxes"], t["boxes"])
        torch.testing.assert_close(o["scores"], t["scores"])
        n += o["labels"].numel()
    assert n > 0
    sizes = [(64, 48), (40, 64)]
    for o, (h, w) in zip(m(images, image_sizes=sizes), sizes, strict=True):
        assert o["labels"].numel() > 0
        assert 0 <= int(o["labels"].min()) and int(o["labels"].max()) < K
        b = o["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_features_are_what_the_hook_path_sees(tv, arch):
    from ckakd.train.hooks import FeatureHooks

    m = build(arch).train()
    images, _ = batch()
    with FeatureHooks(m, m.feature_names) as hooks:
        feats = m.features(images)
        seen = hooks[m.feature_names[0]]
    assert list(seen.values()) == feats == m.hooked_levels(seen)  # the very same tensors
    expect_levels = (2, 3, 4, 5, 6) if arch == "fasterrcnn" else (3, 4, 5, 6, 7)
    assert m.levels == expect_levels and m.strides == tuple(2**lv for lv in expect_levels)
    assert m.num_levels == len(feats) == 5 and m.fpn_channels == 64 and m.backbone is m.model.backbone
    for f, s in zip(feats, m.strides, strict=True):
        assert f.shape == (2, 64, math.ceil(64 / s), math.ceil(64 / s))


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_dense_cls_logits_per_level(tv, arch):
    m = build(arch).eval()
    images, _ = batch()
    with torch.no_grad():
        feats = m.features(images)
        outs = m.head_outputs(feats)
        raw = m.model.head(feats)
    a = 9 if arch == "retinanet" else 1
    for key, width in (("cls_logits", K), ("background_logits", 1), ("box_regression", 4)):
        assert [o.shape for o in outs[key]] == [(2, f.shape[-2] * f.shape[-1] * a, width) for f in feats], key
    torch.testing.assert_close(torch.cat(outs["cls_logits"], 1), raw["cls_logits"][..., 1:])
    torch.testing.assert_close(torch.cat(outs["background_logits"], 1), raw["cls_logits"][..., :1])
    if arch == "fcos":
        assert [o.shape for o in outs["centerness"]] == [(2, f.shape[-2] * f.shape[-1], 1) for f in feats]


def test_faster_rcnn_head_outputs_are_the_rpn(tv):
    m = build("fasterrcnn").train()
    images, targets = batch()
    feats = m.features(images)
    outs = m.head_outputs(feats)
    assert set(outs) == {"objectness", "rpn_box_regression"}  # no dense class logits
    assert [o.shape for o in outs["objectness"]] == [(2, f.shape[-2] * f.shape[-1] * 3, 1) for f in feats]
    m.eval()
    with pytest.raises(RuntimeError, match="training mode"):
        m.compute_losses(outs, feats, images, targets)


@pytest.mark.parametrize("arch", ARCHS)
def test_distiller_pcka_between_torchvision_detectors(tv, arch):
    from ckakd.detection.trainer import DetectionDistiller

    torch.manual_seed(0)
    student, teacher = build(arch, "resnet18"), build(arch, "resnet34")  # bigger teacher, same FPN width
    distiller = DetectionDistiller(student, teacher, method="pcka").train()
    assert distiller.extra is None and not teacher.training
    images, targets = batch()
    losses = distiller.forward_train(images, targets)
    assert set(losses) == LOSS_KEYS[arch] | {"distill"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["distill"]) > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.backbone.body.layer1[0].conv1.weight.grad is not None


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_distiller_wkd_l_on_torchvision_cls_logits(tv, arch):
    import ckakd
    from ckakd.detection.trainer import DetectionDistiller

    torch.manual_seed(0)
    student, teacher = build(arch, "resnet18"), build(arch, "resnet34")
    ir = torch.full((K, K), 0.2).fill_diagonal_(1.0)
    distiller = DetectionDistiller(
        student, teacher, method="wkd_l", cost=ckakd.cost_from_interrelation(ir), score_thresh=0.0
    ).train()
    images, targets = batch()
    losses = distiller.forward_train(images, targets)
    assert "distill" in losses and all(torch.isfinite(v) for v in losses.values())
    assert float(losses["distill"]) > 0
    sum(losses.values()).backward()


def test_own_retinanet_student_with_a_torchvision_teacher(tv):
    from ckakd.detection.models import RetinaNet
    from ckakd.detection.trainer import DetectionDistiller

    torch.manual_seed(0)
    teacher = build("retinanet", "resnet34")
    student = RetinaNet(K, depth=18, width=16, out_channels=64, num_convs=1)
    assert student.num_levels == teacher.num_levels and student.strides == teacher.strides
    distiller = DetectionDistiller(student, teacher, method="pcka").train()
    images, targets = batch()
    losses = distiller.forward_train(images, targets)
    assert {"cls", "box", "distill"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    three = RetinaNet(K, depth=18, width=16, out_channels=64, num_convs=1, levels=(3, 4, 5))
    with pytest.raises(ValueError, match="same number of FPN levels"):
        DetectionDistiller(three, teacher, method="pcka")


def test_evaluate_detector_gives_the_coco_metrics(tv):
    pytest.importorskip("sklearn")
    pytest.importorskip("pycocotools")
    from ckakd.detection.data import SyntheticDigitsDetection
    from ckakd.detection.evaluation import METRIC_NAMES
    from ckakd.detection.trainer import evaluate_detector

    torch.manual_seed(0)
    m = build("retinanet", score_thresh=0.0)
    data = SyntheticDigitsDetection(4, image_size=64, max_objects=2, scales=(16, 32), split="val")
    metrics = evaluate_detector(m, data, batch_size=2)
    assert set(metrics) == set(METRIC_NAMES)
    assert all(isinstance(v, float) and math.isfinite(v) and -1.0 <= v <= 1.0 for v in metrics.values())
    assert m.training  # mode restored


def test_builder_arguments(tv):
    with pytest.raises(ValueError, match="fpn_channels is only for the composed names"):
        build_torchvision_detector("retinanet_resnet50_fpn", 3, fpn_channels=64)
    with pytest.raises(ValueError, match="weights"):
        build_torchvision_detector("retinanet_resnet18_fpn", 3, weights="DEFAULT")
    with pytest.raises(TypeError, match="RetinaNet, FCOS or FasterRCNN"):
        TorchvisionDetector(torch.nn.Linear(2, 2))
    m = build("fasterrcnn", trainable_backbone_layers=2)  # ignored without weights, as in torchvision
    assert all(p.requires_grad for p in m.model.backbone.body.parameters())
    assert len(TORCHVISION_DETECTORS) == len(set(TORCHVISION_DETECTORS))


@pytest.mark.parametrize(
    ("name", "strides"),
    [
        ("retinanet_resnet50_fpn", (8, 16, 32, 64, 128)),
        ("retinanet_resnet50_fpn_v2", (8, 16, 32, 64, 128)),
        ("fcos_resnet50_fpn", (8, 16, 32, 64, 128)),
        ("fasterrcnn_resnet50_fpn", (4, 8, 16, 32, 64)),
        ("fasterrcnn_mobilenet_v3_large_fpn", (32, 32, 64)),
    ],
)
def test_torchvision_builders_without_downloads(tv, name, strides):
    torch.manual_seed(0)
    m = build_torchvision_detector(name, 3).eval()  # weights=None, weights_backbone=None: nothing fetched
    assert m.num_classes == 3 and m.strides == strides and m.fpn_channels == 256
    out = m(torch.rand(1, 3, 64, 64))
    assert len(out) == 1 and (out[0]["labels"] < 3).all() and (out[0]["labels"] >= 0).all()


# ------------------------------------------------------------------------------------ the shim itself


@pytest.fixture(scope="module")
def shim(tv):
    import tests.torchvision_shim as ts

    if not ts.SHIM_ACTIVE:
        pytest.skip("torchvision imports natively: the test shim is not in use")
    return ts


def test_shim_roi_align_matches_torchvision_python_reference(shim, tv):
    from torchvision.ops import roi_align
    from torchvision.ops.roi_align import _roi_align

    _roi_align = getattr(_roi_align, "__wrapped__", _roi_align)  # the eager function, not its torch.compile

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, generator=g)
    xy = torch.rand(12, 2, dtype=torch.float64, generator=g) * 20
    rois = torch.cat(
        [
            torch.randint(0, 2, (12, 1), generator=g).double(),
            xy,
            xy + 1 + 18 * torch.rand(12, 2, dtype=torch.float64, generator=g),
        ],
        1,
    )
    for sampling_ratio in (-1, 2):
        for aligned in (False, True):
            ours = torch.ops.torchvision.roi_align(x, rois, 0.25, 5, 4, sampling_ratio, aligned)
            torch.testing.assert_close(ours, _roi_align(x, rois, 0.25, 5, 4, sampling_ratio, aligned))
    xr = x[:, :1].clone().requires_grad_()  # the backward op (_roi_align_backward) against finite differences
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (5, 4), 0.25, -1, True), (xr,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (3, 3), 0.25, 2, False), (xr,), fast_mode=True)
    outside = torch.tensor([[0.0, -20.0, -20.0, -8.0, -8.0]], dtype=torch.float64)  # C++: samples < -1 give 0
    assert torch.equal(
        torch.ops.torchvision.roi_align(x, outside, 0.25, 2, 2, -1, False), torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    )


def test_shim_nms_is_greedy_nms(shim, tv):
    from torchvision.ops import box_iou, nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 1 + 20 * torch.rand(200, 2, generator=g)], 1)
    scores = torch.rand(200, generator=g)
    keep: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        if all(float(box_iou(boxes[i : i + 1], boxes[j : j + 1])) <= 0.5 for j in keep):
            keep.append(i)
    assert nms(boxes, scores, 0.5).tolist() == keep
    assert nms(boxes[:0], scores[:0], 0.5).shape == (0,)
