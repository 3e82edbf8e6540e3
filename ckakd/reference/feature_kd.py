"""Float64 references of :mod:`ckakd.feature_kd`: attention transfer and the FitNets hint after
adaptive average pooling to the smaller spatial size, one pooling window at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd.reference._common import as_dtype, reduce
from ckakd.reference.wasserstein import adaptive_bounds


def _pool_to(f: Tensor, h: int, w: int) -> Tensor:
    """Adaptive average pooling (B, C, H, W) -> (B, C, h, w) with PyTorch's bins, one window at a time."""
    rows = adaptive_bounds(f.shape[-2], h)
    cols = adaptive_bounds(f.shape[-1], w)
    out = f.new_empty(f.shape[0], f.shape[1], h, w)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, :, i, j] = f[:, :, r0:r1, c0:c1].mean(dim=(-2, -1))
    return out


def _match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    h, w = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
    return _pool_to(f_s, h, w), _pool_to(f_t, h, w)


def at_loss(
    f_s: Tensor, f_t: Tensor, p: float = 2.0, *, dtype: torch.dtype | None = None, reduction: str = "mean"
) -> Tensor:
    """Attention transfer: a(f) = m / max(‖m‖, 1e-12) with m = mean_c f^p flattened per sample; per sample the
    mean over positions of (a_s − a_t)², then ``reduction`` over the samples."""
    f_s, f_t = _match_spatial(as_dtype(f_s, dtype), as_dtype(f_t, dtype))

    def att(f: Tensor) -> Tensor:
        m = (f**p).mean(dim=1).reshape(f.shape[0], -1)
        return m / torch.sqrt((m * m).sum(dim=1, keepdim=True)).clamp_min(1e-12)

    return reduce(((att(f_s) - att(f_t)) ** 2).mean(dim=1), reduction)


def fitnet_loss(f_s: Tensor, f_t: Tensor, *, dtype: torch.dtype | None = None, reduction: str = "mean") -> Tensor:
    """FitNets hint: mean squared difference after adaptive-average-pooling to the smaller spatial size (per
    sample over C·H·W, then ``reduction`` over the samples)."""
    f_s, f_t = _match_spatial(as_dtype(f_s, dtype), as_dtype(f_t, dtype))
    return reduce(((f_s - f_t) ** 2).reshape(f_s.shape[0], -1).mean(dim=1), reduction)
