"""Gram-matrix primitives shared by the ops, one function per primitive, each with a torch and a Triton path.

* ``gram``: K = Xc Xcᵀ (b, n, n) with Xc = X - column means (or X when not centering).
  The torch path centers the *features* first, chunk by chunk over d, so it never forms an (n, d)
  temporary larger than one chunk and never centers a Gram after the fact (catastrophic in fp32 for
  features with a large mean, DESIGN §3).
* ``gram_apply``: M @ Xc (b, n, d), the one (n×n)·(n×d) product every backward needs.
* ``frobenius_dots``: [Σ K∘L, Σ K∘K, Σ L∘L] per batch entry.
* ``u_center``, ``double_center``: O(n²) transforms of (b, n, n) matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Columns per chunk for the torch path: bounds the temporary to ~16 MB of fp32 whatever d is.
_CHUNK_ELEMENTS = 1 << 22


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(b: int, n: int, d: int):
    step = max(256, _CHUNK_ELEMENTS // max(1, b * n))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def gram(x: Tensor, center: bool, backend: str) -> tuple[Tensor, Tensor]:
    """x (b, n, d) -> (K (b, n, n), mean (b, d)) in fp32 (fp64 for fp64 input)."""
    if backend == "triton" and x.dtype != torch.float64:
        from ckakd import kernels

        return kernels.gram_forward(x, center)
    acc = _acc(x)
    b, n, d = x.shape
    mean = x.mean(dim=1, dtype=acc) if center else x.new_zeros((b, d), dtype=acc)
    k = None
    for sl in _chunks(b, n, d):
        xc = x[..., sl].to(acc)
        if center:
            xc = xc - mean[:, None, sl]
        k = torch.bmm(xc, xc.transpose(1, 2)) if k is None else k.baddbmm_(xc, xc.transpose(1, 2))
    if k is None:  # d == 0
        k = x.new_zeros((b, n, n), dtype=acc)
    return k, mean


def gram_apply(m: Tensor, x: Tensor, mean: Tensor, center: bool, backend: str) -> Tensor:
    """m (b, n, n), x (b, n, d) -> m @ (x - mean) (b, n, d) in x.dtype."""
    if backend == "triton" and x.dtype != torch.float64:
        from ckakd import kernels

        return kernels.gram_backward(m.float().contiguous(), x, mean.float().contiguous(), center)
    acc = _acc(x)
    b, n, d = x.shape
    m = m.to(acc)
    parts = []
    for sl in _chunks(b, n, d):
        xc = x[..., sl].to(acc)
        if center:
            xc = xc - mean[:, None, sl].to(acc)
        parts.append(torch.bmm(m, xc).to(x.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def frobenius_dots(k: Tensor, l: Tensor, backend: str) -> Tensor:
    """k, l (b, n, n) -> (b, 3): [Σ k∘l, Σ k∘k, Σ l∘l]."""
    if backend == "triton" and k.dtype == torch.float32 and l.dtype == torch.float32:
        from ckakd import kernels

        return kernels.frobenius_dots(k.contiguous(), l.contiguous())
    k2, l2 = k.flatten(1), l.flatten(1)
    return torch.stack([(k2 * l2).sum(1), (k2 * k2).sum(1), (l2 * l2).sum(1)], dim=1)


def u_center(k: Tensor) -> Tensor:
    """Batched U-centering (b, n, n), n >= 3 (Székely–Rizzo; idempotent and self-adjoint)."""
    n = k.shape[-1]
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    total = k.sum(dim=(-2, -1), keepdim=True)
    row = k.sum(dim=-1, keepdim=True) / (n - 2)
    col = k.sum(dim=-2, keepdim=True) / (n - 2)
    k = k - row - col + total / ((n - 1) * (n - 2))
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def double_center(m: Tensor) -> Tensor:
    """H M H for a batch (b, n, n)."""
    m = m - m.mean(dim=-2, keepdim=True)
    return m - m.mean(dim=-1, keepdim=True)
