"""Frobenius inner products of Gram matrices in Triton: the three sums behind HSIC and CKA.

Math
----
With Grams of centered features (``kernels.gram``), ``HSIC(K, L) = Σ K∘L / (n-1)²`` and
``CKA = Σ K∘L / sqrt(Σ K∘K · Σ L∘L)``: traces as elementwise sums, never a matrix product. One launch
returns ``[Σ K∘L, Σ K∘K, Σ L∘L]`` per batch entry, reading ``k`` and ``l`` once.

Tiling
------
``_frobenius_dots_kernel`` — grid ``(b · n_blocks,)`` (the batch is folded into axis 0, whose limit is
2³¹ − 1, and decoded with a 32-bit division). The ``n*n`` elements of batch entry ``b`` are cut in chunks
of ``BLOCK``; program ``i`` owns a contiguous run of ``chunks_per_block`` chunks, accumulates the three
products lane-wise in fp32 registers, reduces them once and writes a ``(b, n_blocks, 3)`` partial. Element
offsets are 64-bit (a Gram of ``n >= 46,341`` has more than 2³¹ elements). ``n_blocks`` is chosen to give
about four programs per SM; when it is 1 (small ``n``, or the CPU interpreter) the partial *is* the
result, otherwise the tiny partial tensor is summed over its middle axis (a deterministic two-stage
reduction, no atomics).

Launch configurations: ``FROBENIUS_CONFIGS`` (first = default, the only one used under the interpreter or
with ``CKAKD_AUTOTUNE=0``); on a GPU :func:`ckakd.kernels._launch.choose` times them once per shape bucket.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import choose, launch, num_sms

__all__ = ["FROBENIUS_CONFIGS", "frobenius_dots"]

# Candidates (first = default). Every entry compiles for sm_90 with triton 3.6 without register spills.
FROBENIUS_CONFIGS: list[dict[str, int]] = [
    {"BLOCK": 1024, "num_warps": 4},
    {"BLOCK": 2048, "num_warps": 8},
    {"BLOCK": 4096, "num_warps": 8},
]


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
    pid_all = tl.program_id(0)
    pid_b = pid_all // n_blocks
    pid = pid_all - pid_b * n_blocks
    base = pid_b.to(tl.int64) * nn
    # 64-bit running start: chunks_per_block * BLOCK can exceed 2**31 when n_blocks is small
    start = pid.to(tl.int64) * chunks_per_block * BLOCK
    acc_kl = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_kk = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_ll = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, chunks_per_block):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < nn
        kv = tl.load(k_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        lv = tl.load(l_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        acc_kl += kv * lv
        acc_kk += kv * kv
        acc_ll += lv * lv
        start += BLOCK
    out = part_ptr + pid_all.to(tl.int64) * 3  # part[pid_b, pid]
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
    dev = k.device
    result: list[torch.Tensor] = []

    def run(config: dict[str, int]) -> None:
        chunks = triton.cdiv(nn, config["BLOCK"])
        blocks = max(1, (4 * num_sms(dev)) // b) if num_blocks is None else int(num_blocks)
        blocks = max(1, min(blocks, chunks))
        chunks_per_block = triton.cdiv(chunks, blocks)
        blocks = triton.cdiv(chunks, chunks_per_block)  # no empty programs
        part = torch.empty((b, blocks, 3), device=dev, dtype=torch.float32)
        launch(_frobenius_dots_kernel, (b * blocks,), k, l, part, nn, blocks, chunks_per_block, device=dev, **config)
        result[:] = [part[:, 0] if blocks == 1 else part.sum(dim=1)]

    key = (triton.next_power_of_2(nn), triton.next_power_of_2(b), num_blocks)
    choose("frobenius_dots", key, FROBENIUS_CONFIGS, run, dev)
    return result[0]
