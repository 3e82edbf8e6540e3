"""What every GPU check shares: where it runs (:class:`Env`: CUDA, or the CPU for a dry run), the PASS / FAIL
:class:`Runner`, the dispatch assertion, seeded inputs, the error measure and one forward + backward."""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Env:
    """Where the checks run: CUDA, or (``dry``) the CPU with the Triton interpreter and the C++ extension."""

    dry: bool

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def triton(self) -> str:
        return "triton"

    @property
    def ext(self) -> str:
        return "cpp" if self.dry else "cuda"

    def size(self, gpu: int, dry: int) -> int:
        return dry if self.dry else gpu

    def sync(self) -> None:
        import torch

        if not self.dry:
            torch.cuda.synchronize()


class Failed(AssertionError):
    pass


class Runner:
    """Runs named checks, prints PASS / FAIL lines, counts failures."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str, float]] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            detail = fn() or ""
            ok = True
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            detail = f"{type(exc).__name__}: {text}{where}"
            ok = False
        seconds = time.perf_counter() - start
        self.results.append((name, ok, detail, seconds))
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s){': ' + detail if detail else ''}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not ok for _, ok, _, _ in self.results)


@contextlib.contextmanager
def expect_dispatch(backend: str, *primitives: str) -> Iterator[dict]:
    """Assert that every primitive ran on ``backend`` inside the block, and none of them on another backend."""
    from ckakd.ops import track_dispatch

    with track_dispatch() as ran:
        yield ran
    missing = [p for p in primitives if not ran[(p, backend)]]
    fallback = sorted(f"{p} on {b}" for (p, b), k in ran.items() if p in primitives and b != backend and k)
    if missing or fallback:
        raise Failed(
            f"expected {', '.join(primitives)} on {backend}; missing: {missing or 'none'}, "
            f"fallbacks: {fallback or 'none'} (ran: {dict(ran)})"
        )


def gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def randn(env: Env, *shape: int, seed: int = 0, offset: float = 0.0):
    import torch

    return (torch.randn(*shape, generator=gen(seed)) + offset).to(env.device)


def histograms(env: Env, b: int, c: int, seed: int = 0):
    import torch

    g = gen(seed)
    p = torch.softmax(2 * torch.randn(b, c, generator=g), 1)
    q = torch.softmax(2 * torch.randn(b, c, generator=g), 1)
    a = torch.rand(c, c, generator=g)
    cost = (a + a.T) / 2
    cost.fill_diagonal_(0)
    return p.to(env.device), q.to(env.device), cost.to(env.device)


def close(name: str, a, e, rtol: float = 1e-4, atol: float = 1e-6) -> float:
    """Relative max error of ``a`` against ``e`` (scaled by max |e|); raises when over ``rtol``/``atol``."""
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    if a.shape != e.shape:
        raise Failed(f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
    if not bool(a.isfinite().all()):
        raise Failed(f"{name}: non-finite values")
    scale = max(e.abs().max().item(), 1e-30)
    err = (a - e).abs().max().item() / scale
    if err > rtol + atol / scale:
        raise Failed(f"{name}: max error {err:.3g} of max |expected| {scale:.3g} exceeds {rtol:g}")
    return err


def fwd_bwd(fn: Callable, inputs: Sequence, need: Sequence[bool], seed: int = 99, copy: bool = True):
    """(value, grads) of fn(*inputs) with a non-unit incoming gradient.

    The leaves are fresh copies, or with ``copy=False`` detached views of the inputs themselves (same storage and
    strides: ``clone`` would make a non-dense view contiguous).
    """
    import torch

    leaves = [(t.detach().clone() if copy else t.detach()).requires_grad_(n) for t, n in zip(inputs, need, strict=True)]
    if not copy:
        for t, leaf in zip(inputs, leaves, strict=True):
            if leaf.stride() != t.stride() or leaf.data_ptr() != t.data_ptr():
                raise Failed("test setup: the leaf is not the view itself")
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=gen(seed)).to(out) if out.dim() else torch.tensor(-1.3).to(out)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t, n in zip(leaves, need, strict=True) if n]
