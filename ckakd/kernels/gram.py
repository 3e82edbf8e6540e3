"""Centered Gram matrix in Triton: ``K = Xc Xcᵀ`` (forward; the backward ``M Xc`` is :mod:`.gram_backward`).

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

1. the column means (``n > 64`` and ``center`` only): :mod:`.column_mean`.
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
The backward ``M Xc`` is :mod:`.gram_backward`; both share this module's row buckets (:func:`gram_bucket`).

Index arithmetic: every element offset is formed in 64 bits (a scalar 64-bit base per program plus
32-bit in-tile indices times 64-bit strides), so tensors of more than 2³¹ elements and split buffers of
more than 2³¹ floats are addressed correctly. Row indices stay 32-bit (``n`` rows make an ``n x n``
Gram, so ``n < 2³¹`` by far) and program-id decoding uses 32-bit division only (a 64-bit division by a
run-time value is a slow division routine on the GPU).

Launch configurations: every kernel has a module-level candidate table (``GRAM_CONFIGS``, ``SUM_SPLITS_CONFIG``; the
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

import torch
import triton
import triton.language as tl

from ._launch import DOT_PRECISION, GRID_LIMITS, PRECISIONS, check_precision, choose, launch, num_sms, pow2_clamp
from .column_mean import column_mean

__all__ = [
    "GRAM_CONFIGS",
    "PRECISIONS",
    "SUM_SPLITS_CONFIG",
    "check_x",
    "gram_bucket",
    "gram_forward",
]

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
# The elementwise second stage: a fixed configuration.
SUM_SPLITS_CONFIG: dict[str, int] = {"BLOCK": 1024, "num_warps": 4}


def check_x(x: torch.Tensor) -> None:
    """Raise unless ``x`` is a ``(b, n, d)`` floating tensor."""
    if x.dim() != 3:
        raise ValueError(f"x must be (b, n, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


def gram_bucket(n: int) -> int:
    """Candidate-table key of ``n`` rows: 16, 32, 64 (one tile holds all rows) or 128 (n > 64, tiled)."""
    return pow2_clamp(n, 16, 128)


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
    check_x(x)
    check_precision(precision)
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
    bucket = gram_bucket(n)
    single_tile = bucket <= 64
    if center and single_tile:
        mean = torch.empty((b, d), device=dev, dtype=torch.float32)  # written by the Gram kernel
        corr = mean
    elif center:
        mean, corr = column_mean(x, row_split=row_split)
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
