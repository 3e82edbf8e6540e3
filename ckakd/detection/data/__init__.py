"""Detection datasets, box-aware transforms and loaders (no network access, nothing downloaded).

Every dataset item is ``(image, target)``: ``image`` a float tensor (3, H, W) in [0, 1]; ``target`` a dict

* ``boxes``: (N, 4) float32, ``x0, y0, x1, y1`` in pixels. Pixel ``(row i, col j)`` covers
  ``[j, j + 1) x [i, i + 1)``, so a box that tightly encloses columns ``a..b`` has ``x0 = a``, ``x1 = b + 1``.
* ``labels``: (N,) int64, contiguous class indices 0..K-1.
* ``image_id``: int.
* ``orig_size``: ``(H, W)`` of the image as stored (transforms change the image and the boxes, never this).

Two datasets: :class:`SyntheticDigitsDetection` (scikit-learn's 8x8 digits pasted at several scales on
textured canvases, generated deterministically from a seed) and :class:`CocoDetection` (a folder of images
plus a COCO instances JSON). Box-aware transforms are called as ``t(image, target, generator=None)``.
:func:`make_detection_loader` batches with :func:`detection_collate` (zero padding to the batch's largest
image) and is seeded like :func:`ckakd.train.data.make_loader`.

Modules: ``synthetic`` (the digits set), ``coco`` (the COCO folder), ``coco_json`` (the instances JSON's checks),
``transforms`` (box-aware transforms), ``loader`` (collate and loader). Every name below is importable from here.
"""

from .coco import CocoDetection
from .coco_json import Annotation, int_field, parse_annotation, refuse_duplicates
from .loader import DetectionCollate, detection_collate, make_detection_loader
from .synthetic import DIGIT_ALPHA_MIN, MIN_VISIBLE_FRACTION, DigitPlacement, SyntheticDigitsDetection, digit_alpha
from .transforms import BoxTransform, ComposeBoxes, RandomHorizontalFlipBoxes, ResizeBoxes, Target, apply_box_transform

__all__ = [
    "CocoDetection",
    "ComposeBoxes",
    "DetectionCollate",
    "DigitPlacement",
    "RandomHorizontalFlipBoxes",
    "ResizeBoxes",
    "SyntheticDigitsDetection",
    "detection_collate",
    "digit_alpha",
    "make_detection_loader",
    "apply_box_transform",
    "Annotation",
    "int_field",
    "parse_annotation",
    "refuse_duplicates",
    "DIGIT_ALPHA_MIN",
    "MIN_VISIBLE_FRACTION",
    "Target",
    "BoxTransform",
]
