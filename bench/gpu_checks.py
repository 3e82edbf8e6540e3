"""GPU-only checks of ckakd that the test-suite cannot make on a CPU machine; one subcommand each.

    python bench/gpu_checks.py sanitizer-cases   tiny fused / general Sinkhorn and one case per Triton kernel, for
                                                 compute-sanitizer --tool memcheck / racecheck
    python bench/gpu_checks.py graphs            CUDA-graph capture + replay of a CKA distillation step vs eager,
                                                 and the same step on a side stream vs the default stream
    python bench/gpu_checks.py determinism       two runs of the same forward + backward are bitwise identical
    python bench/gpu_checks.py bigoffset         views whose elements lie past 2**31 of an 8 GiB buffer vs the
                                                 same data in a fresh small tensor
    python bench/gpu_checks.py all
    python bench/gpu_checks.py --dry all         the same logic on CPU tensors (Triton interpreter, C++ extension),
                                                 tiny sizes, the 2**31 limit replaced by a small one

Every check names its backend (``backend="triton"`` for the CKA family, ``"cuda"`` — ``"cpp"`` with ``--dry`` —
for Sinkhorn) and asserts with ``ckakd.ops.track_dispatch`` that it ran there. Each prints one PASS / FAIL line;
the exit status is 1 when any failed (2: no CUDA device without ``--dry``). ``CKAKD_AUTOTUNE=0`` is set unless
``--autotune`` is given (fixed launch configurations: fewer launches under the sanitizer, and the graph capture
uses the same configuration as eager runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the checkout's ckakd, also without an editable install

COMMANDS = ("sanitizer-cases", "graphs", "determinism", "bigoffset")


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


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _randn(env: Env, *shape: int, seed: int = 0, offset: float = 0.0):
    import torch

    return (torch.randn(*shape, generator=_gen(seed)) + offset).to(env.device)


def _histograms(env: Env, b: int, c: int, seed: int = 0):
    import torch

    g = _gen(seed)
    p = torch.softmax(2 * torch.randn(b, c, generator=g), 1)
    q = torch.softmax(2 * torch.randn(b, c, generator=g), 1)
    a = torch.rand(c, c, generator=g)
    cost = (a + a.T) / 2
    cost.fill_diagonal_(0)
    return p.to(env.device), q.to(env.device), cost.to(env.device)


def _close(name: str, a, e, rtol: float = 1e-4, atol: float = 1e-6) -> float:
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


def _fwd_bwd(fn: Callable, inputs: Sequence, need: Sequence[bool], seed: int = 99, copy: bool = True):
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
    w = torch.randn(out.shape, generator=_gen(seed)).to(out) if out.dim() else torch.tensor(-1.3).to(out)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t, n in zip(leaves, need, strict=True) if n]


# ---------------------------------------------------------------------------------------------------
# sanitizer-cases
# ---------------------------------------------------------------------------------------------------


def sanitizer_cases(env: Env, runner: Runner) -> None:
    """Tiny cases: every CUDA / Triton kernel launched once forward and backward, synchronized after each."""
    import ckakd
    from ckakd.apps.selftest import environment

    def sinkhorn_case(b: int, c: int, general: bool) -> Callable[[], str]:
        def run() -> str:
            p, q, cost = _histograms(env, b, c, seed=c)
            with environment({"CKAKD_SINKHORN_CUDA_GENERAL": "1" if general else "0"}):
                with expect_dispatch(env.ext, "sinkhorn_fixed_forward", "sinkhorn_fixed_backward"):
                    out, grads = _fwd_bwd(
                        lambda a, t: ckakd.sinkhorn(a, t, cost, eps=0.1, iters=5, backend=env.ext), [p, q], [True, True]
                    )
                    env.sync()
            ref, ref_grads = _fwd_bwd(
                lambda a, t: ckakd.sinkhorn(a, t, cost, eps=0.1, iters=5, backend="torch"), [p, q], [True, True]
            )
            errs = [_close("grad", g, r, rtol=1e-3) for g, r in zip(grads, ref_grads, strict=True)]
            err = max(_close("cost", out, ref), *errs)
            return f"B={b} C={c} max rel err vs torch {err:.1e}"

        return run

    fused_c = env.size(100, 12)
    runner.run(f"sanitizer-cases/sinkhorn fused (C={fused_c} <= 128)", sinkhorn_case(4, fused_c, False))
    general_c = env.size(160, 20)
    runner.run(f"sanitizer-cases/sinkhorn general (C={general_c} > 128)", sinkhorn_case(3, general_c, False))
    runner.run("sanitizer-cases/sinkhorn general forced (CKAKD_SINKHORN_CUDA_GENERAL=1)", sinkhorn_case(3, 16, True))

    def wkd_target() -> str:
        import torch

        c = env.size(100, 12)
        zs, zt = _randn(env, 4, c, seed=1), _randn(env, 4, c, seed=2)
        _, _, cost = _histograms(env, 1, c, seed=3)
        target = torch.arange(4, device=env.device) % c
        with expect_dispatch(env.ext, "sinkhorn_fixed_forward", "sinkhorn_fixed_backward"):
            _fwd_bwd(lambda s: ckakd.wkd_logit_loss(s, zt, cost, target=target, backend=env.ext), [zs], [True])
            env.sync()
        return f"B=4 C={c} (zero-mass start)"

    runner.run("sanitizer-cases/wkd_logit_loss target separation", wkd_target)

    def converged() -> str:
        p, q, cost = _histograms(env, 3, 10, seed=4)
        with expect_dispatch(env.ext, "sinkhorn_converged"):
            _fwd_bwd(
                lambda a, t: ckakd.sinkhorn(a, t, cost, eps=0.2, tol=1e-6, max_iter=200, backend=env.ext),
                [p, q],
                [True, True],
            )
            env.sync()
        return "B=3 C=10"

    runner.run("sanitizer-cases/sinkhorn converged", converged)

    def gram_case(n: int, d: int) -> Callable[[], str]:
        def run() -> str:
            x = _randn(env, n, d, seed=n, offset=3.0)
            with expect_dispatch("triton", "gram", "gram_apply"):
                k, (g,) = _fwd_bwd(lambda a: ckakd.centered_gram(a, backend="triton"), [x], [True])
                env.sync()
            rk, (rg,) = _fwd_bwd(lambda a: ckakd.centered_gram(a, backend="torch"), [x], [True])
            return f"n={n} d={d} max rel err vs torch {max(_close('gram', k, rk), _close('grad', g, rg)):.1e}"

        return run

    runner.run("sanitizer-cases/triton gram fwd+bwd (single tile)", gram_case(20, 50))
    runner.run("sanitizer-cases/triton gram fwd+bwd (multi-tile, column means)", gram_case(70, 40))
    split_d = env.size(8192, 256)
    runner.run("sanitizer-cases/triton gram fwd+bwd (long d, split-K on a GPU)", gram_case(16, split_d))

    def frobenius() -> str:
        x, y = _randn(env, 24, 40, seed=5), _randn(env, 24, 30, seed=6)
        with expect_dispatch("triton", "gram", "frobenius_dots", "gram_apply"):
            _fwd_bwd(lambda a, b: ckakd.cka(a, b, mode="debiased", backend="triton"), [x, y], [True, True])
            env.sync()
        return "cka debiased n=24"

    runner.run("sanitizer-cases/triton frobenius dots (cka)", frobenius)

    def patch_case(reduce: str, teacher_grad: bool) -> Callable[[], str]:
        def run() -> str:
            f_s, f_t = _randn(env, 2, 6, 8, 8, seed=7), _randn(env, 2, 6, 8, 8, seed=8)
            with expect_dispatch("triton", "patch_cka_forward", "patch_cka_backward"):
                _fwd_bwd(
                    lambda a, b: ckakd.patch_cka_loss(a, b, patch_size=2, reduce=reduce, backend="triton"),
                    [f_s, f_t],
                    [True, teacher_grad],
                )
                env.sync()
            return f"(2, 6, 8, 8), 2x2 patches, teacher grad {teacher_grad}"

        return run

    for reduce in ("channel", "batch", "spatial"):
        runner.run(f"sanitizer-cases/triton patch CKA fwd+bwd ({reduce})", patch_case(reduce, reduce == "channel"))


# ---------------------------------------------------------------------------------------------------
# graphs
# ---------------------------------------------------------------------------------------------------


def _distill_step(kind: str):
    """A CKA distillation step's loss from static student / teacher tensors (student ones require grad)."""
    import ckakd

    if kind == "cka":

        def step(feat_s, logits_s, feat_t, logits_t):
            return ckakd.cka_loss(feat_s, feat_t, backend="triton") + ckakd.rcka_loss(
                feat_s, feat_t, logits_s, logits_t, backend="triton"
            )

        return step

    def pcka(feat_s, logits_s, feat_t, logits_t):
        return ckakd.patch_cka_loss(feat_s, feat_t, patch_size=2, backend="triton")

    return pcka


def _step_inputs(env: Env, seed: int):
    b, c, h, w, k = env.size(32, 8), env.size(16, 4), 8, 8, env.size(10, 5)
    feat_s = _randn(env, b, c, h, w, seed=seed, offset=1.0)
    feat_t = 0.5 * feat_s + _randn(env, b, c, h, w, seed=seed + 1)
    logits_s, logits_t = _randn(env, b, k, seed=seed + 2), _randn(env, b, k, seed=seed + 3)
    return [feat_s, logits_s, feat_t, logits_t]


# which of (feat_s, logits_s, feat_t, logits_t) the step differentiates: the student's inputs it uses
NEEDS_GRAD = {"cka": (True, True, False, False), "pcka": (True, False, False, False)}


def _eager(step, data, needs):
    """(loss, student grads) of one eager step on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(g) for t, g in zip(data, needs, strict=True)]
    loss = step(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t, g in zip(leaves, needs, strict=True) if g]


def _compare_step(label: str, loss, grads, ref_loss, ref_grads) -> str:
    errs = [_close(f"{label} loss", loss, ref_loss, rtol=1e-5)]
    errs += [_close(f"{label} grad", g, r, rtol=1e-5) for g, r in zip(grads, ref_grads, strict=True)]
    bitwise = all(bool((a == b).all()) for a, b in zip([loss, *grads], [ref_loss, *ref_grads], strict=True))
    return f"max rel err {max(errs):.1e}, bitwise {'identical' if bitwise else 'different'}"


def graphs(env: Env, runner: Runner) -> None:
    """CUDA-graph capture of one CKA distillation step, replayed on new data, against eager; side stream."""
    import torch

    primitives = {"cka": ("gram", "frobenius_dots", "gram_apply"), "pcka": ("patch_cka_forward", "patch_cka_backward")}

    def capture(kind: str) -> Callable[[], str]:
        def run() -> str:
            step, needs = _distill_step(kind), NEEDS_GRAD[kind]
            static = [t.clone().requires_grad_(g) for t, g in zip(_step_inputs(env, seed=10), needs, strict=True)]
            leaves = [t for t, g in zip(static, needs, strict=True) if g]

            def train_step():
                for t in leaves:
                    t.grad = None
                loss = step(*static)
                loss.backward()
                return loss

            if env.dry:  # no CUDA graphs on the CPU: the step logic, run again on the same static tensors
                train_step()
                with expect_dispatch("triton", *primitives[kind]):
                    static_loss = train_step()
                replay = train_step
            else:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up (autotuning, compilation) outside the capture
                    for _ in range(3):
                        train_step()
                torch.cuda.current_stream().wait_stream(side)
                for t in leaves:
                    t.grad = None  # the captured backward allocates the grads in the graph's pool
                graph = torch.cuda.CUDAGraph()
                with expect_dispatch("triton", *primitives[kind]):
                    with torch.cuda.graph(graph):
                        static_loss = step(*static)
                        static_loss.backward()

                def replay():
                    graph.replay()
                    torch.cuda.synchronize()
                    return static_loss

            details = []
            for seed in (20, 30):  # two fresh batches: the replay must follow the new data
                fresh = _step_inputs(env, seed=seed)
                with torch.no_grad():
                    for t, new in zip(static, fresh, strict=True):
                        t.copy_(new)
                loss = replay()
                ref_loss, ref_grads = _eager(step, fresh, needs)
                details.append(_compare_step("replay", loss, [t.grad for t in leaves], ref_loss, ref_grads))
            return "; ".join(details) + (" (dry: no graph capture on the CPU)" if env.dry else "")

        return run

    runner.run("graphs/capture+replay cka_loss + rcka_loss step", capture("cka"))
    runner.run("graphs/capture+replay patch_cka_loss step", capture("pcka"))

    def side_stream(kind: str) -> Callable[[], str]:
        def run() -> str:
            step, needs = _distill_step(kind), NEEDS_GRAD[kind]
            data = _step_inputs(env, seed=40)
            ref_loss, ref_grads = _eager(step, data, needs)
            if env.dry:
                with expect_dispatch("triton", *primitives[kind]):
                    loss, grads = _eager(step, data, needs)
                return _compare_step("rerun", loss, grads, ref_loss, ref_grads) + " (dry: no streams on the CPU)"
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), expect_dispatch("triton", *primitives[kind]):
                loss, grads = _eager(step, data, needs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            return _compare_step("side stream", loss, grads, ref_loss, ref_grads)

        return run

    runner.run("graphs/side stream vs default stream (cka step)", side_stream("cka"))
    runner.run("graphs/side stream vs default stream (pcka step)", side_stream("pcka"))


# ---------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------


def determinism(env: Env, runner: Runner) -> None:
    """The same forward + backward twice (after a warm-up): bitwise-identical values and gradients."""
    import torch

    import ckakd

    def twice(fn: Callable, inputs: Sequence, need: Sequence[bool], backend: str, primitives: Sequence[str]) -> str:
        _fwd_bwd(fn, inputs, need)  # warm-up: compilation, autotuning
        with expect_dispatch(backend, *primitives):
            first = _fwd_bwd(fn, inputs, need)
            second = _fwd_bwd(fn, inputs, need)
        env.sync()
        tensors = [(first[0], second[0])] + list(zip(first[1], second[1], strict=True))
        differ = [i for i, (a, b) in enumerate(tensors) if not torch.equal(a, b)]
        if differ:
            worst = max((a.double() - b.double()).abs().max().item() for a, b in tensors)
            raise Failed(f"outputs {differ} (0 = value, then grads) differ between runs, by up to {worst:.3g}")
        return "bitwise identical"

    n_big, d_big = env.size(64, 12), env.size(60000, 300)
    n_tiles, d_tiles = env.size(200, 70), env.size(3000, 40)
    stats = ("gram", "frobenius_dots", "gram_apply")
    for mode in ("centered", "debiased", "uncentered"):
        for n, d, what in ((n_big, d_big, "long d (split-K)"), (n_tiles, d_tiles, "multi-tile")):
            x, y = _randn(env, n, d, seed=1, offset=2.0), _randn(env, n, d // 2, seed=2)

            def run(x=x, y=y, mode=mode) -> str:
                return twice(
                    lambda a, b: ckakd.cka(a, b, mode=mode, backend="triton"), [x, y], [True, True], "triton", stats
                )

            runner.run(f"determinism/cka {mode} n={n} d={d} ({what})", run)

    shape = (2, env.size(64, 4), env.size(32, 8), env.size(32, 8))
    ps = env.size(4, 2)
    for reduce in ("channel", "batch", "spatial", "mix"):
        levels = 3 if reduce == "mix" else 1
        f_s = [_randn(env, *shape, seed=10 + i) for i in range(levels)]
        f_t = [_randn(env, *shape, seed=20 + i) for i in range(levels)]

        def run_patch(f_s=f_s, f_t=f_t, reduce=reduce, levels=levels) -> str:
            def fn(*ts):
                return ckakd.patch_cka_loss(
                    list(ts[:levels]), list(ts[levels:]), patch_size=ps, reduce=reduce, backend="triton"
                )

            return twice(fn, f_s + f_t, [True] * levels + [False] * levels, "triton", ("patch_cka_forward",))

        runner.run(f"determinism/patch_cka_loss {reduce} {shape} {ps}x{ps} patches", run_patch)

    for c in (env.size(100, 10), env.size(1000, 20)):
        b = env.size(64, 6)
        zs, zt = _randn(env, b, c, seed=30), _randn(env, b, c, seed=31)
        _, _, cost = _histograms(env, 1, c, seed=32)
        target = (torch.arange(b) % c).to(env.device)

        def run_wkd(zs=zs, zt=zt, cost=cost, target=target) -> str:
            return twice(
                lambda s: ckakd.wkd_logit_loss(s, zt, cost, target=target, temperature=4.0, backend=env.ext),
                [zs],
                [True],
                env.ext,
                ("sinkhorn_fixed_forward", "sinkhorn_fixed_backward"),
            )

        runner.run(f"determinism/wkd_logit_loss B={b} C={c} ({env.ext})", run_wkd)


# ---------------------------------------------------------------------------------------------------
# bigoffset
# ---------------------------------------------------------------------------------------------------


def _last_element(view) -> int:
    """Offset (in elements) of the view's farthest element from the start of its storage."""
    return view.storage_offset() + sum((s - 1) * st for s, st in zip(view.shape, view.stride(), strict=True))


def bigoffset(env: Env, runner: Runner) -> None:
    """Views whose elements lie past ``limit`` elements of one buffer (2**31 on a GPU: an 8 GiB fp32 buffer)."""
    import torch

    import ckakd

    limit = 2**31 if not env.dry else 2**12
    extra = 1 << 22 if not env.dry else 1 << 11
    holder: list = []

    def allocate() -> str:
        holder.append(torch.empty(limit + extra, dtype=torch.float32, device=env.device))
        return f"{holder[0].numel()} fp32 elements ({holder[0].numel() * 4 / 2**30:.2f} GiB), limit {limit}"

    runner.run("bigoffset/allocate the buffer", allocate)
    if not holder:
        return
    buf = holder.pop()

    def place(shape: Sequence[int], strides: Sequence[int], offset: int, seed: int):
        view = buf.as_strided(tuple(shape), tuple(strides), offset)
        if _last_element(view) < limit:
            raise Failed(f"test setup: view {tuple(shape)} / {tuple(strides)} + {offset} stays below {limit}")
        if _last_element(view) >= buf.numel():
            raise Failed("test setup: view runs past the buffer")
        data = torch.randn(*shape, generator=_gen(seed)).to(env.device) + 1.5
        view.copy_(data)
        return view, data

    def compare(fn: Callable, views: Sequence, copies: Sequence, need: Sequence[bool], backend, primitives) -> str:
        with expect_dispatch(backend, *primitives):
            got = _fwd_bwd(fn, views, need, copy=False)  # the kernels read the views in the big buffer
        env.sync()
        want = _fwd_bwd(fn, [c.contiguous() for c in copies], need)
        errs = [_close("value", got[0], want[0], rtol=1e-5)]
        errs += [_close("grad", g, w, rtol=1e-5) for g, w in zip(got[1], want[1], strict=True)]
        bitwise = all(torch.equal(a, b) for a, b in zip([got[0], *got[1]], [want[0], *want[1]], strict=True))
        return f"max rel err {max(errs):.1e}, {'bitwise identical' if bitwise else 'not bitwise identical'}"

    n, d, dy = env.size(48, 6), env.size(64, 8), env.size(40, 6)
    row = limit // (n - 1) + 1  # row n-1 starts past the limit

    def gram_rows() -> str:
        x, data = place((n, d), (row, 1), 0, seed=1)
        return compare(
            lambda a: ckakd.centered_gram(a, backend="triton"), [x], [data], [True], "triton", ("gram", "gram_apply")
        )

    def gram_offset() -> str:
        x, data = place((n, d), (d, 1), limit + 16, seed=2)
        return compare(
            lambda a: ckakd.centered_gram(a, backend="triton"), [x], [data], [True], "triton", ("gram", "gram_apply")
        )

    def cka_rows() -> str:
        x, dx_ = place((n, d), (row, 1), 0, seed=3)
        y, dy_ = place((n, dy), (row, 1), d + 8, seed=4)
        stats = ("gram", "frobenius_dots", "gram_apply")
        return compare(
            lambda a, b: ckakd.cka(a, b, backend="triton"), [x, y], [dx_, dy_], [True, True], "triton", stats
        )

    def cka_batch() -> str:
        bstride = limit + 32
        x, dx_ = place((2, n, d), (bstride, d, 1), 0, seed=5)
        y, dy_ = place((2, n, dy), (bstride, dy, 1), n * d + 64, seed=6)
        stats = ("gram", "frobenius_dots", "gram_apply")
        return compare(
            lambda a, b: ckakd.cka(a, b, backend="triton"), [x, y], [dx_, dy_], [True, True], "triton", stats
        )

    runner.run(f"bigoffset/gram fwd+bwd, rows {row} apart ({n}x{d})", gram_rows)
    runner.run(f"bigoffset/gram fwd+bwd, storage offset {limit + 16}", gram_offset)
    runner.run("bigoffset/cka, rows past the limit", cka_rows)
    runner.run("bigoffset/cka batched, batch stride past the limit", cka_batch)

    shape = (2, env.size(8, 3), env.size(16, 4), env.size(16, 4))
    b, c, h, w = shape
    pstride = (limit + 64, h * w, w, 1)
    for reduce in ("channel", "batch", "spatial"):

        def patch(reduce=reduce) -> str:
            f_s, ds = place(shape, pstride, 0, seed=7)
            f_t, dt = place(shape, pstride, c * h * w + 128, seed=8)
            return compare(
                lambda a, t: ckakd.patch_cka_loss(a, t, patch_size=2, reduce=reduce, backend="triton"),
                [f_s, f_t],
                [ds, dt],
                [True, False],
                "triton",
                ("patch_cka_forward", "patch_cka_backward"),
            )

        runner.run(f"bigoffset/patch CKA {reduce}, batch stride {pstride[0]}", patch)
    buf = None  # the closures above hold the cell: free the buffer through it
    if not env.dry:
        torch.cuda.empty_cache()


CHECKS = {"sanitizer-cases": sanitizer_cases, "graphs": graphs, "determinism": determinism, "bigoffset": bigoffset}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen checks; 0 when all passed, 1 when one failed, 2 when they cannot run here."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=(*COMMANDS, "all"), help="which checks")
    p.add_argument("--dry", action="store_true", help="CPU: the checks' logic on CPU tensors, tiny sizes")
    p.add_argument("--autotune", action="store_true", help="keep Triton launch-configuration autotuning on")
    args = p.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (ckakd imports it lazily)
    if not args.autotune:
        os.environ.setdefault("CKAKD_AUTOTUNE", "0")
    import torch

    import ckakd

    env = Env(dry=args.dry)
    if not args.dry and not torch.cuda.is_available():
        print("FAIL gpu_checks: no CUDA device visible (use --dry on a CPU machine)", flush=True)
        return 2
    status = ckakd.backends()
    needed = ("triton", env.ext)
    inactive = [f"{n}: {status[n].detail}" for n in needed if not status[n].active]
    where = "the CPU (dry run)" if args.dry else torch.cuda.get_device_name()
    print(f"gpu_checks on {where}; torch {torch.__version__}; backends: " + "; ".join(str(status[n]) for n in needed))
    if inactive:
        print(f"FAIL gpu_checks: needed backends inactive: {'; '.join(inactive)}", flush=True)
        return 1
    runner = Runner()
    for name in COMMANDS if args.command == "all" else (args.command,):
        CHECKS[name](env, runner)
    print(
        f"{'ALL PASSED' if not runner.failed else 'FAILED'}: {len(runner.results) - runner.failed} passed, "
        f"{runner.failed} failed"
    )
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
