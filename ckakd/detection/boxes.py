"""Box utilities for the detectors, on ``(N, 4)`` ``xyxy`` tensors in pixels (pure PyTorch).

Conventions: a box is ``(x1, y1, x2, y2)`` with ``x2 >= x1`` and ``y2 >= y1``; widths are ``x2 - x1`` (no
"+1" pixel convention). Pairwise functions return ``(N, M)`` matrices; the ``*_loss`` functions work on
*matched pairs* (two ``(N, 4)`` tensors, row ``i`` against row ``i``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "BoxCoder",
    "box_area",
    "box_iou",
    "check_boxes",
    "clip_boxes",
    "generalized_box_iou",
    "giou_loss",
    "iou_loss",
    "remove_small_boxes",
    "sigmoid_focal_loss",
]

_REDUCTIONS = ("none", "mean", "sum")


def check_boxes(boxes: torch.Tensor, name: str) -> None:
    """``TypeError`` / ``ValueError`` unless ``boxes`` is a floating-point (N, 4) xyxy tensor (named ``name``)."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) in xyxy format, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {boxes.dtype}")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else loss.sum()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of ``boxes`` (N, 4) xyxy -> (N,)."""
    check_boxes(boxes, "boxes")
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _inter_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area1[:, None] + area2[None, :] - inter


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: ``boxes1`` (N, 4), ``boxes2`` (M, 4) -> (N, M). Two empty boxes give 0 (not NaN)."""
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    inter, union = _inter_union(boxes1, boxes2)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019): IoU - (|C| - |A ∪ B|) / |C| with C the enclosing box.

    ``boxes1`` (N, 4), ``boxes2`` (M, 4) -> (N, M), values in [-1, 1].
    """
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    inter, union = _inter_union(boxes1, boxes2)
    tiny = torch.finfo(union.dtype).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(inter))
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area_c = wh[..., 0] * wh[..., 1]
    penalty = torch.where(area_c > 0, (area_c - union) / area_c.clamp(min=tiny), torch.zeros_like(area_c))
    return iou - penalty


def _paired_iou_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes1 and boxes2 must be matched pairs of equal shape, got {tuple(boxes1.shape)} "
            f"and {tuple(boxes2.shape)}"
        )
    x1 = torch.max(boxes1[:, 0], boxes2[:, 0])
    y1 = torch.max(boxes1[:, 1], boxes2[:, 1])
    x2 = torch.min(boxes1[:, 2], boxes2[:, 2])
    y2 = torch.min(boxes1[:, 3], boxes2[:, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    cw = torch.max(boxes1[:, 2], boxes2[:, 2]) - torch.min(boxes1[:, 0], boxes2[:, 0])
    ch = torch.max(boxes1[:, 3], boxes2[:, 3]) - torch.min(boxes1[:, 1], boxes2[:, 1])
    area_c = cw * ch
    giou = iou - (area_c - union) / (area_c + eps)
    return iou, giou


def iou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none", eps: float = 1e-7) -> torch.Tensor:
    """Linear IoU loss ``1 - IoU`` of matched pairs: (N, 4), (N, 4) -> (N,) (or a scalar when reduced)."""
    iou, _ = _paired_iou_giou(boxes1, boxes2, eps)
    return _reduce(1.0 - iou, reduction)


def giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none", eps: float = 1e-7) -> torch.Tensor:
    """GIoU loss ``1 - GIoU`` of matched pairs: (N, 4), (N, 4) -> (N,) in [0, 2] (or a scalar when reduced)."""
    _, giou = _paired_iou_giou(boxes1, boxes2, eps)
    return _reduce(1.0 - giou, reduction)


class BoxCoder:
    """RetinaNet / Faster R-CNN delta encoding.

    ``encode(anchors, boxes)`` gives ``(wx·(gx - ax)/aw, wy·(gy - ay)/ah, ww·log(gw/aw), wh·log(gh/ah))`` with
    centers ``(ax, ay)`` and sizes ``(aw, ah)``; ``decode`` inverts it, clamping ``dw, dh`` at
    ``bbox_xform_clip`` (default ``log(1000/16)``) so that a wild prediction cannot overflow ``exp``.
    Inside the clamp the round trip ``decode(anchors, encode(anchors, boxes))`` is exact up to rounding.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be four positive numbers, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Deltas of ``boxes`` (N, 4) relative to ``anchors`` (N, 4) -> (N, 4). Sizes must be positive."""
        check_boxes(anchors, "anchors")
        check_boxes(boxes, "boxes")
        if anchors.shape != boxes.shape:
            raise ValueError(
                f"anchors and boxes must have equal shapes, got {tuple(anchors.shape)} and {tuple(boxes.shape)}"
            )
        wx, wy, ww, wh = self.weights
        aw = anchors[:, 2] - anchors[:, 0]
        ah = anchors[:, 3] - anchors[:, 1]
        ax = anchors[:, 0] + 0.5 * aw
        ay = anchors[:, 1] + 0.5 * ah
        gw = boxes[:, 2] - boxes[:, 0]
        gh = boxes[:, 3] - boxes[:, 1]
        gx = boxes[:, 0] + 0.5 * gw
        gy = boxes[:, 1] + 0.5 * gh
        return torch.stack(
            [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=1
        )

    def decode(self, anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Boxes (N, 4) xyxy from ``deltas`` (N, 4) applied to ``anchors`` (N, 4)."""
        check_boxes(anchors, "anchors")
        check_boxes(deltas, "deltas")
        if anchors.shape != deltas.shape:
            raise ValueError(
                f"anchors and deltas must have equal shapes, got {tuple(anchors.shape)} and {tuple(deltas.shape)}"
            )
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        aw = anchors[:, 2] - anchors[:, 0]
        ah = anchors[:, 3] - anchors[:, 1]
        ax = anchors[:, 0] + 0.5 * aw
        ay = anchors[:, 1] + 0.5 * ah
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[:, 3] / wh).clamp(max=self.bbox_xform_clip)
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) on independent sigmoids, any shape (``targets`` in [0, 1], same shape).

    ``FL = -α_t (1 - p_t)^γ log(p_t)`` with ``p_t = p`` for positives and ``1 - p`` otherwise, ``α_t = α`` for
    positives and ``1 - α`` otherwise (``alpha < 0`` disables the weighting). ``reduction``: none|mean|sum.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have equal shapes, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clamp ``boxes`` (N, 4) into an image of ``size = (height, width)`` -> (N, 4)."""
    check_boxes(boxes, "boxes")
    h, w = int(size[0]), int(size[1])
    x = boxes[:, 0::2].clamp(min=0, max=w)
    y = boxes[:, 1::2].clamp(min=0, max=h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices (K,) of the boxes (N, 4) whose width and height are both ``>= min_size``."""
    check_boxes(boxes, "boxes")
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((ws >= min_size) & (hs >= min_size)).flatten()
