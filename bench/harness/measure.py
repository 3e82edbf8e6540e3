"""Timing, peak memory, kernel launches, and the machine ceilings (copy bandwidth, matmul rate) of the floor."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from harness.spec import QUANTILES


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) of ``fn`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). CPU: ``perf_counter``
    after a warm-up, at least ``min_runs`` runs and ``min_s`` seconds in total, at most ``max_runs``.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, 100)
        q = do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
        return float(q[0]), float(q[1]), float(q[2])
    min_runs, min_s, max_runs, warm_s = (3, 0.1, 30, 0.05) if quick else (5, 1.0, 200, 0.3)
    start = time.perf_counter()
    fn()  # warm-up: at least once, more while it is cheap
    while time.perf_counter() - start < warm_s:
        fn()
    times: list[float] = []
    total = 0.0
    while (len(times) < min_runs or total < min_s) and len(times) < max_runs:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    q = np.quantile(np.asarray(times) * 1e3, QUANTILES)
    return float(q[0]), float(q[1]), float(q[2])


def peak_mem_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated during one call of ``fn`` above what was held before it, in MiB.

    CUDA: the allocator's peak. CPU: torch has no allocator peak counter for CPU tensors, so CPU rows
    report the memory autograd keeps for the backward (distinct storages saved during the call, counted
    with saved-tensor hooks) — the part that grows with the algorithm's state (e.g. B×C×C per-sample
    costs vs O(T·B·C) histories); NaN in backward mode, where the graph already exists.
    """
    if device.type != "cuda":
        storages: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        del out
        return sum(storages.values()) / 2**20 if storages else math.nan
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


def kernel_launches(fn: Callable[[], object], device: torch.device, scope: Sequence[str] = ()) -> float:
    """CUDA kernels launched by one call of ``fn`` (memcpy / memset activities not counted), from ``torch.profiler``.

    With ``scope`` (profiler names of ops, e.g. ``"ckakd::sinkhorn_fixed_forward"``) only the kernels launched
    while one of those ops ran on the launching thread count: the op under test inside a loss with other ops.
    NaN on the CPU, when the profiler saw no CUDA activity at all (no CUPTI), or when no op of ``scope`` ran.
    """
    if device.type != "cuda":
        return math.nan
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    events = list(prof.events())
    if not any(e.kernels for e in events) and not any(e.device_type == DeviceType.CUDA for e in events):
        return math.nan
    ranges = [(e.thread, e.time_range.start, e.time_range.end) for e in events if e.name in scope]
    if scope and not ranges:
        return math.nan

    def inside(e) -> bool:
        start, end = e.time_range.start, e.time_range.end
        return any(t == e.thread and s <= start and end <= f for t, s, f in ranges)

    return float(
        sum(
            not k.name.startswith(("Memcpy", "Memset"))
            for e in events
            if e.kernels and (not scope or inside(e))
            for k in e.kernels
        )
    )


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Keep CUDA fp32 matmuls in IEEE fp32 (TF32 off, torch's default) inside the block.

    Our kernels compute in IEEE fp32, so the matmul ceiling and the torch providers must too. Only the
    legacy flag is touched (mixing it with ``fp32_precision`` raises on some torch versions).
    """
    matmul = torch.backends.cuda.matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prev = bool(matmul.allow_tf32)
        if prev:
            matmul.allow_tf32 = False
    try:
        yield
    finally:
        if prev:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                matmul.allow_tf32 = True


@dataclass(frozen=True)
class Ceilings:
    """Measured machine ceilings for the floor: copy bandwidth (read + write) and matmul rate."""

    bandwidth: float  # bytes / s
    flops: float  # flop / s in the bench dtype

    def describe(self) -> str:
        bw, rate = self.bandwidth / 1e9, self.flops / 1e12
        return f"copy bandwidth {bw:.1f} GB/s (read + write), matmul {rate:.3g} TFLOP/s"


_CEILINGS: dict[tuple[str, torch.dtype], Ceilings] = {}


def ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Measure (once per process) copy bandwidth and matmul rate on ``device`` for ``dtype``.

    CPU: a 256 MiB fp32 copy and a 2048² matmul. CUDA: a 1 GiB copy and an 8192² matmul, fp32 with
    TF32 disabled.
    """
    key = (str(device), dtype)
    if key not in _CEILINGS:
        _CEILINGS[key] = Ceilings(_copy_bandwidth(device), _matmul_rate(device, dtype))
    return _CEILINGS[key]


def _best_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Best-case time for a ceiling: CUDA do_bench median; CPU the fastest of ≥ 10 runs (≥ 1 s, ≤ 100).

    A ceiling is what the machine can do, so on a shared CPU the least-disturbed run is the estimate.
    """
    if device.type == "cuda":
        return time_ms(fn, device, quick=False)[0]
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 10 or (time.perf_counter() - start < 1.0 and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _copy_bandwidth(device: torch.device) -> float:
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_ms = _best_ms(lambda: dst.copy_(src), device)
    return 2 * numel * src.element_size() / (copy_ms * 1e-3)


def _matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    cuda = device.type == "cuda"
    size = 8192 if cuda else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    with ieee_fp32_matmul() if cuda else contextlib.nullcontext():
        mm_ms = _best_ms(lambda: torch.mm(a, b), device)
    return 2 * size**3 / (mm_ms * 1e-3)


def floor_ms(flops: float, nbytes: float, ceil: Ceilings) -> float:
    """Roofline floor: the larger of bytes ÷ bandwidth and flops ÷ matmul rate, in ms."""
    return max(nbytes / ceil.bandwidth, flops / ceil.flops) * 1e3
