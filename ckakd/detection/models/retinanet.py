"""RetinaNet (Lin et al. 2017) on a :class:`~ckakd.detection.models.fpn.ResNetFPN`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ckakd.detection.boxes import BoxCoder, box_iou, sigmoid_focal_loss

from .anchors import AnchorGenerator, AnchorMatcher
from .detector import DenseDetector, full_precision
from .fpn import ResNetFPN
from .heads import RetinaNetHead

__all__ = ["RetinaNet"]


class RetinaNet(DenseDetector):
    """RetinaNet (Lin et al. 2017) on a :class:`ResNetFPN` (P6 from C5).

    Losses (normalized by the batch's number of foreground anchors, at least 1): ``"cls"`` sigmoid focal loss
    (α = 0.25, γ = 2) over all non-ignored anchors, ``"box"`` L1 (or smooth-L1 with ``box_loss="smooth_l1"``,
    β = 1/9) on the :class:`BoxCoder` deltas of foreground anchors. Anchors: IoU >= ``fg_iou`` foreground,
    < ``bg_iou`` background, in between ignored, plus low-quality matches.

    ``head_norm=False`` is the paper's head (plain convs, N(0, 0.01) init); ``head_norm=True`` adds GroupNorm
    after each tower conv. Narrow heads need it: at 32 channels the paper's head shrinks the signal ~8x per conv
    and trains several times slower (R18 width-16 on 64-px synthetic digits, 768 steps at lr 0.05: val AP 12
    without, 45 with).
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
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        fg_iou: float = 0.5,
        bg_iou: float = 0.4,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "l1",
        prior_prob: float = 0.01,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        head_norm: bool = False,
    ) -> None:
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        backbone = ResNetFPN(depth, width, out_channels, in_channels, levels, extra_from="c5")
        super().__init__(num_classes, backbone, score_thresh, nms_thresh, detections_per_img, topk_candidates)
        self.anchor_generator = AnchorGenerator.retinanet(
            backbone.levels, octave_base_scale, scales_per_octave, aspect_ratios
        )
        num_anchors = self.anchor_generator.num_anchors_per_location[0]
        self.head = RetinaNetHead(out_channels, num_anchors, num_classes, num_convs, prior_prob, norm=head_norm)
        self.matcher = AnchorMatcher(fg_iou, bg_iou, allow_low_quality_matches=True)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.focal_alpha, self.focal_gamma, self.box_loss = focal_alpha, focal_gamma, box_loss

    @full_precision
    def compute_losses(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        features: Sequence[torch.Tensor],
        images: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``{"cls": focal loss, "box": L1 on deltas}``, each a scalar normalized by the foreground count."""
        self._check_targets(targets, images.shape[0])
        anchors = torch.cat(self.anchor_generator(features))
        logits = torch.cat(head_outputs["cls_logits"], dim=1)
        deltas = torch.cat(head_outputs["box_regression"], dim=1)
        cls_sum = logits.new_zeros(())
        box_sum = logits.new_zeros(())
        num_fg = 0
        for b, tgt in enumerate(targets):
            gt_boxes = tgt["boxes"].to(anchors.dtype)
            matches = self.matcher(box_iou(gt_boxes, anchors))
            fg = matches >= 0
            valid = matches != AnchorMatcher.BETWEEN_THRESHOLDS
            cls_target = torch.zeros_like(logits[b])
            cls_target[fg, tgt["labels"][matches[fg]]] = 1.0
            cls_sum = cls_sum + sigmoid_focal_loss(
                logits[b][valid], cls_target[valid], self.focal_alpha, self.focal_gamma, reduction="sum"
            )
            if bool(fg.any()):
                target_deltas = self.box_coder.encode(anchors[fg], gt_boxes[matches[fg]])
                if self.box_loss == "l1":
                    box_sum = box_sum + F.l1_loss(deltas[b][fg], target_deltas, reduction="sum")
                else:
                    box_sum = box_sum + F.smooth_l1_loss(deltas[b][fg], target_deltas, reduction="sum", beta=1 / 9)
            else:
                box_sum = box_sum + 0.0 * deltas[b].sum()  # keeps the graph connected
            num_fg += int(fg.sum())
        norm = max(1, num_fg)
        return {"cls": cls_sum / norm, "box": box_sum / norm}

    @torch.no_grad()
    @full_precision
    def postprocess(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        features: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Per level: sigmoid scores > ``score_thresh``, top ``topk_candidates``, decode; then clip, class-wise
        NMS and the best ``detections_per_img``."""
        anchors = self.anchor_generator(features)
        results = []
        for b, size in enumerate(image_sizes):
            boxes, scores, labels = [], [], []
            for lv, anc in enumerate(anchors):
                vals, prior, lab = self._select(torch.sigmoid(head_outputs["cls_logits"][lv][b]))
                boxes.append(self.box_coder.decode(anc[prior], head_outputs["box_regression"][lv][b][prior]))
                scores.append(vals)
                labels.append(lab)
            results.append(self._finalize(boxes, scores, labels, size))
        return results
