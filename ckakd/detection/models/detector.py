"""The dense-detector protocol (:class:`DenseDetector`: ``features`` / ``head_outputs`` / ``compute_losses`` /
``postprocess`` / ``forward``) and :func:`full_precision` for its loss and post-processing methods."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ckakd.detection.boxes import clip_boxes
from ckakd.detection.ops import batched_nms

from .fpn import ResNetFPN

__all__ = ["DenseDetector", "full_precision"]


def full_precision(fn: Callable) -> Callable:
    """Run a ``(self, head_outputs, features, ...)`` loss / post-processing method in float32 with autocast off:
    under AMP the heads give bf16/fp16 outputs, whose box decoding, IoU logs and focal sums lose too much (bf16
    FCOS training reaches NaN within two steps without this)."""

    @functools.wraps(fn)
    def wrapper(self, head_outputs, features, *args, **kwargs):
        device_type = features[0].device.type if len(features) else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            outs = {k: [t.float() for t in v] for k, v in head_outputs.items()}
            return fn(self, outs, [f.float() for f in features], *args, **kwargs)

    return wrapper


class DenseDetector(nn.Module):
    """Common protocol of :class:`RetinaNet` and :class:`FCOS`.

    * ``features(images)`` -> FPN levels, list of (B, out_channels, H_l, W_l);
    * ``head_outputs(features)`` -> dict with ``"cls_logits"``: list of (B, H_l·W_l·A, K) and
      ``"box_regression"``: list of (B, H_l·W_l·A, 4) (FCOS: A = 1 and ``"centerness"``: list of (B, H_l·W_l, 1));
    * ``compute_losses(head_outputs, features, images, targets)`` -> dict of scalar losses;
    * ``postprocess(head_outputs, features, image_sizes)`` -> per image ``{"boxes": (D, 4), "scores": (D,),
      "labels": (D,)}``, scores decreasing, ``D <= detections_per_img``;
    * ``forward(images, targets=None, image_sizes=None)``: losses in training mode when ``targets`` is given,
      detections otherwise.

    ``targets``: list (one per image) of dicts with ``"boxes"`` (N, 4) float xyxy pixels and ``"labels"`` (N,)
    int64 in ``[0, num_classes)``; N = 0 means an all-background image. Images are used as given (no resizing
    or normalization: that is the data pipeline's job); ``image_sizes`` (default: the tensor's H, W) are the
    valid (unpadded) ``(h, w)`` used to clip boxes.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: ResNetFPN,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        topk_candidates: int,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.score_thresh, self.nms_thresh = float(score_thresh), float(nms_thresh)
        self.detections_per_img, self.topk_candidates = int(detections_per_img), int(topk_candidates)
        self.feature_names: list[str] = [f"backbone.{n}" for n in backbone.fpn_level_names]

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each FPN level."""
        return self.backbone.strides

    @property
    def num_levels(self) -> int:
        """Number of FPN levels that ``features`` returns."""
        return len(self.backbone.levels)

    @property
    def fpn_channels(self) -> int:
        """Channels of every FPN level."""
        return int(self.backbone.out_channels)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """FPN levels of ``images`` (B, C, H, W): list of (B, out_channels, H_l, W_l)."""
        return self.backbone(images)

    def head_outputs(self, features: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Flattened per-level head outputs (see the class docstring)."""
        return self.head(features)

    def _check_targets(self, targets: Sequence[dict[str, torch.Tensor]], batch: int) -> None:
        if not isinstance(targets, (list, tuple)) or len(targets) != batch:
            n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise ValueError(f"targets must be a list of {batch} dicts (one per image), got {n}")
        for i, t in enumerate(targets):
            if "boxes" not in t or "labels" not in t:
                raise ValueError(f"targets[{i}] needs 'boxes' and 'labels', got keys {sorted(t)}")
            boxes, labels = t["boxes"], t["labels"]
            if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(
                    f"targets[{i}]['boxes'] must be float (N, 4) xyxy, got {tuple(boxes.shape)} {boxes.dtype}"
                )
            if labels.shape != (boxes.shape[0],) or labels.dtype != torch.long:
                raise ValueError(
                    f"targets[{i}]['labels'] must be int64 ({boxes.shape[0]},), got "
                    f"{tuple(labels.shape)} {labels.dtype}"
                )
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"targets[{i}]['labels'] must lie in [0, {self.num_classes}), got "
                    f"{labels.min().item()}..{labels.max().item()}"
                )
            if boxes.numel() and bool(((boxes[:, 2:] - boxes[:, :2]) <= 0).any()):
                raise ValueError(f"targets[{i}]['boxes'] must have x2 > x1 and y2 > y1")

    def _image_sizes(
        self, image_sizes: Sequence[tuple[int, int]] | None, images: torch.Tensor
    ) -> list[tuple[int, int]]:
        if image_sizes is None:
            return [tuple(images.shape[-2:])] * images.shape[0]
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"image_sizes needs one (h, w) per image ({images.shape[0]}), got {len(image_sizes)}")
        return [(int(h), int(w)) for h, w in image_sizes]

    def _select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``scores`` (N, K) -> (kept scores, prior indices, labels): above ``score_thresh``, top-k."""
        k = scores.shape[1]
        flat = scores.flatten()
        idx = torch.nonzero(flat > self.score_thresh).flatten()
        vals = flat[idx]
        if idx.numel() > self.topk_candidates:
            vals, order = vals.topk(self.topk_candidates)
            idx = idx[order]
        return vals, idx // k, idx % k

    def _finalize(
        self, boxes: list[torch.Tensor], scores: list[torch.Tensor], labels: list[torch.Tensor], size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        boxes_t, scores_t, labels_t = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        boxes_t = clip_boxes(boxes_t, size)
        keep = batched_nms(boxes_t, scores_t, labels_t, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes_t[keep], "scores": scores_t[keep], "labels": labels_t[keep]}

    def forward(
        self,
        images: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training with ``targets``: dict of scalar losses. Otherwise: list of per-image detection dicts."""
        feats = self.features(images)
        outs = self.head_outputs(feats)
        if self.training and targets is not None:
            return self.compute_losses(outs, feats, images, targets)
        return self.postprocess(outs, feats, self._image_sizes(image_sizes, images))
