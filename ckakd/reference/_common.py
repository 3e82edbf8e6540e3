"""What every reference formula shares: the cast to float64 (or the asked dtype), the batch reduction."""

from __future__ import annotations

import torch
from torch import Tensor


def as_dtype(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``x`` cast to ``dtype``, float64 when ``dtype`` is None (any shape)."""
    return x.to(torch.float64 if dtype is None else dtype)


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """(B,) per-sample losses -> their mean ("mean"), sum ("sum") or themselves ("none")."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    return per_sample if reduction == "none" else per_sample.sum() if reduction == "sum" else per_sample.mean()
