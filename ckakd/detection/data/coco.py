"""A COCO-format folder as a detection dataset: :class:`CocoDetection` (images + an instances JSON, checked and
cleaned once at construction)."""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .coco_json import (
    EMPTY_SECTIONS,
    Annotation,
    int_field,
    is_number,
    parse_annotation,
    refuse_duplicates,
    require_field,
)
from .transforms import BoxTransform, Target, apply_box_transform

__all__ = ["CocoDetection"]


def _id_list(ids: Sequence[str], limit: int = 8) -> str:
    """`` (ids 3, 7, ...)`` for a warning, or ``""``."""
    if not ids:
        return ""
    return " (ids " + ", ".join(ids[:limit]) + (", ..." if len(ids) > limit else "") + ")"


def _load_rgb(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class CocoDetection(Dataset):
    """Images in ``images_dir`` described by a COCO instances JSON (``images``, ``annotations``, ``categories``).

    Category ids are mapped to contiguous labels in sorted id order (``cat_id_to_label``,
    ``label_to_cat_id``); ``bbox`` [x, y, w, h] becomes xyxy. Crowd annotations (``iscrowd=1``) are not
    used as training boxes (they stay in :meth:`to_coco` as COCOeval's ignore regions).

    The JSON is checked once, at construction (before any training), and a malformed file is refused with a
    ``ValueError`` naming the file and the entry (its index and, for annotations, its id): a missing or empty
    ``images`` / ``annotations`` / ``categories``; an id, ``image_id``, ``category_id``, ``height`` or
    ``width`` that is not a JSON integer (a string ``"12"`` included); duplicate image, category or annotation
    ids (listed); a ``bbox`` that is not 4 numbers; an ``iscrowd`` other than 0 / 1; a non-numeric ``area``;
    no usable image, or no box left after the cleaning below. Bad values in well-formed entries are repaired
    or skipped, never fatal:

    * ``clipped_box``: a box reaching outside its image is clipped to it (and kept);
    * ``outside_box``: a box with nothing left inside the image is dropped;
    * ``degenerate_box``: a zero/negative width or height, or a non-finite value, is dropped;
    * ``unknown_category`` / ``unknown_image``: an annotation naming a category / image id not in the JSON;
    * ``missing_image`` / ``undecodable_image``: an image whose file is absent / cannot be read by PIL is
      skipped (checked at construction from the file header when ``check_images=True``; a file that only
      fails when fully decoded is skipped at load time, returning the next good image instead);
    * ``crowd``: crowd annotations left out of the training targets;
    * ``bad_area``: a zero, negative or non-finite ``area`` is replaced by the (cleaned) box area;
    * ``size_mismatch``: an image whose JSON ``height`` / ``width`` differ from its file's (the file's size
      is used, for clipping and scoring alike; its ids are listed: its boxes may be in another frame).

    The counts are in ``dataset.skipped`` and reported in one ``UserWarning`` per dataset with the ids of
    the annotations (images, for ``size_mismatch``) concerned (load-time decode failures in one more, the
    first time one happens; counts from DataLoader worker processes stay in the workers). :meth:`to_coco`
    is the cleaned ground truth, which :class:`~ckakd.detection.task.DetectionTask` scores against.
    ``check_images=False`` takes sizes from the JSON ``height``/``width`` instead of the files. Missing
    ``images_dir`` or ``annotation_file``: ``FileNotFoundError``. ``transform(image, target)`` is applied
    per item.
    """

    SKIP_KINDS = (
        "clipped_box",
        "outside_box",
        "degenerate_box",
        "unknown_category",
        "unknown_image",
        "missing_image",
        "undecodable_image",
        "crowd",
        "bad_area",
        "size_mismatch",
    )

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        transform: BoxTransform | None = None,
        check_images: bool = True,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO images folder not found: {self.images_dir}")
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotation_file}")
        try:
            with open(self.annotation_file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.annotation_file}: not valid JSON ({exc})") from exc
        src = str(self.annotation_file)
        if not isinstance(data, dict):
            raise ValueError(f"{src}: expected a JSON object at the top level, got {type(data).__name__}")
        images = require_field(data, "images", src)
        annotations = require_field(data, "annotations", src)
        categories = require_field(data, "categories", src)
        for key, value in (("images", images), ("annotations", annotations), ("categories", categories)):
            if not isinstance(value, list):
                raise ValueError(f"{src}: {key!r} must be a list, got {type(value).__name__}")
            if not value:
                raise ValueError(f"{src}: {key!r} is empty: {EMPTY_SECTIONS[key]}")

        cat_ids = [int_field(c, "id", f"{src}: categories[{i}]") for i, c in enumerate(categories)]
        refuse_duplicates(cat_ids, "category", src)
        self.categories: list[dict[str, Any]] = sorted(categories, key=lambda c: int(c["id"]))
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(sorted(cat_ids))}
        self.label_to_cat_id: dict[int, int] = {i: c for c, i in self.cat_id_to_label.items()}
        self.num_classes = len(cat_ids)
        self.transform = transform
        self.skipped: dict[str, int] = dict.fromkeys(self.SKIP_KINDS, 0)
        self._skipped_ids: dict[str, list[str]] = {k: [] for k in self.SKIP_KINDS}

        image_ids = [int_field(img, "id", f"{src}: images[{i}]") for i, img in enumerate(images)]
        refuse_duplicates(image_ids, "image", src)
        # every annotation checked before any image is probed: a broken file fails at once, naming the entry
        parsed = [parse_annotation(ann, f"{src}: annotations[{i}]", i) for i, ann in enumerate(annotations)]
        refuse_duplicates([a.ann_id for a in parsed if a.ann_id is not None], "annotation", src)

        # images: id -> (file name, (H, W)), keeping only readable ones
        self.image_ids: list[int] = []
        self._files: dict[int, str] = {}
        self._sizes: dict[int, tuple[int, int]] = {}
        known_images = set(image_ids)
        for i, (img, image_id) in enumerate(zip(images, image_ids, strict=True)):
            where = f"{src}: images[{i}]"
            file_name = require_field(img, "file_name", where)
            if not isinstance(file_name, str) or not file_name:
                raise ValueError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}")
            if check_images:
                size = self._probe(self.images_dir / file_name)
                if size is None:
                    continue
                stated = (img.get("height"), img.get("width"))
                if all(is_number(v) for v in stated) and tuple(int(v) for v in stated) != size:
                    self.skipped["size_mismatch"] += 1  # the file's size is used; the boxes may be in another frame
                    self._skipped_ids["size_mismatch"].append(str(image_id))
            else:
                size = (int_field(img, "height", where, positive=True), int_field(img, "width", where, positive=True))
            self.image_ids.append(image_id)
            self._files[image_id] = file_name
            self._sizes[image_id] = size
        if not self.image_ids:
            raise ValueError(
                f"{src}: none of the {len(images)} images listed in {self.annotation_file} was found and decodable "
                f"in {self.images_dir} (missing_image={self.skipped['missing_image']}, "
                f"undecodable_image={self.skipped['undecodable_image']})"
            )

        # the ground truth exactly as trained on and scored against (see to_coco): cleaned boxes in xyxy
        per_image: dict[int, tuple[list[list[float]], list[int]]] = {i: ([], []) for i in self.image_ids}
        self._gt_annotations: list[dict[str, Any]] = []
        for ann in parsed:
            if ann.image_id not in known_images:
                self._skip("unknown_image", ann)
                continue
            if ann.image_id not in per_image:  # its image was skipped: already counted there
                continue
            if ann.category_id not in self.cat_id_to_label:
                self._skip("unknown_category", ann)
                continue
            box = self._clean_box(ann, self._sizes[ann.image_id])
            if box is None:
                continue
            area = ann.area
            if area is not None and not (math.isfinite(area) and area > 0):
                self._skip("bad_area", ann)
                area = None
            if area is None:
                area = (box[2] - box[0]) * (box[3] - box[1])
            self._gt_annotations.append(
                {
                    "id": ann.ann_id,
                    "image_id": ann.image_id,
                    "category_id": ann.category_id,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": float(area),
                    "iscrowd": int(ann.iscrowd),
                }
            )
            if ann.iscrowd:  # an ignore region when scored, never a training box
                self.skipped["crowd"] += 1
                continue
            per_image[ann.image_id][0].append(box)
            per_image[ann.image_id][1].append(self.cat_id_to_label[ann.category_id])
        self._boxes = {k: torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for k, (b, _) in per_image.items()}
        self._labels = {k: torch.tensor(lab, dtype=torch.long) for k, (_, lab) in per_image.items()}
        self._warned_load = False
        if not any(len(v) for v in self._labels.values()):
            counts = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v)
            raise ValueError(
                f"{src}: no box is left on the {len(self.image_ids)} usable images after cleaning ({counts}): "
                "there is nothing to train on and COCO AP is undefined"
            )
        self._warn(f"{src}: ")

    def _skip(self, kind: str, ann: Annotation) -> None:
        self.skipped[kind] += 1
        self._skipped_ids[kind].append(str(ann.ann_id) if ann.ann_id is not None else f"annotations[{ann.index}]")

    def to_coco(self) -> dict[str, Any]:
        """The COCO ground truth this dataset trains and validates on (what :class:`CocoEvaluator` should score).

        ``images``: the usable images (``height`` / ``width`` as loaded); ``annotations``: every kept box, as the
        loader cleaned it (clipped to its image; dropped entries are absent), ``bbox`` [x, y, w, h] in the stored
        image's pixels, ``area`` from the JSON when it is a positive number (COCO's mask area, which sets the
        small / medium / large ranges) else the cleaned box's area, the JSON ``id`` (numbered after the largest
        one when missing). Crowd regions are kept with ``iscrowd=1``: COCOeval ignores detections on them,
        as on the official ground truth; they are never training boxes.
        """
        used = {a["id"] for a in self._gt_annotations if a["id"] is not None}
        next_id = max(used, default=0) + 1
        annotations = []
        for a in self._gt_annotations:
            a = dict(a)
            if a["id"] is None:
                a["id"], next_id = next_id, next_id + 1
            annotations.append(a)
        images = [
            {"id": i, "file_name": self._files[i], "height": self._sizes[i][0], "width": self._sizes[i][1]}
            for i in self.image_ids
        ]
        return {"images": images, "annotations": annotations, "categories": copy.deepcopy(self.categories)}

    def _probe(self, path: Path) -> tuple[int, int] | None:
        """(H, W) from the file header, or None (counted) when the file is missing or not an image."""
        from PIL import Image

        if not path.is_file():
            self.skipped["missing_image"] += 1
            return None
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
            self.skipped["undecodable_image"] += 1
            return None
        return int(h), int(w)

    def _clean_box(self, ann: Annotation, size: tuple[int, int]) -> list[float] | None:
        """xywh -> clipped xyxy, or None (counted) when the box is degenerate or fully outside its (H, W) image."""
        x, y, w, h = ann.bbox
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            self._skip("degenerate_box", ann)
            return None
        H, W = size
        x0, y0, x1, y1 = x, y, x + w, y + h
        cx0, cy0, cx1, cy1 = min(max(x0, 0.0), W), min(max(y0, 0.0), H), min(max(x1, 0.0), W), min(max(y1, 0.0), H)
        if cx1 <= cx0 or cy1 <= cy0:
            self._skip("outside_box", ann)
            return None
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            self._skip("clipped_box", ann)
        return [cx0, cy0, cx1, cy1]

    def _warn(self, prefix: str) -> None:
        counts = {k: v for k, v in self.skipped.items() if v}
        if counts:
            detail = ", ".join(f"{k}={v}{_id_list(self._skipped_ids.get(k, []))}" for k, v in counts.items())
            warnings.warn(f"{prefix}CocoDetection repaired or skipped bad input: {detail}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.image_ids)

    def target(self, index: int) -> Target:
        """The target of item ``index`` without loading the image (before any transform)."""
        image_id = self.image_ids[index]
        return {
            "boxes": self._boxes[image_id].clone(),
            "labels": self._labels[image_id].clone(),
            "image_id": image_id,
            "orig_size": self._sizes[image_id],
        }

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        n = len(self.image_ids)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for offset in range(n):
            i = (index + offset) % n
            path = self.images_dir / self._files[self.image_ids[i]]
            try:
                image = _load_rgb(path)
            except Exception as exc:  # decode failure at load time: skip to the next image
                self.skipped["undecodable_image"] += 1
                if not self._warned_load:
                    self._warned_load = True
                    warnings.warn(
                        f"CocoDetection: could not decode {path} ({exc}); using the next image instead "
                        "(further load-time failures are only counted in dataset.skipped)",
                        stacklevel=2,
                    )
                continue
            target = self.target(i)
            if tuple(image.shape[-2:]) != target["orig_size"]:
                raise ValueError(
                    f"{path}: the image is {tuple(image.shape[-2:])} but the annotations say {target['orig_size']}"
                )
            if self.transform is not None:
                image, target = apply_box_transform(self.transform, image, target, None)
            return image, target
        raise RuntimeError(f"CocoDetection: none of the {n} images in {self.images_dir} could be decoded")
