"""ckakd.detection.ops: NMS and RoIAlign (torchvision's when it imports) and their one pure-PyTorch fallback,
against brute-force references written from torchvision's CPU kernels."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ckakd.detection import ops
from ckakd.detection.ops import (
    batched_nms,
    batched_nms_fallback,
    nms,
    nms_fallback,
    roi_align,
    roi_align_backward_fallback,
    roi_align_fallback,
    torchvision_ops,
)


def random_boxes(n: int, seed: int, size: float = 100.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * size / 2 + 1.0
    return torch.cat([xy, xy + wh], dim=1)


def pair_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def brute_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    b = boxes.tolist()
    keep: list[int] = []
    suppressed = [False] * len(order)
    for pos, i in enumerate(order):
        if suppressed[pos]:
            continue
        keep.append(i)
        for pos2 in range(pos + 1, len(order)):
            if not suppressed[pos2] and pair_iou(b[i], b[order[pos2]]) > thr:
                suppressed[pos2] = True
    return keep


@pytest.mark.parametrize("impl", [nms, nms_fallback], ids=["nms", "fallback"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_bruteforce(impl, seed: int, thr: float) -> None:
    boxes = random_boxes(60, seed, size=60.0)
    scores = torch.rand(60, generator=torch.Generator().manual_seed(seed + 100))
    keep = impl(boxes, scores, thr)
    assert keep.dtype == torch.long and keep.tolist() == brute_nms(boxes, scores, thr)
    assert bool((scores[keep][1:] <= scores[keep][:-1]).all())
    assert impl(boxes[:0], scores[:0], thr).numel() == 0


def test_nms_ties_keep_the_lower_index_first() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert nms_fallback(boxes, scores, 0.5).tolist() == [0, 1]


@pytest.mark.parametrize("impl", [batched_nms, batched_nms_fallback], ids=["batched_nms", "fallback"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_nms_matches_per_class_bruteforce(impl, seed: int) -> None:
    boxes = random_boxes(50, seed, size=40.0)
    scores = torch.rand(50, generator=torch.Generator().manual_seed(seed + 7))
    labels = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(seed + 9))
    keep = impl(boxes, scores, labels, 0.5)
    ref: list[int] = []
    for c in range(3):
        idx = torch.nonzero(labels == c).flatten()
        ref += [int(idx[i]) for i in brute_nms(boxes[idx], scores[idx], 0.5)]
    ref.sort(key=lambda i: -float(scores[i]))
    assert keep.tolist() == ref
    # two identical boxes of different classes both survive; of the same class only one
    two = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)
    s = torch.tensor([0.9, 0.8])
    assert impl(two, s, torch.tensor([0, 1]), 0.5).tolist() == [0, 1]
    assert impl(two, s, torch.tensor([1, 1]), 0.5).tolist() == [0]
    assert impl(boxes[:0], scores[:0], labels[:0], 0.5).numel() == 0


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor data by the host: the ops that synchronize a device (``item`` / ``bool`` /
    ``int`` reach ``aten._local_scalar_dense``; ``nonzero`` sizes its output from the data) and, through
    :meth:`patch`, the Tensor methods that hand data to Python (``tolist``, ``numpy``, ``item``, ``__bool__``,
    ``__int__``, ``__float__``, ``__index__``), which on a CPU tensor dispatch no op."""

    SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")
    METHODS = ("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.SYNC_OPS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))

    def patch(self, monkeypatch) -> HostReads:
        for method in self.METHODS:
            original = getattr(torch.Tensor, method)

            def counted(t, *a, _m=method, _f=original, **k):
                self.reads.append(_m)
                return _f(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, method, counted)
        return self


@pytest.mark.parametrize("n", [1, 40, 400])
def test_nms_fallback_reads_the_device_once_whatever_it_keeps(n: int, monkeypatch) -> None:
    boxes = random_boxes(n, 11, size=400.0)  # sparse: most boxes are kept
    scores = torch.rand(n, generator=torch.Generator().manual_seed(12))
    labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(13))
    expected, expected_batched = nms_fallback(boxes, scores, 0.5), batched_nms_fallback(boxes, scores, labels, 0.5)
    assert expected.numel() > n // 2
    with HostReads().patch(monkeypatch) as counter:
        keep = nms_fallback(boxes, scores, 0.5)
    assert len(counter.reads) <= 1, counter.reads
    with HostReads().patch(monkeypatch) as counter:
        keep_batched = batched_nms_fallback(boxes, scores, labels, 0.5)
    assert len(counter.reads) <= 1, counter.reads
    monkeypatch.undo()
    assert torch.equal(keep, expected) and torch.equal(keep_batched, expected_batched)
    assert keep.tolist() == brute_nms(boxes, scores, 0.5)


def test_the_host_read_counter_sees_a_per_box_loop(monkeypatch) -> None:
    """The counter above is not blind: a scan that reads one score per box is seen once per box."""
    boxes, scores = random_boxes(30, 3), torch.rand(30, generator=torch.Generator().manual_seed(4))
    with HostReads().patch(monkeypatch) as counter:
        brute_nms(boxes, scores, 0.5)
    assert len(counter.reads) >= 30


def test_nms_fallback_on_a_large_set_matches_bruteforce_with_ties_and_duplicates(monkeypatch) -> None:
    """More boxes than one mask chunk's rows at a small chunk size; repeated boxes and tied scores."""
    boxes = torch.cat([random_boxes(150, 21, size=80.0)] * 2)
    scores = torch.cat([torch.rand(150, generator=torch.Generator().manual_seed(22))] * 2).round(decimals=1)
    whole = nms_fallback(boxes, scores, 0.4)
    monkeypatch.setattr(ops, "_NMS_CHUNK_ELEMENTS", 7 * 300)  # 7 rows per chunk
    assert nms_fallback(boxes, scores, 0.4).tolist() == brute_nms(boxes, scores, 0.4) == whole.tolist()


def test_nms_checks_its_inputs() -> None:
    boxes = random_boxes(4, 0)
    with pytest.raises(ValueError, match=r"scores must have shape \(4,\)"):
        nms(boxes, torch.rand(3), 0.5)
    with pytest.raises(ValueError, match="xyxy"):
        nms(boxes[:, :3], torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="scores and labels"):
        batched_nms(boxes, torch.rand(4), torch.zeros(3, dtype=torch.long), 0.5)


# -------------------------------------------------------------------------------------------- RoIAlign


def brute_roi_align(x, rois, scale, ph, pw, sampling_ratio, aligned) -> torch.Tensor:
    """torchvision's CPU RoIAlign forward, loop by loop (roi_align_kernel.cpp, bilinear_interpolate)."""
    _, c, h, w = x.shape
    out = torch.zeros(rois.shape[0], c, ph, pw, dtype=x.dtype)

    def bilinear(img, y: float, xx: float) -> torch.Tensor:
        if y < -1.0 or y > h or xx < -1.0 or xx > w:
            return torch.zeros(c, dtype=x.dtype)
        y, xx = max(y, 0.0), max(xx, 0.0)
        y0, x0 = int(y), int(xx)
        if y0 >= h - 1:
            y0 = y1 = h - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= w - 1:
            x0 = x1 = w - 1
            xx = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, xx - x0
        hy, hx = 1.0 - ly, 1.0 - lx
        return hy * hx * img[:, y0, x0] + hy * lx * img[:, y0, x1] + ly * hx * img[:, y1, x0] + ly * lx * img[:, y1, x1]

    off = 0.5 if aligned else 0.0
    for k, (b, x1_, y1_, x2_, y2_) in enumerate(rois.tolist()):
        sw, sh = x1_ * scale - off, y1_ * scale - off
        rw, rh = x2_ * scale - off - sw, y2_ * scale - off - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw)
        count = max(gh * gw, 1)
        for i in range(ph):
            for j in range(pw):
                acc = torch.zeros(c, dtype=x.dtype)
                for iy in range(gh):
                    for ix in range(gw):
                        yy = sh + i * bh + (iy + 0.5) * bh / gh
                        xx = sw + j * bw + (ix + 0.5) * bw / gw
                        acc += bilinear(x[int(b)], yy, xx)
                out[k, :, i, j] = acc / count
    return out


def some_rois(g: torch.Generator, n: int = 8) -> torch.Tensor:
    xy = torch.rand(n, 2, dtype=torch.float64, generator=g) * 36 - 2
    wh = 0.5 + 20 * torch.rand(n, 2, dtype=torch.float64, generator=g)
    batch = torch.randint(0, 2, (n, 1), generator=g).double()
    outside = torch.tensor([[1.0, -30.0, -30.0, -10.0, -12.0]], dtype=torch.float64)  # every sample < -1: zeros
    return torch.cat([torch.cat([batch, xy, xy + wh], 1), outside])


@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_fallback_matches_the_bruteforce_kernel(sampling_ratio: int, aligned: bool) -> None:
    g = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g)
    rois = some_rois(g)
    got = roi_align_fallback(x, rois, 0.25, 3, 2, sampling_ratio, aligned)
    want = brute_roi_align(x, rois, 0.25, 3, 2, sampling_ratio, aligned)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))
    assert roi_align_fallback(x, rois[:0], 0.25, 3, 2, sampling_ratio, aligned).shape == (0, 3, 3, 2)


@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(-1, True), (2, False)])
def test_roi_align_backward_fallback_is_the_forwards_gradient(sampling_ratio: int, aligned: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    rois = some_rois(g, 5)
    out = roi_align_fallback(x, rois, 0.25, 3, 3, sampling_ratio, aligned)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=g)
    (auto,) = torch.autograd.grad(out, x, upstream)
    manual = roi_align_backward_fallback(upstream, rois, 0.25, 3, 3, 2, 2, 7, 8, sampling_ratio, aligned)
    torch.testing.assert_close(manual, auto, rtol=1e-12, atol=1e-12)
    fn = lambda t: roi_align_fallback(t, rois, 0.25, 3, 3, sampling_ratio, aligned)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


def test_roi_align_takes_torchvisions_arguments() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g)
    rois = some_rois(g)
    torch.testing.assert_close(
        roi_align(x, rois, (3, 2), 0.25, 2, True), roi_align_fallback(x, rois, 0.25, 3, 2, 2, True)
    )
    torch.testing.assert_close(roi_align(x, rois, 4, 0.5), roi_align_fallback(x, rois, 0.5, 4, 4, -1, False))
    with pytest.raises(ValueError, match=r"rois \(K, 5\)"):
        roi_align(x, rois[:, 1:], 3)


# ------------------------------------------------------------------------------------ torchvision or not


@pytest.fixture
def fresh_probe():
    torchvision_ops.cache_clear()
    yield
    torchvision_ops.cache_clear()


def test_a_torchvision_that_does_not_import_means_the_fallback(monkeypatch, fresh_probe) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now raises ImportError
    assert torchvision_ops() is None
    boxes, scores = random_boxes(20, 5), torch.rand(20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(nms(boxes, scores, 0.5), nms_fallback(boxes, scores, 0.5))


def test_an_importable_torchvision_is_used(monkeypatch) -> None:
    calls: list[str] = []
    fake = types.SimpleNamespace(
        nms=lambda b, s, t: calls.append("nms") or nms_fallback(b, s, t),
        batched_nms=lambda b, s, lab, t: calls.append("batched_nms") or batched_nms_fallback(b, s, lab, t),
        roi_align=lambda x, r, size, scale, sr, al: (
            calls.append("roi_align") or roi_align_fallback(x, r, scale, *size, sr, al)
        ),
    )
    monkeypatch.setattr(ops, "torchvision_ops", lambda: fake)
    boxes, scores = random_boxes(10, 6), torch.rand(10)
    nms(boxes, scores, 0.5)
    batched_nms(boxes, scores, torch.zeros(10, dtype=torch.long), 0.5)
    roi_align(torch.rand(1, 2, 5, 5), torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0]]), 2)
    assert calls == ["nms", "batched_nms", "roi_align"]
