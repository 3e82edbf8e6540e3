"""The synthetic detection set: :class:`SyntheticDigitsDetection`, scikit-learn's 8x8 digits pasted at several
scales on textured canvases, generated deterministically from a seed (nothing downloaded)."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ckakd.train.data import load_digits_dataset

from .transforms import Target

__all__ = ["DIGIT_ALPHA_MIN", "MIN_VISIBLE_FRACTION", "DigitPlacement", "SyntheticDigitsDetection", "digit_alpha"]

# A pixel of an upsampled digit belongs to the object when its bilinear intensity is at least this
# (fainter pixels are set to exactly 0, so what is drawn and what the box encloses are the same pixels).
DIGIT_ALPHA_MIN = 0.1
# An earlier object is dropped once less than this fraction of its pixels is still visible (more than
# 70 % covered by later objects).
MIN_VISIBLE_FRACTION = 0.3


@functools.lru_cache(maxsize=2)
def _digit_pool(split: str) -> tuple[Tensor, Tensor]:
    """The split's digit images (N, 8, 8) float in [0, 1] and labels (N,) long (a fixed split, seed 0)."""
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
