"""Frobenius inner products of Gram matrices in Triton: the three sums behind HSIC and CKA.

Math
----
With Grams of centered features (``kernels.gram``), ``HSIC(K, L) = Σ K∘L / (n-1)²`` and
``CKA = Σ K∘L / sqrt(Σ K∘K · Σ L∘L)``: traces as elementwise sums, never a matrix product. One launch
returns ``[Σ K∘L, Σ K∘K, Σ L∘L]`` per batch entry, reading ``k`` and ``l`` once.

Tiling
------
``_frobenius_dots_kernel`` — grid ``(n_blocks, b)``. The ``n*n`` elements of batch entry ``b`` are cut in
chunks of ``BLOCK``; program ``i`` owns a contiguous run of ``chunks_per_block`` chunks, accumulates the
three products lane-wise in fp32 registers, reduces them once and writes a ``(b, n_blocks, 3)`` partial.
``n_blocks`` is chosen to give about four programs per SM; when it is 1 (small ``n``, or the CPU
interpreter) the partial *is* the result, otherwise the tiny partial tensor is summed over its middle
axis (a deterministic two-stage reduction, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gram import num_sms

__all__ = ["frobenius_dots"]


@triton.jit
def _frobenius_dots_kernel(
    k_ptr,
    l_ptr,
    part_ptr,
    nn,
    n_blocks,
    chunks_per_block,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1)
    base = pid_b.to(tl.int64) * nn
    start = pid.to(tl.int64) * chunks_per_block * BLOCK
    acc_kl = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_kk = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_ll = tl.zeros((BLOCK,), dtype=tl.float32)
    for it in range(0, chunks_per_block):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < nn
        kv = tl.load(k_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        lv = tl.load(l_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        acc_kl += kv * lv
        acc_kk += kv * kv
        acc_ll += lv * lv
    out = part_ptr + (pid_b.to(tl.int64) * n_blocks + pid) * 3
    tl.store(out, tl.sum(acc_kl, axis=0))
    tl.store(out + 1, tl.sum(acc_kk, axis=0))
    tl.store(out + 2, tl.sum(acc_ll, axis=0))


def frobenius_dots(k: torch.Tensor, l: torch.Tensor, *, num_blocks: int | None = None) -> torch.Tensor:
    """``[Σ k∘l, Σ k∘k, Σ l∘l]`` per batch entry.

    Args:
        k, l: ``(b, n, n)`` fp32 (other float dtypes are read and accumulated as fp32). Non-contiguous
            inputs are made contiguous first.
        num_blocks: force the number of programs per batch entry (testing / tuning).

    Returns:
        ``(b, 3)`` fp32.
    """
    if k.dim() != 3 or k.shape != l.shape or k.shape[1] != k.shape[2]:
        raise ValueError(f"k and l must both be (b, n, n), got {tuple(k.shape)} and {tuple(l.shape)}")
    k = k.contiguous()
    l = l.contiguous()
    b, n, _ = k.shape
    nn = n * n
    if b == 0 or nn == 0:
        return torch.zeros((b, 3), device=k.device, dtype=torch.float32)
    block = 1024
    chunks = triton.cdiv(nn, block)
    if num_blocks is None:
        num_blocks = max(1, (4 * num_sms(k.device)) // b)
    num_blocks = max(1, min(int(num_blocks), chunks))
    chunks_per_block = triton.cdiv(chunks, num_blocks)
    num_blocks = triton.cdiv(chunks, chunks_per_block)  # no empty programs
    part = torch.empty((b, num_blocks, 3), device=k.device, dtype=torch.float32)
    _frobenius_dots_kernel[(num_blocks, b)](k, l, part, nn, num_blocks, chunks_per_block, BLOCK=block, num_warps=4)
    return part[:, 0] if num_blocks == 1 else part.sum(dim=1)
