"""How every ckakd Triton kernel is launched: on its tensors' device, inside the grid limits, with a
launch configuration picked from a per-kernel candidate list, and recordable without a GPU.

* ``launch(kernel, grid, *args, device=..., **meta)`` — the only place a kernel is started. It checks the
  grid against CUDA's limits (axis 0 < 2³¹, axes 1 and 2 ≤ 65,535: a larger axis would fail at launch or,
  worse, be truncated) and makes ``device`` current for the launch, so tensors on ``cuda:1`` while
  ``cuda:0`` is current run on their own device and stream.
* ``choose(name, key, candidates, run)`` — picks one configuration (a dict of constexprs and ``num_warps``)
  of several. On a GPU each candidate is timed once per ``key`` (a shape bucket) with
  ``triton.testing.do_bench`` and the fastest is cached for the process; the first candidate is used under
  the interpreter, during CUDA-graph capture, or with ``CKAKD_AUTOTUNE=0`` (fixed configurations, for
  bitwise reproducibility across processes). Every candidate computes the same function: the tests run
  each one under the interpreter.
* ``recording(callback)`` — while active, launches are handed to ``callback(kernel, grid, args, meta)``
  instead of running, and ``choose`` offers every candidate: ``bench/compile_report.py`` drives the
  launchers this way to compile exactly what they can launch, for sm_90, on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

GRID_LIMITS = (2**31 - 1, 65535, 65535)

_recorder: list[Callable[..., None]] = []
_tuned: dict[tuple, int] = {}


def check_grid(name: str, grid: Sequence[int]) -> None:
    """Raise ``ValueError`` if ``grid`` exceeds CUDA's per-axis limits (``name`` is the kernel, for the message)."""
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS, strict=False)):
        if size > limit:
            raise ValueError(
                f"{name}: grid axis {axis} would have {size} programs, over CUDA's limit of {limit}; "
                "this shape needs a launcher that folds the axis (please report it)"
            )


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for a launch (a no-op for CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid: tuple[int, ...], *args: Any, device: torch.device, **meta: Any) -> None:
    """Run ``kernel[grid](*args, **meta)`` on ``device`` (or hand it to the active recorder)."""
    grid = tuple(int(g) for g in grid)
    check_grid(getattr(kernel, "__name__", str(kernel)), grid)
    if min(grid, default=0) == 0:
        return
    if _recorder:
        _recorder[-1](kernel, grid, args, meta)
        return
    with device_guard(device):
        kernel[grid](*args, **meta)


def _autotune_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("CKAKD_AUTOTUNE", "1") in ("0", ""):
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose(
    name: str,
    key: tuple,
    candidates: Sequence[dict[str, Any]],
    run: Callable[[dict[str, Any]], None],
    device: torch.device,
) -> dict[str, Any]:
    """Run ``run(config)`` for the chosen candidate and return that candidate (see the module docstring)."""
    if not candidates:
        raise ValueError(f"{name}: no launch configuration for {key}")
    if _recorder:
        for config in candidates:
            run(config)
        return candidates[0]
    if len(candidates) == 1 or not _autotune_enabled(device):
        run(candidates[0])
        return candidates[0]
    cache_key = (name, key, device.index, tuple(tuple(sorted(c.items())) for c in candidates))
    best = _tuned.get(cache_key)
    if best is None:
        import triton.testing

        times = []
        with device_guard(device):
            for config in candidates:
                times.append(triton.testing.do_bench(lambda c=config: run(c), warmup=5, rep=20))
        best = min(range(len(candidates)), key=times.__getitem__)
        _tuned[cache_key] = best
    run(candidates[best])
    return candidates[best]


def tuned_configs() -> dict[tuple, int]:
    """The autotuning decisions of this process: (kernel, key, device, candidates) -> index of the winner."""
    return dict(_tuned)


@contextlib.contextmanager
def recording(callback: Callable[..., None]) -> Iterator[None]:
    """Hand every launch to ``callback(kernel, grid, args, meta)`` instead of running it."""
    _recorder.append(callback)
    try:
        yield
    finally:
        _recorder.remove(callback)


# ---------------------------------------------------------------------------------------------------
# shared by the launchers: SM count, dot precision, candidate tables
# ---------------------------------------------------------------------------------------------------

# tl.dot input precision for fp32 operands (``"ieee"``: exact fp32 FMA; ``"tf32x3"``: three TF32 products,
# close to fp32; ``"tf32"``: a 10-bit significand). ``bench/bench_precision.py`` measures each.
PRECISIONS = ("ieee", "tf32x3", "tf32")
DOT_PRECISION = "ieee"  # the default


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Number of streaming multiprocessors of ``device``; 1 off-GPU (the interpreter runs programs
    one after the other, so fewer, larger programs are faster there)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def check_precision(precision: str) -> None:
    """Raise ``ValueError`` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def pow2_clamp(v: int, lo: int, hi: int) -> int:
    """``next_power_of_2(v)`` (at least 1) clamped to ``[lo, hi]``."""
    return max(lo, min(hi, 1 << (max(int(v), 1) - 1).bit_length()))  # = triton.next_power_of_2


def capped_configs(configs: list[dict[str, int]], key: str, cap: int) -> list[dict[str, int]]:
    """``configs`` with ``config[key]`` capped at ``cap``, duplicates removed (order kept)."""
    out: list[dict[str, int]] = []
    for config in configs:
        c = dict(config, **{key: min(config[key], cap)})
        if c not in out:
            out.append(c)
    return out
