"""Seeded loaders: reproducible shuffling and per-sample augmentation (per worker too)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ckakd.train.data.transforms import Transform, call_transform


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
                x = call_transform(self.transform, x, self.generator)
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
