"""Batched patch CKA in Triton (PCKA): thousands of tiny CKA problems from two feature maps.

Problems
--------
``f_s``, ``f_t`` are ``(B, C, H, W)`` feature maps cut into ``ph x pw`` patches: ``Ph = H // ph``,
``Pw = W // pw``, ``P = Ph * Pw`` patches. Patches are the *samples* (rows) of each problem; ``reduce``
picks what one problem ``g`` is and which elements are its features (columns):

==========  ============  ======================  ==========================================
reduce      problems G    features f              element X_g[p, f], p = (pi, pj)
==========  ============  ======================  ==========================================
channel     C  (g = c)    (b, i, j), D = B·ph·pw  f[b, c, pi·ph + i, pj·pw + j]
batch       B  (g = b)    (c, i, j), D = C·ph·pw  f[b, c, pi·ph + i, pj·pw + j]
spatial     ph·pw         (b, c),    D = B·C      f[b, c, pi·ph + i, pj·pw + j], g = i·pw + j
==========  ============  ======================  ==========================================

Every element of the ``(B, C, H, W)`` tensor belongs to exactly one ``(g, p, f)``. The matrices are
never built: a tile of ``X_g`` is gathered from the 4-D tensor by index arithmetic with its strides
(channels_last and sliced inputs work without copies). The index arithmetic decomposes row and column
numbers in 32-bit integers (``P <= 128``, ``D < 2³¹`` is checked) and only multiplies by the strides in
64 bits: a 64-bit ``//`` or ``%`` by a run-time value is a call to a division routine on the GPU, which
cost the first version of these kernels 255 registers and hundreds of bytes of spills.

Forward, two launches
---------------------
1. ``_patch_gram_partial_kernel`` — grid ``(G · S, n_tensors)``: program ``(g, s)`` on axis 0, the tensor
   (student / teacher) on axis 1. It holds all ``P`` rows (padded to ``P_PAD``, a power of two ``<= 128``)
   and walks the ``s``-th of ``S`` contiguous ranges of the ``D`` features in ``BLOCK_D`` chunks. Every
   chunk has all rows, so its column means are available in-program: the chunk is centered in registers
   (shifted by its row 0 first, so a large offset costs no precision; padded rows stay zero) and
   ``X Xᵀ`` is accumulated with ``tl.dot`` in fp32 — one ``P_PAD x P_PAD`` accumulator per program. The
   split over ``D`` (``S`` chosen to fill the GPU) is what keeps few, wide problems (``reduce="batch"``:
   ``G = B = 2`` problems of ``D = 65,536`` features) from running on 2 of 132 SMs.
2. ``_patch_finalize_kernel`` — grid ``(G,)``: sums the ``S`` partial Grams in a fixed order (deterministic,
   no atomics), reading entry ``(min(i, j), max(i, j))`` so that the result is exactly symmetric, writes
   both ``P x P`` Grams and ``[Σ Ks∘Kt, Σ Ks∘Ks, Σ Kt∘Kt]``, in ``BLOCK_R``-row slices.

Backward: :mod:`.patch_alignment_stats_backward` (one launch, the needed tensors only).

All products are ``tl.dot(..., input_precision="ieee")`` with fp32 accumulation; fp16/bf16 inputs are
converted to fp32 in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DOT_PRECISION, choose, launch, num_sms

__all__ = [
    "FINALIZE_CONFIG",
    "FWD_CONFIGS",
    "MAX_PATCHES",
    "REDUCE_CODES",
    "center_rows",
    "col_offsets",
    "padded_patches",
    "patch_cka_forward",
    "problem_offset",
    "problem_shape",
    "row_offsets",
    "table_candidates",
]

MAX_PATCHES = 128
REDUCE_CODES = {"channel": 0, "batch": 1, "spatial": 2}
_INT32_MAX = 2**31 - 1

# Launch candidates per P_PAD, first = default (the only one under the interpreter / CKAKD_AUTOTUNE=0).
# Every entry compiles for sm_90 with triton 3.6 without register spills, for every reduce mode and dtype
# (bench/compile_report.py checks; CI fails on a spill). Spills are not monotonic in the size: e.g. the
# forward at P_PAD=64 spills with BLOCK_D=32 on 8 warps (80 registers, 8 bytes) but not with 64 on 8.
FWD_CONFIGS: dict[int, list[dict[str, int]]] = {
    16: [{"BLOCK_D": 64, "num_warps": 4}, {"BLOCK_D": 32, "num_warps": 4}, {"BLOCK_D": 16, "num_warps": 4}],
    32: [{"BLOCK_D": 32, "num_warps": 4}, {"BLOCK_D": 64, "num_warps": 8}, {"BLOCK_D": 32, "num_warps": 8}],
    64: [{"BLOCK_D": 32, "num_warps": 16}, {"BLOCK_D": 16, "num_warps": 8}, {"BLOCK_D": 16, "num_warps": 4}],
    128: [{"BLOCK_D": 32, "num_warps": 8}, {"BLOCK_D": 16, "num_warps": 8}],
}
FINALIZE_CONFIG = {"BLOCK_R": 16, "num_warps": 4}


# ---------------------------------------------------------------------------------------------------
# index arithmetic (32-bit decomposition, 64-bit offsets)
# ---------------------------------------------------------------------------------------------------


@triton.jit
def problem_offset(g, sB, sC, sH, sW, REDUCE: tl.constexpr, PW: tl.constexpr):
    """Offset of problem ``g``'s origin in the 4-D tensor (``g`` int32)."""
    if REDUCE == 0:
        off = g.to(tl.int64) * sC
    elif REDUCE == 1:
        off = g.to(tl.int64) * sB
    else:
        off = (g // PW).to(tl.int64) * sH + (g % PW).to(tl.int64) * sW
    return off


@triton.jit
def row_offsets(rows, Pw, sH, sW, PH: tl.constexpr, PW: tl.constexpr):
    """Offsets of the top-left corner of patch ``p = pi * Pw + pj`` (``rows``, ``Pw`` int32)."""
    pi = rows // Pw
    pj = rows - pi * Pw
    return pi.to(tl.int64) * (PH * sH) + pj.to(tl.int64) * (PW * sW)


@triton.jit
def col_offsets(f, C, sB, sC, sH, sW, REDUCE: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Offsets of feature columns ``f`` (int32; see the table in the module docstring)."""
    if REDUCE == 2:
        outer = f // C
        inner = f - outer * C
        off = outer.to(tl.int64) * sB + inner.to(tl.int64) * sC
    else:
        outer = f // (PH * PW)
        inner = f - outer * (PH * PW)
        i = inner // PW
        pix = i.to(tl.int64) * sH + (inner - i * PW).to(tl.int64) * sW
        if REDUCE == 0:
            off = outer.to(tl.int64) * sB + pix
        else:
            off = outer.to(tl.int64) * sC + pix
    return off


@triton.jit
def center_rows(xv, mask, rows, n_rows):
    """Subtract the mean over the valid rows of every column; masked entries stay exactly 0.

    Row 0 is subtracted first (exact for offset-dominated data), then the small mean of the shifted
    values, so a feature offset of 1000 does not cost fp32 digits.
    """
    shift = tl.sum(tl.where(rows[:, None] == 0, xv, 0.0), axis=0)
    dv = tl.where(mask, xv - shift[None, :], 0.0)
    corr = tl.sum(dv, axis=0) / n_rows
    return tl.where(mask, dv - corr[None, :], 0.0)


# ---------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _gram_partial_one(
    x_ptr,
    part_ptr,
    g,
    d_start,
    d_end,
    C,
    Pw,
    P,
    sB,
    sC,
    sH,
    sW,
    REDUCE: tl.constexpr,
    CENTER: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    P_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``part[i, j] = Σ_{f in [d_start, d_end)} Xc_g[i, f] Xc_g[j, f]`` for one tensor, ``i, j < P``."""
    rows = tl.arange(0, P_PAD)
    rmask = rows < P
    base = x_ptr + problem_offset(g, sB, sC, sH, sW, REDUCE, PW)
    row_ptrs = base + row_offsets(rows, Pw, sH, sW, PH, PW)[:, None]
    acc = tl.zeros((P_PAD, P_PAD), dtype=tl.float32)
    for d0 in range(d_start, d_end, BLOCK_D):
        f = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (f < d_end)[None, :]
        col = col_offsets(f, C, sB, sC, sH, sW, REDUCE, PH, PW)
        xv = tl.load(row_ptrs + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if CENTER:
            xv = center_rows(xv, mask, rows, P)
        acc += tl.dot(xv, tl.trans(xv), input_precision=PRECISION)
    offs = rows[:, None] * P + rows[None, :]
    tl.store(part_ptr + offs, acc, mask=rmask[:, None] & rmask[None, :])


@triton.jit
def _patch_gram_partial_kernel(
    s_ptr,
    t_ptr,
    part_ptr,
    G,
    C,
    Pw,
    P,
    D,
    d_per_split,
    n_split,
    s_sB,
    s_sC,
    s_sH,
    s_sW,
    t_sB,
    t_sC,
    t_sH,
    t_sW,
    REDUCE: tl.constexpr,
    CENTER: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    P_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    which = tl.program_id(1)  # 0: student, 1: teacher
    g = pid // n_split
    split = pid - g * n_split
    d_start = split * d_per_split
    d_end = tl.minimum(d_start + d_per_split, D)
    # part[which, split, g] is a (P, P) block
    part = part_ptr + ((which * n_split + split).to(tl.int64) * G + g) * P * P
    # fmt: off
    if which == 0:
        _gram_partial_one(s_ptr, part, g, d_start, d_end, C, Pw, P, s_sB, s_sC, s_sH, s_sW,
                          REDUCE, CENTER, PH, PW, P_PAD, BLOCK_D, PRECISION)
    else:
        _gram_partial_one(t_ptr, part, g, d_start, d_end, C, Pw, P, t_sB, t_sC, t_sH, t_sW,
                          REDUCE, CENTER, PH, PW, P_PAD, BLOCK_D, PRECISION)
    # fmt: on


@triton.jit
def _sum_partials_sym(part_ptr, rows, cols, mask, P, G, n_split, BLOCK_R: tl.constexpr, P_PAD: tl.constexpr):
    """Σ_s part[s][min(i, j), max(i, j)] for a row slice: the summed Gram, exactly symmetric."""
    lo = tl.minimum(rows[:, None], cols[None, :])
    hi = tl.maximum(rows[:, None], cols[None, :])
    offs = lo * P + hi
    split_stride = tl.cast(G, tl.int64) * P * P
    acc = tl.zeros((BLOCK_R, P_PAD), dtype=tl.float32)
    for s in range(0, n_split):
        acc += tl.load(part_ptr + s * split_stride + offs, mask=mask, other=0.0)
    return acc


@triton.jit
def _patch_finalize_kernel(
    part_ptr,
    stats_ptr,
    ks_ptr,
    kt_ptr,
    G,
    P,
    n_split,
    P_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    g = tl.program_id(0)
    cols = tl.arange(0, P_PAD)
    cmask = cols < P
    block = g.to(tl.int64) * P * P
    s_part = part_ptr + block
    t_part = part_ptr + tl.cast(n_split, tl.int64) * G * P * P + block
    st = tl.zeros((BLOCK_R, P_PAD), dtype=tl.float32)
    ss = tl.zeros((BLOCK_R, P_PAD), dtype=tl.float32)
    tt = tl.zeros((BLOCK_R, P_PAD), dtype=tl.float32)
    for r0 in range(0, P, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < P)[:, None] & cmask[None, :]
        ks = _sum_partials_sym(s_part, rows, cols, mask, P, G, n_split, BLOCK_R, P_PAD)
        kt = _sum_partials_sym(t_part, rows, cols, mask, P, G, n_split, BLOCK_R, P_PAD)
        offs = block + rows[:, None] * P + cols[None, :]
        tl.store(ks_ptr + offs, ks, mask=mask)
        tl.store(kt_ptr + offs, kt, mask=mask)
        st += ks * kt
        ss += ks * ks
        tt += kt * kt
    stats = stats_ptr + g.to(tl.int64) * 3
    tl.store(stats, tl.sum(tl.sum(st, axis=1), axis=0))
    tl.store(stats + 1, tl.sum(tl.sum(ss, axis=1), axis=0))
    tl.store(stats + 2, tl.sum(tl.sum(tt, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


def problem_shape(f_s: torch.Tensor, f_t: torch.Tensor, ph: int, pw: int, reduce: str) -> tuple[int, int, int]:
    """(G, P, D) of the batched problem; validates the arguments (cheap checks only)."""
    if f_s.dim() != 4 or f_s.shape != f_t.shape:
        raise ValueError(
            f"f_s and f_t must be (B, C, H, W) of the same shape, got {tuple(f_s.shape)} and {tuple(f_t.shape)}"
        )
    if f_s.device != f_t.device:
        raise ValueError(f"f_s and f_t must be on one device, got {f_s.device} and {f_t.device}")
    if reduce not in REDUCE_CODES:
        raise ValueError(f"reduce must be one of {sorted(REDUCE_CODES)}, got {reduce!r}")
    B, C, H, W = f_s.shape
    if ph < 1 or pw < 1 or H % ph or W % pw:
        raise ValueError(f"patch ({ph}, {pw}) must divide the spatial size ({H}, {W})")
    P = (H // ph) * (W // pw)
    if P > MAX_PATCHES:
        raise ValueError(f"patch CKA kernel supports at most {MAX_PATCHES} patches per problem, got P={P}")
    G, D = {"channel": (C, B * ph * pw), "batch": (B, C * ph * pw), "spatial": (ph * pw, B * C)}[reduce]
    if D > _INT32_MAX - 1024 or G * P * P > _INT32_MAX:
        raise ValueError(f"patch CKA kernel needs D < 2^31 features and G·P² < 2^31; got G={G}, P={P}, D={D}")
    return G, P, D


def padded_patches(P: int) -> int:
    """P_PAD: the patch count padded to a power of two, at least 16 (the kernels' row tile)."""
    return max(16, triton.next_power_of_2(P))


def table_candidates(table: dict[int, list[dict[str, int]]], p_pad: int, D: int, block_d: int | None) -> list[dict]:
    """The table's candidates for P_PAD with BLOCK_D capped at the (padded) feature count, deduplicated."""
    cap = max(16, triton.next_power_of_2(max(D, 1)))
    out: list[dict] = []
    for config in table[p_pad]:
        c = dict(config, BLOCK_D=block_d if block_d is not None else min(config["BLOCK_D"], cap))
        if c not in out:
            out.append(c)
    return out


def _split_count(G: int, n_chunks: int, device: torch.device) -> int:
    """How many feature ranges per problem: about two waves of programs (student + teacher), at least
    four BLOCK_D chunks per range."""
    target = 2 * num_sms(device)
    return max(1, min(-(-target // (2 * G)), n_chunks // 4))


def patch_cka_forward(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    ph: int,
    pw: int,
    reduce: str,
    center: bool,
    *,
    block_d: int | None = None,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grams and Frobenius sums of all patch-CKA problems (two launches).

    Args:
        f_s, f_t: ``(B, C, H, W)``, same shape and device, any strides and float dtypes.
        ph, pw: patch size; must divide ``H`` and ``W``.
        reduce: ``"channel"`` | ``"batch"`` | ``"spatial"`` (module docstring).
        center: center every problem's features over its ``P`` patches.
        block_d: force the feature chunk (power of two >= 16; testing / tuning).
        split: force the number of feature ranges per problem (default: enough programs to fill the GPU;
            1 off-GPU).

    Returns:
        ``(stats, k_s, k_t)``: ``stats`` ``(G, 3)`` fp32 ``[Σ Ks∘Kt, Σ Ks∘Ks, Σ Kt∘Kt]``; ``k_s``,
        ``k_t`` ``(G, P, P)`` fp32, exactly symmetric.

    Raises:
        ValueError: bad shapes / reduce, or ``P > 128`` (the caller falls back to another path).
    """
    G, P, D = problem_shape(f_s, f_t, ph, pw, reduce)
    dev = f_s.device
    stats = torch.empty((G, 3), device=dev, dtype=torch.float32)
    k_s = torch.empty((G, P, P), device=dev, dtype=torch.float32)
    k_t = torch.empty((G, P, P), device=dev, dtype=torch.float32)
    if G == 0 or P == 0:
        return stats, k_s, k_t
    if D == 0:
        return stats.zero_(), k_s.zero_(), k_t.zero_()
    p_pad = padded_patches(P)
    C, W = f_s.shape[1], f_s.shape[3]
    candidates = table_candidates(FWD_CONFIGS, p_pad, D, block_d)

    def run(config: dict) -> None:
        bd = config["BLOCK_D"]
        n_chunks = triton.cdiv(D, bd)
        n_split = _split_count(G, n_chunks, dev) if split is None else max(1, min(int(split), n_chunks))
        chunks_per_split = triton.cdiv(n_chunks, n_split)
        n_split = triton.cdiv(n_chunks, chunks_per_split)  # no empty ranges
        part = torch.empty((2, n_split, G, P, P), device=dev, dtype=torch.float32)
        # fmt: off
        launch(_patch_gram_partial_kernel, (G * n_split, 2),
               f_s, f_t, part, G, C, W // pw, P, D, chunks_per_split * bd, n_split, *f_s.stride(), *f_t.stride(),
               device=dev, REDUCE=REDUCE_CODES[reduce], CENTER=bool(center), PH=ph, PW=pw, P_PAD=p_pad,
               BLOCK_D=bd, PRECISION=DOT_PRECISION, num_warps=config["num_warps"])
        launch(_patch_finalize_kernel, (G,), part, stats, k_s, k_t, G, P, n_split,
               device=dev, P_PAD=p_pad, **FINALIZE_CONFIG)
        # fmt: on

    choose("patch_cka_forward", (reduce, p_pad, triton.next_power_of_2(G), triton.next_power_of_2(D)), candidates,
           run, dev)  # fmt: skip
    return stats, k_s, k_t
