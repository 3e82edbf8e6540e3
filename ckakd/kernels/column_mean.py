"""Column means of a batch in Triton, the first pass of the tiled centered Gram (:mod:`.gram`).

``mean = shift + corr`` with ``shift`` = row 0 of ``x`` and ``corr`` = mean of ``x - shift`` (both
``(b, d)`` fp32): the Gram kernel centers with ``(x - shift) - corr``, which keeps fp32 accurate at a
large offset (see :mod:`.gram`).

``_column_mean_kernel`` — grid ``(b · cdiv(d, BLOCK_D), R)``: program ``(batch, column strip)`` on
axis 0, row range ``r`` of ``R`` on axis 1. It walks its rows of a ``BLOCK_D`` column strip in
``BLOCK_N``-row steps, accumulating ``x - shift`` in a 2-D fp32 register tile reduced once at the
end. With ``R = 1`` it writes ``mean`` and ``corr`` (both ``(b, d)`` fp32) directly; otherwise it
writes its partial sum to an ``(R, b, d)`` buffer and ``_column_mean_finish_kernel`` (grid
``(b · cdiv(d, BLOCK_D),)``) adds the ``R`` partials in a fixed order (deterministic, no atomics) and
writes ``mean`` and ``corr``. ``R`` is chosen to give about four programs per SM (a tall ``x``,
``n=4096, d=512``, would otherwise run 4 programs each walking 4096 rows). Only used when ``n > 64``.

Launch configurations: ``COLUMN_MEAN_CONFIGS`` (first = default), through :mod:`._launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import GRID_LIMITS, capped_configs, choose, launch, num_sms, pow2_clamp

__all__ = ["COLUMN_MEAN_CONFIGS", "COLUMN_MEAN_FINISH_CONFIG", "column_mean"]

# _column_mean_kernel (n > 64 only; first = default); BLOCK_D is capped at the padded d.
COLUMN_MEAN_CONFIGS: list[dict[str, int]] = [
    {"BLOCK_N": 32, "BLOCK_D": 128, "num_warps": 4},
    {"BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4},
    {"BLOCK_N": 16, "BLOCK_D": 256, "num_warps": 4},
    {"BLOCK_N": 32, "BLOCK_D": 256, "num_warps": 8},
]
# The elementwise second stage: a fixed configuration.
COLUMN_MEAN_FINISH_CONFIG: dict[str, int] = {"BLOCK_D": 256, "num_warps": 4}


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


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


def _row_split_count(programs: int, row_chunks: int, device: torch.device) -> int:
    """Row ranges of the column-mean pass: about four programs per SM, at least four BLOCK_N chunks each."""
    target = 4 * num_sms(device)
    return max(1, min(-(-target // max(programs, 1)), row_chunks // 4))


def column_mean(x: torch.Tensor, *, row_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, corr), both (b, d) fp32, with mean = x[:, 0] + corr (rows split in ``row_split`` ranges)."""
    b, n, d = x.shape
    dev = x.device
    mean = torch.empty((b, d), device=dev, dtype=torch.float32)
    corr = torch.empty((b, d), device=dev, dtype=torch.float32)
    if b * n * d == 0:
        return mean.zero_(), corr.zero_()
    candidates = capped_configs(COLUMN_MEAN_CONFIGS, "BLOCK_D", pow2_clamp(d, 16, 1 << 30))

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
