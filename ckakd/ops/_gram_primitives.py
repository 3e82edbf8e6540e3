"""Gram-matrix primitives shared by the ops, one function per primitive, each with a torch and a Triton path.

* ``gram``: K = Xc Xcᵀ (b, n, n) with Xc = X - column means (or X when not centering).
  The torch path centers the *features* first, chunk by chunk over d, so it never forms an (n, d)
  temporary larger than one chunk and never centers a Gram after the fact: for features with a large
  mean (offset 1000, std 1) H (X Xᵀ) H cancels entries of order d·offset² down to results of order d,
  and fp32 keeps no correct digit (relative error ~1 at n=64, d=1024).
* ``gram_apply``: M @ Xc (b, n, d), the one (n×n)·(n×d) product every backward needs.
* ``frobenius_dots``: [Σ K∘L, Σ K∘K, Σ L∘L] per batch entry.
* ``u_center``, ``double_center``: O(n²) transforms of (b, n, n) matrices.
* ``pow2_exponent``, ``exp2``, ``mul_pow2`` (and ``pow2_scale``, the factor itself, for ``sqrtm_psd`` and the
  Gaussian Wasserstein losses): exact power-of-two scaling. The ops divide every input by
  2^e with max|x| in [2^(e-1), 2^e) before forming a Gram (``gram`` and ``gram_apply`` fold the factor
  into the chunk loads): scaling by a power of two is exact, so the Grams are those of features of
  magnitude ~1 whatever the input scale (fp32 Gram sums overflow from |x| ~ 1e8 at n·d ~ 6e4 and lose
  digits to denormals below |x| ~ 1e-10), and the gradients are rescaled exactly afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd._checks import accumulation_dtype as _acc_dtype
from ckakd.ops._backend import record_dispatch, triton_kernels

# Columns per chunk for the torch path: bounds temporaries whatever d is. Single problems (b = 1) use
# cache-sized chunks (~4 MB of fp32 per chunk): the centering of a chunk and the products that read it
# then happen while it is in cache, which on the CPU is faster than one big product (measured on 2 EPYC
# cores: M·Xc for n=256, d=16384 took 15.5-17.5 ms in 512-4096-column chunks vs 18.4-23.5 ms in one call).
_CHUNK_ELEMENTS = 1 << 22
_CACHE_CHUNK_ELEMENTS = 1 << 20
# From this many rows on, the symmetric Gram skips its lower-left block (75% of the flops).
_TRIANGULAR_MIN_ROWS = 128


def pow2_exponent(x: Tensor) -> Tensor:
    """x (b, ...) -> int32 (b,): e with max|x_b| in [2^(e-1), 2^e), clamped so that 2^±e stays a normal
    number of the accumulation dtype; 0 for an all-zero, empty or non-finite entry (NaN propagates)."""
    b = x.shape[0]
    if x.numel() == 0:
        return torch.zeros(b, dtype=torch.int32, device=x.device)
    acc = _acc_dtype(x)
    if x.dim() == 1:
        amax = x.abs().to(acc)
    else:  # a reduction over the trailing dims, no copy of a non-contiguous x (e.g. transposed logits)
        amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=tuple(range(1, x.dim()))).to(acc)
    e = torch.frexp(amax).exponent.to(torch.int32)
    lim = 1021 if acc == torch.float64 else 125
    return torch.where(torch.isfinite(amax), e.clamp(-lim, lim), torch.zeros_like(e))


def exp2(e: Tensor, dtype: torch.dtype) -> Tensor:
    """2^e (e an integer tensor) exactly, built from the exponent bits (no libm rounding on any device);
    e is clamped to the normal range of ``dtype`` (float32 or float64)."""
    if dtype == torch.float64:
        return ((e.to(torch.int64).clamp(-1022, 1023) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32).clamp(-126, 127) + 127) << 23).view(torch.float32)


def mul_pow2(t: Tensor, e: Tensor) -> Tensor:
    """t (b, ...) float32/float64 times 2^e_b (e int (b,)), in two exact steps so that a factor outside
    the dtype's range still gives the right result: ±inf only where t·2^e overflows, 0 where it
    underflows, never inf·0 (|e| up to 252 for float32, 2044 for float64)."""
    shape = (-1,) + (1,) * (t.dim() - 1)
    e1 = torch.div(e, 2, rounding_mode="floor")
    return t * exp2(e1, t.dtype).view(shape) * exp2(e - e1, t.dtype).view(shape)


def pow2_scale(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The power of two c with max |t| / c in [1, 2) over ``dims`` (kept), detached; 1 where max |t| is 0
    or not finite. c is finite for every finite t (at most 2^127 in fp32).

    Dividing by a power of two is exact, so scaling by it changes no digit of normal-range inputs while
    keeping squares and products of huge (or tiny) values inside the dtype's range.
    """
    if any(t.shape[d] == 0 for d in dims):  # nothing to scale (d = 0)
        shape = [1 if i in {d % t.dim() for d in dims} else n for i, n in enumerate(t.shape)]
        return torch.ones(shape, dtype=t.dtype, device=t.device)
    m = t.detach().abs().amax(dim=dims, keepdim=True)
    ok = torch.isfinite(m) & (m > 0)
    exponent = torch.frexp(torch.where(ok, m, torch.ones_like(m))).exponent - 1
    return torch.where(ok, torch.ldexp(torch.ones_like(m), exponent), torch.ones_like(m))


def _chunks(b: int, n: int, d: int):
    step = max(128, (_CACHE_CHUNK_ELEMENTS if b == 1 else _CHUNK_ELEMENTS) // max(1, b * n))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def _centered_chunk(
    x: Tensor,
    mean: Tensor,
    sl: slice,
    center: bool,
    acc: torch.dtype,
    corr: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """Columns ``sl`` of ``x·scale - mean`` in ``acc``; with ``corr``, ``(x·scale - mean) - corr`` (``mean``
    a shift). ``scale`` broadcasts against x ((b, 1, 1), or 0-d for a single (n, d) problem)."""
    xc = x[..., sl].to(acc)
    if scale is not None:
        xc = xc * scale
    if not center:
        return xc
    xc = xc - mean[..., sl].to(acc).unsqueeze(-2)
    return xc - corr[..., sl].unsqueeze(-2) if corr is not None else xc


def _shift_and_correction(x: Tensor, acc: torch.dtype, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(shift, corr) (b, d) with column means of ``x·scale`` = shift + corr: shift is row 0 (exact), corr
    the mean of ``x·scale - shift``. Subtracting the two in turn keeps fp32 exact for features with a large
    offset, where a rounded fp32 mean (offset 1000: off by ~3e-5) would shift every centered value."""
    b, n, d = x.shape
    s = None if scale is None else scale.view(b, 1, 1)
    shift = x[:, 0, :].to(acc) if s is None else x[:, 0, :].to(acc) * s[:, 0]
    corr = torch.empty((b, d), dtype=acc, device=x.device)
    for sl in _chunks(b, n, d):
        xs = x[..., sl].to(acc) if s is None else x[..., sl].to(acc) * s
        corr[:, sl] = (xs - shift[:, None, sl]).mean(dim=1)
    return shift, corr


def scaled_copy(x: Tensor, scale: Tensor) -> Tensor:
    """x (b, ...) times scale (b,) (exact powers of two), in x.dtype (computed in scale's dtype)."""
    return (x * scale.view((-1,) + (1,) * (x.dim() - 1))).to(x.dtype)


def gram(x: Tensor, center: bool, backend: str, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x (b, n, d) -> (K (b, n, n), mean (b, d)) of the features ``x·scale`` (scale (b,) powers of two,
    or None for 1), in fp32 (fp64 for fp64 input)."""
    if backend == "triton" and x.dtype != torch.float64:
        kernels = triton_kernels()
        record_dispatch("gram", "triton")
        return kernels.gram_forward(x if scale is None else scaled_copy(x, scale), center)
    record_dispatch("gram", "torch")
    acc = _acc_dtype(x)
    b, n, d = x.shape
    if center and n > 0:
        shift, corr = _shift_and_correction(x, acc, scale)
        mean = shift + corr
    else:
        shift = corr = mean = x.new_zeros((b, d), dtype=acc)
    if b == 1:
        s = None if scale is None else scale.reshape(())
        return _gram_single(x[0], shift[0], corr[0], center, acc, s).unsqueeze(0), mean
    s = None if scale is None else scale.view(b, 1, 1)
    k = x.new_zeros((b, n, n), dtype=acc)
    for sl in _chunks(b, n, d):
        xc = _centered_chunk(x, shift, sl, center, acc, corr, s)
        k.baddbmm_(xc, xc.transpose(1, 2))
    return k, mean


def _gram_single(
    x: Tensor, shift: Tensor, corr: Tensor, center: bool, acc: torch.dtype, scale: Tensor | None = None
) -> Tensor:
    """(n, d) -> Xc Xcᵀ (n, n) of ``x·scale``, computing only the upper block rows when n is large."""
    n, d = x.shape
    k = x.new_zeros((n, n), dtype=acc)
    half = n // 2 if n >= _TRIANGULAR_MIN_ROWS else 0
    for sl in _chunks(1, n, d):
        xc = _centered_chunk(x, shift, sl, center, acc, corr, scale)
        if half:
            k[:half].addmm_(xc[:half], xc.T)
            k[half:, half:].addmm_(xc[half:], xc[half:].T)
        else:
            k.addmm_(xc, xc.T)
    if half:
        k[half:, :half] = k[:half, half:].T
    return k


def gram_apply(
    m: Tensor,
    x: Tensor,
    mean: Tensor,
    center: bool,
    backend: str,
    scale: Tensor | None = None,
    out_exp: Tensor | None = None,
) -> Tensor:
    """m (b, n, n), x (b, n, d) -> (m @ (x·scale - mean))·2^out_exp (b, n, d) in x.dtype, contiguous.

    scale (b,): powers of two applied to x (None: 1); out_exp (b,) int: exact power-of-two factor of the
    result, applied in the accumulation dtype before the cast (see ``mul_pow2``; None: 1).
    """
    acc = _acc_dtype(x)
    if backend == "triton" and x.dtype != torch.float64:
        kernels = triton_kernels()
        record_dispatch("gram_apply", "triton")
        xs = x if scale is None else scaled_copy(x, scale)
        out = kernels.gram_backward(m.float().contiguous(), xs, mean.float().contiguous(), center)
        return out if out_exp is None else mul_pow2(out.to(acc), out_exp).to(x.dtype)
    record_dispatch("gram_apply", "torch")
    b, n, d = x.shape
    m = m.to(acc)
    s = None if scale is None else scale.view(b, 1, 1)
    out = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    for sl in _chunks(b, n, d):
        xc = _centered_chunk(x, mean, sl, center, acc, scale=s)
        if out_exp is not None:
            out[..., sl] = mul_pow2(torch.bmm(m, xc), out_exp).to(x.dtype)
        elif b == 1 and x.dtype == acc:
            torch.mm(m[0], xc[0], out=out[0, :, sl])
        else:
            out[..., sl] = torch.bmm(m, xc).to(x.dtype)
    return out


def frobenius_dots(k: Tensor, l: Tensor, backend: str) -> Tensor:
    """k, l (b, n, n) -> (b, 3): [Σ k∘l, Σ k∘k, Σ l∘l]."""
    if backend == "triton" and k.dtype == torch.float32 and l.dtype == torch.float32:
        kernels = triton_kernels()
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
