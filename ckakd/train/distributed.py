"""torch.distributed helpers for the trainer: process-group setup from ``torchrun``'s environment, rank
queries, a differentiable all-gather, reductions and an unpadded evaluation sampler.

Everything except :func:`init_from_env` is a no-op on a single process (``torch.distributed`` not
initialized), so the distillers and the loop call these unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.utils.data import Sampler

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "env_world_size",
    "is_main_process",
    "init_from_env",
    "cleanup",
    "barrier",
    "gather_batch",
    "all_reduce_sum",
    "all_gather_object",
    "broadcast_buffers",
    "ShardSampler",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (what ``torchrun`` sets), 1 when unset."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def local_rank() -> int:
    """``LOCAL_RANK`` from the environment (the process's index on its node), 0 when unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialize the default process group from ``torchrun``'s environment when ``WORLD_SIZE > 1``.

    ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``; with NCCL the current CUDA
    device is set to ``LOCAL_RANK``. Does nothing if a group already exists or ``WORLD_SIZE`` is 1/unset.
    Returns whether the process is now part of a (multi-process) group.
    """
    if is_distributed():
        return world_size() > 1
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; launch with "
            "`torchrun --nproc_per_node N ...` (or `python -m torch.distributed.run`)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return world_size() > 1


def cleanup() -> None:
    """Destroy the default process group (no-op when none exists)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronize all ranks (no-op on a single process)."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient of the gathered tensor and returns the
    caller's slice (all-reduce + slice, so it also works on gloo, which lacks reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_batch(x: Tensor) -> Tensor:
    """(n, ...) on each rank -> (world_size · n, ...) rank-major, with gradient flowing back to every rank's
    own slice. Identity on a single process.

    The gradient a rank receives for its slice is the sum over ranks of the gradient of the gathered tensor:
    when every rank computes the same loss on the global batch, that is ``world_size`` times the single-process
    gradient, which DDP's gradient averaging divides back out. Used to compute CKA Grams over the global batch
    instead of each rank's share. Every rank must pass the same shape (use ``drop_last=True`` loaders).
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _AllGather.apply(x.contiguous())


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a tensor over ranks (a copy; identity on a single process)."""
    out = values.detach().clone()
    if is_distributed() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, indexed by rank (``[obj]`` on a single process)."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` (BatchNorm statistics...) with rank ``src``'s, in place."""
    if not is_distributed() or world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of a dataset of ``length`` items: each item on exactly one rank,
    no padding or duplicates (unlike ``DistributedSampler``), so summed metrics are exact. For evaluation."""

    def __init__(self, length: int, num_replicas: int | None = None, rank_: int | None = None) -> None:
        self.length = int(length)
        self.num_replicas = world_size() if num_replicas is None else int(num_replicas)
        self.rank = rank() if rank_ is None else int(rank_)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} out of range for {self.num_replicas} replicas")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))
