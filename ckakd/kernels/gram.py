"""Centered Gram matrix in Triton: ``K = Xc Xcᵀ`` (forward) and ``M Xc`` (backward).

Math
----
``x`` is a batch of ``(n, d)`` matrices, rows are samples. With the column means ``mu = 1ᵀx / n`` the
centered features are ``Xc = x - 1 muᵀ`` and the centered linear Gram is ``K = Xc Xcᵀ`` (``n x n``,
symmetric). Centering the *features* before the product is what keeps fp32 accurate when the features
carry a large offset (ReLU features; offset 1000, std 1): forming ``x xᵀ`` first and centering ``K``
afterwards (``H K H``) cancels entries of order ``d · offset²`` down to results of order ``d · std²``,
a factor 10⁶ that fp32's 24-bit significand cannot absorb (measured: relative error 0.96 at n=64,
d=1024). ``Xc`` is never materialized: every tile of ``x`` is centered in registers right after it is
loaded.

For the same reason the kernels do not subtract the fp32 mean itself (at offset 1000 the mean can only
be represented to ~3e-5, which leaves a relative error of ~1.5e-5 in ``K``). They subtract a *shift*
row (row 0 of ``x``, exactly representable) and then a small correction ``corr = mean - shift``
computed in fp32 from the shifted data: ``(x - shift) - corr``. ``x - shift`` is exact for
offset-dominated data and ``corr`` is of the order of the spread of the data, so the centered values
carry an absolute error of ~1e-7 times the spread, not times the offset (``K`` to ~1e-7 relative).

Kernels and grids
-----------------
CUDA limits grid axis 0 to 2³¹ − 1 programs and axes 1 and 2 to 65,535, so every extent that grows
with the batch or the matrix sizes sits on axis 0 (the batch index is folded into it and decoded with a
32-bit division by a launch argument); axis 1 only carries split counts, clamped to 65,535.

1. ``_column_mean_kernel`` — grid ``(b · cdiv(d, BLOCK_D), R)``: program ``(batch, column strip)`` on
   axis 0, row range ``r`` of ``R`` on axis 1. It walks its rows of a ``BLOCK_D`` column strip in
   ``BLOCK_N``-row steps, accumulating ``x - shift`` in a 2-D fp32 register tile reduced once at the
   end. With ``R = 1`` it writes ``mean`` and ``corr`` (both ``(b, d)`` fp32) directly; otherwise it
   writes its partial sum to an ``(R, b, d)`` buffer and ``_column_mean_finish_kernel`` (grid
   ``(b · cdiv(d, BLOCK_D),)``) adds the ``R`` partials in a fixed order (deterministic, no atomics) and
   writes ``mean`` and ``corr``. ``R`` is chosen to give about four programs per SM (a tall ``x``,
   ``n=4096, d=512``, would otherwise run 4 programs each walking 4096 rows). Only used when ``n > 64``.
2. ``_gram_kernel`` — grid ``(b · T, S)``. The ``n x n`` output is cut into square ``BLOCK_N`` tiles;
   only the ``T = nt (nt + 1) / 2`` upper-triangle tiles are computed (axis 0 is decoded to a batch
   entry and a tile pair ``tm <= tn``) and each is stored twice (tile and mirrored transpose). The
   reduction over ``d`` is split in ``S`` contiguous ranges (split-K) so that a few tiles with a huge
   ``d`` (``n=64``, ``d=802816``) still fill the GPU. Every program loads the ``BLOCK_N x BLOCK_K``
   tiles of the rows of ``tm`` and ``tn``, centers them, and accumulates ``a cᵀ`` with ``tl.dot`` in
   fp32. ``SINGLE_TILE`` (``n <= BLOCK_N <= 64``): one tile holds every row, so each program computes
   the column means of its own columns in registers and writes them: ``x`` is read exactly once.
   Padding: columns past ``d`` load as exact zeros (so do their shift and correction); padded rows are
   left as finite garbage after centering, because they only reach Gram entries that are masked at the
   store (a ``where`` per element would cost registers for nothing). A centered Gram of ``n = 1`` is
   zero and its mean is the sample: that case launches nothing.
3. ``_sum_splits_kernel`` — grid ``(cdiv(b n², BLOCK),)``, the deterministic second stage when
   ``S > 1``: the ``S`` partial Grams (``(S, b, n, n)`` fp32) are summed elementwise in a fixed order.
4. ``_gram_backward_kernel`` — grid ``(b · cdiv(n, BLOCK_M) · cdiv(d, BLOCK_D),)``: ``out = m @ Xc``,
   a plain tiled matmul whose right operand is centered in registers (``x - mean``; padded rows meet
   the zero-padded columns of ``m``). With ``n <= BLOCK_M`` there is one row block, so ``x`` is read
   exactly once.

Index arithmetic: every element offset is formed in 64 bits (a scalar 64-bit base per program plus
32-bit in-tile indices times 64-bit strides), so tensors of more than 2³¹ elements and split buffers of
more than 2³¹ floats are addressed correctly. Row indices stay 32-bit (``n`` rows make an ``n x n``
Gram, so ``n < 2³¹`` by far) and program-id decoding uses 32-bit division only (a 64-bit division by a
run-time value is a slow division routine on the GPU).

Launch configurations: every kernel has a module-level candidate table (``GRAM_CONFIGS``, ...; the
first entry is the default). All launches go through :mod:`._launch` (``launch`` checks the grid and
sets the device, ``choose`` times the candidates once per shape bucket on a GPU and takes the first
under the interpreter). Every candidate computes the same function up to fp32 summation order.

Precision: products use ``tl.dot(..., input_precision=precision)`` with fp32 accumulation.
``"ieee"`` (default) is exact fp32 FMA; ``"tf32x3"`` splits each fp32 operand into two TF32 parts and
runs three tensor-core products (close to fp32 accuracy); ``"tf32"`` rounds operands to a 10-bit
significand (relative error ~1e-3: too coarse for CKA of similar representations).
``bench/bench_precision.py`` measures speed and error of each. fp16/bf16 inputs are loaded and
converted to fp32 in registers; the launchers convert float64 inputs to fp32 first (so they are computed in
fp32: callers send fp16/bf16/fp32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import GRID_LIMITS, choose, launch

__all__ = [
    "COLUMN_MEAN_CONFIGS",
    "GRAM_BWD_CONFIGS",
    "GRAM_CONFIGS",
    "PRECISIONS",
    "gram_backward",
    "gram_forward",
    "num_sms",
]

# tl.dot input precision for fp32 operands (see the module docstring).
PRECISIONS = ("ieee", "tf32x3", "tf32")
DOT_PRECISION = "ieee"  # the default

# ---------------------------------------------------------------------------------------------------
# launch candidates (first = default; the only one used under the interpreter or CKAKD_AUTOTUNE=0)
# ---------------------------------------------------------------------------------------------------
# Every entry compiles for sm_90 with triton 3.6 without register spills at every dot precision, for fp32,
# bf16 and fp16 inputs, centered or not, contiguous (aligned and odd sizes) or transposed: checked offline
# with ptxas -v (bench/compile_report.py does the same for every launch the ops make). ptxas trades a
# few bytes of spills for occupancy when a kernel needs a little more than 64, 80 or 128 registers, so
# the set is empirical: the entries below are the ones that passed, e.g. the earlier tiled default
# BLOCK_N=64, BLOCK_K=32, 8 warps spilled 8-32 bytes for 2-byte and for uncentered inputs; with
# num_stages=1 (no cp.async pipelining of the loads) and BLOCK_K=16 it stays at <= 128 registers.

# _gram_kernel, keyed on next_power_of_2(n) clamped to [16, 128]: 16/32/64 are the single-tile buckets
# (n <= BLOCK_N), 128 stands for every n > 64 (tiled; only entries with BLOCK_N < n are used).
GRAM_CONFIGS: dict[int, list[dict[str, int]]] = {
    16: [
        {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4},
        {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4},
        {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2},
        {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 2},
    ],
    32: [
        {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4},
        {"BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4},
        {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8},
    ],
    64: [
        {"BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8},
        {"BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4},
        {"BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4},
        {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8},
    ],
    128: [
        {"BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 1},
        {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4},
        {"BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 8},
        {"BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    ],
}
# _gram_backward_kernel, keyed like GRAM_CONFIGS (128: n > 64); BLOCK_D is capped at the padded d.
GRAM_BWD_CONFIGS: dict[int, list[dict[str, int]]] = {
    16: [
        {"BLOCK_M": 16, "BLOCK_D": 64, "BLOCK_K": 16, "num_warps": 4},
        {"BLOCK_M": 16, "BLOCK_D": 128, "BLOCK_K": 16, "num_warps": 4},
        {"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 4},
        {"BLOCK_M": 16, "BLOCK_D": 128, "BLOCK_K": 16, "num_warps": 8},
    ],
    32: [
        {"BLOCK_M": 32, "BLOCK_D": 64, "BLOCK_K": 16, "num_warps": 4},
        {"BLOCK_M": 32, "BLOCK_D": 128, "BLOCK_K": 16, "num_warps": 8},
        {"BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 4},
        {"BLOCK_M": 32, "BLOCK_D": 64, "BLOCK_K": 16, "num_warps": 8},
    ],
    64: [
        {"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_K": 16, "num_warps": 8},
        {"BLOCK_M": 64, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 8},
        {"BLOCK_M": 64, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 4},
        {"BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_K": 16, "num_warps": 8},
    ],
    128: [
        {"BLOCK_M": 128, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 8},
        {"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_K": 16, "num_warps": 8},
        {"BLOCK_M": 64, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 8},
        {"BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_K": 16, "num_warps": 8},
    ],
}
# _column_mean_kernel (n > 64 only); BLOCK_D is capped at the padded d.
COLUMN_MEAN_CONFIGS: list[dict[str, int]] = [
    {"BLOCK_N": 32, "BLOCK_D": 128, "num_warps": 4},
    {"BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4},
    {"BLOCK_N": 16, "BLOCK_D": 256, "num_warps": 4},
    {"BLOCK_N": 32, "BLOCK_D": 256, "num_warps": 8},
]
# The elementwise second stages: fixed configurations.
COLUMN_MEAN_FINISH_CONFIG: dict[str, int] = {"BLOCK_D": 256, "num_warps": 4}
SUM_SPLITS_CONFIG: dict[str, int] = {"BLOCK": 1024, "num_warps": 4}


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


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _column_mean_kernel(
    x_ptr,
    part_ptr,
    mean_ptr,
    corr_ptr,
    n,
    d,
    bd,
    n_col_blocks,
    rows_per_split,
    stride_xb,
    stride_xn,
    stride_xd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FINISH: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_b = pid // n_col_blocks
    pid_d = pid - pid_b * n_col_blocks
    col0 = pid_d.to(tl.int64) * BLOCK_D
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d - col0
    base = x_ptr + pid_b.to(tl.int64) * stride_xb + col0 * stride_xd
    col_off = cols.to(tl.int64) * stride_xd
    shift = tl.load(base + col_off, mask=cmask, other=0.0).to(tl.float32)
    row_start = pid_r * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        ptrs = base + rows.to(tl.int64)[:, None] * stride_xn + col_off[None, :]
        xv = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(mask, xv - shift[None, :], 0.0)
    total = tl.sum(acc, axis=0)
    out = pid_b.to(tl.int64) * d + col0 + cols
    if FINISH:
        corr = total / n
        tl.store(mean_ptr + out, shift + corr, mask=cmask)
        tl.store(corr_ptr + out, corr, mask=cmask)
    else:
        # the partial sum of x - shift over this program's rows, into the (R, b, d) buffer (bd = b * d)
        tl.store(part_ptr + pid_r.to(tl.int64) * bd + out, total, mask=cmask)


@triton.jit
def _column_mean_finish_kernel(
    x_ptr,
    part_ptr,
    mean_ptr,
    corr_ptr,
    n,
    d,
    bd,
    n_col_blocks,
    n_split,
    stride_xb,
    stride_xd,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = pid // n_col_blocks
    pid_d = pid - pid_b * n_col_blocks
    col0 = pid_d.to(tl.int64) * BLOCK_D
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d - col0
    out = pid_b.to(tl.int64) * d + col0 + cols
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ptrs = part_ptr + out
    for _ in range(0, n_split):  # fixed order: deterministic
        total += tl.load(ptrs, mask=cmask, other=0.0)
        ptrs += bd  # a 64-bit pointer step (r * bd could exceed 2**31)
    base = x_ptr + pid_b.to(tl.int64) * stride_xb + col0 * stride_xd
    shift = tl.load(base + cols.to(tl.int64) * stride_xd, mask=cmask, other=0.0).to(tl.float32)
    corr = total / n
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
    """(len(rows), len(ks)) fp32 tile of x, centered with ``(x - shift) - corr``.

    Padded columns (``ks`` past the range) are exactly zero: ``x``, ``shift`` and ``corr`` all load as 0
    there. Padded rows hold finite garbage when centering; they only reach Gram entries that are never
    stored, so no ``where`` (and its registers) is spent on them.
    """
    mask = rmask[:, None] & kmask[None, :]
    ptrs = base + rows.to(tl.int64)[:, None] * stride_xn + ks.to(tl.int64)[None, :] * stride_xd
    xv = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        xv = (xv - shift[None, :]) - corr[None, :]
    return xv


@triton.jit
def _gram_kernel(
    x_ptr,
    corr_ptr,
    mean_ptr,
    out_ptr,
    n,
    d,
    n_tiles,
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
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = pid // n_tiles
    pid_t = pid - pid_b * n_tiles
    # decode pid_t = tn (tn + 1) / 2 + tm with 0 <= tm <= tn; the float estimate is fixed up by one step
    # either way (exact for any tile count whose Gram fits in memory).
    tn = ((tl.sqrt(8.0 * pid_t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tn = tl.where(tn * (tn + 1) // 2 > pid_t, tn - 1, tn)
    tn = tl.where((tn + 1) * (tn + 2) // 2 <= pid_t, tn + 1, tn)
    tm = pid_t - tn * (tn + 1) // 2

    rm = tm * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_mask = rm < n
    rn_mask = rn < n
    # this program's d-range [k_start, k_start + k_len): 64-bit scalar base, 32-bit offsets inside it
    k_start = pid_s.to(tl.int64) * k_per_split
    k_len = tl.minimum(d - k_start, k_per_split).to(tl.int32)
    base = x_ptr + pid_b.to(tl.int64) * stride_xb + k_start * stride_xd
    vec = pid_b.to(tl.int64) * d + k_start  # offset of (pid_b, k_start) in the (b, d) mean / corr

    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_len
        if SINGLE_TILE:
            # n <= BLOCK_N: this program holds all n rows of its columns, so the column means are
            # computed here (same shifted form) and written out; no separate mean pass over x.
            zero = tl.zeros((BLOCK_K,), dtype=tl.float32)
            a = _load_centered_rows(base, rm, rm_mask, ks, kmask, zero, zero, stride_xn, stride_xd, False)
            if CENTER:
                # row 0 again (an L1 hit) rather than a cross-thread reduction of the tile
                shift = tl.load(base + ks.to(tl.int64) * stride_xd, mask=kmask, other=0.0).to(tl.float32)
                dv = tl.where(rm_mask[:, None], a - shift[None, :], 0.0)  # padded rows out of the sum
                corr = tl.sum(dv, axis=0) / n
                a = dv - corr[None, :]  # padded rows: -corr, only in Gram entries never stored
                tl.store(mean_ptr + vec + ks, shift + corr, mask=kmask)
            c = a
        else:
            if CENTER:
                shift = tl.load(base + ks.to(tl.int64) * stride_xd, mask=kmask, other=0.0).to(tl.float32)
                corr = tl.load(corr_ptr + vec + ks, mask=kmask, other=0.0)
            else:
                shift = tl.zeros((BLOCK_K,), dtype=tl.float32)
                corr = shift
            a = _load_centered_rows(base, rm, rm_mask, ks, kmask, shift, corr, stride_xn, stride_xd, CENTER)
            c = _load_centered_rows(base, rn, rn_mask, ks, kmask, shift, corr, stride_xn, stride_xd, CENTER)
        acc += tl.dot(a, tl.trans(c), input_precision=PRECISION)

    out = out_ptr + pid_s.to(tl.int64) * stride_out_split + pid_b.to(tl.int64) * n * n
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if tm == tn:
        # diagonal tile: take its upper triangle and mirror it, so that K is exactly symmetric (a dot
        # product need not return bitwise-equal (i, j) and (j, i))
        acc = tl.where(rm[:, None] <= rn[None, :], acc, tl.trans(acc))
        tl.store(out + rm64[:, None] * n + rn64[None, :], acc, mask=rm_mask[:, None] & rn_mask[None, :])
    else:
        # off-diagonal tile (tm < tn): the tile and its transpose
        tl.store(out + rm64[:, None] * n + rn64[None, :], acc, mask=rm_mask[:, None] & rn_mask[None, :])
        tl.store(out + rn64[:, None] * n + rm64[None, :], tl.trans(acc), mask=rn_mask[:, None] & rm_mask[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, n_split, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # split s starts s * numel floats in, past 2**31 for large Grams: step a 64-bit pointer instead of
    # forming s * numel in 32 bits
    ptrs = part_ptr + offs
    for _ in range(0, n_split):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _gram_backward_kernel(
    m_ptr,
    x_ptr,
    mean_ptr,
    out_ptr,
    n,
    d,
    n_row_blocks,
    n_col_blocks,
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
    # axis 0 = ((batch * n_row_blocks) + row block) * n_col_blocks + column block
    pid = tl.program_id(0)
    pid_bm = pid // n_col_blocks
    pid_d = pid - pid_bm * n_col_blocks
    pid_b = pid_bm // n_row_blocks
    pid_m = pid_bm - pid_b * n_row_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = pid_d.to(tl.int64) * BLOCK_D
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n
    cmask = cols < d - col0
    cols64 = cols.to(tl.int64)
    m_base = m_ptr + pid_b.to(tl.int64) * stride_mb + rows.to(tl.int64)[:, None] * stride_mi
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb + (col0 + cols64[None, :]) * stride_xd
    if CENTER:
        mu_ptr = mean_ptr + pid_b.to(tl.int64) * stride_meanb + (col0 + cols64) * stride_meand
        mu = tl.load(mu_ptr, mask=cmask, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < n
        mmask = rmask[:, None] & kmask[None, :]
        mt = tl.load(m_base + ks.to(tl.int64)[None, :] * stride_mj, mask=mmask, other=0.0).to(tl.float32)
        xmask = kmask[:, None] & cmask[None, :]
        xt = tl.load(x_base + ks.to(tl.int64)[:, None] * stride_xn, mask=xmask, other=0.0).to(tl.float32)
        if CENTER:
            # padded rows (ks >= n) become -mu but meet the zero columns of mt; padded columns are never
            # stored: no where() needed
            xt = xt - mu[None, :]
        acc += tl.dot(mt, xt, input_precision=PRECISION)

    out = out_ptr + pid_b.to(tl.int64) * n * d + rows.to(tl.int64)[:, None] * d + (col0 + cols64[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def _capped(configs: list[dict[str, int]], key: str, cap: int) -> list[dict[str, int]]:
    """``configs`` with ``config[key]`` capped at ``cap``, duplicates removed (order kept)."""
    out: list[dict[str, int]] = []
    for config in configs:
        c = dict(config, **{key: min(config[key], cap)})
        if c not in out:
            out.append(c)
    return out


def _bucket(n: int) -> int:
    """Candidate-table key of ``n`` rows: 16, 32, 64 (one tile holds all rows) or 128 (n > 64, tiled)."""
    return _pow2_clamp(n, 16, 128)


def _row_split_count(programs: int, row_chunks: int, device: torch.device) -> int:
    """Row ranges of the column-mean pass: about four programs per SM, at least four BLOCK_N chunks each."""
    target = 4 * num_sms(device)
    return max(1, min(-(-target // max(programs, 1)), row_chunks // 4))


def _column_mean(x: torch.Tensor, *, row_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, corr), both (b, d) fp32, with mean = x[:, 0] + corr (rows split in ``row_split`` ranges)."""
    b, n, d = x.shape
    dev = x.device
    mean = torch.empty((b, d), device=dev, dtype=torch.float32)
    corr = torch.empty((b, d), device=dev, dtype=torch.float32)
    if b * n * d == 0:
        return mean.zero_(), corr.zero_()
    candidates = _capped(COLUMN_MEAN_CONFIGS, "BLOCK_D", _pow2_clamp(d, 16, 1 << 30))

    def run(config: dict[str, int]) -> None:
        block_n, block_d = config["BLOCK_N"], config["BLOCK_D"]
        n_col_blocks = triton.cdiv(d, block_d)
        row_chunks = triton.cdiv(n, block_n)
        split = _row_split_count(b * n_col_blocks, row_chunks, dev) if row_split is None else int(row_split)
        split = max(1, min(split, row_chunks, GRID_LIMITS[1]))
        rows_per_split = triton.cdiv(row_chunks, split) * block_n
        split = triton.cdiv(n, rows_per_split)  # no empty ranges
        part = mean if split == 1 else torch.empty((split, b, d), device=dev, dtype=torch.float32)
        # fmt: off
        launch(_column_mean_kernel, (b * n_col_blocks, split),
               x, part, mean, corr, n, d, b * d, n_col_blocks, rows_per_split, *x.stride(),
               device=dev, FINISH=split == 1, **config)
        if split > 1:
            fin_d = COLUMN_MEAN_FINISH_CONFIG["BLOCK_D"]
            fin_blocks = triton.cdiv(d, fin_d)
            launch(_column_mean_finish_kernel, (b * fin_blocks,),
                   x, part, mean, corr, n, d, b * d, fin_blocks, split, x.stride(0), x.stride(2),
                   device=dev, **COLUMN_MEAN_FINISH_CONFIG)
        # fmt: on

    key = (triton.next_power_of_2(n), triton.next_power_of_2(d), triton.next_power_of_2(b), x.dtype, row_split)
    choose("column_mean", key, candidates, run, dev)
    return mean, corr


def _split_count(tiles: int, k_chunks: int, out_elems: int, device: torch.device) -> int:
    """How many d-ranges to split the reduction into: enough programs to fill the GPU (about 2 waves),
    at least 4 BLOCK_K chunks per split, and a partial buffer of at most 2**26 fp32 (256 MiB)."""
    target = 2 * num_sms(device)
    split = max(1, min(target // max(tiles, 1), k_chunks // 4, (1 << 26) // max(out_elems, 1)))
    return split


def gram_forward(
    x: torch.Tensor,
    center: bool,
    *,
    split_k: int | None = None,
    row_split: int | None = None,
    precision: str = DOT_PRECISION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centered (or plain) Gram matrices of a batch.

    Args:
        x: ``(b, n, d)``, any strides, fp32/fp16/bf16 (fp64 is converted to fp32 first).
        center: subtract the column means over the ``n`` rows before the product.
        split_k: force the number of d-ranges of the split-K reduction (testing / tuning); default
            from a heuristic (1 off-GPU). Clamped to the number of ``BLOCK_K`` chunks and to 65,535.
        row_split: force the number of row ranges of the column-mean pass (``n > 64`` and ``center``
            only; testing / tuning); default from a heuristic (1 off-GPU).
        precision: ``tl.dot`` input precision, ``"ieee"`` | ``"tf32x3"`` | ``"tf32"`` (module docstring).

    Returns:
        ``(k, mean)``: ``k`` ``(b, n, n)`` fp32, ``(x - mean)(x - mean)ᵀ`` (exactly symmetric);
        ``mean`` ``(b, d)`` fp32 column means (zeros when ``center`` is False).
    """
    _check_x(x)
    _check_precision(precision)
    if x.dtype == torch.float64:
        x = x.float()  # computed in fp32 anyway; the kernels are compiled for 2- and 4-byte inputs only
    b, n, d = x.shape
    dev = x.device
    k = torch.empty((b, n, n), device=dev, dtype=torch.float32)
    if b == 0 or n == 0 or d == 0:
        return k.zero_(), torch.zeros((b, d), device=dev, dtype=torch.float32)
    if center and n == 1:
        # one sample: the centered features are exactly zero and the mean is the sample (no launch; the
        # all-ones specialization of that degenerate shape is also the one Gram variant ptxas spilled in)
        return k.zero_(), torch.empty((b, d), device=dev, dtype=torch.float32).copy_(x[:, 0])
    bucket = _bucket(n)
    single_tile = bucket <= 64
    if center and single_tile:
        mean = torch.empty((b, d), device=dev, dtype=torch.float32)  # written by the Gram kernel
        corr = mean
    elif center:
        mean, corr = _column_mean(x, row_split=row_split)
    else:
        mean = torch.zeros((b, d), device=dev, dtype=torch.float32)
        corr = mean
    candidates = [c for c in GRAM_CONFIGS[bucket] if single_tile or c["BLOCK_N"] < n]

    def run(config: dict[str, int]) -> None:
        block_n, block_k = config["BLOCK_N"], config["BLOCK_K"]
        nt = triton.cdiv(n, block_n)
        tiles = nt * (nt + 1) // 2
        k_chunks = triton.cdiv(d, block_k)
        split = _split_count(tiles * b, k_chunks, b * n * n, dev) if split_k is None else int(split_k)
        split = max(1, min(split, k_chunks, GRID_LIMITS[1]))
        chunks_per_split = triton.cdiv(k_chunks, split)
        split = triton.cdiv(k_chunks, chunks_per_split)  # no empty ranges
        numel = b * n * n
        part = k if split == 1 else torch.empty((split, b, n, n), device=dev, dtype=torch.float32)
        # fmt: off
        launch(_gram_kernel, (b * tiles, split),
               x, corr, mean, part, n, d, tiles, chunks_per_split * block_k, *x.stride(), numel,
               device=dev, CENTER=bool(center), SINGLE_TILE=single_tile, PRECISION=precision, **config)
        if split > 1:
            launch(_sum_splits_kernel, (triton.cdiv(numel, SUM_SPLITS_CONFIG["BLOCK"]),),
                   part, k, numel, split, device=dev, **SUM_SPLITS_CONFIG)
        # fmt: on

    key = (bucket, triton.next_power_of_2(d), triton.next_power_of_2(b), x.dtype, bool(center), precision, split_k)
    choose("gram_forward", key, candidates, run, dev)
    return k, mean


def gram_backward(
    m: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    center: bool,
    *,
    precision: str = DOT_PRECISION,
) -> torch.Tensor:
    """``m @ (x - mean)`` (``m @ x`` when not ``center``) without forming ``x - mean`` in memory.

    Args:
        m: ``(b, n, n)`` (any matrix, any strides; converted to fp32 if it is not).
        x: ``(b, n, d)``, any strides, fp32/fp16/bf16 (fp64 is computed in fp32 and returned as fp64).
        mean: ``(b, d)`` fp32 column means (ignored when ``center`` is False).
        center: subtract ``mean`` from every row of ``x`` in registers.
        precision: ``tl.dot`` input precision, ``"ieee"`` | ``"tf32x3"`` | ``"tf32"`` (module docstring).

    Returns:
        ``(b, n, d)`` contiguous tensor of ``x.dtype`` (fp32 accumulation).

    ``mean`` is used as given: its fp32 rounding ``δ`` (~3e-5 at offset 1000) adds ``(m 1) δᵀ``, which
    vanishes for CKA's coefficient matrices (built from centered Grams, rows summing to zero).
    """
    _check_x(x)
    _check_precision(precision)
    b, n, d = x.shape
    if m.shape != (b, n, n):
        raise ValueError(f"m must be (b, n, n) = {(b, n, n)}, got {tuple(m.shape)}")
    if center and mean.shape != (b, d):
        raise ValueError(f"mean must be (b, d) = {(b, d)}, got {tuple(mean.shape)}")
    if x.dtype == torch.float64:  # computed in fp32 (as the forward); the kernels take 2- and 4-byte x
        return gram_backward(m, x.float(), mean, center, precision=precision).double()
    m = m.float()  # no-op for the fp32 coefficient matrices of the ops
    mean = mean.float()
    dev = x.device
    out = torch.empty((b, n, d), device=dev, dtype=x.dtype)
    if out.numel() == 0:
        return out
    if not center:
        mean = x.new_zeros((1, 1), dtype=torch.float32)  # unused pointer
    bucket = _bucket(n)
    candidates = _capped(GRAM_BWD_CONFIGS[bucket], "BLOCK_D", _pow2_clamp(d, 16, 1 << 30))

    def run(config: dict[str, int]) -> None:
        n_row_blocks = triton.cdiv(n, config["BLOCK_M"])
        n_col_blocks = triton.cdiv(d, config["BLOCK_D"])
        # fmt: off
        launch(_gram_backward_kernel, (b * n_row_blocks * n_col_blocks,),
               m, x, mean, out, n, d, n_row_blocks, n_col_blocks, *m.stride(), *x.stride(), *mean.stride(),
               device=dev, CENTER=bool(center), PRECISION=precision, **config)
        # fmt: on

    key = (bucket, triton.next_power_of_2(d), triton.next_power_of_2(b), x.dtype, bool(center), precision)
    choose("gram_backward", key, candidates, run, dev)
    return out
