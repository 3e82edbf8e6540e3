"""Tensor augmentations: every transform is called as ``t(x (C, H, W), generator=None) -> (C, H', W')``
(those without randomness as ``t(x)``); :func:`call_transform` passes the generator to those that take it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd._checks import takes_keyword

Transform = Callable[..., Tensor]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=generator).item())


def _rand(generator: torch.Generator | None) -> float:
    """Uniform float in [0, 1)."""
    return float(torch.rand(1, generator=generator).item())


def _check_image(x: Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"expected an image tensor of shape (C, H, W), got {tuple(x.shape)}")


class RandomCropFlip:
    """Zero-pad by ``padding``, take a random ``size`` crop, then flip horizontally with probability ``flip_p``.

    (C, H, W) -> (C, size_h, size_w). With ``padding=0``, ``flip_p=0`` and ``size == (H, W)`` it is the identity.
    """

    def __init__(self, size: int | Sequence[int], padding: int = 4, flip_p: float = 0.5) -> None:
        self.size = _pair(size)
        self.padding = int(padding)
        self.flip_p = float(flip_p)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_image(x)
        p = self.padding
        if p > 0:
            x = F.pad(x, (p, p, p, p))
        th, tw = self.size
        h, w = x.shape[-2:]
        if h < th or w < tw:  # pad (centred) up to the crop size when the image is too small
            dh, dw = max(th - h, 0), max(tw - w, 0)
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
            h, w = x.shape[-2:]
        top = _randint(h - th + 1, generator)
        left = _randint(w - tw + 1, generator)
        x = x[:, top : top + th, left : left + tw]
        if _rand(generator) < self.flip_p:
            x = x.flip(-1)
        return x.contiguous()


class Cutout:
    """Zero a random ``size`` × ``size`` square (clipped at the borders; centre anywhere) with probability ``p``.

    (C, H, W) -> (C, H, W); ``size=0`` or ``p=0`` is the identity.
    """

    def __init__(self, size: int, p: float = 1.0) -> None:
        self.size = int(size)
        self.p = float(p)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_image(x)
        h, w = x.shape[-2:]
        cy, cx = _randint(h, generator), _randint(w, generator)
        apply = _rand(generator) < self.p
        if self.size <= 0 or not apply:
            return x
        y0, y1 = max(cy - self.size // 2, 0), min(cy - self.size // 2 + self.size, h)
        x0, x1 = max(cx - self.size // 2, 0), min(cx - self.size // 2 + self.size, w)
        out = x.clone()
        out[:, y0:y1, x0:x1] = 0.0
        return out


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Warp (C, H, W) with a 2×3 affine matrix in normalised coordinates; outside is filled with 0."""
    grid = F.affine_grid(theta.unsqueeze(0).to(x.dtype), [1, *x.shape], align_corners=False)
    return F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _blend(a: Tensor, b: Tensor, factor: float) -> Tensor:
    """``b + factor * (a - b)`` clamped to [0, 1] (factor 1 → a)."""
    return (b + factor * (a - b)).clamp_(0.0, 1.0)


def _gray(x: Tensor) -> Tensor:
    if x.shape[0] == 3:
        return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    return x.mean(0, keepdim=True)


class RandAugmentLite:
    """A small RandAugment on tensors: ``num_ops`` random ops per call at a fixed ``magnitude`` in [0, 10].

    Ops: brightness, contrast, translate_x/y, rotate, shear_x (affine_grid, zero fill), posterize
    (quantisation), solarize, autocontrast (blended by magnitude). Signed ops get a random sign.
    ``magnitude=0`` or ``num_ops=0`` leaves the image unchanged (up to float rounding of the identity
    warp). (C, H, W) -> (C, H, W), values stay in [0, 1].
    """

    ops: tuple[str, ...] = (
        "brightness",
        "contrast",
        "translate_x",
        "translate_y",
        "rotate",
        "shear_x",
        "posterize",
        "solarize",
        "autocontrast",
    )

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, ops: Sequence[str] | None = None) -> None:
        if not 0.0 <= magnitude <= 10.0:
            raise ValueError(f"magnitude must be in [0, 10], got {magnitude}")
        if ops is not None:
            unknown = set(ops) - set(self.ops)
            if unknown:
                raise ValueError(f"unknown ops {sorted(unknown)}; available: {self.ops}")
            self.ops = tuple(ops)
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)

    def apply_op(self, x: Tensor, op: str, level: float) -> Tensor:
        """Apply one op at ``level`` in [-1, 1] (sign matters for signed ops) to (C, H, W)."""
        if op == "brightness":
            return _blend(x, torch.zeros_like(x), 1.0 + 0.9 * level)
        if op == "contrast":
            mean = _gray(x).mean()
            return _blend(x, torch.full_like(x, float(mean)), 1.0 + 0.9 * level)
        if op in ("translate_x", "translate_y", "rotate", "shear_x"):
            theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
            if op == "translate_x":
                theta[0, 2] = 2.0 * 0.3 * level  # up to 30 % of the width
            elif op == "translate_y":
                theta[1, 2] = 2.0 * 0.3 * level
            elif op == "rotate":
                a = math.radians(30.0 * level)
                theta[:, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            else:
                theta[0, 1] = 0.3 * level
            return _affine(x, theta).clamp_(0.0, 1.0)
        if op == "posterize":
            shift = int(round(4 * abs(level)))  # keep 8 - shift bits
            if shift == 0:
                return x
            q = float(2**shift)
            return (torch.floor(x * 255.0 / q) * q / 255.0).clamp_(0.0, 1.0)
        if op == "solarize":
            threshold = 1.0 - abs(level)
            return torch.where(x > threshold, 1.0 - x, x)
        if op == "autocontrast":
            lo = x.amin(dim=(-2, -1), keepdim=True)
            hi = x.amax(dim=(-2, -1), keepdim=True)
            scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-12), torch.ones_like(hi))
            stretched = torch.where(hi > lo, (x - lo) * scale, x)
            return _blend(stretched, x, abs(level))
        raise ValueError(f"unknown op {op!r}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_image(x)
        for _ in range(self.num_ops):
            op = self.ops[_randint(len(self.ops), generator)]
            sign = 1.0 if _rand(generator) < 0.5 else -1.0
            x = self.apply_op(x, op, sign * self.magnitude / 10.0)
        return x


class Resize:
    """Bilinear (antialiased) resize of the shorter side to ``size`` (int), or to exactly ``size`` = (h, w).

    (C, H, W) -> (C, H', W').
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size if isinstance(size, int) else _pair(size)

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        h, w = x.shape[-2:]
        if isinstance(self.size, int):
            scale = self.size / min(h, w)
            out = (max(1, round(h * scale)), max(1, round(w * scale)))
        else:
            out = self.size
        if (h, w) == tuple(out):
            return x
        return F.interpolate(x.unsqueeze(0), size=out, mode="bilinear", align_corners=False, antialias=True)[0]


class CenterCrop:
    """Central ``size`` crop (zero-padded when the image is smaller): (C, H, W) -> (C, size_h, size_w)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        th, tw = self.size
        h, w = x.shape[-2:]
        if h < th or w < tw:
            dh, dw = max(th - h, 0), max(tw - w, 0)
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
            h, w = x.shape[-2:]
        top, left = (h - th) // 2, (w - tw) // 2
        return x[:, top : top + th, left : left + tw].contiguous()


class RandomResizedCrop:
    """The ImageNet training crop: a random area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), resized to ``size``, then a horizontal flip with probability ``flip_p``.

    (C, H, W) -> (C, size_h, size_w). Falls back to the central crop after 10 failed draws.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ) -> None:
        self.size = _pair(size)
        self.scale, self.ratio, self.flip_p = scale, ratio, float(flip_p)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_image(x)
        h, w = x.shape[-2:]
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        box = None
        for _ in range(10):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * _rand(generator))
            aspect = math.exp(log_lo + (log_hi - log_lo) * _rand(generator))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                box = (_randint(h - ch + 1, generator), _randint(w - cw + 1, generator), ch, cw)
                break
        if box is None:
            ch, cw = min(h, w), min(h, w)
            box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
        top, left, ch, cw = box
        x = Resize(self.size)(x[:, top : top + ch, left : left + cw])
        if _rand(generator) < self.flip_p:
            x = x.flip(-1)
        return x.contiguous()


class Normalize:
    """Per-channel ``(x - mean) / std``: (C, H, W) -> (C, H, W)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        if x.shape[0] != self.mean.shape[0]:
            raise ValueError(f"Normalize has {self.mean.shape[0]} channels, the image has {x.shape[0]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Compose:
    """Apply transforms in order, passing the same generator to each: (C, H, W) -> (C, H', W')."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for t in self.transforms:
            x = call_transform(t, x, generator)
        return x


def weak_augment(size: int | Sequence[int], padding: int = 4, flip_p: float = 0.5) -> Compose:
    """Random crop (zero padding ``padding``) to ``size`` + horizontal flip with probability ``flip_p``
    (``flip_p=0``: a small random translation only, e.g. for digits, where a flip changes the class)."""
    return Compose([RandomCropFlip(size, padding=padding, flip_p=flip_p)])


def strong_augment(
    size: int | Sequence[int],
    padding: int = 4,
    num_ops: int = 2,
    magnitude: float = 9.0,
    cutout: int | None = None,
    flip_p: float = 0.5,
) -> Compose:
    """Crop + flip (probability ``flip_p``), RandAugmentLite, then Cutout (default square side: half the
    shorter crop side)."""
    h, w = _pair(size)
    side = max(min(h, w) // 2, 1) if cutout is None else cutout
    return Compose(
        [
            RandomCropFlip(size, padding=padding, flip_p=flip_p),
            RandAugmentLite(num_ops=num_ops, magnitude=magnitude),
            Cutout(side),
        ]
    )


class MultiView:
    """Several independently augmented views of one image: ``x (C, H, W) -> {name: view (C, H', W')}``.

    ``views`` maps a view name (e.g. ``"student"``, ``"teacher0"``, ``"teacher1"``) to its transform
    (``None``: the image unchanged). The views are drawn in the mapping's order from the one generator
    passed in (the loader's seeded collate generator), so a loader with a ``MultiView`` transform is as
    reproducible as a single-view one. :func:`make_loader` stacks the views per name: batches are
    ``({name: (B, C, H', W')}, Y (B,))``. Every view must have the same shape across the samples of a batch
    (different views may differ from each other).
    """

    def __init__(self, views: Mapping[str, Transform | None]) -> None:
        if not isinstance(views, Mapping) or not views:
            raise ValueError(f"MultiView needs a non-empty mapping of view name -> transform, got {views!r}")
        for name, t in views.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"MultiView view names must be non-empty strings, got {name!r}")
            if t is not None and not callable(t):
                raise TypeError(f"MultiView view {name!r}: the transform must be callable or None, got {t!r}")
        self.views: dict[str, Transform | None] = dict(views)

    @property
    def names(self) -> list[str]:
        """The view names, in drawing order."""
        return list(self.views)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, t in self.views.items():
            out[name] = x if t is None else call_transform(t, x, generator)
        return out

    def __repr__(self) -> str:
        return f"MultiView({self.views!r})"


def accepts_generator(t: Transform) -> bool:
    """Whether ``t`` takes a ``generator=`` keyword (the seeded transforms here, or any callable naming it)."""
    if isinstance(t, RandomCropFlip | Cutout | RandAugmentLite | Compose | RandomResizedCrop | MultiView):
        return True
    return takes_keyword(t, "generator")


def call_transform(t: Transform, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``t(x, generator=generator)`` when ``t`` takes a generator, else ``t(x)``: (C, H, W) -> ``t``'s output."""
    return t(x, generator=generator) if accepts_generator(t) else t(x)
