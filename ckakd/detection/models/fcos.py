"""FCOS (Tian et al. 2019) on a :class:`~ckakd.detection.models.fpn.ResNetFPN`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ckakd.detection.boxes import giou_loss, sigmoid_focal_loss

from .anchors import fcos_assign, fcos_centerness_targets, fcos_points
from .detector import DenseDetector, full_precision
from .fpn import ResNetFPN
from .heads import FCOSHead

__all__ = ["FCOS"]


class FCOS(DenseDetector):
    """FCOS (Tian et al. 2019) on a :class:`ResNetFPN` (P6 from P5), with center sampling (radius 1.5),
    per-level scale ranges, centerness on the regression branch and GIoU box loss.

    Losses (normalized by the batch's number of foreground points, at least 1): ``"cls"`` sigmoid focal loss
    over all points, ``"box"`` GIoU loss of the decoded foreground boxes, ``"centerness"`` BCE on foreground
    points. Scores at inference: ``sqrt(sigmoid(cls) · sigmoid(centerness))``.
    ``scale_ranges`` default: ``(0, 64), (64, 128), (128, 256), (256, 512), (512, inf)`` (doubling for other
    level counts).
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 50,
        width: int = 64,
        out_channels: int = 256,
        in_channels: int = 3,
        num_convs: int = 4,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        scale_ranges: Sequence[tuple[float, float]] | None = None,
        center_sampling_radius: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
    ) -> None:
        backbone = ResNetFPN(depth, width, out_channels, in_channels, levels, extra_from="p5")
        super().__init__(num_classes, backbone, score_thresh, nms_thresh, detections_per_img, topk_candidates)
        n = len(backbone.levels)
        if scale_ranges is None:
            bounds = [0.0] + [64.0 * 2**i for i in range(n - 1)] + [math.inf]
            scale_ranges = [(bounds[i], bounds[i + 1]) for i in range(n)]
        if len(scale_ranges) != n:
            raise ValueError(f"scale_ranges needs one (lo, hi) per level ({n}), got {len(scale_ranges)}")
        self.scale_ranges = [(float(lo), float(hi)) for lo, hi in scale_ranges]
        self.center_sampling_radius = float(center_sampling_radius)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.head = FCOSHead(out_channels, num_classes, n, num_convs, prior_prob)

    def points(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """FCOS locations per level, list of (H_l·W_l, 2)."""
        f0 = features[0]
        return fcos_points([tuple(f.shape[-2:]) for f in features], self.strides, f0.dtype, f0.device)

    @staticmethod
    def _decode(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
        return torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], dim=1)

    @full_precision
    def compute_losses(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        features: Sequence[torch.Tensor],
        images: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``{"cls": focal, "box": GIoU, "centerness": BCE}``, scalars normalized by the foreground count."""
        self._check_targets(targets, images.shape[0])
        pts_levels = self.points(features)
        points = torch.cat(pts_levels)
        counts = [p.shape[0] for p in pts_levels]
        dev, dt = points.device, points.dtype
        strides = torch.repeat_interleave(
            torch.tensor(self.strides, dtype=dt, device=dev), torch.tensor(counts, device=dev)
        )
        ranges = torch.repeat_interleave(
            torch.tensor(self.scale_ranges, dtype=dt, device=dev), torch.tensor(counts, device=dev), dim=0
        )
        logits = torch.cat(head_outputs["cls_logits"], dim=1)
        reg = torch.cat(head_outputs["box_regression"], dim=1)
        ctr = torch.cat(head_outputs["centerness"], dim=1)[..., 0]
        cls_sum, box_sum, ctr_sum = logits.new_zeros(()), logits.new_zeros(()), logits.new_zeros(())
        num_fg = 0
        for b, tgt in enumerate(targets):
            gt_boxes = tgt["boxes"].to(dt)
            matched = fcos_assign(points, strides, ranges, gt_boxes, self.center_sampling_radius)
            fg = matched >= 0
            cls_target = torch.zeros_like(logits[b])
            cls_target[fg, tgt["labels"][matched[fg]]] = 1.0
            cls_sum = cls_sum + sigmoid_focal_loss(
                logits[b], cls_target, self.focal_alpha, self.focal_gamma, reduction="sum"
            )
            if bool(fg.any()):
                p, g = points[fg], gt_boxes[matched[fg]]
                pred_boxes = self._decode(p, reg[b][fg] * strides[fg, None])
                box_sum = box_sum + giou_loss(pred_boxes, g, reduction="sum")
                target_ltrb = torch.cat([p - g[:, :2], g[:, 2:] - p], dim=1)
                ctr_sum = ctr_sum + F.binary_cross_entropy_with_logits(
                    ctr[b][fg], fcos_centerness_targets(target_ltrb), reduction="sum"
                )
            else:
                zero = 0.0 * (reg[b].sum() + ctr[b].sum())  # keeps the graph connected
                box_sum, ctr_sum = box_sum + zero, ctr_sum + zero
            num_fg += int(fg.sum())
        norm = max(1, num_fg)
        return {"cls": cls_sum / norm, "box": box_sum / norm, "centerness": ctr_sum / norm}

    @torch.no_grad()
    @full_precision
    def postprocess(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        features: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Per level: ``sqrt(sigmoid(cls)·sigmoid(ctr))`` > ``score_thresh``, top ``topk_candidates``, decode;
        then clip, class-wise NMS and the best ``detections_per_img``."""
        pts = self.points(features)
        results = []
        for b, size in enumerate(image_sizes):
            boxes, scores, labels = [], [], []
            for lv, p in enumerate(pts):
                s = torch.sqrt(
                    torch.sigmoid(head_outputs["cls_logits"][lv][b]) * torch.sigmoid(head_outputs["centerness"][lv][b])
                )
                vals, prior, lab = self._select(s)
                ltrb = head_outputs["box_regression"][lv][b][prior] * self.strides[lv]
                boxes.append(self._decode(p[prior], ltrb))
                scores.append(vals)
                labels.append(lab)
            results.append(self._finalize(boxes, scores, labels, size))
        return results
