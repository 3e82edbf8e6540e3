"""Datasets, tensor augmentations and loaders for the reference trainer.

Everything works on float image tensors of shape (C, H, W) with values in [0, 1]; nothing here
downloads anything or depends on torchvision.
"""

from __future__ import annotations

import functools
import inspect
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "Cifar100Dataset",
    "CenterCrop",
    "Compose",
    "Cutout",
    "ImageFolderDataset",
    "MultiView",
    "RandAugmentLite",
    "RandomCropFlip",
    "RandomResizedCrop",
    "Resize",
    "Normalize",
    "load_digits_dataset",
    "make_loader",
    "strong_augment",
    "weak_augment",
]

Transform = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def load_digits_dataset(split: str = "train", val_fraction: float = 0.25, seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled digits as ``TensorDataset(images (N, 1, 8, 8) float in [0, 1], labels (N,) long)``.

    The split is stratified per class with a fixed seed, so it is deterministic and the train and
    val parts are disjoint and together cover all 1,797 images.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    val_idx: list[Tensor] = []
    train_idx: list[Tensor] = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = int(round(val_fraction * idx.numel()))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    chosen = torch.sort(torch.cat(train_idx if split == "train" else val_idx)).values
    return TensorDataset(images[chosen].contiguous(), labels[chosen].contiguous())


class Cifar100Dataset(Dataset):
    """CIFAR-100 from the standard python-pickle folder ``root/cifar-100-python/{train,test}``.

    Items are ``(image (3, 32, 32) float in [0, 1], fine label int)``; ``transform`` is applied to the
    float tensor. ``root`` may also point at the ``cifar-100-python`` folder itself. Never downloads.
    """

    base_folder = "cifar-100-python"

    def __init__(self, root: str | Path, train: bool = True, transform: Transform | None = None) -> None:
        root = Path(root)
        folder = root if root.name == self.base_folder else root / self.base_folder
        path = folder / ("train" if train else "test")
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-100 file not found: expected {path} (the python-pickle release extracted under {root}); "
                "this loader never downloads"
            )
        with open(path, "rb") as f:
            entry: dict[bytes, Any] = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        self.data = torch.from_numpy(data.copy())  # (N, 3, 32, 32) uint8
        self.targets: list[int] = [int(t) for t in entry[b"fine_labels"]]
        if len(self.targets) != self.data.shape[0]:
            raise ValueError(f"{path}: {self.data.shape[0]} images but {len(self.targets)} labels")
        self.classes: list[str] = []
        meta = folder / "meta"
        if meta.is_file():
            with open(meta, "rb") as f:
                names = pickle.load(f, encoding="bytes").get(b"fine_label_names", [])
            self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        self.transform = transform

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.data[index].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]


class ImageFolderDataset(Dataset):
    """Class-per-subfolder images (``root/<class>/**/<file>``) loaded with PIL.

    Class names are sorted and mapped to indices 0..K-1. Items are ``(image (C, H, W) float in
    [0, 1], class index)``, with C = 3 for ``mode="RGB"`` (default) or 1 for ``mode="L"``.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        extensions: Sequence[str] = (".png", ".jpg", ".jpeg"),
        mode: str = "RGB",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        exts = tuple(e.lower() for e in extensions)
        self.classes: list[str] = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = sorted(p for p in (self.root / c).rglob("*") if p.is_file() and p.suffix.lower() in exts)
            self.samples.extend((p, self.class_to_idx[c]) for p in files)
        if not self.samples:
            raise ValueError(f"no images with extensions {exts} found in class subfolders of {self.root}")
        self.targets: list[int] = [t for _, t in self.samples]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, target = self.samples[index]
        with Image.open(path) as img:
            arr = np.asarray(img.convert(self.mode), dtype=np.uint8)
        x = torch.from_numpy(arr.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        x = x.float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, target


# --------------------------------------------------------------------------------------------
# Tensor augmentations: every transform is called as t(x (C, H, W), generator=None) -> (C, H', W')
# --------------------------------------------------------------------------------------------


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
            x = _call_transform(t, x, generator)
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
            out[name] = x if t is None else _call_transform(t, x, generator)
        return out

    def __repr__(self) -> str:
        return f"MultiView({self.views!r})"


def _accepts_generator(t: Transform) -> bool:
    if isinstance(t, RandomCropFlip | Cutout | RandAugmentLite | Compose | RandomResizedCrop | MultiView):
        return True
    try:
        params = inspect.signature(t).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call_transform(t: Transform, x: Tensor, generator: torch.Generator | None) -> Tensor:
    return t(x, generator=generator) if _accepts_generator(t) else t(x)


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


class _TransformCollate:
    """Collate ``[(x (C, H, W), y), ...]`` into ``(X (B, C, H', W'), Y (B,))``, transforming each x first.

    A transform returning a mapping (:class:`MultiView`) gives ``({name: (B, C, H', W')}, Y)`` instead.
    Owns a generator seeded from ``seed`` so the augmentation stream is reproducible (per worker, the
    worker's copy is re-seeded with its id in ``_worker_init``).
    """

    def __init__(self, transform: Transform | None, seed: int) -> None:
        self.transform = transform
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: list[tuple[Any, Any]]) -> tuple[Tensor | dict[str, Tensor], Tensor]:
        xs: list[Any] = []
        ys = []
        for x, y in batch:
            x = torch.as_tensor(x)
            if self.transform is not None:
                x = _call_transform(self.transform, x, self.generator)
            xs.append(x)
            ys.append(torch.as_tensor(y))
        return _stack(xs), torch.stack(ys).long()


def _stack(xs: list[Any]) -> Tensor | dict[str, Tensor]:
    """Stack per-sample tensors, or per-sample ``{view: tensor}`` mappings view by view."""
    if not xs or not isinstance(xs[0], Mapping):
        return torch.stack(xs)
    names = list(xs[0])
    for i, x in enumerate(xs):
        if not isinstance(x, Mapping) or list(x) != names:
            got = list(x) if isinstance(x, Mapping) else type(x).__name__
            raise ValueError(f"multi-view collate: sample {i} has views {got}, sample 0 has {names}")
    out = {}
    for name in names:
        try:
            out[name] = torch.stack([x[name] for x in xs])
        except RuntimeError as exc:
            shapes = sorted({tuple(x[name].shape) for x in xs})
            raise ValueError(f"multi-view collate: view {name!r} has different shapes in one batch: {shapes}") from exc
    return out


def _worker_init(collate: _TransformCollate, worker_id: int) -> None:
    """Re-seed the worker's copy of the collate generator (picklable via ``functools.partial``)."""
    collate.generator.manual_seed(collate.seed + 1_000_003 * (worker_id + 1))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    transform: Transform | None = None,
) -> DataLoader:
    """DataLoader with a seeded shuffling generator and a collate applying ``transform`` per sample.

    Yields ``(X (B, C, H, W) float, Y (B,) long)``; with ``transform=MultiView({...})`` X is a
    ``dict[str, Tensor]`` with one (B, C, H, W) entry per view. Two loaders built with the same arguments
    yield the same batches (order and augmentations), for ``num_workers=0`` and for fixed ``num_workers > 0``.
    """
    return seeded_loader(
        dataset, batch_size, shuffle, seed, _TransformCollate(transform, seed + 1), num_workers, drop_last
    )


def seeded_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    collate: Any,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader whose shuffling draws from ``loader.generator`` (seeded with ``seed``) and whose ``collate``
    (an object with ``.generator`` and ``.seed``, e.g. a transform-applying collate) is re-seeded per worker.
    The trainer reseeds both per epoch, which makes runs and resumes reproducible."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=functools.partial(_worker_init, collate) if num_workers > 0 else None,
    )
