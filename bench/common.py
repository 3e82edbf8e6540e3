"""Shared benchmark harness: timing, peak memory, roofline floor, correctness check, CSV + markdown output.

A benchmark is an :class:`OpBench`: named shapes, presets of shape names, an input factory, a cost model
(flops and bytes per mode), a list of providers (callables returning a scalar loss) and the issue's
:class:`Target` s. :func:`main` runs any number of them with the shared command line and writes one CSV.

Modes — what one timed call does (a training step needs the loss and its gradient, so ``full`` is what the
targets are stated for):

* ``forward``  — the loss only, with the inputs requiring grad (the autograd graph is built, as in
  training; ``torch.no_grad`` would time a different program);
* ``backward`` — only ``loss.backward(retain_graph=True)`` of a loss computed once beforehand;
* ``full``     — forward + backward.

Every provider's loss value and gradients are checked against the bench's baseline provider once per
shape before anything is timed (that first call is also the warm-up and absorbs ``torch.compile``).
On CUDA each row also counts the kernels one call launches (``torch.profiler``; see :func:`kernel_launches`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BASE_PROVIDER = "ckakd"
QUANTILES = (0.5, 0.2, 0.8)
# Value / gradient agreement required before a provider is timed (relative; absolute floor = rtol·1e-3).
CHECK_RTOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}

Dims = tuple[int | str, ...]  # sizes, optionally followed by a parameter of the case (e.g. a reduce mode)
Inputs = tuple[Tensor | str, ...]  # tensors, and the case's non-tensor parameters (passed to the providers too)
LossFn = Callable[..., Tensor]


# ---------------------------------------------------------------------------------------------------
# Benchmark description
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One implementation of an op: ``fn(*inputs)`` returns the scalar loss."""

    name: str
    fn: LossFn
    note: str = ""
    checked: bool = True  # False: a different algorithm (e.g. POT's solver), timed but not value-checked


TARGET_KINDS = ("speedup", "floor", "time", "launches")


@dataclass(frozen=True)
class Target:
    """A goal from the issue for the ``ckakd`` provider at one (device, shape, mode), of one ``kind``:

    * ``speedup``  — ``versus``'s median / ckakd's median ≥ ``bound``; ``versus`` is a provider name or a tuple
      of them, meaning the fastest of those measured ("the best batched formulation");
    * ``floor``    — ckakd's median / roofline floor ≤ ``bound``;
    * ``time``     — ckakd's median ≤ ``bound`` milliseconds;
    * ``launches`` — kernels one ckakd call launches inside the bench's ``kernel_scope`` ≤ ``bound`` (CUDA only).

    Build them with :meth:`speedup`, :meth:`floor`, :meth:`time` or :meth:`launches`.
    """

    device: str  # "cpu" | "cuda"
    shape: str
    mode: str
    kind: str
    bound: float
    versus: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"Target kind must be one of {TARGET_KINDS}; got {self.kind!r}")
        if (self.kind == "speedup") != bool(self.versus):
            raise ValueError("a speedup target needs `versus` (and only a speedup target takes it)")

    @classmethod
    def speedup(cls, device: str, shape: str, mode: str, factor: float, versus: str | Sequence[str]) -> Target:
        return cls(device, shape, mode, "speedup", factor, (versus,) if isinstance(versus, str) else tuple(versus))

    @classmethod
    def floor(cls, device: str, shape: str, mode: str, factor: float) -> Target:
        return cls(device, shape, mode, "floor", factor)

    @classmethod
    def time(cls, device: str, shape: str, mode: str, ms: float) -> Target:
        return cls(device, shape, mode, "time", ms)

    @classmethod
    def launches(cls, device: str, shape: str, mode: str, count: int) -> Target:
        return cls(device, shape, mode, "launches", count)

    def describe(self) -> str:
        if self.kind == "speedup":
            rival = self.versus[0] if len(self.versus) == 1 else "the fastest of " + ", ".join(self.versus)
            what = f"≥ {self.bound:g}× faster than {rival}"
        elif self.kind == "floor":
            what = f"≤ {self.bound:g}× floor"
        elif self.kind == "time":
            what = f"≤ {self.bound:g} ms"
        else:
            what = f"≤ {self.bound:g} kernel launch{'es' if self.bound != 1 else ''}"
        return f"{self.shape} {self.mode}: ckakd {what}"

    def measure(self, medians: dict[str, float], row: Row | None) -> tuple[float, bool]:
        """(measured value, met) from this (op, shape, mode)'s provider medians and ckakd's row; NaN: not run."""
        base = medians.get(BASE_PROVIDER, math.nan)
        if self.kind == "speedup":
            rivals = [medians[p] for p in self.versus if p in medians and not math.isnan(medians[p])]
            got = min(rivals) / base if rivals else math.nan
            return got, got >= self.bound
        got = math.nan
        if row is not None:
            got = {"floor": row.time_over_floor, "time": row.median_ms, "launches": row.launches}[self.kind]
        return got, got <= self.bound


@dataclass(frozen=True)
class OpBench:
    """An op to benchmark: shapes, presets, inputs, cost model, providers and the checking baseline."""

    op: str
    shapes: dict[str, Dims]
    presets: dict[str, tuple[str, ...]]  # "cpu", "gpu", "quick-cpu", "quick-gpu", ...
    make_inputs: Callable[[Dims, torch.device, torch.dtype], Inputs]
    cost: Callable[[Dims, str, int], tuple[float, float]]  # (dims, mode, element size) -> (flops, bytes)
    providers: Callable[[torch.device], list[Provider]]
    baseline: str  # provider whose value and gradients every other provider must match
    targets: tuple[Target, ...] = ()
    self_test: Callable[[], None] | None = None
    # Profiler names of the ops whose kernels the `launches` column counts (e.g. "ckakd::sinkhorn_fixed_forward");
    # empty: every kernel of the call.
    kernel_scope: tuple[str, ...] = ()


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    shapes: tuple[str, ...] | None
    providers: tuple[str, ...] | None
    modes: tuple[str, ...]
    out: Path
    verbose: bool = False
    threads: int | None = None


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float
    launches: float  # CUDA kernels one call launches (inside the bench's kernel_scope, if any); NaN on CPU
    floor_ms: float
    time_over_floor: float
    device: str
    torch: str
    triton: str
    timestamp: str
    notes: str = ""


CSV_COLUMNS = tuple(f.name for f in fields(Row))


# ---------------------------------------------------------------------------------------------------
# Helpers for the bench modules
# ---------------------------------------------------------------------------------------------------


def compiled(fn: LossFn) -> LossFn:
    """``torch.compile`` of ``fn`` (static shapes; compile time is excluded by the warm-up call).

    AOTAutograd "donates" saved buffers to the compiled backward, which then refuses
    ``retain_graph=True`` — needed by the backward mode — so donation is switched off.
    """
    with contextlib.suppress(Exception):
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


def reference_providers(
    device: torch.device, ckakd_fn: LossFn, ckakd_torch_fn: LossFn, reference_fn: LossFn
) -> list[Provider]:
    """ckakd (auto backend), ckakd-torch (CUDA only: the pure-torch path), the reference and its compile."""
    out = [Provider("ckakd", ckakd_fn)]
    if device.type == "cuda":
        out.append(Provider("ckakd-torch", ckakd_torch_fn))
    return out + [Provider("reference", reference_fn), Provider("reference-compile", compiled(reference_fn))]


def latent_features(
    n: int,
    dims: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    shared: float = 1.0,
    rank: int = 16,
    seed: int = 0,
) -> list[Tensor]:
    """Features (n, d_i) = z·W_i + own latent + noise with a shared rank-``rank`` latent z.

    Gives Grams that are not dominated by their diagonal, so CKA sits well inside (0, 1) and the
    check compares meaningful values.
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    z = randn(n, rank)
    out = []
    for d in dims:
        own = randn(n, rank)
        x = (shared * z + own) @ randn(rank, d) / rank**0.5 + randn(n, d)
        out.append(x.to(dtype))
    return out


# ---------------------------------------------------------------------------------------------------
# Timing, memory, ceilings
# ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ---------------------------------------------------------------------------------------------------
# Running one bench
# ---------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu {model} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
    except Exception:  # not installed or broken: the torch path still runs
        return ""
    return triton.__version__


def preset_key(device: torch.device, quick: bool) -> str:
    return ("quick-" if quick else "") + ("gpu" if device.type == "cuda" else "cpu")


def shape_label(dims: Dims) -> str:
    """The shape column: sizes joined by "x", then the case's parameters, e.g. "2x256x100x168 batch"."""
    sizes = "x".join(str(d) for d in dims if not isinstance(d, str))
    return " ".join([sizes, *(d for d in dims if isinstance(d, str))])


def select_shapes(bench: OpBench, cfg: Config) -> list[str]:
    """Shape names to run: the device's default preset, or the ``--shapes`` presets / names it knows."""
    requested = cfg.shapes or (preset_key(cfg.device, cfg.quick),)
    names: list[str] = []
    for item in requested:
        if item == "all":
            found = tuple(bench.shapes)
        else:
            found = bench.presets.get(item, (item,) if item in bench.shapes else ())
        names += [n for n in found if n not in names]
    return names


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clear_grads(tensors: Sequence[Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _grad_inputs(inputs: Inputs) -> list[Tensor]:
    """The inputs the gradients are checked for (and reset before each timed call): tensors requiring grad."""
    return [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]


def _value_and_grads(fn: LossFn, inputs: Inputs, wrt: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    _clear_grads(wrt)
    loss = fn(*inputs)
    loss.backward()
    value = loss.detach().double()
    grads = [t.grad.detach().double() if t.grad is not None else torch.zeros_like(t, dtype=torch.float64) for t in wrt]
    _clear_grads(wrt)
    return value, grads


def _check(value: Tensor, grads: list[Tensor], ref_value: Tensor, ref_grads: list[Tensor], rtol: float) -> None:
    """Loss value within rtol (atol = rtol·1e-3) and each gradient within rtol in relative norm."""
    torch.testing.assert_close(value, ref_value, rtol=rtol, atol=rtol * 1e-3)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        err = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
        if not err <= rtol:
            raise AssertionError(f"gradient {i}: relative error {err:.2e} > {rtol:g}")


def _mode_fn(mode: str, fn: LossFn, inputs: Inputs, wrt: Sequence[Tensor]) -> Callable[[], object]:
    if mode == "forward":
        return lambda: fn(*inputs)
    if mode == "backward":
        loss = fn(*inputs)

        def backward() -> Tensor:
            _clear_grads(wrt)
            loss.backward(retain_graph=True)
            return loss

        return backward

    def full() -> Tensor:
        _clear_grads(wrt)
        out = fn(*inputs)
        out.backward()
        return out

    return full


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(bench: OpBench, cfg: Config, ceil: Ceilings, meta: dict[str, str]) -> tuple[list[Row], list[str]]:
    """Run every selected (shape, provider, mode) of ``bench``; returns the rows and check failures."""
    dev, dtype = cfg.device, cfg.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    esize = torch.empty((), dtype=dtype).element_size()
    all_providers = bench.providers(dev)
    by_name = {p.name: p for p in all_providers}
    timed = [p for p in all_providers if cfg.providers is None or p.name in cfg.providers]
    rows: list[Row] = []
    failures: list[str] = []
    if bench.self_test is not None and timed:
        bench.self_test()
    for shape_name in select_shapes(bench, cfg):
        dims = bench.shapes[shape_name]
        shape = shape_label(dims)

        def row(
            p: Provider,
            mode: str,
            t: tuple[float, float, float],
            mem: float,
            notes: str,
            launches: float = math.nan,
            dims: Dims = dims,
            shape: str = shape,
        ) -> Row:
            flops, nbytes = bench.cost(dims, mode, esize)
            fl = floor_ms(flops, nbytes, ceil)
            return Row(
                bench.op, p.name, mode, shape, dtype_name, *t, mem, launches, fl, t[0] / fl, notes=notes, **meta
            )

        nan3 = (math.nan, math.nan, math.nan)
        try:
            inputs = bench.make_inputs(dims, dev, dtype)
        except Exception as exc:  # e.g. out of memory for a preset too large for this device
            rows += [row(p, m, nan3, math.nan, "inputs: " + _short(exc)) for p in timed for m in cfg.modes]
            continue
        wrt = _grad_inputs(inputs)
        rtol = CHECK_RTOL.get(dtype, 5e-2)
        try:
            ref = _value_and_grads(by_name[bench.baseline].fn, inputs, wrt)
        except Exception as exc:
            ref = None
            _log(f"[{bench.op} {shape}] baseline {bench.baseline} failed, providers unchecked: {_short(exc)}")
        for p in timed:
            notes = [p.note] if p.note else []
            try:
                if p.name != bench.baseline:
                    value, grads = _value_and_grads(p.fn, inputs, wrt)  # also the warm-up / compile call
                    if not p.checked:
                        notes.append(f"loss {value.item():.6g}, not compared (different algorithm)")
                    elif ref is None:
                        notes.append("unchecked (baseline failed)")
                    else:
                        _check(value, grads, *ref, rtol)
                        notes.append(f"loss {value.item():.6g} (baseline {ref[0].item():.6g})")
                elif ref is not None:
                    notes.append(f"loss {ref[0].item():.6g}")
            except AssertionError as exc:
                failures.append(f"{bench.op} {shape} {p.name}: {_short(exc, 300)}")
                _log(f"[{bench.op} {shape}] CHECK FAILED {p.name}: {_short(exc, 300)}")
                rows += [row(p, m, nan3, math.nan, "CHECK FAILED: " + _short(exc)) for m in cfg.modes]
                continue
            except Exception as exc:  # compile failure, OOM, ...: record it, keep going
                _log(f"[{bench.op} {shape}] {p.name} failed: {_short(exc, 300)}")
                if cfg.verbose:
                    traceback.print_exc()
                rows += [row(p, m, nan3, math.nan, _short(exc)) for m in cfg.modes]
                continue
            for mode in cfg.modes:
                try:
                    fn = _mode_fn(mode, p.fn, inputs, wrt)
                    t = time_ms(fn, dev, cfg.quick)
                    _clear_grads(wrt)  # so that the measured call allocates its gradient afresh
                    mem = peak_mem_mb(fn, dev)
                    _clear_grads(wrt)
                    launches = kernel_launches(fn, dev, bench.kernel_scope)
                    r = row(p, mode, t, mem, "; ".join(notes), launches)
                    del fn
                except Exception as exc:
                    r = row(p, mode, nan3, math.nan, _short(exc))
                _clear_grads(wrt)
                rows.append(r)
                _log(
                    f"[{bench.op} {shape}] {p.name:<18} {mode:<8} {r.median_ms:10.3f} ms"
                    f"  floor {r.floor_ms:8.3f} ms  x{r.time_over_floor:.2f}"
                    + ("" if math.isnan(r.launches) else f"  {r.launches:.0f} launches")
                )
        del inputs, wrt, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows, failures


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if abs(v) >= 10**digits:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _order(rows: Sequence[Row]) -> list[Row]:
    shapes = list(dict.fromkeys(r.shape for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    return sorted(rows, key=lambda r: (shapes.index(r.shape), MODES.index(r.mode), providers.index(r.provider)))


def results_table(rows: Sequence[Row]) -> str:
    """One line per row; a ``launches`` column when any row counted kernel launches (CUDA)."""
    with_launches = any(not math.isnan(r.launches) for r in rows)
    header = ["provider", "mode", "shape", "median ms", "p20", "p80", "peak MB"]
    header += ["launches"] * with_launches + ["floor ms", "×floor", "notes"]
    body = [
        [r.provider, r.mode, r.shape, _fmt(r.median_ms), _fmt(r.p20_ms), _fmt(r.p80_ms), _fmt(r.peak_mem_mb)]
        + [_fmt(r.launches)] * with_launches
        + [_fmt(r.floor_ms), _fmt(r.time_over_floor), r.notes]
        for r in _order(rows)
    ]
    return _table(header, body)


def ratios(rows: Sequence[Row]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(op, shape, mode) -> {provider: median / ckakd median} for rows measured in this run."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in rows:
        out.setdefault((r.op, r.shape, r.mode), {})[r.provider] = r.median_ms
    for key, medians in out.items():
        base = medians.get(BASE_PROVIDER, math.nan)
        out[key] = {p: m / base for p, m in medians.items()}
    return out


def ratios_table(rows: Sequence[Row]) -> str:
    providers = [p for p in dict.fromkeys(r.provider for r in rows) if p != BASE_PROVIDER]
    base = {(r.shape, r.mode): r.median_ms for r in rows if r.provider == BASE_PROVIDER}
    body = []
    for (_, shape, mode), rel in ratios(_order(rows)).items():
        body.append(
            [shape, mode, _fmt(base.get((shape, mode), math.nan))] + [_fmt(rel.get(p, math.nan)) for p in providers]
        )
    return _table(["shape", "mode", "ckakd ms"] + [f"{p} / ckakd" for p in providers], body)


def targets_table(benches: Sequence[OpBench], rows: Sequence[Row], device: torch.device) -> str:
    """The device's targets of ``benches`` with the value measured in ``rows`` and met / MISSED / not run."""
    medians: dict[tuple[str, str, str], dict[str, float]] = {}
    ckakd_rows: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        medians.setdefault((r.op, r.shape, r.mode), {})[r.provider] = r.median_ms
        if r.provider == BASE_PROVIDER:
            ckakd_rows[(r.op, r.shape, r.mode)] = r
    body = []
    for bench in benches:
        for t in bench.targets:
            if t.device != device.type:
                continue
            shape = shape_label(bench.shapes[t.shape])
            key = (bench.op, shape, t.mode)
            got, ok = t.measure(medians.get(key, {}), ckakd_rows.get(key))
            status = "not run" if math.isnan(got) else ("met" if ok else "MISSED")
            body.append([bench.op, t.describe(), _fmt(got), status])
    return _table(["op", "target", "measured", "status"], body) if body else ""


def report(
    benches: Sequence[OpBench],
    rows: Sequence[Row],
    cfg: Config,
    ceil: Ceilings,
    meta: dict[str, str],
    load: tuple[float, float] | None = None,
) -> str:
    parts = [
        f"## ckakd benchmarks — {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton'] or '-'}, "
        f"dtype {str(cfg.dtype).removeprefix('torch.')}, "
        f"{meta['timestamp']}{' (quick)' if cfg.quick else ''}. Ceilings: {ceil.describe()}.",
        "Times in ms (median, p20, p80); ×floor = median / floor; ratios > 1 mean slower than ckakd.",
    ]
    if cfg.device.type != "cuda":
        parts.append("CPU 'peak MB' = memory autograd saves for the backward (no CPU allocator peak in torch).")
    if load is not None:
        parts.append(
            f"1-min load average at start / end: {load[0]:.2f} / {load[1]:.2f} "
            f"on {os.cpu_count()} cores (other processes on the cores inflate and scatter CPU times)."
        )
    for bench in benches:
        op_rows = [r for r in rows if r.op == bench.op]
        if not op_rows:
            continue
        parts += [
            "",
            f"### {bench.op}",
            "",
            results_table(op_rows),
            "",
            f"#### {bench.op}: ratios to ckakd",
            "",
            ratios_table(op_rows),
        ]
    targets = targets_table(benches, rows, cfg.device)
    if targets:
        parts += ["", "### Targets", "", targets]
    return "\n".join(parts) + "\n"


def write_csv(path: Path, rows: Sequence[Row], append: bool = False) -> None:
    """Write ``rows`` to ``path``; ``append`` adds them to an existing file. A file written with other columns
    (before a column was added) is rewritten once with the current ones; its missing cells stay empty."""
    mode, carried = "w", []
    if append and path.exists():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) == CSV_COLUMNS:
                mode = "a"
            else:
                carried = list(reader)
    with path.open(mode, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        for old in carried:
            writer.writerow({k: old.get(k) or "" for k in CSV_COLUMNS})
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()})


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--quick", action="store_true", help="few small shapes, few repeats (minutes on 2 CPU cores)")
    ap.add_argument(
        "--shapes",
        type=_csv_list,
        default=None,
        help="comma-separated presets (cpu, gpu, quick-cpu, quick-gpu, all) or shape names",
    )
    ap.add_argument("--providers", type=_csv_list, default=None, help="comma-separated provider names to time")
    ap.add_argument("--modes", type=_csv_list, default=MODES, help="comma-separated: forward,backward,full")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "out",
        help="output directory for the CSV and markdown (default bench/out/)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU only: torch.set_num_threads (default: torch's choice)"
    )
    ap.add_argument("--list", action="store_true", help="list shapes, presets and providers, then exit")
    ap.add_argument("-v", action="store_true", help="print tracebacks of provider failures")
    return ap


def config(args: argparse.Namespace) -> Config:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    return Config(
        torch.device(args.device),
        DTYPES[args.dtype],
        args.quick,
        args.shapes,
        args.providers,
        tuple(args.modes),
        args.out,
        args.v,
        args.threads,
    )


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return math.nan


def _listing(benches: Sequence[OpBench], device: torch.device) -> str:
    lines = []
    for b in benches:
        lines.append(f"{b.op}: providers {', '.join(p.name for p in b.providers(device))} (baseline {b.baseline})")
        for name, dims in b.shapes.items():
            lines.append(f"  {name:<28} {shape_label(dims)}")
        for name, shapes in b.presets.items():
            lines.append(f"  preset {name:<15} {', '.join(shapes)}")
    return "\n".join(lines)


def main(benches: Sequence[OpBench], argv: Sequence[str] | None = None, description: str = "") -> int:
    """Parse the shared command line, run ``benches``, write CSV + markdown, print the tables."""
    args = parser(description or "ckakd benchmarks").parse_args(argv)
    cfg = config(args)
    if args.list:
        print(_listing(benches, cfg.device))
        return 0
    unknown = [s for s in cfg.shapes or () if not any(s == "all" or s in b.presets or s in b.shapes for b in benches)]
    if unknown:
        raise SystemExit(f"unknown shape or preset name(s): {', '.join(unknown)} (see --list)")
    if cfg.threads and cfg.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    now = datetime.now(timezone.utc)
    load_start = _loadavg()
    meta = {
        "device": device_name(cfg.device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "timestamp": now.isoformat(timespec="seconds"),
    }
    rows: list[Row] = []
    failures: list[str] = []
    with ieee_fp32_matmul() if cfg.device.type == "cuda" else contextlib.nullcontext():
        _log(f"measuring ceilings on {meta['device']} ...")
        ceil = ceilings(cfg.device, cfg.dtype)
        _log(ceil.describe())
        for bench in benches:
            r, f = run_bench(bench, cfg, ceil, meta)
            rows += r
            failures += f
    load = None if cfg.device.type == "cuda" else (load_start, _loadavg())
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{cfg.device.type}-{now.strftime('%Y%m%d-%H%M%S')}"
    text = report(benches, rows, cfg, ceil, meta, load)
    write_csv(cfg.out / f"{stem}.csv", rows)
    write_csv(cfg.out / "history.csv", rows, append=True)
    (cfg.out / f"{stem}.md").write_text(text)
    print(text)
    _log(f"wrote {cfg.out / (stem + '.csv')}, {cfg.out / (stem + '.md')} (rows also appended to history.csv)")
    if failures:
        _log("CHECK FAILURES (these providers were not timed):\n  " + "\n  ".join(failures))
        return 1
    return 0
