"""Devices: :func:`resolve_device` / :func:`check_device` (the one place a device name becomes a torch device),
:func:`autocast` (AMP) and where collectives run (:func:`collective_device`, :func:`all_reduce_max`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed as dist
from .settings import AMP_DTYPES

__all__ = ["all_reduce_max", "autocast", "check_device", "collective_device", "resolve_device"]


def resolve_device(name: str | torch.device, key: str = "device") -> torch.device:
    """``name`` as a torch device: ``"auto"`` is this rank's CUDA device when there is one (``cuda:LOCAL_RANK`` under
    torchrun), the CPU otherwise; anything else is checked by :func:`check_device` (``ValueError`` naming ``key``)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank() if dist.env_world_size() > 1 else 0)
        return torch.device("cpu")
    check_device(name, key)
    return torch.device(name)


def check_device(name: str | torch.device, key: str = "device") -> None:
    """``ValueError`` naming ``key`` when ``name`` is not a usable device here (``cuda`` without a GPU, a
    ``cuda:N`` beyond the visible GPUs, or not a device string at all); ``"auto"`` always passes."""
    if isinstance(name, torch.device) or name == "auto":
        device = name if isinstance(name, torch.device) else None
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"{key}={name!r} is not a device ('auto', 'cpu', 'cuda' or 'cuda:N'): {exc}") from None
    if device is None or device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides them)"
        )
        raise ValueError(f"{key}={str(name)!r} but {why}; use {key}=auto or {key}=cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{key}={str(name)!r} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")


def autocast(device: torch.device, amp: bool, amp_dtype: str):
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp_dtype], enabled=bool(amp))


def collective_device(device: torch.device) -> torch.device:
    """Where tensors for collectives live: the CUDA device with NCCL, the CPU otherwise."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(t: Tensor) -> Tensor:
    import torch.distributed as tdist

    out = t.clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out
