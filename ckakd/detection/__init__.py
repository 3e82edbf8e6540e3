"""Detection: box utilities, plain-PyTorch dense detectors (RetinaNet, FCOS on ResNet+FPN), torchvision adapters
(torchvision imported only when one is built), NMS / RoIAlign (``ops``), the distillers on the FPN levels or the
classification branch (``distillers``, in the shared distiller registry) and the trainer task.

The names below are imported from their submodules on first access (PEP 562): ``import ckakd.detection`` (e.g. by
``ckakd --help``) does not load the detectors, the trainer task or ``ckakd.train``.
"""

import importlib as _importlib

# name -> the submodule (of this package) that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("TorchvisionDetector", "build_torchvision_detector", "torchvision_available"), "adapters"),
    **dict.fromkeys(
        (
            "BoxCoder",
            "box_area",
            "box_iou",
            "clip_boxes",
            "generalized_box_iou",
            "giou_loss",
            "iou_loss",
            "remove_small_boxes",
            "sigmoid_focal_loss",
        ),
        "boxes",
    ),
    **dict.fromkeys(
        (
            "AnchorGenerator",
            "AnchorMatcher",
            "DenseDetector",
            "FCOS",
            "ResNetFPN",
            "RetinaNet",
            "fcos_assign",
            "fcos_centerness_targets",
            "fcos_points",
        ),
        "models",
    ),
    **dict.fromkeys(("batched_nms", "nms", "roi_align"), "ops"),
    **dict.fromkeys(("DetectionTask",), "task"),
    **dict.fromkeys(("DISTILL_METHODS", "DetectionDistiller"), "distillers"),
    **dict.fromkeys(("evaluate_detector", "train_detector"), "trainer"),
}

__all__ = [
    "DISTILL_METHODS",
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
    "roi_align",
    "sigmoid_focal_loss",
]


# the submodules, also reachable as attributes (``ckakd.detection.trainer``) without an explicit import
_SUBMODULES = frozenset(
    [
        "adapters",
        "boxes",
        "config",
        "data",
        "distill",
        "distillers",
        "evaluation",
        "models",
        "ops",
        "runner",
        "task",
        "trainer",
        "visualize",
    ]
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
