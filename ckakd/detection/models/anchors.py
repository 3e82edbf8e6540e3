"""Where the dense detectors predict and what they are trained on: RetinaNet's anchors (:class:`AnchorGenerator`) and
their matching (:class:`AnchorMatcher`), FCOS's points (:func:`fcos_points`), targets (:func:`fcos_assign`) and
centerness (:func:`fcos_centerness_targets`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["AnchorGenerator", "AnchorMatcher", "fcos_points", "fcos_assign", "fcos_centerness_targets"]


class AnchorGenerator:
    """Anchors for a list of feature levels.

    Level ``i`` has ``A = len(sizes[i]) · len(aspect_ratios[i])`` cell anchors of area ``size²`` and ratio
    ``h / w = r``, ordered ratio-major (``[r0·s0, r0·s1, ..., r1·s0, ...]``); they are centered at
    ``((x + offset)·stride, (y + offset)·stride)`` for every feature cell (row-major), giving
    ``(H_l·W_l·A, 4)`` anchors per level in the same order as the flattened head outputs (location-major,
    anchor-minor). ``offset=0.0`` follows torchvision/Detectron2.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
    ) -> None:
        if not (len(sizes) == len(aspect_ratios) == len(strides)) or len(sizes) == 0:
            raise ValueError(
                f"sizes, aspect_ratios and strides need one entry per level, got {len(sizes)}, "
                f"{len(aspect_ratios)} and {len(strides)}"
            )
        if any(len(s) == 0 or min(s) <= 0 for s in sizes) or any(len(r) == 0 or min(r) <= 0 for r in aspect_ratios):
            raise ValueError("every level needs at least one positive size and one positive aspect ratio")
        self.sizes = [tuple(float(s) for s in lv) for lv in sizes]
        self.aspect_ratios = [tuple(float(r) for r in lv) for lv in aspect_ratios]
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)

    @classmethod
    def retinanet(
        cls,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> AnchorGenerator:
        """The paper's anchors: base size ``octave_base_scale · 2^l`` (32..512 for P3..P7) times
        ``2^(k/scales_per_octave)``, ``k = 0..scales_per_octave-1``, for each aspect ratio (9 per location)."""
        scales = [2 ** (k / scales_per_octave) for k in range(scales_per_octave)]
        sizes = [[octave_base_scale * 2**lv * s for s in scales] for lv in levels]
        return cls(sizes, [tuple(aspect_ratios)] * len(sizes), [2**lv for lv in levels])

    @property
    def num_anchors_per_location(self) -> list[int]:
        """``A`` per level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def cell_anchors(self, level: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Cell anchors (A, 4) of level index ``level``, centered at 0."""
        sizes = torch.tensor(self.sizes[level], dtype=dtype, device=device)
        ratios = torch.tensor(self.aspect_ratios[level], dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        ws = (sizes[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (sizes[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def grid_anchors(
        self, feature_sizes: Sequence[tuple[int, int]], dtype: torch.dtype = torch.float32, device=None
    ) -> list[torch.Tensor]:
        """Anchors per level: list of (H_l·W_l·A_l, 4) for ``feature_sizes = [(H_l, W_l), ...]``."""
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(feature_sizes)}")
        out = []
        for i, (h, w) in enumerate(feature_sizes):
            stride = self.strides[i]
            xs = (torch.arange(w, dtype=dtype, device=device) + self.offset) * stride
            ys = (torch.arange(h, dtype=dtype, device=device) + self.offset) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            out.append((shifts + self.cell_anchors(i, dtype, device)[None]).reshape(-1, 4))
        return out

    def __call__(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Anchors for FPN ``features`` (list of (B, C, H_l, W_l)) -> list of (H_l·W_l·A_l, 4)."""
        f0 = features[0]
        return self.grid_anchors([tuple(f.shape[-2:]) for f in features], f0.dtype, f0.device)


class AnchorMatcher:
    """IoU matcher of RetinaNet / Faster R-CNN.

    For an IoU matrix (M gt boxes, N anchors) returns (N,) int64: the matched gt index for IoU >= ``fg_iou``,
    ``BELOW_LOW_THRESHOLD = -1`` (background) for IoU < ``bg_iou`` and ``BETWEEN_THRESHOLDS = -2`` (ignored)
    in between. With ``allow_low_quality_matches`` every gt also claims the anchors that reach its highest IoU
    (ties included, only when that IoU is > 0); such an anchor gets its own best gt, as in torchvision.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, fg_iou: float = 0.5, bg_iou: float = 0.4, allow_low_quality_matches: bool = True) -> None:
        if bg_iou > fg_iou:
            raise ValueError(f"bg_iou ({bg_iou}) must not exceed fg_iou ({fg_iou})")
        self.fg_iou, self.bg_iou = float(fg_iou), float(bg_iou)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: torch.Tensor) -> torch.Tensor:
        """``iou`` (M, N) -> matches (N,) int64."""
        if iou.dim() != 2:
            raise ValueError(f"iou must have shape (M gt, N anchors), got {tuple(iou.shape)}")
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), self.BELOW_LOW_THRESHOLD, dtype=torch.long, device=iou.device)
        best, matches = iou.max(dim=0)
        all_matches = matches.clone()
        matches[best < self.fg_iou] = self.BETWEEN_THRESHOLDS
        matches[best < self.bg_iou] = self.BELOW_LOW_THRESHOLD
        if self.allow_low_quality_matches:
            highest = iou.max(dim=1, keepdim=True).values
            low_quality = ((iou == highest) & (highest > 0)).any(dim=0)
            matches[low_quality] = all_matches[low_quality]
        return matches


def fcos_points(
    feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], dtype: torch.dtype = torch.float32, device=None
) -> list[torch.Tensor]:
    """FCOS locations per level: list of (H_l·W_l, 2) ``(x, y)`` pixel centers ``((j + 0.5)·s, (i + 0.5)·s)``,
    row-major like the flattened head outputs."""
    out = []
    for (h, w), s in zip(feature_sizes, strides, strict=True):
        xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) * s
        ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return out


def fcos_assign(
    points: torch.Tensor,
    point_strides: torch.Tensor,
    point_ranges: torch.Tensor,
    gt_boxes: torch.Tensor,
    center_sampling_radius: float = 1.5,
) -> torch.Tensor:
    """FCOS target assignment.

    A point ``(x, y)`` (row of ``points`` (N, 2), level stride ``point_strides`` (N,), scale range
    ``point_ranges`` (N, 2) = ``(lo, hi)``) is a candidate for gt box ``g`` (row of ``gt_boxes`` (M, 4)) when
      * it lies strictly inside ``g``: ``min(l, t, r, b) > 0`` with ``(l, t, r, b) = (x-x1, y-y1, x2-x, y2-y)``;
      * with ``center_sampling_radius > 0``, also ``|x - cx| < radius·stride`` and ``|y - cy| < radius·stride``
        (the center-sampling region clipped to the box); ``radius <= 0`` disables center sampling;
      * ``lo <= max(l, t, r, b) <= hi`` (the level's scale range).
    Among several candidates the box with the smallest area wins. Returns (N,) int64 gt indices, -1 = background.
    """
    n = points.shape[0]
    if gt_boxes.shape[0] == 0:
        return torch.full((n,), -1, dtype=torch.long, device=points.device)
    x, y = points[:, 0:1], points[:, 1:2]
    ltrb = torch.stack(
        [x - gt_boxes[None, :, 0], y - gt_boxes[None, :, 1], gt_boxes[None, :, 2] - x, gt_boxes[None, :, 3] - y], dim=2
    )  # (N, M, 4)
    ok = ltrb.min(dim=2).values > 0
    if center_sampling_radius > 0:
        cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
        cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
        rad = center_sampling_radius * point_strides.to(points.dtype)[:, None]
        ok &= ((x - cx[None]).abs() < rad) & ((y - cy[None]).abs() < rad)
    max_dist = ltrb.max(dim=2).values
    ok &= (max_dist >= point_ranges[:, 0:1]) & (max_dist <= point_ranges[:, 1:2])
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    masked = torch.where(ok, areas[None, :].expand(n, -1), torch.full_like(max_dist, math.inf))
    min_area, idx = masked.min(dim=1)
    idx[torch.isinf(min_area)] = -1
    return idx


def fcos_centerness_targets(ltrb: torch.Tensor) -> torch.Tensor:
    """Centerness ``sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))`` of positive distances ``ltrb`` (N, 4) -> (N,)."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values.clamp(min=1e-12)) * (
        tb.min(dim=1).values / tb.max(dim=1).values.clamp(min=1e-12)
    )
    return torch.sqrt(ratio.clamp(min=0))
