"""Box-aware transforms, called as ``t(image (3, H, W), target, generator=None) -> (image', target')``: they
change the image and its ``boxes`` together (never ``orig_size``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Target", "BoxTransform", "ResizeBoxes", "RandomHorizontalFlipBoxes", "ComposeBoxes", "apply_box_transform"]

Target = dict[str, Any]
BoxTransform = Callable[..., tuple[Tensor, Target]]


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
            image, target = apply_box_transform(t, image, target, generator)
        return image, target


def apply_box_transform(
    t: BoxTransform, image: Tensor, target: Target, generator: torch.Generator | None
) -> tuple[Tensor, Target]:
    """``t(image, target, generator=generator)``, or ``t(image, target)`` for a transform that takes no generator."""
    if isinstance(t, ResizeBoxes | RandomHorizontalFlipBoxes | ComposeBoxes):
        return t(image, target, generator=generator)
    try:
        params = inspect.signature(t).parameters
        takes = "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes = False
    return t(image, target, generator=generator) if takes else t(image, target)
