"""The detection operators of ``torchvision.ops``: :func:`nms`, :func:`batched_nms`, :func:`roi_align`.

Each runs ``torchvision.ops``' kernel when torchvision imports (:func:`torchvision_ops`, a guarded import tried
once: the CUDA wheel on a CPU-only torch fails at import, and that failure only means "no torchvision") and
otherwise its one pure-PyTorch fallback here, written to torchvision's CPU semantics:

* :func:`nms_fallback` — greedy NMS by decreasing score (stable: ties keep the lower index first), a box is
  dropped when its IoU with a kept one is ``> iou_threshold``; the pairwise mask is built once on the device
  and read back once (no host synchronization per kept box); :func:`batched_nms_fallback` offsets each class's
  boxes so that classes never overlap, then one NMS.
* :func:`roi_align_fallback` / :func:`roi_align_backward_fallback` — RoIAlign with the arguments of the
  ``torchvision::roi_align`` operator (``sampling_ratio`` <= 0: adaptive; ``aligned``: the half-pixel shift;
  a sample outside ``[-1, size]`` contributes 0) as separable bilinear weights, and its input gradient.

``tests/torchvision_shim.py`` registers these fallbacks as the ``torchvision::`` operator kernels where
torchvision's C++ extension cannot load.
"""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from ckakd.detection.boxes import box_iou, check_boxes

__all__ = [
    "torchvision_ops",
    "nms",
    "batched_nms",
    "roi_align",
    "nms_fallback",
    "batched_nms_fallback",
    "suppression_mask",
    "roi_align_fallback",
    "roi_align_backward_fallback",
]


@functools.cache
def torchvision_ops() -> ModuleType | None:
    """``torchvision.ops`` when torchvision imports, else ``None`` (tried once per process)."""
    try:
        import torchvision.ops as tv_ops
    except Exception:  # ImportError, or the CUDA wheel's RuntimeError "operator torchvision::nms does not exist"
        return None
    return tv_ops


# ------------------------------------------------------------------------------------------------- NMS


def _check_scores(boxes: Tensor, scores: Tensor, labels: Tensor | None = None) -> None:
    check_boxes(boxes, "boxes")
    if labels is None:
        if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
            raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    elif labels.shape != scores.shape or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"scores and labels must have shape ({boxes.shape[0]},), got {tuple(scores.shape)} "
            f"and {tuple(labels.shape)}"
        )


# IoU rows computed at once: bounds the float temporary of the suppression mask to about 16 MiB per chunk.
_NMS_CHUNK_ELEMENTS = 1 << 22


def suppression_mask(sorted_boxes: Tensor, iou_threshold: float) -> Tensor:
    """``(N, N)`` bool, entry ``[i, j]``: box ``j`` would be dropped by a kept box ``i`` (``IoU > iou_threshold``,
    NaN included: not ``<=``) for boxes (N, 4) already sorted by decreasing score; only ``j > i`` is read. Built in
    row chunks on the boxes' device, without reading anything back to the host."""
    n = sorted_boxes.shape[0]
    mask = torch.empty(n, n, dtype=torch.bool, device=sorted_boxes.device)
    rows = max(1, _NMS_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n, rows):
        iou = box_iou(sorted_boxes[start : start + rows], sorted_boxes)
        torch.le(iou, iou_threshold, out=mask[start : start + rows])
    return mask.logical_not_()


def nms_fallback(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS in PyTorch: ``boxes`` (N, 4) xyxy, ``scores`` (N,) -> kept indices (K,) int64 by decreasing
    score (ties: lower index first); a box is dropped when its IoU with a kept box is ``> iou_threshold``.

    As torchvision's CUDA kernel does: the pairwise suppression mask (:func:`suppression_mask`) is formed once on
    the boxes' device and read back in one transfer; the greedy scan runs on the host over that mask. One
    device-to-host synchronization per call, whatever the number of kept boxes."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    over = suppression_mask(boxes[order], iou_threshold).cpu().numpy()  # the one read-back
    removed = np.zeros(n, dtype=bool)
    kept = np.empty(n, dtype=np.int64)
    k = 0
    for i in range(n):
        if removed[i]:
            continue
        kept[k] = i
        k += 1
        removed[i + 1 :] |= over[i, i + 1 :]
    return order[torch.from_numpy(kept[:k]).to(boxes.device, non_blocking=True)]


def batched_nms_fallback(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS in PyTorch: each class's boxes shifted by ``label * (max coordinate span + 1)`` so that
    classes cannot overlap, then one :func:`nms_fallback`. (N, 4), (N,), (N,) -> kept indices (K,)."""
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    span = boxes.max() - boxes.min() + 1
    offsets = labels.to(boxes.dtype) * span
    return nms_fallback(boxes + offsets[:, None], scores, iou_threshold)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: ``boxes`` (N, 4) xyxy, ``scores`` (N,) -> kept indices (K,) int64, sorted
    by decreasing score; a box is dropped when its IoU with a kept box is ``> iou_threshold``
    (``torchvision.ops.nms`` when torchvision imports, else :func:`nms_fallback`)."""
    _check_scores(boxes, scores)
    tv = torchvision_ops()
    if tv is None:
        return nms_fallback(boxes, scores, iou_threshold)
    return tv.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: boxes of different ``labels`` never suppress each other. (N, 4), (N,), (N,) -> kept
    indices (K,) sorted by decreasing score (``torchvision.ops.batched_nms``, else :func:`batched_nms_fallback`)."""
    _check_scores(boxes, scores, labels)
    tv = torchvision_ops()
    if tv is None:
        return batched_nms_fallback(boxes, scores, labels, iou_threshold)
    return tv.batched_nms(boxes, scores, labels, float(iou_threshold))


# -------------------------------------------------------------------------------------------- RoIAlign


def _axis_weights(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int) -> Tensor:
    """Bilinear weights of one axis: (K, pooled, size), summed over the roi's ``grid`` sample points per bin
    (torchvision's ``bilinear_interpolate``: a sample outside ``[-1, size]`` contributes 0, coordinates clamped
    at 0, the last row/column repeated)."""
    k = start.shape[0]
    g_max = max(int(grid.max()) if k else 0, 1)
    dtype, device = start.dtype, start.device
    p = torch.arange(pooled, dtype=dtype, device=device)
    i = torch.arange(g_max, dtype=dtype, device=device)
    gridf = grid.to(dtype).clamp(min=1)
    coord = (
        start[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + (i[None, None, :] + 0.5) * (bin_size / gridf)[:, None, None]
    )  # (K, pooled, g_max)
    valid = (i[None, None, :] < grid[:, None, None]) & (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, size - 1, low + 1)
    coord = torch.where(at_end, low.to(dtype), coord)
    frac = coord - low.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=device)
    w_low = torch.where(valid, 1.0 - frac, zero)
    w_high = torch.where(valid, frac, zero)
    out = torch.zeros(k, pooled, size, dtype=dtype, device=device)
    out.scatter_add_(2, low, w_low)
    out.scatter_add_(2, high, w_high)
    return out


def _roi_align_weights(
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(batch index (K,), Y weights (K, PH, H), X weights (K, PW, W), 1 / count (K,)) of RoIAlign: the bilinear
    sampling is separable, so ``out[k] = Wy[k] @ input[b_k] @ Wx[k]^T / count[k]``."""
    offset = 0.5 if aligned else 0.0
    batch = rois[:, 0].long()
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    x2 = rois[:, 3] * spatial_scale - offset
    y2 = rois[:, 4] * spatial_scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
    if sampling_ratio > 0:
        grid_h = torch.full_like(batch, sampling_ratio)
        grid_w = torch.full_like(batch, sampling_ratio)
    else:
        grid_h = torch.ceil(roi_h / pooled_height).long()
        grid_w = torch.ceil(roi_w / pooled_width).long()
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)
    wy = _axis_weights(y1, bin_h, grid_h, pooled_height, height)
    wx = _axis_weights(x1, bin_w, grid_w, pooled_width, width)
    return batch, wy, wx, 1.0 / count


def roi_align_fallback(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign forward in PyTorch, the ``torchvision::roi_align`` operator's arguments: ``input`` (N, C, H, W),
    ``rois`` (K, 5) ``(batch index, x1, y1, x2, y2)`` in input pixels (times ``spatial_scale`` on the map)
    -> (K, C, PH, PW). Differentiable in ``input`` (autograd gives :func:`roi_align_backward_fallback`)."""
    _, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_zeros(k, c, pooled_height, pooled_width)
    if k == 0:
        return out
    batch, wy, wx, inv = _roi_align_weights(
        rois.to(input.dtype), spatial_scale, pooled_height, pooled_width, h, w, sampling_ratio, aligned
    )
    for b in batch.unique().tolist():
        idx = torch.nonzero(batch == b).flatten()
        out[idx] = torch.einsum("kph,chw,kqw->kcpq", wy[idx], input[b], wx[idx]) * inv[idx, None, None, None]
    return out


def roi_align_backward_fallback(
    grad: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """Gradient of :func:`roi_align_fallback` w.r.t. its input, the ``torchvision::_roi_align_backward``
    operator's arguments: ``grad`` (K, C, PH, PW) -> (batch_size, channels, height, width)."""
    out = grad.new_zeros(batch_size, channels, height, width)
    if rois.shape[0] == 0:
        return out
    batch, wy, wx, inv = _roi_align_weights(
        rois.to(grad.dtype), spatial_scale, pooled_height, pooled_width, height, width, sampling_ratio, aligned
    )
    for b in batch.unique().tolist():
        idx = torch.nonzero(batch == b).flatten()
        g = grad[idx] * inv[idx, None, None, None]
        out[b] += torch.einsum("kph,kcpq,kqw->chw", wy[idx], g, wx[idx])
    return out


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign: ``input`` (N, C, H, W), ``rois`` (K, 5) ``(batch index, x1, y1, x2, y2)`` -> (K, C, PH, PW) with
    ``output_size`` = PH (= PW) or (PH, PW) (``torchvision.ops.roi_align`` when torchvision imports, else
    :func:`roi_align_fallback`; the same arguments)."""
    if input.dim() != 4 or rois.dim() != 2 or rois.shape[-1] != 5:
        raise ValueError(
            f"expected input (N, C, H, W) and rois (K, 5), got {tuple(input.shape)} and {tuple(rois.shape)}"
        )
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else (int(output_size[0]), int(output_size[1]))
    tv = torchvision_ops()
    if tv is None:
        return roi_align_fallback(input, rois, float(spatial_scale), ph, pw, int(sampling_ratio), bool(aligned))
    return tv.roi_align(input, rois.to(input.dtype), (ph, pw), float(spatial_scale), int(sampling_ratio), bool(aligned))
