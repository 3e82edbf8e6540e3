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
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ckakd.train.data import seeded_loader

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
]

Target = dict[str, Any]
BoxTransform = Callable[..., tuple[Tensor, Target]]

# A pixel of an upsampled digit belongs to the object when its bilinear intensity is at least this
# (fainter pixels are set to exactly 0, so what is drawn and what the box encloses are the same pixels).
DIGIT_ALPHA_MIN = 0.1
# An earlier object is dropped once less than this fraction of its pixels is still visible (more than
# 70 % covered by later objects).
MIN_VISIBLE_FRACTION = 0.3


# --------------------------------------------------------------------------------------------
# Synthetic digits detection
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _digit_pool(split: str) -> tuple[Tensor, Tensor]:
    """The split's digit images (N, 8, 8) float in [0, 1] and labels (N,) long (a fixed split, seed 0)."""
    from ckakd.train.data import load_digits_dataset

    ds = load_digits_dataset(split=split, seed=0)
    images, labels = ds.tensors
    return images[:, 0].contiguous(), labels.contiguous()


def digit_alpha(digit: Tensor, scale: int) -> Tensor:
    """Bilinearly upsample one digit (8, 8) in [0, 1] to (scale, scale); values below ``DIGIT_ALPHA_MIN`` become 0."""
    if digit.ndim != 2:
        raise ValueError(f"expected a digit of shape (8, 8), got {tuple(digit.shape)}")
    alpha = F.interpolate(digit[None, None].float(), size=(scale, scale), mode="bilinear", align_corners=False)[0, 0]
    alpha = alpha.clamp(0.0, 1.0)
    return torch.where(alpha >= DIGIT_ALPHA_MIN, alpha, torch.zeros_like(alpha))


def _tight_box(mask: Tensor) -> tuple[int, int, int, int]:
    """Tight ``(x0, y0, x1, y1)`` (exclusive ends) of the True pixels of a non-empty (h, w) mask."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class DigitPlacement:
    """One pasted digit: ``digit_index`` into the split's pool, ``scale`` (paste square side), paste square
    top-left ``(top, left)``, ``color`` (3,) RGB, its ``box`` (x0, y0, x1, y1) and whether it was ``kept``
    (False: more than 70 % covered by later digits, so it has no box in the target)."""

    digit_index: int
    label: int
    scale: int
    top: int
    left: int
    color: tuple[float, float, float]
    box: tuple[int, int, int, int]
    kept: bool


class SyntheticDigitsDetection(Dataset):
    """scikit-learn's 8x8 digits pasted on textured RGB canvases: a small, exact detection dataset.

    Each image (3, H, W) is a seeded texture (smooth noise, a linear gradient or stripes) with
    ``min_objects..max_objects`` digits pasted on it. A digit is bilinearly upsampled to a random integer
    side in ``scales`` (inclusive), tinted with a random colour contrasting with the canvas under it, and
    alpha-composited (its intensity is the alpha). Its box is the tight box of its non-zero pixels after
    scaling (not the paste square). Labels are the digit classes 0..9.

    Occlusion (``occlusion=True``): digits are pasted in order and may overlap, a later digit covering an
    earlier one; an earlier digit whose still-visible pixels fall below 30 % of its pixels (more than 70 %
    covered) is dropped from the target. Kept digits keep their full (amodal) box. Placements that would
    leave fewer than ``min_objects`` digits are re-drawn (30 tries; a digit that finds no valid place is
    left out, which with the defaults does not happen). ``occlusion=False``: digit boxes never overlap.

    Everything is a function of ``(seed, split, index)``; the ``"train"`` and ``"val"`` splits draw from
    disjoint digit images (the fixed stratified split of :func:`ckakd.train.data.load_digits_dataset`).
    Category ids in :meth:`to_coco` are ``label + 1`` (``label_to_cat_id``).
    """

    num_classes = 10

    def __init__(
        self,
        num_images: int = 256,
        image_size: int | tuple[int, int] = (128, 128),
        min_objects: int = 1,
        max_objects: int = 4,
        scales: tuple[int, int] = (16, 48),
        occlusion: bool = True,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        if h < 8 or w < 8:
            raise ValueError(f"image_size must be at least 8 x 8, got {(h, w)}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        lo, hi = int(scales[0]), int(scales[1])
        if not 8 <= lo <= hi <= min(h, w):
            raise ValueError(f"scales must satisfy 8 <= low <= high <= min(image_size) = {min(h, w)}, got {scales}")
        self.num_images = int(num_images)
        self.image_size = (h, w)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.scales = (lo, hi)
        self.occlusion = bool(occlusion)
        self.seed = int(seed)
        self.split = split
        self.digits, self.digit_labels = _digit_pool(split)
        self.categories: list[dict[str, Any]] = [
            {"id": c + 1, "name": str(c), "supercategory": "digit"} for c in range(self.num_classes)
        ]
        self.label_to_cat_id: dict[int, int] = {c: c + 1 for c in range(self.num_classes)}
        self.cat_id_to_label: dict[int, int] = {c + 1: c for c in range(self.num_classes)}

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image, target, _, _ = self.render(index)
        return image, target

    # ---- rendering ---------------------------------------------------------------------------

    def _background(self, g: torch.Generator) -> Tensor:
        """A textured canvas (3, H, W) in [0.15, 0.85] (plus a little pixel noise)."""
        h, w = self.image_size
        kind = int(torch.randint(0, 3, (1,), generator=g))
        if kind == 0:  # smooth noise: a coarse random grid, bilinearly upsampled
            grid = int(torch.randint(2, 9, (1,), generator=g))
            coarse = torch.rand(1, 3, grid, grid, generator=g)
            bg = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]
        else:
            c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
            theta = float(torch.rand(1, generator=g)) * 2.0 * math.pi
            ys = torch.arange(h, dtype=torch.float32).view(h, 1) / max(h - 1, 1)
            xs = torch.arange(w, dtype=torch.float32).view(1, w) / max(w - 1, 1)
            u = xs * math.cos(theta) + ys * math.sin(theta)
            if kind == 1:  # linear gradient between two colours
                t = (u - u.min()) / (u.max() - u.min()).clamp_min(1e-6)
            else:  # stripes
                freq = 2.0 + 10.0 * float(torch.rand(1, generator=g))
                phase = float(torch.rand(1, generator=g)) * 2.0 * math.pi
                t = 0.5 + 0.5 * torch.sin(2.0 * math.pi * freq * u + phase)
            bg = c0 + (c1 - c0) * t
        bg = 0.15 + 0.7 * bg
        return (bg + 0.02 * torch.randn(3, h, w, generator=g)).clamp_(0.0, 1.0)

    def render(self, index: int) -> tuple[Tensor, Target, list[DigitPlacement], Tensor]:
        """Image (3, H, W), target, every placement drawn (kept or dropped, in paste order) and the bare canvas."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        g = torch.Generator().manual_seed(_seed_for(self.seed, 0 if self.split == "train" else 1, index))
        h, w = self.image_size
        background = self._background(g)
        image = background.clone()
        n = int(torch.randint(self.min_objects, self.max_objects + 1, (1,), generator=g))
        placed: list[DigitPlacement] = []
        visible: list[Tensor] = []  # (H, W) bool per placed digit: its pixels not covered by later digits
        areas: list[int] = []
        for k in range(n):
            scale = int(torch.randint(self.scales[0], self.scales[1] + 1, (1,), generator=g))
            d = int(torch.randint(0, self.digits.shape[0], (1,), generator=g))
            alpha = digit_alpha(self.digits[d], scale)
            mask = alpha > 0
            bx0, by0, bx1, by1 = _tight_box(mask)
            remaining = n - k - 1
            chosen: tuple[int, int, list[int]] | None = None
            for _ in range(30):
                top = int(torch.randint(0, h - scale + 1, (1,), generator=g))
                left = int(torch.randint(0, w - scale + 1, (1,), generator=g))
                box = (left + bx0, top + by0, left + bx1, top + by1)
                kept_idx = [i for i, p in enumerate(placed) if p.kept]
                if self.occlusion:
                    drops = []
                    for i in kept_idx:
                        window = visible[i][top : top + scale, left : left + scale]
                        still_visible = int(visible[i].sum()) - int((window & mask).sum())
                        if still_visible < MIN_VISIBLE_FRACTION * areas[i]:
                            drops.append(i)
                    if len(kept_idx) - len(drops) + 1 + remaining >= self.min_objects:
                        chosen = (top, left, drops)
                        break
                elif not any(_boxes_overlap(box, placed[i].box) for i in kept_idx):
                    chosen = (top, left, [])
                    break
            if chosen is None:
                continue
            top, left, drops = chosen
            for i in drops:
                placed[i] = replace(placed[i], kept=False)
            for v in visible:
                v[top : top + scale, left : left + scale] &= ~mask
            patch = background[:, top : top + scale, left : left + scale]
            tint = torch.rand(3, generator=g)
            # contrast with the canvas under the digit: dark tints on bright canvases and vice versa
            color = 0.4 * tint if float(patch.mean()) > 0.5 else 0.6 + 0.4 * tint
            region = image[:, top : top + scale, left : left + scale]
            region.mul_(1.0 - alpha).add_(alpha * color.view(3, 1, 1))
            full = torch.zeros(h, w, dtype=torch.bool)
            full[top : top + scale, left : left + scale] = mask
            visible.append(full)
            areas.append(int(mask.sum()))
            placed.append(
                DigitPlacement(
                    digit_index=d,
                    label=int(self.digit_labels[d]),
                    scale=scale,
                    top=top,
                    left=left,
                    color=(float(color[0]), float(color[1]), float(color[2])),
                    box=(left + bx0, top + by0, left + bx1, top + by1),
                    kept=True,
                )
            )
        kept = [p for p in placed if p.kept]
        target: Target = {
            "boxes": torch.tensor([p.box for p in kept], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([p.label for p in kept], dtype=torch.long),
            "image_id": int(index),
            "orig_size": (h, w),
        }
        return image, target, placed, background

    # ---- COCO export -------------------------------------------------------------------------

    def file_name(self, index: int) -> str:
        """The file name :meth:`to_coco` gives image ``index`` (e.g. ``"000007.png"``)."""
        return f"{index:06d}.png"

    def to_coco(self) -> dict[str, Any]:
        """COCO ground truth (``images``, ``annotations`` with ``bbox`` [x, y, w, h], ``area`` = box area,
        ``iscrowd`` 0, ``categories``) for all images; image ids are the dataset indices, annotation ids
        start at 1. Renders every image once."""
        h, w = self.image_size
        images, annotations = [], []
        for index in range(self.num_images):
            _, target, _, _ = self.render(index)
            images.append({"id": index, "file_name": self.file_name(index), "height": h, "width": w})
            for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
                x0, y0, x1, y1 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index,
                        "category_id": self.label_to_cat_id[int(label)],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
        return {"images": images, "annotations": annotations, "categories": copy.deepcopy(self.categories)}


def _boxes_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


# --------------------------------------------------------------------------------------------
# COCO-format folder
# --------------------------------------------------------------------------------------------


def _require(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{where}: missing required key {key!r}")
    return entry[key]


_EMPTY = {
    "images": "the file lists no images",
    "categories": "the file defines no categories (class labels come from them)",
    "annotations": "the file has no boxes to train on or to score against",
}


def _int_field(entry: Any, key: str, where: str, *, positive: bool = False) -> int:
    """``entry[key]`` as an int; ``ValueError`` naming ``where`` and the key for a string, float, bool, null."""
    value = _require(entry, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (COCO ids and sizes are JSON numbers, not strings)" if isinstance(value, str) else ""
        raise ValueError(f"{where}: {key!r} must be an integer, got {value!r} ({type(value).__name__}){hint}")
    if positive and value <= 0:
        raise ValueError(f"{where}: {key!r} must be positive, got {value}")
    return int(value)


def _refuse_duplicates(ids: Sequence[int], what: str, src: str) -> None:
    """``ValueError`` listing the ids that occur more than once (a COCO id names exactly one entry)."""
    seen: set[int] = set()
    dup = sorted({i for i in ids if i in seen or seen.add(i)})
    if dup:
        shown = ", ".join(map(str, dup[:20])) + (f" and {len(dup) - 20} more" if len(dup) > 20 else "")
        raise ValueError(f"{src}: duplicate {what} ids (each must name exactly one {what}): {shown}")


def _id_list(ids: Sequence[str], limit: int = 8) -> str:
    """`` (ids 3, 7, ...)`` for a warning, or ``""``."""
    if not ids:
        return ""
    return " (ids " + ", ".join(ids[:limit]) + (", ..." if len(ids) > limit else "") + ")"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class _Annotation:
    """One COCO annotation after the type checks (``bbox`` still the JSON's [x, y, w, h])."""

    index: int
    ann_id: int | None
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float | None
    iscrowd: bool


def _parse_annotation(ann: Any, where: str, index: int) -> _Annotation:
    """Type-check one annotation; ``ValueError`` naming the file, its index and its id otherwise.

    Structural errors (a string id, a bbox that is not 4 numbers, an ``iscrowd`` that is not 0/1, a non-numeric
    ``area``) are refused; bad values (a zero or negative side, NaN, a negative area) are left to the cleaning."""
    if not isinstance(ann, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(ann).__name__}")
    ann_id = _int_field(ann, "id", where) if "id" in ann else None
    if ann_id is not None:
        where = f"{where} (annotation id {ann_id})"
    image_id = _int_field(ann, "image_id", where)
    category_id = _int_field(ann, "category_id", where)
    bbox = _require(ann, "bbox", where)
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    iscrowd = ann.get("iscrowd", 0)
    if isinstance(iscrowd, str) or iscrowd not in (0, 1):
        raise ValueError(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
    area = ann.get("area")
    if area is not None and not _is_number(area):
        raise ValueError(f"{where}: 'area' must be a number, got {area!r} ({type(area).__name__})")
    x, y, w, h = (float(v) for v in bbox)
    return _Annotation(
        index, ann_id, image_id, category_id, (x, y, w, h), None if area is None else float(area), bool(iscrowd)
    )


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
        images = _require(data, "images", src)
        annotations = _require(data, "annotations", src)
        categories = _require(data, "categories", src)
        for key, value in (("images", images), ("annotations", annotations), ("categories", categories)):
            if not isinstance(value, list):
                raise ValueError(f"{src}: {key!r} must be a list, got {type(value).__name__}")
            if not value:
                raise ValueError(f"{src}: {key!r} is empty: {_EMPTY[key]}")

        cat_ids = [_int_field(c, "id", f"{src}: categories[{i}]") for i, c in enumerate(categories)]
        _refuse_duplicates(cat_ids, "category", src)
        self.categories: list[dict[str, Any]] = sorted(categories, key=lambda c: int(c["id"]))
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(sorted(cat_ids))}
        self.label_to_cat_id: dict[int, int] = {i: c for c, i in self.cat_id_to_label.items()}
        self.num_classes = len(cat_ids)
        self.transform = transform
        self.skipped: dict[str, int] = dict.fromkeys(self.SKIP_KINDS, 0)
        self._skipped_ids: dict[str, list[str]] = {k: [] for k in self.SKIP_KINDS}

        image_ids = [_int_field(img, "id", f"{src}: images[{i}]") for i, img in enumerate(images)]
        _refuse_duplicates(image_ids, "image", src)
        # every annotation checked before any image is probed: a broken file fails at once, naming the entry
        parsed = [_parse_annotation(ann, f"{src}: annotations[{i}]", i) for i, ann in enumerate(annotations)]
        _refuse_duplicates([a.ann_id for a in parsed if a.ann_id is not None], "annotation", src)

        # images: id -> (file name, (H, W)), keeping only readable ones
        self.image_ids: list[int] = []
        self._files: dict[int, str] = {}
        self._sizes: dict[int, tuple[int, int]] = {}
        known_images = set(image_ids)
        for i, (img, image_id) in enumerate(zip(images, image_ids, strict=True)):
            where = f"{src}: images[{i}]"
            file_name = _require(img, "file_name", where)
            if not isinstance(file_name, str) or not file_name:
                raise ValueError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}")
            if check_images:
                size = self._probe(self.images_dir / file_name)
                if size is None:
                    continue
                stated = (img.get("height"), img.get("width"))
                if all(_is_number(v) for v in stated) and tuple(int(v) for v in stated) != size:
                    self.skipped["size_mismatch"] += 1  # the file's size is used; the boxes may be in another frame
                    self._skipped_ids["size_mismatch"].append(str(image_id))
            else:
                size = (_int_field(img, "height", where, positive=True), _int_field(img, "width", where, positive=True))
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

    def _skip(self, kind: str, ann: _Annotation) -> None:
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

    def _clean_box(self, ann: _Annotation, size: tuple[int, int]) -> list[float] | None:
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
                image, target = _call_box_transform(self.transform, image, target, None)
            return image, target
        raise RuntimeError(f"CocoDetection: none of the {n} images in {self.images_dir} could be decoded")


# --------------------------------------------------------------------------------------------
# Box-aware transforms: t(image (3, H, W), target, generator=None) -> (image', target')
# --------------------------------------------------------------------------------------------


def _check(image: Tensor, target: Target) -> None:
    if image.ndim != 3:
        raise ValueError(f"expected an image tensor of shape (C, H, W), got {tuple(image.shape)}")
    if "boxes" not in target:
        raise ValueError("target has no 'boxes'")


class ResizeBoxes:
    """Resize so the shorter side is ``min_size``, unless the longer side would exceed ``max_size`` (then the
    longer side is ``max_size``); bilinear, antialiased. Boxes are scaled by the same per-axis factors
    (new W / W, new H / H). (3, H, W) -> (3, H', W')."""

    def __init__(self, min_size: int, max_size: int) -> None:
        if min_size <= 0 or max_size < min_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The (H', W') an (h, w) image is resized to."""
        scale = self.min_size / min(h, w)
        if max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def __call__(
        self, image: Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        _check(image, target)
        h, w = image.shape[-2:]
        nh, nw = self.output_size(h, w)
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        factors = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=target["boxes"].dtype)
        target = {**target, "boxes": target["boxes"] * factors}
        return image, target


class RandomHorizontalFlipBoxes:
    """Flip image and boxes left-right with probability ``p`` (``x0' = W - x1``, ``x1' = W - x0``).

    One uniform draw from ``generator`` per call whatever the outcome, so the random stream does not depend
    on the images."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(
        self, image: Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        _check(image, target)
        if float(torch.rand(1, generator=generator)) >= self.p:
            return image, target
        w = image.shape[-1]
        boxes = target["boxes"]
        flipped = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return image.flip(-1), {**target, "boxes": flipped}


class ComposeBoxes:
    """Apply box-aware transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[BoxTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = _call_box_transform(t, image, target, generator)
        return image, target


def _call_box_transform(
    t: BoxTransform, image: Tensor, target: Target, generator: torch.Generator | None
) -> tuple[Tensor, Target]:
    if isinstance(t, ResizeBoxes | RandomHorizontalFlipBoxes | ComposeBoxes):
        return t(image, target, generator=generator)
    try:
        params = inspect.signature(t).parameters
        takes = "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes = False
    return t(image, target, generator=generator) if takes else t(image, target)


# --------------------------------------------------------------------------------------------
# Collate and loader
# --------------------------------------------------------------------------------------------


def detection_collate(
    batch: Sequence[tuple[Tensor, Target]],
) -> tuple[Tensor, list[Target], list[tuple[int, int]]]:
    """``[(image (C, H_i, W_i), target), ...]`` -> ``(images (B, C, Hmax, Wmax), targets, image_sizes)``.

    Images are zero-padded at the bottom and right (boxes stay valid); ``image_sizes[i]`` is the unpadded
    ``(H_i, W_i)``."""
    if len(batch) == 0:
        raise ValueError("detection_collate got an empty batch")
    images = [torch.as_tensor(x) for x, _ in batch]
    channels = {x.shape[0] for x in images}
    if any(x.ndim != 3 for x in images) or len(channels) != 1:
        raise ValueError(f"detection_collate needs (C, H, W) images with one C, got {[tuple(x.shape) for x in images]}")
    sizes = [(int(x.shape[1]), int(x.shape[2])) for x in images]
    hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
    out = images[0].new_zeros(len(images), images[0].shape[0], hmax, wmax)
    for i, x in enumerate(images):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out, [t for _, t in batch], sizes


class DetectionCollate:
    """:func:`detection_collate` after a box-aware ``transform`` per sample, drawn from its own seeded
    ``generator`` (``seed`` is what DataLoader worker processes re-seed their copy from)."""

    def __init__(self, transform: BoxTransform | None, seed: int) -> None:
        self.transform = transform
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, batch: Sequence[tuple[Tensor, Target]]) -> tuple[Tensor, list[Target], list[tuple[int, int]]]:
        if self.transform is not None:
            batch = [_call_box_transform(self.transform, x, t, self.generator) for x, t in batch]
        return detection_collate(batch)


def make_detection_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    transform: BoxTransform | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader yielding ``(images (B, 3, Hmax, Wmax), targets list[dict], image_sizes list[(H, W)])``.

    Shuffling draws from ``loader.generator`` (seeded with ``seed``); the per-sample ``transform`` draws
    from ``loader.collate_fn.generator`` (seeded with ``seed + 1``); a trainer can reseed both per epoch.
    Two loaders built with the same arguments yield the same batches."""
    return seeded_loader(
        dataset, batch_size, shuffle, seed, DetectionCollate(transform, seed + 1), num_workers, drop_last
    )
