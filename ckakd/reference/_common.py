"""What every reference formula shares: the cast to float64 (or the asked dtype)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_dtype(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``x`` cast to ``dtype``, float64 when ``dtype`` is None (any shape)."""
    return x.to(torch.float64 if dtype is None else dtype)
