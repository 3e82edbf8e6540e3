"""Centered Gram matrix in Triton: ``K = Xc Xcᵀ`` (forward) and ``M Xc`` (backward).

Math
----
``x`` is a batch of ``(n, d)`` matrices, rows are samples. With the column means ``mu = 1ᵀx / n`` the
centered features are ``Xc = x - 1 muᵀ`` and the centered linear Gram is ``K = Xc Xcᵀ`` (``n x n``,
symmetric). Centering the *features* before the product is what keeps fp32 accurate when the features
carry a large offset (ReLU features, offset 1000: forming ``x xᵀ`` first and centering ``K`` afterwards
loses 3-4 digits, see DESIGN §3). ``Xc`` is never materialized: every tile of ``x`` is centered in
registers right after it is loaded.

For the same reason the kernels do not subtract the fp32 mean itself (at offset 1000 the mean can only
be represented to ~3e-5). They subtract a *shift* row (row 0 of ``x``, exactly representable) and then a
small correction ``corr = mean - shift`` computed in fp32 from the shifted data: ``(x - shift) - corr``.
``x - shift`` is exact for offset-dominated data and ``corr`` is of the order of the spread of the
data, so the centered values carry an absolute error of ~1e-7 times the spread, not times the offset.

Kernels and tiling
------------------
1. ``_column_mean_kernel`` — grid ``(cdiv(d, BLOCK_D), b)``: one read of ``x``. Each program walks all
   ``n`` rows of a ``BLOCK_D`` column strip, accumulating ``x - shift`` in a 2-D fp32 register tile
   that is reduced once at the end; writes ``mean`` and ``corr`` (both ``(b, d)`` fp32). Only used when
   ``n > 64`` (see ``SINGLE_TILE``).
2. ``_gram_kernel`` — grid ``(T, S, b)``. The ``n x n`` output is cut into square ``BLOCK_N`` tiles;
   only the ``T = nt (nt + 1) / 2`` upper-triangle tiles are computed (the program id of axis 0 is
   decoded to a tile pair ``tm <= tn``) and each is stored twice (tile and mirrored transpose). The
   reduction over ``d`` is split in ``S`` contiguous ranges (split-K) so that a few tiles with a huge
   ``d`` (``n=64``, ``d=200704``) still fill the GPU. Every program loads the ``BLOCK_N x BLOCK_K`` tiles
   of the rows of ``tm`` and ``tn``, centers them, and accumulates ``a cᵀ`` with ``tl.dot`` in fp32.
   ``SINGLE_TILE`` (``n <= BLOCK_N = 64``): one tile holds every row, so each program computes the
   column means of its own columns in registers and writes them: ``x`` is read exactly once.
3. ``_sum_splits_kernel`` — the deterministic second stage when ``S > 1``: the ``S`` partial Grams
   (``(S, b, n, n)`` fp32) are summed elementwise (no atomics, reproducible results).
4. ``_gram_backward_kernel`` — grid ``(cdiv(d, BLOCK_D), cdiv(n, BLOCK_M), b)``: ``out = m @ Xc``,
   a plain tiled matmul whose right operand is centered in registers (``x - mean``). With ``n <= 128``
   there is one row block, so ``x`` is read exactly once.

All products use ``tl.dot(..., input_precision="ieee")`` (TF32 loses ~3e-4) and fp32 accumulation;
fp16/bf16/fp64 inputs are loaded and converted to fp32 in registers (float64 inputs are therefore
computed in fp32: callers send fp16/bf16/fp32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["gram_forward", "gram_backward", "num_sms"]

# tl.dot precision for fp32 operands: "ieee" is exact fp32 FMA; "tf32x3" would be faster on tensor
# cores at a small accuracy cost, plain "tf32" is not accurate enough for CKA.
DOT_PRECISION = "ieee"


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Number of streaming multiprocessors of ``device``; 1 off-GPU (the interpreter runs programs
    one after the other, so fewer, larger programs are faster there)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (b, n, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _column_mean_kernel(
    x_ptr,
    mean_ptr,
    corr_ptr,
    n,
    d,
    stride_xb,
    stride_xn,
    stride_xd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    base = x_ptr + pid_b.to(tl.int64) * stride_xb
    col_off = cols.to(tl.int64) * stride_xd
    shift = tl.load(base + col_off, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < n)[:, None] & cmask[None, :]
        ptrs = base + rows.to(tl.int64)[:, None] * stride_xn + col_off[None, :]
        xv = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(mask, xv - shift[None, :], 0.0)
    corr = tl.sum(acc, axis=0) / n
    out = pid_b.to(tl.int64) * d + cols
    tl.store(mean_ptr + out, shift + corr, mask=cmask)
    tl.store(corr_ptr + out, corr, mask=cmask)


@triton.jit
def _load_centered_rows(
    base,
    rows,
    rmask,
    ks,
    kmask,
    shift,
    corr,
    stride_xn,
    stride_xd,
    CENTER: tl.constexpr,
):
    """(len(rows), len(ks)) fp32 tile of x, centered with ``(x - shift) - corr``; zero where masked."""
    mask = rmask[:, None] & kmask[None, :]
    ptrs = base + rows.to(tl.int64)[:, None] * stride_xn + ks.to(tl.int64)[None, :] * stride_xd
    xv = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        # the where() keeps padded rows/columns at exactly zero after the subtraction
        xv = tl.where(mask, (xv - shift[None, :]) - corr[None, :], 0.0)
    return xv


@triton.jit
def _gram_kernel(
    x_ptr,
    corr_ptr,
    mean_ptr,
    out_ptr,
    n,
    d,
    k_per_split,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_out_split,
    CENTER: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    # decode pid_t = tn (tn + 1) / 2 + tm with 0 <= tm <= tn; the float estimate is fixed up by one step
    # either way (exact for any realistic tile count).
    tn = ((tl.sqrt(8.0 * pid_t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tn = tl.where(tn * (tn + 1) // 2 > pid_t, tn - 1, tn)
    tn = tl.where((tn + 1) * (tn + 2) // 2 <= pid_t, tn + 1, tn)
    tm = pid_t - tn * (tn + 1) // 2

    rm = tm * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_mask = rm < n
    rn_mask = rn < n
    base = x_ptr + pid_b.to(tl.int64) * stride_xb
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, d)

    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_end
        if SINGLE_TILE:
            # n <= BLOCK_N: this program holds all n rows of its columns, so the column means are
            # computed here (same shifted form) and written out; no separate mean pass over x.
            zero = tl.zeros((BLOCK_K,), dtype=tl.float32)
            a = _load_centered_rows(base, rm, rm_mask, ks, kmask, zero, zero, stride_xn, stride_xd, False)
            if CENTER:
                mask = rm_mask[:, None] & kmask[None, :]
                shift = tl.sum(tl.where(rm[:, None] == 0, a, 0.0), axis=0)
                dv = tl.where(mask, a - shift[None, :], 0.0)
                corr = tl.sum(dv, axis=0) / n
                a = tl.where(mask, dv - corr[None, :], 0.0)
                tl.store(mean_ptr + pid_b.to(tl.int64) * d + ks, shift + corr, mask=kmask)
            c = a
        else:
            if CENTER:
                shift = tl.load(base + ks.to(tl.int64) * stride_xd, mask=kmask, other=0.0).to(tl.float32)
                corr = tl.load(corr_ptr + pid_b.to(tl.int64) * d + ks, mask=kmask, other=0.0)
            else:
                shift = tl.zeros((BLOCK_K,), dtype=tl.float32)
                corr = shift
            a = _load_centered_rows(base, rm, rm_mask, ks, kmask, shift, corr, stride_xn, stride_xd, CENTER)
            c = _load_centered_rows(base, rn, rn_mask, ks, kmask, shift, corr, stride_xn, stride_xd, CENTER)
        acc += tl.dot(a, tl.trans(c), input_precision=PRECISION)

    # Diagonal tiles: take the upper triangle and mirror it so that K is exactly symmetric (a dot
    # product need not return bitwise-equal (i, j) and (j, i)). Off-diagonal tiles have rm < rn.
    acc = tl.where(rm[:, None] <= rn[None, :], acc, tl.trans(acc))
    out = out_ptr + pid_s.to(tl.int64) * stride_out_split + pid_b.to(tl.int64) * n * n
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    tl.store(out + rm64[:, None] * n + rn64[None, :], acc, mask=rm_mask[:, None] & rn_mask[None, :])
    if tm != tn:
        tl.store(
            out + rn64[:, None] * n + rm64[None, :],
            tl.trans(acc),
            mask=rn_mask[:, None] & rm_mask[None, :],
        )


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, n_split, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n_split):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _gram_backward_kernel(
    m_ptr,
    x_ptr,
    mean_ptr,
    out_ptr,
    n,
    d,
    stride_mb,
    stride_mi,
    stride_mj,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_meanb,
    stride_meand,
    CENTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_b = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < n
    cmask = cols < d
    cols64 = cols.to(tl.int64)
    m_base = m_ptr + pid_b.to(tl.int64) * stride_mb + rows.to(tl.int64)[:, None] * stride_mi
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb + cols64[None, :] * stride_xd
    if CENTER:
        mu = tl.load(mean_ptr + pid_b.to(tl.int64) * stride_meanb + cols64 * stride_meand, mask=cmask, other=0.0)
        mu = mu.to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < n
        mt = tl.load(m_base + ks.to(tl.int64)[None, :] * stride_mj, mask=rmask[:, None] & kmask[None, :], other=0.0).to(
            tl.float32
        )
        xmask = kmask[:, None] & cmask[None, :]
        xt = tl.load(x_base + ks.to(tl.int64)[:, None] * stride_xn, mask=xmask, other=0.0).to(tl.float32)
        if CENTER:
            xt = tl.where(xmask, xt - mu[None, :], 0.0)
        acc += tl.dot(mt, xt, input_precision=PRECISION)

    out = out_ptr + pid_b.to(tl.int64) * n * d + rows.to(tl.int64)[:, None] * d + cols64[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


# Launch configurations. fp32 "ieee" dots run on FMA units with their operands in registers; these
# sizes compile without register spills for sm_90 (checked with ptxas -v on triton 3.9's PTX). The same
# configurations run under the interpreter, so the CPU tests exercise the GPU tiling.
_GRAM_CONFIG = {16: (64, 4), 32: (32, 4), 64: (32, 8)}  # BLOCK_N -> (BLOCK_K, num_warps)
_GRAM_BWD_CONFIG = {16: (64, 4), 32: (64, 4), 64: (64, 8), 128: (32, 8)}  # BLOCK_M -> (BLOCK_D, num_warps)


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def _column_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, corr), both (b, d) fp32, with mean = x[:, 0] + corr."""
    b, n, d = x.shape
    mean = torch.empty((b, d), device=x.device, dtype=torch.float32)
    corr = torch.empty((b, d), device=x.device, dtype=torch.float32)
    block_d = _pow2_clamp(d, 16, 128)
    block_n = _pow2_clamp(n, 8, 32)
    grid = (triton.cdiv(d, block_d), b)
    _column_mean_kernel[grid](
        x, mean, corr, n, d, x.stride(0), x.stride(1), x.stride(2), BLOCK_N=block_n, BLOCK_D=block_d
    )
    return mean, corr


def _split_count(tiles: int, k_chunks: int, out_elems: int, device: torch.device) -> int:
    """How many d-ranges to split the reduction into: enough programs to fill the GPU (about 2 waves),
    at least 4 BLOCK_K chunks per split, and a partial buffer of at most 2**26 fp32 (256 MiB)."""
    target = 2 * num_sms(device)
    split = max(1, min(target // max(tiles, 1), k_chunks // 4, (1 << 26) // max(out_elems, 1)))
    return split


def gram_forward(x: torch.Tensor, center: bool, *, split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Centered (or plain) Gram matrices of a batch.

    Args:
        x: ``(b, n, d)``, any strides, fp32/fp16/bf16 (fp64 is computed in fp32).
        center: subtract the column means over the ``n`` rows before the product.
        split_k: force the number of d-ranges of the split-K reduction (testing / tuning); default
            from a heuristic (1 off-GPU).

    Returns:
        ``(k, mean)``: ``k`` ``(b, n, n)`` fp32, ``(x - mean)(x - mean)ᵀ`` (exactly symmetric);
        ``mean`` ``(b, d)`` fp32 column means (zeros when ``center`` is False).
    """
    _check_x(x)
    b, n, d = x.shape
    dev = x.device
    k = torch.empty((b, n, n), device=dev, dtype=torch.float32)
    block_n = _pow2_clamp(n, 16, 64)
    single_tile = n <= block_n
    if center and single_tile:
        mean = torch.empty((b, d), device=dev, dtype=torch.float32)  # written by the Gram kernel
        corr = mean
    elif center and b * n * d > 0:
        mean, corr = _column_mean(x)
    else:
        mean = torch.zeros((b, d), device=dev, dtype=torch.float32)
        corr = mean
    if b == 0 or n == 0:
        return k, mean.zero_()
    if d == 0:
        return k.zero_(), mean
    block_k, warps = _GRAM_CONFIG[block_n]
    nt = triton.cdiv(n, block_n)
    tiles = nt * (nt + 1) // 2
    k_chunks = triton.cdiv(d, block_k)
    if split_k is None:
        split_k = _split_count(tiles * b, k_chunks, b * n * n, dev)
    split_k = max(1, min(int(split_k), k_chunks))
    chunks_per_split = triton.cdiv(k_chunks, split_k)
    split_k = triton.cdiv(k_chunks, chunks_per_split)  # no empty ranges

    part = k if split_k == 1 else torch.empty((split_k, b, n, n), device=dev, dtype=torch.float32)
    _gram_kernel[(tiles, split_k, b)](
        x,
        corr,
        mean,
        part,
        n,
        d,
        chunks_per_split * block_k,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        b * n * n,
        CENTER=bool(center),
        SINGLE_TILE=single_tile,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION=DOT_PRECISION,
        num_warps=warps,
    )
    if split_k > 1:
        numel = b * n * n
        block = 1024
        _sum_splits_kernel[(triton.cdiv(numel, block),)](part, k, numel, split_k, BLOCK=block)
    return k, mean


def gram_backward(m: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, center: bool) -> torch.Tensor:
    """``m @ (x - mean)`` (``m @ x`` when not ``center``) without forming ``x - mean`` in memory.

    Args:
        m: ``(b, n, n)`` (any matrix, any strides; read as fp32).
        x: ``(b, n, d)``, any strides.
        mean: ``(b, d)`` fp32 column means (ignored when ``center`` is False).
        center: subtract ``mean`` from every row of ``x`` in registers.

    Returns:
        ``(b, n, d)`` contiguous tensor of ``x.dtype`` (fp32 accumulation).

    ``mean`` is used as given: its fp32 rounding ``δ`` (~3e-5 at offset 1000) adds ``(m 1) δᵀ``, which
    vanishes for CKA's coefficient matrices (built from centered Grams, rows summing to zero).
    """
    _check_x(x)
    b, n, d = x.shape
    if m.shape != (b, n, n):
        raise ValueError(f"m must be (b, n, n) = {(b, n, n)}, got {tuple(m.shape)}")
    if center and mean.shape != (b, d):
        raise ValueError(f"mean must be (b, d) = {(b, d)}, got {tuple(mean.shape)}")
    out = torch.empty((b, n, d), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    if not center:
        mean = x.new_zeros((1, 1), dtype=torch.float32)  # unused pointer
    block_m = _pow2_clamp(n, 16, 128)
    block_d, warps = _GRAM_BWD_CONFIG[block_m]
    block_d = min(block_d, _pow2_clamp(d, 16, 128))
    block_k = 16
    grid = (triton.cdiv(d, block_d), triton.cdiv(n, block_m), b)
    _gram_backward_kernel[grid](
        m,
        x,
        mean,
        out,
        n,
        d,
        m.stride(0),
        m.stride(1),
        m.stride(2),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        mean.stride(0),
        mean.stride(1),
        CENTER=bool(center),
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        BLOCK_K=block_k,
        PRECISION=DOT_PRECISION,
        num_warps=warps,
    )
    return out
