"""Detection: box utilities, plain-PyTorch dense detectors (RetinaNet, FCOS on ResNet+FPN), torchvision adapters
(torchvision imported only when one is built), the FPN / classification-branch distiller and the trainer task."""

from .adapters import TorchvisionDetector, build_torchvision_detector, torchvision_available
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
from .task import DetectionTask
from .trainer import DetectionDistiller, evaluate_detector, train_detector

__all__ = [
    "DetectionDistiller",
    "DetectionTask",
    "TorchvisionDetector",
    "build_torchvision_detector",
    "evaluate_detector",
    "torchvision_available",
    "train_detector",
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
