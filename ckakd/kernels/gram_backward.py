"""Backward of the centered Gram in Triton: ``M Xc`` without forming ``Xc = x - mean`` in memory.

Every backward of the Gram ops needs the one ``(n x n) · (n x d)`` product ``M (x - mean)``
(``∂⟨G, K⟩/∂X = (G + Gᵀ) Xc`` for ``K = Xc Xcᵀ``); the forward is :mod:`.gram`, whose row buckets
(:func:`.gram.gram_bucket`), input checks, index arithmetic and dot precisions this module shares.

``_gram_backward_kernel`` — grid ``(b · cdiv(n, BLOCK_M) · cdiv(d, BLOCK_D),)``: ``out = m @ Xc``,
a plain tiled matmul whose right operand is centered in registers (``x - mean``; padded rows meet
the zero-padded columns of ``m``). With ``n <= BLOCK_M`` there is one row block, so ``x`` is read
exactly once.


Launch configurations: ``GRAM_BWD_CONFIGS`` (first = default), through :mod:`._launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DOT_PRECISION, PRECISIONS, capped_configs, check_precision, choose, launch, pow2_clamp
from .gram import check_x, gram_bucket

__all__ = ["GRAM_BWD_CONFIGS", "PRECISIONS", "gram_backward"]

# ---------------------------------------------------------------------------------------------------
# launch candidates (first = default; the only one used under the interpreter or CKAKD_AUTOTUNE=0)
# ---------------------------------------------------------------------------------------------------
# Checked as the forward tables (see :mod:`.gram`): no register spills with ptxas -v for sm_90, triton 3.6.
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

# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


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
    check_x(x)
    check_precision(precision)
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
    bucket = gram_bucket(n)
    candidates = capped_configs(GRAM_BWD_CONFIGS[bucket], "BLOCK_D", pow2_clamp(d, 16, 1 << 30))

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
