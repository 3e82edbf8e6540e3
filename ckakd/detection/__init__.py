"""Detection: box utilities and plain-PyTorch dense detectors (RetinaNet, FCOS on ResNet+FPN)."""

from .boxes import (
    BoxCoder,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    generalized_box_iou,
    giou_loss,
    iou_loss,
    nms,
    remove_small_boxes,
    sigmoid_focal_loss,
)
from .models import (
    FCOS,
    AnchorGenerator,
    AnchorMatcher,
    DenseDetector,
    ResNetFPN,
    RetinaNet,
    fcos_assign,
    fcos_centerness_targets,
    fcos_points,
)

__all__ = [
    "AnchorGenerator",
    "AnchorMatcher",
    "BoxCoder",
    "DenseDetector",
    "FCOS",
    "ResNetFPN",
    "RetinaNet",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "fcos_assign",
    "fcos_centerness_targets",
    "fcos_points",
    "generalized_box_iou",
    "giou_loss",
    "iou_loss",
    "nms",
    "remove_small_boxes",
    "sigmoid_focal_loss",
]
