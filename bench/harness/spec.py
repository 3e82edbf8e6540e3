"""What a benchmark is: an :class:`OpBench` (named shapes, presets, inputs, cost model, providers, checking
baseline, :class:`Target` s), the run's :class:`Config`, one result :class:`Row`, and shape selection.

Modes — what one timed call does (a training step needs the loss and its gradient, so ``full`` is what the
targets are stated for):

* ``forward``  — the loss only, with the inputs requiring grad (the autograd graph is built, as in
  training; ``torch.no_grad`` would time a different program);
* ``backward`` — only ``loss.backward(retain_graph=True)`` of a loss computed once beforehand;
* ``full``     — forward + backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

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
