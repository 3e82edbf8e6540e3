"""Batched patch CKA in Triton (PCKA): thousands of tiny CKA problems in one launch.

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
(channels_last and sliced inputs work without copies).

Forward (``_patch_cka_fwd_kernel``, grid ``(G,)``): one program per problem holds all ``P`` rows
(padded to ``P_PAD``, a power of two ``<= 128``) and walks the ``D`` features in ``BLOCK_D`` chunks.
Because every chunk has all rows, its column means are available in-program: the chunk is centered in
registers (shifted by its row 0 first, so a large offset costs no precision; padded rows are re-zeroed
after the subtraction) and ``Ks += Xs Xsᵀ``, ``Kt += Xt Xtᵀ`` are accumulated with ``tl.dot`` in
fp32. The program then writes both ``P x P`` Grams and ``[Σ Ks∘Kt, Σ Ks∘Ks, Σ Kt∘Kt]``.

Backward (``_patch_cka_bwd_kernel``, grid ``(G, cdiv(D, BLOCK_D))``): ``grad_X[g] = m[g] @ Xc[g]``
for both tensors in the same program. For its ``P_PAD x BLOCK_D`` chunk of ``X_g`` a program first
walks the P rows once to get the column means (same shifted form), then walks them again in
``BLOCK_R``-row blocks, centering each and accumulating ``m[g][:, rows] @ Xc[rows]`` with ``tl.dot``
(one P_PAD-deep fp32 dot would spill registers; the second read hits L1/L2). The result is scattered
to the positions the chunk came from, in a contiguous output of the input's dtype.

All products are ``tl.dot(..., input_precision="ieee")`` with fp32 accumulation; fp16/bf16 inputs are
converted to fp32 in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gram import DOT_PRECISION

__all__ = ["patch_cka_forward", "patch_cka_backward", "MAX_PATCHES"]

MAX_PATCHES = 128
_REDUCE = {"channel": 0, "batch": 1, "spatial": 2}

# P_PAD -> (BLOCK_D, num_warps). fp32 "ieee" dots run on FMA units and keep their operands in registers;
# these sizes compile without register spills for sm_90 (ptxas -v), except P_PAD=128 forward (two
# 128x128 accumulators: ~0.3 KB spilled per thread even at 16 warps).
_FWD_CONFIG = {16: (64, 4), 32: (32, 4), 64: (32, 8), 128: (16, 16)}
_BWD_CONFIG = {16: (32, 4), 32: (32, 4), 64: (32, 8), 128: (32, 8)}
_BLOCK_R = 16  # rows per chunk of the backward's reduction over patches


@triton.jit
def _problem_offset(g, sB, sC, sH, sW, REDUCE: tl.constexpr, PW: tl.constexpr):
    """Offset of problem ``g``'s origin in the 4-D tensor."""
    g64 = g.to(tl.int64)
    if REDUCE == 0:
        off = g64 * sC
    elif REDUCE == 1:
        off = g64 * sB
    else:
        off = (g64 // PW) * sH + (g64 % PW) * sW
    return off


@triton.jit
def _row_offsets(rows, Pw, sH, sW, PH: tl.constexpr, PW: tl.constexpr):
    """Offsets of the top-left corner of patch ``p = pi * Pw + pj``."""
    r64 = rows.to(tl.int64)
    return (r64 // Pw) * (PH * sH) + (r64 % Pw) * (PW * sW)


@triton.jit
def _col_offsets(f, C, sB, sC, sH, sW, REDUCE: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Offsets of feature columns ``f`` (see the table in the module docstring)."""
    f64 = f.to(tl.int64)
    if REDUCE == 2:
        off = (f64 // C) * sB + (f64 % C) * sC
    else:
        outer = f64 // (PH * PW)
        inner = f64 % (PH * PW)
        pix = (inner // PW) * sH + (inner % PW) * sW
        if REDUCE == 0:
            off = outer * sB + pix
        else:
            off = outer * sC + pix
    return off


@triton.jit
def _center_rows(xv, mask, rows, n_rows):
    """Subtract the mean over the valid rows of every column; masked entries stay exactly 0.

    Row 0 is subtracted first (exact for offset-dominated data), then the small mean of the shifted
    values, so a feature offset of 1000 does not cost fp32 digits.
    """
    shift = tl.sum(tl.where(rows[:, None] == 0, xv, 0.0), axis=0)
    dv = tl.where(mask, xv - shift[None, :], 0.0)
    corr = tl.sum(dv, axis=0) / n_rows
    return tl.where(mask, dv - corr[None, :], 0.0)


@triton.jit
def _load_tile(
    ptr, g_off, row_off, f, mask, C, sB, sC, sH, sW, REDUCE: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr
):
    col = _col_offsets(f, C, sB, sC, sH, sW, REDUCE, PH, PW)
    return tl.load(ptr + g_off + row_off[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _patch_cka_fwd_kernel(
    s_ptr,
    t_ptr,
    stats_ptr,
    ks_ptr,
    kt_ptr,
    C,
    Pw,
    P,
    D,
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
    g = tl.program_id(0)
    rows = tl.arange(0, P_PAD)
    rmask = rows < P
    s_row = _row_offsets(rows, Pw, s_sH, s_sW, PH, PW)
    t_row = _row_offsets(rows, Pw, t_sH, t_sW, PH, PW)
    s_g = _problem_offset(g, s_sB, s_sC, s_sH, s_sW, REDUCE, PW)
    t_g = _problem_offset(g, t_sB, t_sC, t_sH, t_sW, REDUCE, PW)

    acc_s = tl.zeros((P_PAD, P_PAD), dtype=tl.float32)
    acc_t = tl.zeros((P_PAD, P_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        f = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (f < D)[None, :]
        xs = _load_tile(s_ptr, s_g, s_row, f, mask, C, s_sB, s_sC, s_sH, s_sW, REDUCE, PH, PW)
        xt = _load_tile(t_ptr, t_g, t_row, f, mask, C, t_sB, t_sC, t_sH, t_sW, REDUCE, PH, PW)
        if CENTER:
            xs = _center_rows(xs, mask, rows, P)
            xt = _center_rows(xt, mask, rows, P)
        acc_s += tl.dot(xs, tl.trans(xs), input_precision=PRECISION)
        acc_t += tl.dot(xt, tl.trans(xt), input_precision=PRECISION)

    # exact symmetry: keep the upper triangle, mirror it
    upper = rows[:, None] <= rows[None, :]
    acc_s = tl.where(upper, acc_s, tl.trans(acc_s))
    acc_t = tl.where(upper, acc_t, tl.trans(acc_t))
    kmask = rmask[:, None] & rmask[None, :]
    k_off = g.to(tl.int64) * P * P + rows[:, None] * P + rows[None, :]
    tl.store(ks_ptr + k_off, acc_s, mask=kmask)
    tl.store(kt_ptr + k_off, acc_t, mask=kmask)
    stats = stats_ptr + g.to(tl.int64) * 3
    tl.store(stats, tl.sum(tl.sum(acc_s * acc_t, axis=1), axis=0))
    tl.store(stats + 1, tl.sum(tl.sum(acc_s * acc_s, axis=1), axis=0))
    tl.store(stats + 2, tl.sum(tl.sum(acc_t * acc_t, axis=1), axis=0))


@triton.jit
def _patch_bwd_one(
    m_ptr,
    x_ptr,
    out_ptr,
    g,
    f,
    fmask,
    C,
    Pw,
    P,
    m_sg,
    m_si,
    m_sj,
    sB,
    sC,
    sH,
    sW,
    o_sB,
    o_sC,
    o_sH,
    REDUCE: tl.constexpr,
    CENTER: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    P_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``out[positions of X_g[:, f]] = m[g] @ Xc_g[:, f]`` for one of the two tensors.

    The reduction over the P rows runs in ``BLOCK_R`` chunks (a single P_PAD-deep FMA dot would
    spill registers): a first pass over the chunk's rows gets the column means, the second centers
    each row block and accumulates ``m[:, rows] @ Xc[rows]``. The second read hits L1/L2.
    """
    g_off = _problem_offset(g, sB, sC, sH, sW, REDUCE, PW)
    x_row0 = x_ptr + g_off + _col_offsets(f, C, sB, sC, sH, sW, REDUCE, PH, PW)  # patch 0: row offset 0
    x_cols = x_row0[None, :]
    if CENTER:
        shift = tl.load(x_row0, mask=fmask, other=0.0).to(tl.float32)
        part = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, P, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            msk = (rr < P)[:, None] & fmask[None, :]
            xv = tl.load(x_cols + _row_offsets(rr, Pw, sH, sW, PH, PW)[:, None], mask=msk, other=0.0)
            part += tl.where(msk, xv.to(tl.float32) - shift[None, :], 0.0)
        corr = tl.sum(part, axis=0) / P

    rows = tl.arange(0, P_PAD)
    rmask = rows < P
    m_rows = m_ptr + g.to(tl.int64) * m_sg + rows.to(tl.int64)[:, None] * m_si
    acc = tl.zeros((P_PAD, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, P, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rrmask = rr < P
        msk = rrmask[:, None] & fmask[None, :]
        xv = tl.load(x_cols + _row_offsets(rr, Pw, sH, sW, PH, PW)[:, None], mask=msk, other=0.0)
        xv = xv.to(tl.float32)
        if CENTER:
            xv = tl.where(msk, (xv - shift[None, :]) - corr[None, :], 0.0)
        mmask = rmask[:, None] & rrmask[None, :]
        mv = tl.load(m_rows + rr.to(tl.int64)[None, :] * m_sj, mask=mmask, other=0.0).to(tl.float32)
        acc += tl.dot(mv, xv, input_precision=PRECISION)

    o_row = _row_offsets(rows, Pw, o_sH, 1, PH, PW)
    o_g = _problem_offset(g, o_sB, o_sC, o_sH, 1, REDUCE, PW)
    o_col = _col_offsets(f, C, o_sB, o_sC, o_sH, 1, REDUCE, PH, PW)
    tl.store(
        out_ptr + o_g + o_row[:, None] + o_col[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & fmask[None, :],
    )


@triton.jit
def _patch_cka_bwd_kernel(
    ms_ptr,
    mt_ptr,
    s_ptr,
    t_ptr,
    gs_ptr,
    gt_ptr,
    C,
    Pw,
    P,
    D,
    ms_sg,
    ms_si,
    ms_sj,
    mt_sg,
    mt_si,
    mt_sj,
    s_sB,
    s_sC,
    s_sH,
    s_sW,
    t_sB,
    t_sC,
    t_sH,
    t_sW,
    o_sB,
    o_sC,
    o_sH,
    REDUCE: tl.constexpr,
    CENTER: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    P_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    fmask = f < D
    # fmt: off
    _patch_bwd_one(ms_ptr, s_ptr, gs_ptr, g, f, fmask, C, Pw, P, ms_sg, ms_si, ms_sj, s_sB, s_sC, s_sH, s_sW,
                   o_sB, o_sC, o_sH, REDUCE, CENTER, PH, PW, P_PAD, BLOCK_R, BLOCK_D, PRECISION)
    _patch_bwd_one(mt_ptr, t_ptr, gt_ptr, g, f, fmask, C, Pw, P, mt_sg, mt_si, mt_sj, t_sB, t_sC, t_sH, t_sW,
                   o_sB, o_sC, o_sH, REDUCE, CENTER, PH, PW, P_PAD, BLOCK_R, BLOCK_D, PRECISION)
    # fmt: on


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


def _problem_shape(f_s: torch.Tensor, f_t: torch.Tensor, ph: int, pw: int, reduce: str) -> tuple[int, int, int]:
    """(G, P, D) of the batched problem; validates the arguments (cheap checks only)."""
    if f_s.dim() != 4 or f_s.shape != f_t.shape:
        raise ValueError(
            f"f_s and f_t must be (B, C, H, W) of the same shape, got {tuple(f_s.shape)} and {tuple(f_t.shape)}"
        )
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {sorted(_REDUCE)}, got {reduce!r}")
    B, C, H, W = f_s.shape
    if ph < 1 or pw < 1 or H % ph or W % pw:
        raise ValueError(f"patch ({ph}, {pw}) must divide the spatial size ({H}, {W})")
    P = (H // ph) * (W // pw)
    if P > MAX_PATCHES:
        raise ValueError(f"patch CKA kernel supports at most {MAX_PATCHES} patches per problem, got P={P}")
    G, D = {"channel": (C, B * ph * pw), "batch": (B, C * ph * pw), "spatial": (ph * pw, B * C)}[reduce]
    return G, P, D


def _p_pad(P: int) -> int:
    return max(16, triton.next_power_of_2(P))


def _config(table: dict[int, tuple[int, int]], p_pad: int, D: int, block_d: int | None) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the table's entry for P_PAD, BLOCK_D capped at the (padded) feature count."""
    bd, warps = table[p_pad]
    if block_d is None:
        block_d = max(16, min(bd, triton.next_power_of_2(max(D, 1))))
    return block_d, warps


def patch_cka_forward(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    ph: int,
    pw: int,
    reduce: str,
    center: bool,
    *,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grams and Frobenius sums of all patch-CKA problems, one launch.

    Args:
        f_s, f_t: ``(B, C, H, W)``, same shape, any strides and float dtypes.
        ph, pw: patch size; must divide ``H`` and ``W``.
        reduce: ``"channel"`` | ``"batch"`` | ``"spatial"`` (module docstring).
        center: center every problem's features over its ``P`` patches.
        block_d: force the feature chunk (power of two >= 16; testing / tuning).

    Returns:
        ``(stats, k_s, k_t)``: ``stats`` ``(G, 3)`` fp32 ``[Σ Ks∘Kt, Σ Ks∘Ks, Σ Kt∘Kt]``; ``k_s``,
        ``k_t`` ``(G, P, P)`` fp32.

    Raises:
        ValueError: bad shapes / reduce, or ``P > 128`` (the caller falls back to another path).
    """
    G, P, D = _problem_shape(f_s, f_t, ph, pw, reduce)
    dev = f_s.device
    stats = torch.empty((G, 3), device=dev, dtype=torch.float32)
    k_s = torch.empty((G, P, P), device=dev, dtype=torch.float32)
    k_t = torch.empty((G, P, P), device=dev, dtype=torch.float32)
    if G == 0 or P == 0:
        return stats, k_s, k_t
    p_pad = _p_pad(P)
    block_d, warps = _config(_FWD_CONFIG, p_pad, D, block_d)
    C, W = f_s.shape[1], f_s.shape[3]
    _patch_cka_fwd_kernel[(G,)](
        f_s,
        f_t,
        stats,
        k_s,
        k_t,
        C,
        W // pw,
        P,
        D,
        *f_s.stride(),
        *f_t.stride(),
        REDUCE=_REDUCE[reduce],
        CENTER=bool(center),
        PH=ph,
        PW=pw,
        P_PAD=p_pad,
        BLOCK_D=block_d,
        PRECISION=DOT_PRECISION,
        num_warps=warps,
    )
    return stats, k_s, k_t


def patch_cka_backward(
    m_s: torch.Tensor,
    m_t: torch.Tensor,
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    ph: int,
    pw: int,
    reduce: str,
    center: bool,
    *,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_X[g] = m[g] @ Xc[g]`` for both tensors, scattered back to ``(B, C, H, W)``, one launch.

    Args:
        m_s, m_t: ``(G, P, P)`` coefficient matrices (any strides; read as fp32).
        f_s, f_t, ph, pw, reduce, center: as in :func:`patch_cka_forward`.
        block_d: force the feature chunk (power of two >= 16; testing / tuning).

    Returns:
        ``(grad_s, grad_t)``: contiguous ``(B, C, H, W)`` of ``f_s.dtype`` / ``f_t.dtype``.
    """
    G, P, D = _problem_shape(f_s, f_t, ph, pw, reduce)
    if m_s.shape != (G, P, P) or m_t.shape != (G, P, P):
        raise ValueError(f"m_s and m_t must be (G, P, P) = {(G, P, P)}, got {tuple(m_s.shape)}, {tuple(m_t.shape)}")
    dev = f_s.device
    grad_s = torch.empty(f_s.shape, device=dev, dtype=f_s.dtype)
    grad_t = torch.empty(f_t.shape, device=dev, dtype=f_t.dtype)
    if grad_s.numel() == 0:
        return grad_s, grad_t
    p_pad = _p_pad(P)
    block_d, warps = _config(_BWD_CONFIG, p_pad, D, block_d)
    B, C, H, W = f_s.shape
    _patch_cka_bwd_kernel[(G, triton.cdiv(D, block_d))](
        m_s,
        m_t,
        f_s,
        f_t,
        grad_s,
        grad_t,
        C,
        W // pw,
        P,
        D,
        *m_s.stride(),
        *m_t.stride(),
        *f_s.stride(),
        *f_t.stride(),
        C * H * W,
        H * W,
        W,
        REDUCE=_REDUCE[reduce],
        CENTER=bool(center),
        PH=ph,
        PW=pw,
        P_PAD=p_pad,
        BLOCK_R=_BLOCK_R,
        BLOCK_D=block_d,
        PRECISION=DOT_PRECISION,
        num_warps=warps,
    )
    return grad_s, grad_t
