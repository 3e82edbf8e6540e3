"""Tests for ckakd.detection.boxes and ckakd.detection.models (tiny images and widths, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from ckakd.detection.boxes import (
    BoxCoder,
    box_area,
    box_iou,
    clip_boxes,
    generalized_box_iou,
    giou_loss,
    iou_loss,
    remove_small_boxes,
    sigmoid_focal_loss,
)
from ckakd.detection.models import (
    FCOS,
    AnchorGenerator,
    AnchorMatcher,
    ResNetFPN,
    RetinaNet,
    fcos_assign,
    fcos_centerness_targets,
    fcos_points,
)


def _random_boxes(n: int, seed: int, size: float = 100.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * size / 2 + 1.0
    return torch.cat([xy, xy + wh], dim=1)


def _pair_iou(a: list[float], b: list[float]) -> tuple[float, float]:
    """Direct IoU and GIoU of two xyxy boxes (plain Python)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / union
    return iou, iou - (c - union) / c


# ---------------------------------------------------------------------------------------------- boxes


def test_box_coder_round_trip_and_clamp() -> None:
    anchors = _random_boxes(200, 0, dtype=torch.float64)
    boxes = _random_boxes(200, 1, dtype=torch.float64)
    coder = BoxCoder()
    deltas = coder.encode(anchors, boxes)
    torch.testing.assert_close(coder.decode(anchors, deltas), boxes, rtol=0, atol=1e-9)
    # known value: same center, twice the width -> (0, 0, log 2, 0)
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[-5.0, 0.0, 15.0, 10.0]])
    torch.testing.assert_close(coder.encode(a, b), torch.tensor([[0.0, 0.0, math.log(2.0), 0.0]]))
    # a huge dw is clamped at log(1000/16): width = 10 * 1000 / 16, finite
    wild = coder.decode(a, torch.tensor([[0.0, 0.0, 1e4, 0.0]]))
    assert torch.isfinite(wild).all()
    assert float(wild[0, 2] - wild[0, 0]) == pytest.approx(10.0 * 1000 / 16, rel=1e-5)


def test_box_iou_and_giou_match_direct_formulas() -> None:
    b1, b2 = _random_boxes(7, 2), _random_boxes(5, 3)
    iou, giou = box_iou(b1, b2), generalized_box_iou(b1, b2)
    assert iou.shape == giou.shape == (7, 5)
    for i in range(7):
        for j in range(5):
            ref_iou, ref_giou = _pair_iou(b1[i].tolist(), b2[j].tolist())
            assert float(iou[i, j]) == pytest.approx(ref_iou, abs=1e-6)
            assert float(giou[i, j]) == pytest.approx(ref_giou, abs=1e-6)
    # hand-made: [0,0,2,2] vs [1,1,3,3]: IoU 1/7, enclosing area 9 -> GIoU 1/7 - 2/9
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert float(box_iou(a, b)) == pytest.approx(1 / 7)
    assert float(generalized_box_iou(a, b)) == pytest.approx(1 / 7 - 2 / 9)
    assert box_area(a).tolist() == [4.0]
    with pytest.raises(ValueError, match="boxes1"):
        box_iou(torch.zeros(3, 5), b)


def test_iou_and_giou_losses_on_matched_pairs() -> None:
    b1, b2 = _random_boxes(9, 4), _random_boxes(9, 5)
    torch.testing.assert_close(iou_loss(b1, b2), 1 - torch.diagonal(box_iou(b1, b2)), atol=1e-6, rtol=0)
    torch.testing.assert_close(giou_loss(b1, b2), 1 - torch.diagonal(generalized_box_iou(b1, b2)), atol=1e-6, rtol=0)
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert float(giou_loss(a, b, reduction="sum")) == pytest.approx(1 - (1 / 7 - 2 / 9), abs=1e-6)
    assert float(giou_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    far = torch.tensor([[10.0, 10.0, 12.0, 12.0]])
    assert float(giou_loss(a, far)) > 1.0  # disjoint: GIoU < 0
    assert float(giou_loss(b1, b2, reduction="mean")) == pytest.approx(float(giou_loss(b1, b2).mean()), abs=1e-6)
    with pytest.raises(ValueError, match="matched pairs"):
        giou_loss(b1, b2[:3])


def test_sigmoid_focal_loss_matches_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g) * 3
    targets = (torch.rand(6, 4, generator=g) > 0.7).float()
    out = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    for i in range(6):
        for j in range(4):
            p = 1 / (1 + math.exp(-float(logits[i, j])))
            if targets[i, j] == 1:
                ref = -0.25 * (1 - p) ** 2 * math.log(p)
            else:
                ref = -0.75 * p**2 * math.log(1 - p)
            assert float(out[i, j]) == pytest.approx(ref, rel=1e-4, abs=1e-7)
    assert float(sigmoid_focal_loss(logits, targets, reduction="sum")) == pytest.approx(float(out.sum()), rel=1e-5)
    assert float(sigmoid_focal_loss(logits, targets, reduction="mean")) == pytest.approx(float(out.mean()), rel=1e-5)
    # gamma = 0, alpha < 0: plain BCE
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0), bce)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(logits, targets, reduction="avg")


def test_clip_and_remove_small_boxes() -> None:
    boxes = torch.tensor([[-5.0, -2.0, 30.0, 70.0], [10.0, 10.0, 10.5, 20.0], [1.0, 1.0, 4.0, 4.0]])
    clipped = clip_boxes(boxes, (50, 20))
    assert clipped[0].tolist() == [0.0, 0.0, 20.0, 50.0]
    assert remove_small_boxes(boxes, 1.0).tolist() == [0, 2]


# -------------------------------------------------------------------------------------- anchors / points


def test_anchor_generator_counts_sizes_and_positions() -> None:
    gen = AnchorGenerator.retinanet()
    assert gen.num_anchors_per_location == [9] * 5
    assert gen.sizes[0][0] == 32 and gen.sizes[-1][0] == 512
    assert gen.sizes[0][1] == pytest.approx(32 * 2 ** (1 / 3))
    cell = gen.cell_anchors(0)
    wh = cell[:, 2:] - cell[:, :2]
    areas = (wh[:, 0] * wh[:, 1]).view(3, 3)  # ratio-major, scale-minor
    torch.testing.assert_close(areas, torch.tensor(gen.sizes[0]).pow(2).expand(3, 3).contiguous())
    torch.testing.assert_close((wh[:, 1] / wh[:, 0]).view(3, 3)[:, 0], torch.tensor([0.5, 1.0, 2.0]))
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    anchors = gen.grid_anchors(sizes)
    assert [a.shape[0] for a in anchors] == [h * w * 9 for h, w in sizes]
    # anchor (y=2, x=5, a=4) of level 0 is centered at (5*8, 2*8) and is the ratio-1 scale-1 anchor
    a = anchors[0][(2 * 12 + 5) * 9 + 4]
    assert ((a[:2] + a[2:]) / 2).tolist() == [40.0, 16.0]
    assert (a[2:] - a[:2]).tolist() == pytest.approx([gen.sizes[0][1]] * 2)


def test_anchor_matcher_hand_made() -> None:
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 14.0, 10.0]]
    )
    matcher = AnchorMatcher(0.5, 0.4, allow_low_quality_matches=True)
    # gt 0 equals anchor 1; gt 1 overlaps anchor 2 with IoU 0.25 only (low-quality match)
    gts = torch.tensor([[20.0, 20.0, 40.0, 40.0], [50.0, 50.0, 55.0, 55.0]])
    m = matcher(box_iou(gts, anchors))
    assert m.tolist() == [-1, 0, 1, -1]
    strict = AnchorMatcher(0.5, 0.4, allow_low_quality_matches=False)(box_iou(gts, anchors))
    assert strict.tolist() == [-1, 0, -1, -1]
    # IoU 100/140 = 0.714 (fg) for anchor 3, and [0,0,10,10] vs [0,0,10,22]: 100/220 = 0.4545 (ignored)
    gts2 = torch.tensor([[0.0, 0.0, 14.0, 10.0]])
    assert AnchorMatcher(0.8, 0.4, False)(box_iou(gts2, anchors)).tolist() == [-2, -1, -1, 0]
    assert matcher(box_iou(torch.zeros(0, 4), anchors)).tolist() == [-1] * 4
    # a gt that overlaps nothing claims no anchor even with low-quality matches
    assert matcher(box_iou(torch.tensor([[100.0, 100.0, 110.0, 110.0]]), anchors)).tolist() == [-1] * 4


def _assign(points, gts, stride=8, rng=(0.0, 64.0), radius=1.5):
    p = torch.tensor(points, dtype=torch.float32)
    n = p.shape[0]
    return fcos_assign(p, torch.full((n,), float(stride)), torch.tensor([rng] * n), torch.tensor(gts), radius).tolist()


def test_fcos_points_and_assignment() -> None:
    pts = fcos_points([(2, 3), (1, 1)], [8, 16])
    assert pts[0].tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert pts[1].tolist() == [[8, 8]]
    box = [[0.0, 0.0, 32.0, 32.0]]
    assert _assign([[12.0, 12.0], [40.0, 40.0]], box) == [0, -1]  # inside / outside
    big = [[0.0, 0.0, 60.0, 60.0]]  # center 30, center region radius 1.5 * 8 = 12
    assert _assign([[4.0, 4.0], [25.0, 35.0]], big) == [-1, 0]
    assert _assign([[4.0, 4.0]], big, radius=0.0) == [0]
    huge = [[0.0, 0.0, 200.0, 200.0]]  # max distance 100 at the center
    assert _assign([[100.0, 100.0]], huge, stride=32, rng=(0.0, 64.0)) == [-1]
    assert _assign([[100.0, 100.0]], huge, stride=32, rng=(64.0, 128.0)) == [0]
    # ambiguity: the smallest box wins whatever the order
    nested = [[0.0, 0.0, 60.0, 60.0], [20.0, 20.0, 40.0, 40.0]]
    assert _assign([[30.0, 30.0]], nested, radius=0.0) == [1]
    assert _assign([[30.0, 30.0]], nested[::-1], radius=0.0) == [0]
    assert _assign([[30.0, 30.0]], [[0.0, 0.0, 1.0, 1.0]]) == [-1]  # outside a tiny box
    assert fcos_assign(torch.zeros(3, 2), torch.ones(3), torch.zeros(3, 2), torch.zeros(0, 4)).tolist() == [-1] * 3
    ctr = fcos_centerness_targets(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 3.0, 1.0, 1.0]]))
    torch.testing.assert_close(ctr, torch.tensor([1.0, math.sqrt(1 / 3)]))


# ------------------------------------------------------------------------------------------- detectors


def _tiny(cls, **kw):
    torch.manual_seed(0)
    kw = {"out_channels": 16, "num_convs": 2, **kw}
    return cls(num_classes=3, depth=18, width=8, **kw)


@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (50, 70)])
def test_resnet_fpn_shapes_and_hook_paths(hw: tuple[int, int]) -> None:
    h, w = hw
    for depth in (18, 50):
        fpn = ResNetFPN(depth=depth, width=4, out_channels=16)
        feats = fpn(torch.randn(2, 3, h, w))
        assert [tuple(f.shape) for f in feats] == [
            (2, 16, math.ceil(h / 2**lv), math.ceil(w / 2**lv)) for lv in range(3, 8)
        ]
    det = _tiny(RetinaNet)
    seen: dict[str, torch.Tensor] = {}
    for name in det.feature_names:
        det.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    feats = det.features(torch.randn(1, 3, h, w))
    assert det.feature_names == [f"backbone.fpn_levels.{i}" for i in range(5)]
    for name, f in zip(det.feature_names, feats, strict=True):
        assert seen[name] is f


@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_detector_head_output_shapes(hw: tuple[int, int]) -> None:
    h, w = hw
    x = torch.randn(2, 3, h, w)
    for cls, a in ((RetinaNet, 9), (FCOS, 1)):
        det = _tiny(cls)
        feats = det.features(x)
        outs = det.head_outputs(feats)
        sizes = [
            (h // 2**lv) * (w // 2**lv)
            if h % 2**lv == 0 and w % 2**lv == 0
            else math.ceil(h / 2**lv) * math.ceil(w / 2**lv)
            for lv in range(3, 8)
        ]
        assert [tuple(t.shape) for t in outs["cls_logits"]] == [(2, s * a, 3) for s in sizes]
        assert [tuple(t.shape) for t in outs["box_regression"]] == [(2, s * a, 4) for s in sizes]
        if cls is FCOS:
            assert [tuple(t.shape) for t in outs["centerness"]] == [(2, s, 1) for s in sizes]
            assert all(bool((t > 0).all()) for t in outs["box_regression"])
        # focal-loss prior init: every logit starts near log(0.01 / 0.99)
        logit0 = torch.cat(outs["cls_logits"], dim=1).detach()
        assert float((torch.sigmoid(logit0) - 0.01).abs().max()) < 0.01


def _targets_with_empty() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 8.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_empty_targets_give_finite_losses_and_gradients() -> None:
    x = torch.randn(2, 3, 64, 64)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    for cls, keys in ((RetinaNet, {"cls", "box"}), (FCOS, {"cls", "box", "centerness"})):
        det = _tiny(cls).train()
        for tg in (empty, _targets_with_empty()):
            det.zero_grad()
            losses = det(x, tg)
            assert set(losses) == keys
            assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
            sum(losses.values()).backward()
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in det.parameters())
        assert det(x, empty)["box"].item() == 0.0


def test_bad_targets_raise() -> None:
    det = _tiny(RetinaNet).train()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="labels"):
        det(x, [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="one per image"):
        det(x, [])
    with pytest.raises(ValueError, match="depth"):
        ResNetFPN(depth=20)
    with pytest.raises(ValueError, match="images"):
        det.features(torch.randn(3, 64, 64))


def _synthetic_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    x = torch.zeros(2, 3, 64, 64)
    boxes = [torch.tensor([[8.0, 8.0, 48.0, 40.0]]), torch.tensor([[16.0, 20.0, 60.0, 60.0], [2.0, 2.0, 30.0, 26.0]])]
    labels = [torch.tensor([0]), torch.tensor([1, 2])]
    for i, bs in enumerate(boxes):
        for b, lab in zip(bs.long().tolist(), labels[i].tolist(), strict=True):
            x[i, lab, b[1] : b[3], b[0] : b[2]] += 1.0
    return x, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]


@pytest.mark.parametrize("cls", [RetinaNet, FCOS])
def test_short_training_run_decreases_loss(cls) -> None:
    # one 32-channel head conv: with the paper's std-0.01 head init, deeper/narrower heads need far more steps
    det = _tiny(cls, out_channels=32, num_convs=1).train()
    x, targets = _synthetic_batch()
    opt = torch.optim.SGD(det.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(40):
        losses = det(x, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-5:]) / 5 < 0.5 * history[0], history


@pytest.mark.parametrize("cls", [RetinaNet, FCOS])
def test_postprocess_limits_sorting_and_clipping(cls) -> None:
    det = _tiny(cls, score_thresh=0.0, detections_per_img=20).eval()
    # make the predictions wild so that decoded boxes leave the image and must be clipped
    with torch.no_grad():
        det.head.bbox_pred.bias.fill_(1.5)
    x = torch.randn(2, 3, 64, 96)
    sizes = [(64, 96), (40, 50)]
    dets = det(x, image_sizes=sizes)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, sizes, strict=True):
        k = d["boxes"].shape[0]
        assert 0 < k <= 20 and d["scores"].shape == (k,) and d["labels"].shape == (k,)
        assert bool((d["scores"][1:] <= d["scores"][:-1]).all())
        assert bool((d["boxes"][:, 0::2] >= 0).all() and (d["boxes"][:, 0::2] <= w).all())
        assert bool((d["boxes"][:, 1::2] >= 0).all() and (d["boxes"][:, 1::2] <= h).all())
        assert d["labels"].dtype == torch.long and int(d["labels"].max()) < 3
    # defaults: score_thresh 0.05 filters the prior-initialized RetinaNet (all scores ~0.01) to nothing
    if cls is RetinaNet:
        quiet = _tiny(RetinaNet).eval()
        assert all(d["boxes"].shape == (0, 4) for d in quiet(x))


@pytest.mark.parametrize("channels", [16, 32, 48])
def test_fcos_single_image_on_64px_with_narrow_head(channels: int) -> None:
    """P7 of a 64-px image is 1x1: with one channel per GroupNorm group (C <= 32) torch refused a batch of one
    image there (FCOS inference on one image, or a last evaluation batch of one); GroupNorm is per-sample, so a
    single image must give what it gives inside a batch."""
    det = _tiny(FCOS, out_channels=channels).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        dets = det(x[:1])
        one = det.head_outputs(det.features(x[:1]))
        both = det.head_outputs(det.features(x))
    assert len(dets) == 1 and dets[0]["boxes"].shape[1] == 4
    for key, levels in one.items():
        for a, b in zip(levels, both[key], strict=True):
            assert torch.allclose(a, b[:1], rtol=1e-4, atol=1e-5), key


def test_retinanet_head_norm_trains_a_narrow_head_fast() -> None:
    """``head_norm=True`` (GroupNorm towers): a 32-channel, 2-conv RetinaNet head fits the toy batch in 40 steps
    (the paper's head, the default, has no norm layers and barely starts learning in that time)."""
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in _tiny(RetinaNet).head.modules())
    det = _tiny(RetinaNet, out_channels=32, num_convs=2, head_norm=True).train()
    for tower in (det.head.cls_tower, det.head.box_tower):
        assert sum(isinstance(m, torch.nn.GroupNorm) for m in tower) == 2
    x, targets = _synthetic_batch()
    opt = torch.optim.SGD(det.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(40):
        total = sum(det(x, targets).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.15 * history[0], history
