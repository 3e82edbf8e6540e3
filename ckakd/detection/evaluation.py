"""COCO box mAP through pycocotools' ``COCOeval`` (install with ``pip install pycocotools`` or the
``ckakd[detection]`` extra).

Predictions are given per image as ``{"boxes": (N, 4) xyxy in the ground truth's pixel frame, "scores": (N,),
"labels": (N,) contiguous labels}``; :class:`CocoEvaluator` converts them to COCO results (``bbox`` [x, y, w, h],
``category_id`` from ``label_to_cat_id``) and reports AP, AP50, AP75, APs, APm, APl.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ckakd.detection.data.coco_json import int_field, parse_annotation, refuse_duplicates

__all__ = ["CocoEvaluator", "METRIC_NAMES", "load_ground_truth", "rescale_boxes"]

# The first six entries of COCOeval.stats, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

_MISSING = (
    "CocoEvaluator needs pycocotools, which is not installed: run `pip install pycocotools` "
    "(or install the detection extra: `pip install -e .[detection]`)"
)


def _import_pycocotools() -> tuple[Any, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return COCO, COCOeval


def rescale_boxes(boxes: Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> Tensor:
    """Map xyxy boxes (N, 4) from an image of size ``from_size`` (H, W) to one of ``to_size`` (H, W)
    (e.g. from the resized network input back to ``target["orig_size"]`` before :meth:`CocoEvaluator.update`)."""
    fh, fw = (float(v) for v in from_size)
    th, tw = (float(v) for v in to_size)
    factors = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], dtype=boxes.dtype, device=boxes.device)
    return boxes * factors


def _as_numpy(x: Any, name: str, ndim: int) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.size == 0:
        return arr.reshape((0, 4) if ndim == 2 else (0,))
    if arr.ndim != ndim or (ndim == 2 and arr.shape[1] != 4):
        raise ValueError(f"prediction {name!r} must have shape {'(N, 4)' if ndim == 2 else '(N,)'}, got {arr.shape}")
    return arr


def load_ground_truth(coco_gt: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A COCO ground truth (a dict or a JSON path) checked and completed for ``COCOeval``; a deep copy.

    Refused with a ``ValueError`` naming the file (or "COCO ground truth") and the entry: a missing or empty
    ``images`` / ``annotations`` / ``categories``, ids that are not JSON integers, duplicate image or category
    ids (listed), a ``bbox`` that is not 4 numbers (with the annotation id), an ``iscrowd`` other than 0 / 1.
    Completed: ``area`` = box area when missing, zero, negative or not finite; ``iscrowd`` = 0 when missing;
    annotation ids renumbered from 1 when any is missing, not positive or repeated (COCOeval treats id 0 as
    "unmatched"). The checks are those of :class:`~ckakd.detection.data.CocoDetection`
    (:mod:`ckakd.detection.data.coco_json`)."""
    src = "COCO ground truth"
    if isinstance(coco_gt, str | Path):
        path = Path(coco_gt)
        if not path.is_file():
            raise FileNotFoundError(f"COCO ground-truth file not found: {path}")
        src = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                coco_gt = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{src}: not valid JSON ({exc})") from exc
    if not isinstance(coco_gt, Mapping):
        raise TypeError(f"coco_gt must be a COCO dict or a path, got {type(coco_gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in coco_gt:
            raise ValueError(f"{src}: missing required key {key!r}")
        if not isinstance(coco_gt[key], list):
            raise ValueError(f"{src}: {key!r} must be a list, got {type(coco_gt[key]).__name__}")
        if not coco_gt[key]:
            raise ValueError(f"{src}: {key!r} is empty: COCOeval needs {key}")
    gt = copy.deepcopy(dict(coco_gt))
    refuse_duplicates(
        [int_field(c, "id", f"{src}: categories[{i}]") for i, c in enumerate(gt["categories"])], "category", src
    )
    refuse_duplicates([int_field(m, "id", f"{src}: images[{i}]") for i, m in enumerate(gt["images"])], "image", src)
    anns = gt["annotations"]
    parsed = [parse_annotation(a, f"{src}: annotations[{i}]", i) for i, a in enumerate(anns)]
    ids = [p.ann_id for p in parsed]
    renumber = any(i is None or i <= 0 for i in ids) or len(set(ids)) != len(ids)
    for i, (a, p) in enumerate(zip(anns, parsed, strict=True)):
        if renumber:
            a["id"] = i + 1
        a["iscrowd"] = int(p.iscrowd)
        if p.area is None or not (math.isfinite(p.area) and p.area > 0):
            a["area"] = p.bbox[2] * p.bbox[3]
    gt.setdefault("info", {})
    return gt


class CocoEvaluator:
    """Accumulate per-image predictions and score them against COCO ground truth with ``COCOeval`` (bbox).

    ``coco_gt``: a COCO ground-truth dict (``images``, ``annotations``, ``categories``; e.g.
    :meth:`SyntheticDigitsDetection.to_coco`, :meth:`CocoDetection.to_coco` — the cleaned ground truth a
    model trains on) or the path of such a JSON file, checked and completed by :func:`load_ground_truth`.

    ``label_to_cat_id``: maps contiguous labels to category ids (a dict, or a sequence indexed by label);
    default: label ``i`` is the ``i``-th smallest category id (the mapping :class:`CocoDetection` uses).

    Only images passed to :meth:`update` are evaluated. :meth:`compute` returns ``{"AP", "AP50", "AP75",
    "APs", "APm", "APl"}`` as floats in [0, 1]; a metric COCOeval leaves undefined (-1: no ground truth in
    that area range) is reported as 0.0, and the raw 12 ``COCOeval.stats`` are kept in ``self.stats``.
    With no predictions at all every metric is 0.0. An image given again to :meth:`update` keeps its first
    detections (counted in ``self.repeated``): a padded ``DistributedSampler`` shard, or the loader's
    substitute for an undecodable image, repeats images, whose copies would score as false positives.
    pycocotools' printing is suppressed unless
    ``verbose=True``.
    """

    def __init__(
        self,
        coco_gt: Mapping[str, Any] | str | Path,
        label_to_cat_id: Mapping[int, int] | Sequence[int] | None = None,
        verbose: bool = False,
    ) -> None:
        self._COCO, self._COCOeval = _import_pycocotools()
        gt = load_ground_truth(coco_gt)
        self.verbose = bool(verbose)
        self.gt_dict = gt
        with self._quiet():
            self.coco_gt = self._COCO()
            self.coco_gt.dataset = self.gt_dict
            self.coco_gt.createIndex()
        cat_ids = sorted(int(c["id"]) for c in self.gt_dict["categories"])
        if label_to_cat_id is None:
            self.label_to_cat_id: dict[int, int] = dict(enumerate(cat_ids))
        elif isinstance(label_to_cat_id, Mapping):
            self.label_to_cat_id = {int(k): int(v) for k, v in label_to_cat_id.items()}
        else:
            self.label_to_cat_id = {i: int(v) for i, v in enumerate(label_to_cat_id)}
        unknown = sorted(set(self.label_to_cat_id.values()) - set(cat_ids))
        if unknown:
            raise ValueError(f"label_to_cat_id maps to category ids {unknown} that are not in the ground truth")
        self._gt_image_ids = {int(img["id"]) for img in self.gt_dict["images"]}
        self.reset()

    def _quiet(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())

    def reset(self) -> None:
        """Forget all predictions."""
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []
        self._seen: set[int] = set()
        self.repeated = 0
        self.stats: list[float] = []

    def update(self, predictions: Sequence[Mapping[str, Any]], image_ids: Sequence[int] | Tensor) -> None:
        """Add one batch: ``predictions[i]`` (``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,)) for
        image ``image_ids[i]``. Boxes must be in the ground truth's pixel frame (see :func:`rescale_boxes`)."""
        ids = [int(i) for i in (image_ids.tolist() if isinstance(image_ids, Tensor) else image_ids)]
        if len(ids) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(ids)} image ids")
        for image_id, pred in zip(ids, predictions, strict=True):
            if image_id not in self._gt_image_ids:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            for key in ("boxes", "scores", "labels"):
                if key not in pred:
                    raise ValueError(f"prediction for image {image_id} is missing {key!r}")
            boxes = _as_numpy(pred["boxes"], "boxes", 2).astype(np.float64)
            scores = _as_numpy(pred["scores"], "scores", 1).astype(np.float64)
            labels = _as_numpy(pred["labels"], "labels", 1).astype(np.int64)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(
                    f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels differ"
                )
            unknown = sorted({int(v) for v in labels} - set(self.label_to_cat_id))
            if unknown:
                raise ValueError(f"image {image_id}: label {unknown[0]} has no category id in label_to_cat_id")
            if image_id in self._seen:  # scored once: a repeat would count its detections as false positives
                self.repeated += 1
                continue
            self.image_ids.append(image_id)
            self._seen.add(image_id)
            for box, score, label in zip(boxes, scores, labels, strict=True):
                x0, y0, x1, y1 = (float(v) for v in box)
                self.results.append(
                    {
                        "image_id": image_id,
                        "category_id": self.label_to_cat_id[int(label)],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(score),
                    }
                )

    def compute(self) -> dict[str, float]:
        """COCO bbox AP over the images seen so far: ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in [0, 1]."""
        if not self.results:
            self.stats = [0.0] * 12
            return dict.fromkeys(METRIC_NAMES, 0.0)
        with self._quiet():
            coco_dt = self.coco_gt.loadRes(copy.deepcopy(self.results))
            evaluator = self._COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            evaluator.params.imgIds = sorted(set(self.image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        self.stats = [float(s) for s in evaluator.stats]
        return {
            name: (value if math.isfinite(value) and value >= 0.0 else 0.0)
            for name, value in zip(METRIC_NAMES, self.stats[:6], strict=False)
        }
