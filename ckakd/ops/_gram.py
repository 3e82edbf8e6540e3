"""Gram-matrix primitives shared by the ops, one function per primitive, each with a torch and a Triton path.

* ``gram``: K = Xc Xcᵀ (b, n, n) with Xc = X - column means (or X when not centering).
  The torch path centers the *features* first, chunk by chunk over d, so it never forms an (n, d)
  temporary larger than one chunk and never centers a Gram after the fact: for features with a large
  mean (offset 1000, std 1) H (X Xᵀ) H cancels entries of order d·offset² down to results of order d,
  and fp32 keeps no correct digit (relative error ~1 at n=64, d=1024).
* ``gram_apply``: M @ Xc (b, n, d), the one (n×n)·(n×d) product every backward needs.
* ``frobenius_dots``: [Σ K∘L, Σ K∘K, Σ L∘L] per batch entry.
* ``u_center``, ``double_center``: O(n²) transforms of (b, n, n) matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd._checks import accumulation_dtype as _acc_dtype
from ckakd.ops._backend import record_dispatch

# Columns per chunk for the torch path: bounds temporaries whatever d is. Single problems (b = 1) use
# cache-sized chunks (~4 MB of fp32 per chunk): the centering of a chunk and the products that read it
# then happen while it is in cache, which on the CPU is faster than one big product (measured on 2 EPYC
# cores: M·Xc for n=256, d=16384 took 15.5-17.5 ms in 512-4096-column chunks vs 18.4-23.5 ms in one call).
_CHUNK_ELEMENTS = 1 << 22
_CACHE_CHUNK_ELEMENTS = 1 << 20
# From this many rows on, the symmetric Gram skips its lower-left block (75% of the flops).
_TRIANGULAR_MIN_ROWS = 128


def _chunks(b: int, n: int, d: int):
    step = max(128, (_CACHE_CHUNK_ELEMENTS if b == 1 else _CHUNK_ELEMENTS) // max(1, b * n))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def _centered_chunk(
    x: Tensor, mean: Tensor, sl: slice, center: bool, acc: torch.dtype, corr: Tensor | None = None
) -> Tensor:
    """Columns ``sl`` of ``x - mean`` in ``acc``; with ``corr``, ``(x - mean) - corr`` (``mean`` a shift)."""
    xc = x[..., sl].to(acc)
    if not center:
        return xc
    xc = xc - mean[..., sl].to(acc).unsqueeze(-2)
    return xc - corr[..., sl].unsqueeze(-2) if corr is not None else xc


def _shift_and_correction(x: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(shift, corr) (b, d) with column means = shift + corr: shift is row 0 (exact), corr the mean of
    ``x - shift``. Subtracting the two in turn keeps fp32 exact for features with a large offset, where a
    rounded fp32 mean (offset 1000: off by ~3e-5) would shift every centered value by that error."""
    b, n, d = x.shape
    shift = x[:, 0, :].to(acc)
    corr = torch.empty((b, d), dtype=acc, device=x.device)
    for sl in _chunks(b, n, d):
        corr[:, sl] = (x[..., sl].to(acc) - shift[:, None, sl]).mean(dim=1)
    return shift, corr


def gram(x: Tensor, center: bool, backend: str) -> tuple[Tensor, Tensor]:
    """x (b, n, d) -> (K (b, n, n), mean (b, d)) in fp32 (fp64 for fp64 input)."""
    if backend == "triton" and x.dtype != torch.float64:
        from ckakd import kernels

        record_dispatch("gram", "triton")
        return kernels.gram_forward(x, center)
    record_dispatch("gram", "torch")
    acc = _acc_dtype(x)
    b, n, d = x.shape
    if center and n > 0:
        shift, corr = _shift_and_correction(x, acc)
        mean = shift + corr
    else:
        shift = corr = mean = x.new_zeros((b, d), dtype=acc)
    if b == 1:
        return _gram_single(x[0], shift[0], corr[0], center, acc).unsqueeze(0), mean
    k = x.new_zeros((b, n, n), dtype=acc)
    for sl in _chunks(b, n, d):
        xc = _centered_chunk(x, shift, sl, center, acc, corr)
        k.baddbmm_(xc, xc.transpose(1, 2))
    return k, mean


def _gram_single(x: Tensor, shift: Tensor, corr: Tensor, center: bool, acc: torch.dtype) -> Tensor:
    """(n, d) -> Xc Xcᵀ (n, n), computing only the upper block rows when n is large."""
    n, d = x.shape
    k = x.new_zeros((n, n), dtype=acc)
    half = n // 2 if n >= _TRIANGULAR_MIN_ROWS else 0
    for sl in _chunks(1, n, d):
        xc = _centered_chunk(x, shift, sl, center, acc, corr)
        if half:
            k[:half].addmm_(xc[:half], xc.T)
            k[half:, half:].addmm_(xc[half:], xc[half:].T)
        else:
            k.addmm_(xc, xc.T)
    if half:
        k[half:, :half] = k[:half, half:].T
    return k


def gram_apply(m: Tensor, x: Tensor, mean: Tensor, center: bool, backend: str) -> Tensor:
    """m (b, n, n), x (b, n, d) -> m @ (x - mean) (b, n, d) in x.dtype, contiguous."""
    if backend == "triton" and x.dtype != torch.float64:
        from ckakd import kernels

        record_dispatch("gram_apply", "triton")
        return kernels.gram_backward(m.float().contiguous(), x, mean.float().contiguous(), center)
    record_dispatch("gram_apply", "torch")
    acc = _acc_dtype(x)
    b, n, d = x.shape
    m = m.to(acc)
    out = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    for sl in _chunks(b, n, d):
        xc = _centered_chunk(x, mean, sl, center, acc)
        if b == 1 and x.dtype == acc:
            torch.mm(m[0], xc[0], out=out[0, :, sl])
        else:
            out[..., sl] = torch.bmm(m, xc).to(x.dtype)
    return out


def frobenius_dots(k: Tensor, l: Tensor, backend: str) -> Tensor:
    """k, l (b, n, n) -> (b, 3): [Σ k∘l, Σ k∘k, Σ l∘l]."""
    if backend == "triton" and k.dtype == torch.float32 and l.dtype == torch.float32:
        from ckakd import kernels

        record_dispatch("frobenius_dots", "triton")
        return kernels.frobenius_dots(k.contiguous(), l.contiguous())
    record_dispatch("frobenius_dots", "torch")
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
