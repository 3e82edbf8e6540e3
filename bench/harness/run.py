"""Running one bench: the value and gradient check against the baseline, then every (shape, provider, mode)
timed, its memory and kernel launches measured, one :class:`~harness.spec.Row` each."""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from harness.measure import Ceilings, floor_ms, kernel_launches, peak_mem_mb, time_ms
from harness.spec import CHECK_RTOL, Config, Dims, Inputs, LossFn, OpBench, Provider, Row, select_shapes, shape_label


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


def log(msg: str) -> None:
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
            return Row(bench.op, p.name, mode, shape, dtype_name, *t, mem, launches, fl, t[0] / fl, notes=notes, **meta)

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
            log(f"[{bench.op} {shape}] baseline {bench.baseline} failed, providers unchecked: {_short(exc)}")
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
                log(f"[{bench.op} {shape}] CHECK FAILED {p.name}: {_short(exc, 300)}")
                rows += [row(p, m, nan3, math.nan, "CHECK FAILED: " + _short(exc)) for m in cfg.modes]
                continue
            except Exception as exc:  # compile failure, OOM, ...: record it, keep going
                log(f"[{bench.op} {shape}] {p.name} failed: {_short(exc, 300)}")
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
                log(
                    f"[{bench.op} {shape}] {p.name:<18} {mode:<8} {r.median_ms:10.3f} ms"
                    f"  floor {r.floor_ms:8.3f} ms  x{r.time_over_floor:.2f}"
                    + ("" if math.isnan(r.launches) else f"  {r.launches:.0f} launches")
                )
        del inputs, wrt, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows, failures
