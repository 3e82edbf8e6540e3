"""Batching detection items: :func:`detection_collate` (zero padding to the batch's largest image),
:class:`DetectionCollate` (a seeded per-sample transform first) and :func:`make_detection_loader` (seeded like
:func:`ckakd.train.data.make_loader`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ckakd.train.data import seeded_loader

from .transforms import BoxTransform, Target, apply_box_transform

__all__ = ["detection_collate", "DetectionCollate", "make_detection_loader"]


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
            batch = [apply_box_transform(self.transform, x, t, self.generator) for x, t in batch]
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
