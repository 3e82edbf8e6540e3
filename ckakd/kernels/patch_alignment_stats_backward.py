"""Backward of the batched patch CKA in Triton (``ckakd::patch_alignment_stats``), one launch.

The problems, their index arithmetic and the argument checks are those of the forward,
:mod:`.patch_alignment_stats`, whose Triton helpers this module calls.

``_patch_cka_bwd_kernel`` — grid ``(G · cdiv(D, BLOCK_D), n_needed)``: ``grad_X[g] = m[g] @ Xc[g]`` for a
``P_PAD x BLOCK_D`` chunk of one problem of one tensor; only the tensors whose gradient is needed get
programs (the frozen teacher costs nothing). The program walks the ``P`` rows once for the column means
(same shifted form), then again in ``BLOCK_R``-row blocks, centering each and accumulating
``m[g][:, rows] @ Xc[rows]`` (one ``P_PAD``-deep fp32 dot would not fit in registers; the second read
hits L1/L2). The result is scattered to where the chunk came from, in a contiguous output of the input's
dtype. Both large extents sit on grid axis 0 (limit 2³¹ − 1).

"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DOT_PRECISION, choose, launch
from .patch_alignment_stats import (
    REDUCE_CODES,
    col_offsets,
    padded_patches,
    problem_offset,
    problem_shape,
    row_offsets,
    table_candidates,
)

__all__ = ["BWD_CONFIGS", "patch_cka_backward"]

# Launch candidates per P_PAD, first = default; checked like the forward's (see :mod:`.patch_alignment_stats`).
BWD_CONFIGS: dict[int, list[dict[str, int]]] = {
    16: [{"BLOCK_D": 32, "num_warps": 4}, {"BLOCK_D": 16, "num_warps": 4}, {"BLOCK_D": 64, "num_warps": 16}],
    32: [{"BLOCK_D": 32, "num_warps": 4}, {"BLOCK_D": 64, "num_warps": 8}],
    64: [{"BLOCK_D": 32, "num_warps": 8}, {"BLOCK_D": 16, "num_warps": 4}],
    128: [{"BLOCK_D": 32, "num_warps": 16}, {"BLOCK_D": 16, "num_warps": 8}, {"BLOCK_D": 16, "num_warps": 16}],
}
_BLOCK_R = 16  # rows per block of the backward's reduction over patches


# ---------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------


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
    """``out[positions of X_g[:, f]] = m[g] @ Xc_g[:, f]`` for one of the two tensors."""
    x_row0 = x_ptr + problem_offset(g, sB, sC, sH, sW, REDUCE, PW) + col_offsets(f, C, sB, sC, sH, sW, REDUCE, PH, PW)
    x_cols = x_row0[None, :]  # patch 0 has row offset 0
    if CENTER:
        shift = tl.load(x_row0, mask=fmask, other=0.0).to(tl.float32)
        part = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, P, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            msk = (rr < P)[:, None] & fmask[None, :]
            xv = tl.load(x_cols + row_offsets(rr, Pw, sH, sW, PH, PW)[:, None], mask=msk, other=0.0)
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
        xv = tl.load(x_cols + row_offsets(rr, Pw, sH, sW, PH, PW)[:, None], mask=msk, other=0.0)
        xv = xv.to(tl.float32)
        if CENTER:
            xv = tl.where(msk, (xv - shift[None, :]) - corr[None, :], 0.0)
        mv = tl.load(m_rows + rr.to(tl.int64)[None, :] * m_sj, mask=rmask[:, None] & rrmask[None, :], other=0.0)
        acc += tl.dot(mv.to(tl.float32), xv, input_precision=PRECISION)

    o_base = out_ptr + problem_offset(g, o_sB, o_sC, o_sH, 1, REDUCE, PW)
    o_ptrs = o_base + row_offsets(rows, Pw, o_sH, 1, PH, PW)[:, None]
    o_col = col_offsets(f, C, o_sB, o_sC, o_sH, 1, REDUCE, PH, PW)
    tl.store(o_ptrs + o_col[None, :], acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & fmask[None, :])


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
    n_dblocks,
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
    NEED_S: tl.constexpr,
    NEED_T: tl.constexpr,
    REDUCE: tl.constexpr,
    CENTER: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    P_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid // n_dblocks
    f = (pid - g * n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    fmask = f < D
    # axis 1 enumerates the needed tensors: student first when both are needed
    which = tl.program_id(1) + (0 if NEED_S else 1)
    # fmt: off
    if NEED_S:
        if which == 0:
            _patch_bwd_one(ms_ptr, s_ptr, gs_ptr, g, f, fmask, C, Pw, P, ms_sg, ms_si, ms_sj, s_sB, s_sC, s_sH, s_sW,
                           o_sB, o_sC, o_sH, REDUCE, CENTER, PH, PW, P_PAD, BLOCK_R, BLOCK_D, PRECISION)
    if NEED_T:
        if which == 1:
            _patch_bwd_one(mt_ptr, t_ptr, gt_ptr, g, f, fmask, C, Pw, P, mt_sg, mt_si, mt_sj, t_sB, t_sC, t_sH, t_sW,
                           o_sB, o_sC, o_sH, REDUCE, CENTER, PH, PW, P_PAD, BLOCK_R, BLOCK_D, PRECISION)
    # fmt: on


# ---------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------


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
    need_s: bool = True,
    need_t: bool = True,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_X[g] = m[g] @ Xc[g]`` for the needed tensors, scattered back to ``(B, C, H, W)``, one launch.

    Args:
        m_s, m_t: ``(G, P, P)`` coefficient matrices (any strides; read as fp32). One that is not needed
            is not read (any tensor may be passed).
        f_s, f_t, ph, pw, reduce, center: as in :func:`.patch_alignment_stats.patch_cka_forward`.
        need_s, need_t: which gradients to compute; an unneeded one is returned as an empty ``(0,)``
            tensor and costs nothing.
        block_d: force the feature chunk (power of two >= 16; testing / tuning).

    Returns:
        ``(grad_s, grad_t)``: contiguous ``(B, C, H, W)`` of ``f_s.dtype`` / ``f_t.dtype`` (or empty).
    """
    G, P, D = problem_shape(f_s, f_t, ph, pw, reduce)
    for name, m, need in (("m_s", m_s, need_s), ("m_t", m_t, need_t)):
        if need and m.shape != (G, P, P):
            raise ValueError(f"{name} must be (G, P, P) = {(G, P, P)}, got {tuple(m.shape)}")
    dev = f_s.device
    grad_s = torch.empty(f_s.shape, device=dev, dtype=f_s.dtype) if need_s else f_s.new_empty(0)
    grad_t = torch.empty(f_t.shape, device=dev, dtype=f_t.dtype) if need_t else f_t.new_empty(0)
    n_needed = int(need_s) + int(need_t)
    if n_needed == 0 or f_s.numel() == 0:
        return grad_s, grad_t
    p_pad = padded_patches(P)
    B, C, H, W = f_s.shape
    # an unneeded tensor's pointers are never dereferenced: pass the needed one's in their place
    ms, mt = (m_s if need_s else m_t), (m_t if need_t else m_s)
    gs, gt = (grad_s if need_s else grad_t), (grad_t if need_t else grad_s)
    candidates = table_candidates(BWD_CONFIGS, p_pad, D, block_d)

    def run(config: dict) -> None:
        bd = config["BLOCK_D"]
        n_dblocks = triton.cdiv(D, bd)
        # fmt: off
        launch(_patch_cka_bwd_kernel, (G * n_dblocks, n_needed),
               ms, mt, f_s, f_t, gs, gt, C, W // pw, P, D, n_dblocks, *ms.stride(), *mt.stride(),
               *f_s.stride(), *f_t.stride(), C * H * W, H * W, W,
               device=dev, NEED_S=bool(need_s), NEED_T=bool(need_t), REDUCE=REDUCE_CODES[reduce], CENTER=bool(center),
               PH=ph, PW=pw, P_PAD=p_pad, BLOCK_R=_BLOCK_R, BLOCK_D=bd, PRECISION=DOT_PRECISION,
               num_warps=config["num_warps"])
        # fmt: on

    choose("patch_cka_backward", (reduce, p_pad, triton.next_power_of_2(G), triton.next_power_of_2(D)), candidates,
           run, dev)  # fmt: skip
    return grad_s, grad_t
