"""DDP glue and loaders: the training forward wrapped in DDP (:func:`wrap_ddp`), the loaders under DDP
(:func:`distributed_loader`), their per-epoch reseeding (:func:`reseed_loader`): an epoch's order and
augmentations depend only on ``(seed, epoch[, rank])``, and pinned memory on a GPU (:func:`pin_for`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from .. import distributed as dist
from .seeding import epoch_seed

__all__ = ["distributed_loader", "pin_for", "reseed_loader", "wrap_ddp"]


def pin_for(loader: Any, device: torch.device) -> Any:
    """``loader`` with ``pin_memory`` on when ``device`` is CUDA (page-locked batches copy asynchronously); other
    devices and loaders that are not torch DataLoaders are left as they are. Returns ``loader``."""
    if device.type == "cuda" and isinstance(loader, DataLoader) and not loader.pin_memory:
        loader.pin_memory = True
    return loader


def distributed_loader(loader: Any, *, train: bool, world_size: int, rank: int, seed: int) -> Any:
    """``loader`` rebuilt for DDP with its per-rank batch size: a :class:`DistributedSampler` (shuffled when
    ``loader`` was) for training, a :class:`~ckakd.train.distributed.ShardSampler` for validation."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"under DDP the loaders must be torch DataLoaders, got {type(loader).__name__}")
    if train and isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError("under DDP the loaders must use batch_size (not a custom batch_sampler)")
    ds = loader.dataset
    if train:
        sampler: Any = DistributedSampler(
            ds,
            num_replicas=world_size,
            rank=rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
        )
    else:
        sampler = dist.ShardSampler(len(ds), world_size, rank)
    kwargs: dict[str, Any] = {}
    if loader.num_workers > 0:
        kwargs = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
    return DataLoader(
        ds,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last if train else False,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        **kwargs,
    )


def reseed_loader(loader: Any, epoch: int, *, seed: int, rank: int = 0) -> None:
    """Make epoch ``epoch``'s order and augmentations depend only on (seed, epoch[, rank])."""
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(epoch_seed(seed, epoch, 0))
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    collate = getattr(loader, "collate_fn", None)
    cgen = getattr(collate, "generator", None)
    if isinstance(cgen, torch.Generator):
        cseed = epoch_seed(seed, epoch, 1 + rank)
        cgen.manual_seed(cseed)
        if isinstance(getattr(collate, "seed", None), int):
            collate.seed = cseed % 2**62  # worker processes re-seed their copy from this


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``module`` in DistributedDataParallel. Buffers (BatchNorm statistics) are synced once at construction and
    broadcast from rank 0 once per epoch by the trainer, not at every forward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        **sync,
    )
