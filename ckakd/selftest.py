"""``ckakd selftest``: is this installation correct and fast here?

Prints the versions (python, torch and its CUDA, triton, the GPU, the C++/CUDA extension) and
``ckakd.backends()``, then checks every public op on every active backend against the float64 formulas
of ``ckakd.reference``: the forward value and the gradient (of a weighted sum, so the incoming gradient is
not 1), fp32 everywhere and on CUDA also fp16 / bf16 for the CKA family, plus a large-offset case
(features + 1000), odd shapes and, on CUDA, shapes that reach the multi-tile / split-K / general-Sinkhorn
paths. Each check records what actually ran (``ckakd.ops.track_dispatch``): a check whose requested
backend fell back to another one fails, whatever its numbers.

On a CUDA machine an inactive fast path (Triton, the CUDA extension) is a failure. Without CUDA the
Triton kernels are checked under the CPU interpreter: the command sets ``TRITON_INTERPRET=1`` itself
before triton is first imported (``ckakd`` imports triton lazily), unless the variable is already set;
with it set to ``0`` Triton is reported inactive, which is no failure on a CPU machine.

``--bench`` also runs the benchmarks of a source checkout (``bench/run_all.py``: the GPU presets on CUDA,
the quick CPU presets otherwise); ``--json PATH`` writes the whole report. Exit status 0 only when every
check passed.

``CKAKD_SELFTEST_ASSUME_CUDA=1`` applies the CUDA machine's rule (inactive fast paths fail) on a machine
without CUDA, tensors staying on the CPU: it is how the rule itself is tested.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Check", "build_checks", "run_checks", "main", "add_selftest_arguments", "run_selftest_from_args"]

ASSUME_CUDA_ENV = "CKAKD_SELFTEST_ASSUME_CUDA"

# (atol, rtol) per dtype, the test-suite's: atol is relative to the largest reference magnitude.
TOLERANCES = {
    torch.float32: (1e-5, 5e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (5e-3, 5e-2),
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
FAST_BACKENDS = ("triton", "cpp", "cuda")
CKA_BACKENDS = ("torch", "triton")
SINKHORN_BACKENDS = ("torch", "cpp", "cuda")


# ---------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def cuda_rules() -> bool:
    """Whether this machine is held to the CUDA rule (a CUDA device, or ``CKAKD_SELFTEST_ASSUME_CUDA=1``)."""
    return torch.cuda.is_available() or _flag(ASSUME_CUDA_ENV)


def prepare_environment() -> str:
    """Enable the Triton interpreter when no CUDA device is visible; must run before triton is imported.

    Returns a sentence saying what was done, for the report.
    """
    if "TRITON_INTERPRET" in os.environ:
        return f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} (set by the caller)"
    if torch.cuda.is_available():
        return "CUDA device present: Triton compiles for the GPU"
    if "triton" in sys.modules:
        return (
            "triton was imported before the self-test could enable its CPU interpreter: Triton is not checked "
            "(run with TRITON_INTERPRET=1)"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return "no CUDA device: set TRITON_INTERPRET=1 so that the Triton kernels run under the CPU interpreter"


def versions() -> dict[str, object]:
    """Python, torch (+ CUDA), triton, GPU and extension versions."""
    from ckakd import __version__, _ext

    out: dict[str, object] = {
        "ckakd": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # ImportError or a broken install
        out["triton"] = f"not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        out["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(i)),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    else:
        out["gpus"] = []
    loaded, detail = _ext.status()
    out["extension"] = {"loaded": loaded, "detail": detail}
    out["env"] = {k: os.environ[k] for k in ("TRITON_INTERPRET", "CKAKD_AUTOTUNE", ASSUME_CUDA_ENV) if k in os.environ}
    return out


# ---------------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """One tensor against its reference: max |a - e| and the allowed atol·scale + rtol·|e|."""

    what: str
    max_abs_err: float
    atol: float
    rtol: float
    scale: float
    ratio: float  # max over elements of |a - e| / (atol·scale + rtol·|e|); passes when <= 1

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0

    def tolerance(self) -> str:
        return f"atol {self.atol:.0e}x{self.scale:.3g} + rtol {self.rtol:.0e}"


def compare(
    what: str, actual: Tensor, expected: Tensor, dtype: torch.dtype, *, value: bool, rtol_mult: float = 1.0
) -> Comparison:
    """Compare ``actual`` with the float64 ``expected`` at ``dtype``'s tolerance.

    Values: atol relative to max(1, max |expected|); gradients: to max |expected| (as the tests do).
    Non-finite or mis-shaped results get an infinite ratio.
    """
    atol, rtol = TOLERANCES[dtype]
    rtol *= rtol_mult
    e = expected.detach().double().cpu()
    a = actual.detach().double().cpu() if actual is not None else None
    emax = e.abs().max().item() if e.numel() else 0.0
    scale = max(1.0, emax) if value else max(emax, 1e-30)
    if a is None or a.shape != e.shape:
        return Comparison(what, math.inf, atol, rtol, scale, math.inf)
    if a.numel() == 0:
        return Comparison(what, 0.0, atol, rtol, scale, 0.0)
    diff = (a - e).abs()
    if not bool(torch.isfinite(a).all()):
        return Comparison(what, math.inf, atol, rtol, scale, math.inf)
    allowed = atol * scale + rtol * e.abs()
    return Comparison(what, diff.max().item(), atol, rtol, scale, (diff / allowed).max().item())


def _weights(out: Tensor, seed: int = 1234) -> Tensor:
    """Incoming gradient for ``out``: -1.7 for a scalar, fixed pseudo-random values otherwise (never all 1)."""
    if out.dim() == 0:
        return torch.full((), -1.7, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64)


def _forward_backward(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor], need_grad: Sequence[bool], weight: Tensor | None = None
) -> tuple[Tensor, list[Tensor | None], Tensor]:
    leaves = [t.detach().clone().requires_grad_(bool(g)) for t, g in zip(inputs, need_grad, strict=True)]
    out = fn(*leaves)
    w = _weights(out) if weight is None else weight
    if any(need_grad):
        (out * w.to(device=out.device, dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad if g else None for t, g in zip(leaves, need_grad, strict=True)], w


_REFERENCE_SCOPE: list[str] = []  # the running check's "op|case" (set by run_check)
_REFERENCE_CACHE: dict[tuple, tuple[Tensor, list[Tensor | None]]] = {}


def value_and_grad_check(
    fast: Callable[..., Tensor],
    ref: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    need_grad: Sequence[bool],
    dtype: torch.dtype,
    names: Sequence[str],
    grad_rtol_mult: float = 1.0,
) -> list[Comparison]:
    """Value and gradients of ``fast(*inputs)`` against ``ref`` on float64 CPU copies of the same inputs.

    The reference result is memoized for the running check's op and case (``_REFERENCE_SCOPE``) and the exact
    input values: the torch and Triton checks of one case share one (slow, Python-loop) reference computation.
    """
    out, grads, w = _forward_backward(fast, inputs, need_grad)
    ref_inputs = [t.detach().double().cpu() for t in inputs]
    key = None
    if _REFERENCE_SCOPE:
        digest = hashlib.sha1()
        for t in (*ref_inputs, w):
            digest.update(str((tuple(t.shape), t.dtype)).encode())
            digest.update(t.contiguous().numpy().tobytes())
        key = (_REFERENCE_SCOPE[-1], tuple(need_grad), digest.hexdigest())
    if key is not None and key in _REFERENCE_CACHE:
        ref_out, ref_grads = _REFERENCE_CACHE[key]
    else:
        ref_out, ref_grads, _ = _forward_backward(ref, ref_inputs, need_grad, weight=w)
        if key is not None:
            if len(_REFERENCE_CACHE) > 256:
                _REFERENCE_CACHE.clear()
            _REFERENCE_CACHE[key] = (ref_out, ref_grads)
    comps = [compare("value", out, ref_out, dtype, value=True)]
    needed = [i for i, need in enumerate(need_grad) if need]
    if len(names) != len(needed):
        raise ValueError(f"names must name the {len(needed)} inputs that need a gradient, got {list(names)}")
    for name, i in zip(names, needed, strict=True):
        comps.append(compare(f"grad {name}", grads[i], ref_grads[i], dtype, value=False, rtol_mult=grad_rtol_mult))
    return comps


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _pair(gen, n: int, dx: int, dy: int, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Correlated (n, dx), (n, dy) features so that CKA sits inside (0, 1)."""
    x = _randn(gen, n, dx)
    y = 0.6 * (x @ _randn(gen, dx, dy)) / dx**0.5 + _randn(gen, n, dy)
    return x + offset, y + offset


def _maps(gen, shape: tuple[int, ...], offset: float = 0.0) -> tuple[Tensor, Tensor]:
    s = _randn(gen, *shape)
    return s + offset, 0.5 * s + _randn(gen, *shape) + offset


def _to(dev: str, dtype: torch.dtype, *ts: Tensor) -> list[Tensor]:
    return [t.to(dtype).to(dev) for t in ts]


def _histograms(gen, b: int, c: int) -> tuple[Tensor, Tensor]:
    return torch.softmax(2 * _randn(gen, b, c), 1), torch.softmax(2 * _randn(gen, b, c), 1)


def _cost(gen, c: int) -> Tensor:
    a = torch.rand(c, c, generator=gen, dtype=torch.float64)
    cost = (a + a.T) / 2
    cost.fill_diagonal_(0)
    return cost


# ---------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One op × backend × device × dtype × case, with the primitives that must run on ``backend``."""

    op: str
    backend: str
    device: str
    dtype: torch.dtype
    case: str
    run: Callable[[], list[Comparison]]
    required: tuple[str, ...] = ()  # fast backends: each must run on it and on no other backend
    env: dict[str, str] = field(default_factory=dict)  # environment for the check only
    skip: str | None = None

    @property
    def name(self) -> str:
        return f"{self.op} {self.backend}/{self.device} {DTYPE_NAMES[self.dtype]} {self.case}"


GRAM = ("gram", "gram_apply")
STATS = ("gram", "frobenius_dots", "gram_apply")
PATCH = ("patch_cka_forward", "patch_cka_backward")
FIXED = ("sinkhorn_fixed_forward", "sinkhorn_fixed_backward")
CONVERGED = ("sinkhorn_converged",)


def _cka_family(backend: str, dev: str, dtype: torch.dtype, case: str, dims: dict) -> list[Check]:
    """Every CKA-family op for one (backend, device, dtype, case); ``dims`` sizes the inputs."""
    import ckakd
    from ckakd import reference as R

    n, dx, dy = dims["cka"]
    offset = dims.get("offset", 0.0)
    maps_shape = dims["maps"]
    patch = dims["patch"]
    ops = dims.get("ops")  # None: all
    checks: list[Check] = []

    def add(op: str, fn: Callable[[], list[Comparison]], required: tuple[str, ...]) -> None:
        if ops is None or op in ops:
            checks.append(Check(op, backend, dev, dtype, case, fn, required))

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(f"{case} {n} {dx} {dy}".encode()))

    def gram_check() -> list[Comparison]:
        (x, _) = _pair(seeded(), n, dx, dy, offset)
        (x,) = _to(dev, dtype, x)
        return value_and_grad_check(
            lambda a: ckakd.centered_gram(a, backend=backend), R.centered_gram, [x], [True], dtype, ["x"]
        )

    add("centered_gram", gram_check, GRAM)

    for mode in ("biased", "unbiased"):

        def hsic_check(mode=mode) -> list[Comparison]:
            x, y = _to(dev, dtype, *_pair(seeded(), n, dx, dy, offset))
            return value_and_grad_check(
                lambda a, b: ckakd.hsic(a, b, mode=mode, backend=backend),
                lambda a, b: R.hsic(a, b, mode=mode),
                [x, y],
                [True, True],
                dtype,
                ["x", "y"],
            )

        add(f"hsic[{mode}]", hsic_check, STATS)

    for mode in ("centered", "debiased", "uncentered"):

        def cka_check(mode=mode) -> list[Comparison]:
            x, y = _to(dev, dtype, *_pair(seeded(), n, dx, dy, offset))
            grad = mode != "uncentered" or not offset
            return value_and_grad_check(
                lambda a, b: ckakd.cka(a, b, mode=mode, backend=backend),
                lambda a, b: R.cka(a, b, mode=mode),
                [x, y],
                [grad, grad],
                dtype,
                ["x", "y"] if grad else [],
            )

        # Uncentered alignment of offset features is ~1 with a gradient that cancels O(1) terms: ill-conditioned
        # in fp32 by definition, so the offset case checks its value only (as the tests do).
        add(f"cka[{mode}]", cka_check, STATS if mode != "uncentered" or not offset else ("gram", "frobenius_dots"))

    def cka_loss_check() -> list[Comparison]:
        _, c, h, w = maps_shape  # n samples of (C, H, W) maps
        gen = seeded()
        x, y = _maps(gen, (n, c, h, w), offset)
        x, y = _to(dev, dtype, x, y[:, : max(1, c - 1)])
        return value_and_grad_check(
            lambda a, t: ckakd.cka_loss(a, t, backend=backend), R.cka_loss, [x, y], [True, False], dtype, ["x"]
        )

    add("cka_loss", cka_loss_check, STATS)

    def rcka_check() -> list[Comparison]:
        gen = seeded()
        _, c, h, w = maps_shape
        k = dims.get("classes", 10)
        x1, y1 = _maps(gen, (n, c, h, w), offset)
        x2, y2 = _pair(gen, n, dx, dy, offset)
        zs, zt = _pair(gen, n, k, k)
        inputs = _to(dev, dtype, x1, x2, zs, y1, y2, zt)

        def fast(a1, a2, s, t1, t2, t):
            return ckakd.rcka_loss([a1, a2], [t1, t2], s, t, alpha=2.0, beta=3.0, backend=backend)

        def ref(a1, a2, s, t1, t2, t):
            return R.rcka_loss([a1, a2], [t1, t2], s, t, alpha=2.0, beta=3.0)

        return value_and_grad_check(
            fast, ref, inputs, [True, True, True, False, False, False], dtype, ["feats_s[0]", "feats_s[1]", "logits_s"]
        )

    add("rcka_loss", rcka_check, STATS)

    reduces = [("channel", "centered"), ("batch", "centered"), ("spatial", "centered"), ("mix", "centered")]
    reduces.append(("channel", "debiased"))
    for reduce, mode in reduces:

        def patch_check(reduce=reduce, mode=mode) -> list[Comparison]:
            gen = seeded()
            if reduce == "mix":  # three levels: batch, spatial, channel reductions
                b, c, h, w = maps_shape
                shapes = [(b, c, h, w), (b, c, max(patch[0] * 2, h * 3 // 4), max(patch[1] * 2, w * 3 // 4))]
                shapes.append((b, c, patch[0] * 2, patch[1] * 2))
            else:
                shapes = [maps_shape]
            pairs = [_maps(gen, s, offset) for s in shapes]
            inputs = _to(dev, dtype, *[p[0] for p in pairs], *[p[1] for p in pairs])
            levels = len(shapes)

            def fast(*ts):
                return ckakd.patch_cka_loss(
                    list(ts[:levels]), list(ts[levels:]), patch_size=patch, reduce=reduce, mode=mode, backend=backend
                )

            def ref(*ts):
                return R.patch_cka_loss(
                    list(ts[:levels]), list(ts[levels:]), patch_size=patch, reduce=reduce, mode=mode
                )

            names = [f"f_s[{i}]" for i in range(levels)]
            return value_and_grad_check(fast, ref, inputs, [True] * levels + [False] * levels, dtype, names)

        label = f"patch_cka_loss[{reduce}]" if mode == "centered" else f"patch_cka_loss[{reduce};{mode}]"
        add(label, patch_check, PATCH)

    def mmd_check() -> list[Comparison]:
        x, y = _to(dev, dtype, *_pair(seeded(), n, dx, dy, offset))
        return value_and_grad_check(
            lambda a, b: ckakd.mmd_loss(a, b, backend=backend), R.mmd_loss, [x, y], [True, False], dtype, ["x"]
        )

    add("mmd_loss", mmd_check, STATS)
    return checks


def _sinkhorn_family(backend: str, dev: str, case: str, dims: dict) -> list[Check]:
    """Sinkhorn (fixed, converged) and WKD-L for one backend and device, fp32."""
    import ckakd
    from ckakd import reference as R

    dtype = torch.float32
    b, c = dims["sinkhorn"]
    ops = dims.get("ops")
    env = dims.get("env", {})
    eps, iters = 0.1, 10
    checks: list[Check] = []

    def add(op: str, fn: Callable[[], list[Comparison]], required: tuple[str, ...]) -> None:
        if ops is None or op in ops:
            checks.append(Check(op, backend, dev, dtype, case, fn, required, env=dict(env)))

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(1000 * b + c)

    def fixed_check() -> list[Comparison]:
        gen = seeded()
        p, q = _histograms(gen, b, c)
        cost = _cost(gen, c)
        (cost_d,) = _to(dev, dtype, cost)
        p, q = _to(dev, dtype, p, q)
        return value_and_grad_check(
            lambda a, t: ckakd.sinkhorn(a, t, cost_d, eps=eps, iters=iters, backend=backend),
            lambda a, t: R.sinkhorn_fixed(a, t, cost.double(), eps=eps, iters=iters),
            [p, q],
            [True, True],
            dtype,
            ["p", "q"],
            grad_rtol_mult=10.0,
        )

    add("sinkhorn[fixed]", fixed_check, FIXED)

    def converged_check() -> list[Comparison]:
        gen = seeded()
        p64, q64 = _histograms(gen, b, c)
        cost = _cost(gen, c)
        ceps = 0.2
        p, q, cost_d = _to(dev, dtype, p64, q64, cost)
        out, (gp, gq), w = _forward_backward(
            lambda a, t: ckakd.sinkhorn(a, t, cost_d, eps=ceps, tol=1e-9, max_iter=5000, backend=backend),
            [p, q],
            [True, True],
        )
        # Value: <P*, C> of the converged plan = the fixed iterations run to convergence (float64 reference).
        pr, qr = (t.double().cpu() for t in (p, q))
        pr, qr = pr / pr.sum(1, keepdim=True), qr / qr.sum(1, keepdim=True)  # exact histograms in float64
        ref_value = R.sinkhorn_fixed(pr, qr, cost, eps=ceps, iters=3000)
        comps = [compare("value", out, ref_value, dtype, value=True)]
        # Gradient: that of the returned value <P*, C> (implicit differentiation); check directional derivatives
        # along zero-sum directions against central differences of the converged reference iterations.
        h = 1e-5
        rows = min(b, 2)
        for name, g, which in (("p", gp, 0), ("q", gq, 1)):
            # zero-sum directions proportional to the histogram, so that the moved one stays positive
            base = (pr, qr)[which][:rows]
            r = _randn(gen, rows, c)
            dirs = base * (r - (base * r).sum(1, keepdim=True))
            got, want = [], []
            for i in range(rows):
                args = [pr[i], qr[i]]

                def objective(step: float, args=args, which=which, d=dirs[i]) -> float:
                    moved = list(args)
                    moved[which] = args[which] + step * d
                    return R.sinkhorn_fixed(moved[0][None], moved[1][None], cost, eps=ceps, iters=3000).item()

                fd = (objective(h) - objective(-h)) / (2 * h)
                got.append((g[i].double().cpu() * dirs[i]).sum())
                want.append(w[i] * fd)
            comps.append(compare(f"grad {name} (directional)", torch.stack(got), torch.stack(want), dtype, value=False))
        return comps

    add("sinkhorn[converged]", converged_check, CONVERGED)

    def wkd_check(with_target: bool) -> list[Comparison]:
        gen = seeded()
        zs, zt = _pair(gen, b, c, c)
        zs, zt = 2 * zs, 2 * zt
        cost = _cost(gen, c)
        target = torch.randint(0, c, (b,), generator=gen)
        temperature, gamma = 4.0, 2.0
        zs_d, zt_d, cost_d = _to(dev, dtype, zs, zt, cost)
        target_d = target.to(dev)

        def fast(s, t):
            return ckakd.wkd_logit_loss(
                s,
                t,
                cost_d,
                temperature=temperature,
                gamma=gamma,
                eps=eps,
                iters=iters,
                target=target_d if with_target else None,
                backend=backend,
            )

        def ref(s, t):
            if with_target:
                return R.wkd_logit_loss_reduced(
                    s, t, target, cost.double(), temperature=temperature, gamma=gamma, eps=eps, iters=iters
                )
            p, q = torch.softmax(s / temperature, 1), torch.softmax(t / temperature, 1)
            return gamma * R.sinkhorn_fixed(p, q, cost.double(), eps=eps, iters=iters).mean()

        return value_and_grad_check(fast, ref, [zs_d, zt_d], [True, False], dtype, ["logits_s"], grad_rtol_mult=10.0)

    add("wkd_logit_loss[target]", lambda: wkd_check(True), FIXED)
    add("wkd_logit_loss[no target]", lambda: wkd_check(False), FIXED)
    return checks


def _wasserstein(dev: str) -> list[Check]:
    """WKD-F and the Gaussian W2 (pure torch, no backend choice), fp32."""
    import ckakd
    from ckakd import reference as R

    dtype = torch.float32
    checks: list[Check] = []

    for cov, grid in (("diag", 2), ("full", 1)):

        def feature_check(cov=cov, grid=grid) -> list[Comparison]:
            gen = torch.Generator().manual_seed(7)
            f_s, f_t = _maps(gen, (2, 4, 6, 6))
            inputs = _to(dev, dtype, f_s, f_t)
            return value_and_grad_check(
                lambda a, b: ckakd.wkd_feature_loss(a, b, grid=grid, mean_weight=2.0, cov=cov),
                lambda a, b: R.wkd_feature_loss(a, b, grid=grid, mean_weight=2.0, cov=cov),
                inputs,
                [True, False],
                dtype,
                ["f_s"],
            )

        checks.append(Check(f"wkd_feature_loss[{cov};grid={grid}]", "torch", dev, dtype, "regular", feature_check))

    for full in (False, True):

        def gaussian_check(full=full) -> list[Comparison]:
            gen = torch.Generator().manual_seed(8)
            bsz, d = 3, 5
            mu1, mu2 = _randn(gen, bsz, d), _randn(gen, bsz, d)
            if full:
                a1, a2 = _randn(gen, bsz, d, d), _randn(gen, bsz, d, d)
                eye = 0.3 * torch.eye(d, dtype=torch.float64)
                cov1, cov2 = a1 @ a1.mT / d + eye, a2 @ a2.mT / d + eye
            else:
                cov1 = torch.rand(bsz, d, generator=gen, dtype=torch.float64) + 0.2
                cov2 = torch.rand(bsz, d, generator=gen, dtype=torch.float64) + 0.2
            inputs = _to(dev, dtype, mu1, cov1, mu2, cov2)

            def ref(m1, c1, m2, c2):
                return torch.stack([R.gaussian_wasserstein(m1[i], c1[i], m2[i], c2[i]) for i in range(m1.shape[0])])

            return value_and_grad_check(
                ckakd.gaussian_wasserstein, ref, inputs, [True, True, True, True], dtype, ["mu1", "cov1", "mu2", "cov2"]
            )

        label = "gaussian_wasserstein[full]" if full else "gaussian_wasserstein[diag]"
        checks.append(Check(label, "torch", dev, dtype, "regular", gaussian_check))
    return checks


# Problem sizes: tiny on the CPU (the Triton interpreter runs every program one after the other), larger
# on CUDA where the multi-tile (n > 64), split-K (large d) and general Sinkhorn (C > 128) paths are reached.
CPU_CASES = {
    "regular": {"cka": (16, 32, 24), "maps": (2, 4, 8, 8), "patch": (2, 2)},
    "odd": {
        "cka": (13, 37, 21),
        "maps": (3, 3, 9, 7),  # resized to (8, 6) for (2, 3) patches
        "patch": (2, 3),
        "classes": 7,
        "ops": (
            "centered_gram",
            "hsic[unbiased]",
            "cka[centered]",
            "cka[debiased]",
            "rcka_loss",
            "patch_cka_loss[channel]",
            "patch_cka_loss[spatial]",
        ),
    },
    "few-features": {"cka": (40, 5, 7), "maps": (2, 4, 8, 8), "patch": (2, 2), "ops": ("cka[centered]", "mmd_loss")},
    "offset+1000": {
        "cka": (24, 40, 30),
        "maps": (2, 4, 8, 8),
        "patch": (2, 2),
        "offset": 1000.0,
        # centered_gram's torch path is not held to the fp32 tolerance at this offset (about 2e-5 of the largest
        # entry, from the fp32 column mean); CKA, HSIC and the losses are.
        "ops": ("cka[centered]", "cka[debiased]", "cka[uncentered]", "hsic[biased]", "patch_cka_loss[channel]"),
    },
}
CUDA_EXTRA_CASES = {
    "multi-tile": {
        "cka": (130, 300, 200),
        "maps": (2, 8, 40, 48),  # 4x4 patches: 120 per problem, the fused kernel's range (the reference loops)
        "patch": (4, 4),
        "ops": ("centered_gram", "cka[centered]", "cka[debiased]", "patch_cka_loss[channel]", "patch_cka_loss[batch]"),
    },
    "split-k": {"cka": (64, 40000, 30000), "maps": (2, 4, 8, 8), "patch": (2, 2), "ops": ("cka[centered]",)},
}
SINKHORN_CASES = {"regular": {"sinkhorn": (6, 10)}, "odd": {"sinkhorn": (3, 7), "ops": ("sinkhorn[fixed]",)}}
SINKHORN_CUDA_CASES = {
    "fused C=100": {"sinkhorn": (16, 100), "ops": ("sinkhorn[fixed]", "wkd_logit_loss[target]")},
    "general C=200": {"sinkhorn": (8, 200), "ops": ("sinkhorn[fixed]", "wkd_logit_loss[target]")},
    "forced general C=64": {
        "sinkhorn": (8, 64),
        "ops": ("sinkhorn[fixed]",),
        "env": {"CKAKD_SINKHORN_CUDA_GENERAL": "1"},
    },
}


def build_checks(device: str, status: dict, *, on_cuda_rules: bool) -> list[Check]:
    """The checks for tensors on ``device`` ('cpu' | 'cuda'), given ``ckakd.backends()`` ``status``.

    Checks of an inactive backend are kept as skipped ones (with the reason): under the CUDA rule the
    separate fast-path check is what fails for them.
    """
    checks: list[Check] = []
    cuda = device == "cuda"
    low = (torch.float16, torch.bfloat16) if cuda else ()

    def why_inactive(backend: str, dev: str) -> str | None:
        b = status[backend]
        if not b.active:
            return f"{backend} inactive: {b.detail}"
        if backend == "triton" and dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "triton on CPU tensors needs TRITON_INTERPRET=1"
        if backend == "cuda" and dev != "cuda":
            return "the CUDA extension runs on CUDA tensors"
        return None

    def extend(new: list[Check], reason: str | None) -> None:
        for c in new:
            c.skip = reason
        checks.extend(new)

    for backend in CKA_BACKENDS:
        reason = why_inactive(backend, device)
        cases = dict(CPU_CASES, **(CUDA_EXTRA_CASES if cuda else {}))
        for case, dims in cases.items():
            extend(_cka_family(backend, device, torch.float32, case, dims), reason)
        for dtype in low:
            extend(_cka_family(backend, device, dtype, "regular", CPU_CASES["regular"]), reason)

    sinkhorn_targets = [("torch", device), ("cuda", "cuda")] if cuda else [("torch", "cpu")]
    sinkhorn_targets.append(("cpp", "cpu"))
    for backend, dev in sinkhorn_targets:
        reason = why_inactive(backend, dev)
        cases = dict(SINKHORN_CASES, **(SINKHORN_CUDA_CASES if dev == "cuda" else {}))
        for case, dims in cases.items():
            extend(_sinkhorn_family(backend, dev, case, dims), reason)
    extend(_wasserstein(device), None)
    return checks


# ---------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, restoring the previous values (or absence) afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def dispatch_problems(check: Check, ran: dict[tuple[str, str], int]) -> list[str]:
    """Why the recorded dispatches do not show ``check.backend`` doing the work (empty: they do)."""
    backend = check.backend
    if backend == "torch":
        if not check.required and not ran:
            return []  # pure-torch functions without a dispatch point
        others = sorted({f"{op} on {b}" for (op, b), k in ran.items() if b != "torch" and k})
        problems = [f"expected only torch, but {', '.join(others)} ran"] if others else []
        if not any(b == "torch" for (_, b) in ran):
            problems.append("no primitive ran on torch")
        return problems
    problems = []
    for op in check.required:
        if not ran.get((op, backend)):
            elsewhere = sorted(b for (o, b), k in ran.items() if o == op and k)
            where = f" (ran on {', '.join(elsewhere)}: a fallback)" if elsewhere else " (did not run)"
            problems.append(f"{op} did not run on {backend}{where}")
        else:
            fell_back = sorted(b for (o, b), k in ran.items() if o == op and b != backend and k)
            if fell_back:
                problems.append(f"{op} also ran on {', '.join(fell_back)} (a fallback)")
    return problems


def run_check(check: Check) -> dict:
    """Run one check; the record that goes into the report."""
    from ckakd.ops import track_dispatch

    record: dict = {
        "name": check.name,
        "op": check.op,
        "backend": check.backend,
        "device": check.device,
        "dtype": DTYPE_NAMES[check.dtype],
        "case": check.case,
        "required_dispatch": list(check.required),
    }
    if check.skip:
        record.update(status="skip", message=check.skip, seconds=0.0, comparisons=[], dispatch={})
        return record
    start = time.perf_counter()
    comps: list[Comparison] = []
    problems: list[str] = []
    ran: dict = {}
    _REFERENCE_SCOPE.append(f"{check.op}|{check.case}")
    try:
        with environment(check.env), track_dispatch() as counter:
            comps = check.run()
            if check.device == "cuda":
                torch.cuda.synchronize()
        ran = dict(counter)
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        problems.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{where}")
    else:
        problems += dispatch_problems(check, ran)
    finally:
        _REFERENCE_SCOPE.pop()
    for c in comps:  # empty when the check raised
        if not c.ok:
            problems.append(f"{c.what}: max error {c.max_abs_err:.3g} exceeds {c.tolerance()} ({c.ratio:.3g}x)")
    worst = max(comps, key=lambda c: c.ratio, default=None)
    record.update(
        status="fail" if problems else "pass",
        message="; ".join(problems),
        seconds=round(time.perf_counter() - start, 4),
        comparisons=[
            {
                "what": c.what,
                "max_abs_err": c.max_abs_err,
                "atol": c.atol,
                "rtol": c.rtol,
                "scale": c.scale,
                "ratio": c.ratio,
                "ok": c.ok,
            }
            for c in comps
        ],
        max_err=worst.max_abs_err if worst else None,
        tol=worst.tolerance() if worst else None,
        ratio=worst.ratio if worst else None,
        dispatch={f"{op}/{b}": k for (op, b), k in sorted(ran.items())},
    )
    return record


def fast_path_records(status: dict, device: str, on_cuda_rules: bool) -> list[dict]:
    """Under the CUDA rule, one record per fast path (triton, cuda): an inactive one fails, saying why."""
    if not on_cuda_rules:
        return []
    out = []
    for name, consequence in (
        ("triton", "the CKA family (cka, hsic, centered_gram, the CKA losses, patch CKA) would run on the torch path"),
        ("cuda", "Sinkhorn / WKD-L would run on the pure-torch iterations"),
    ):
        b = status[name]
        ok = b.active
        out.append(
            {
                "name": f"fast path {name} active",
                "op": "backends",
                "backend": name,
                "device": device,
                "dtype": "-",
                "case": "-",
                "status": "pass" if ok else "fail",
                "message": "" if ok else f"{name} is inactive on this CUDA machine ({b.detail}): {consequence}",
                "seconds": 0.0,
                "comparisons": [],
                "dispatch": {},
            }
        )
    return out


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="check", dynamic_ncols=True, leave=False)


def run_checks(checks: Sequence[Check], *, progress: bool = True) -> list[dict]:
    """Run ``checks`` in order with a progress bar (tqdm, on stderr, when installed)."""
    bar = _progress(len(checks), progress)
    _REFERENCE_CACHE.clear()  # reference results are shared within one run only
    records = []
    for check in checks:
        if bar is not None:
            bar.set_description_str(check.name[:60])
        records.append(run_check(check))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return records


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == math.inf:
        return "inf"
    return f"{v:.2e}"


def format_table(records: Sequence[dict]) -> str:
    """The final table: one line per check."""
    header = ("check", "result", "max err", "tolerance", "err/tol", "ms")
    rows = [
        (
            r["name"],
            r["status"].upper(),
            _fmt(r.get("max_err")),
            r.get("tol") or "-",
            "-" if r.get("ratio") is None else f"{r['ratio']:.3f}",
            f"{1000 * r['seconds']:.0f}",
        )
        for r in records
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _bench_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "bench"


def run_bench(device: str, out: str | None) -> dict:
    """The benchmarks of a source checkout: GPU presets on CUDA, the quick CPU presets otherwise."""
    bench = _bench_dir()
    record = {
        "name": "benchmarks (bench/run_all.py)",
        "op": "bench",
        "backend": "auto",
        "device": device,
        "dtype": "fp32",
        "case": "-",
        "comparisons": [],
        "dispatch": {},
    }
    if not (bench / "run_all.py").is_file():
        record.update(
            status="skip",
            seconds=0.0,
            message=f"--bench needs a source checkout: {bench / 'run_all.py'} is not there (a non-editable install)",
        )
        return record
    argv = ["--device", "cuda"] if device == "cuda" else ["--quick", "--device", "cpu"]
    if out:
        argv += ["--out", out]
    start = time.perf_counter()
    sys.path.insert(0, str(bench))
    sys.modules.pop("run_all", None)  # this checkout's, not one imported from elsewhere
    try:
        import run_all

        rc = run_all.main(argv)
        message = "" if rc == 0 else f"bench/run_all.py {' '.join(argv)} exited {rc} (a value check failed)"
    except SystemExit as exc:  # argument errors
        rc, message = exc.code, f"bench/run_all.py {' '.join(argv)} stopped: {exc}"
    except Exception as exc:
        rc, message = 1, f"bench/run_all.py {' '.join(argv)} failed: {type(exc).__name__}: {exc}"
    finally:
        sys.path.remove(str(bench))
    record.update(status="pass" if rc == 0 else "fail", message=message, seconds=round(time.perf_counter() - start, 2))
    record["argv"] = argv
    return record


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def add_selftest_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ckakd selftest`` options."""
    p.add_argument("--json", metavar="PATH", default=None, help="write the full report (JSON) to PATH")
    p.add_argument("--bench", action="store_true", help="also run the benchmarks (bench/run_all.py of a checkout)")
    p.add_argument("--bench-out", metavar="DIR", default=None, help="output folder of --bench (default bench/out)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="tensors' device (default: cuda if present)"
    )
    p.add_argument(
        "--only",
        metavar="TEXT[,TEXT]",
        default=None,
        help="run only the checks whose name contains one of these (e.g. cka,sinkhorn); the rest are not run",
    )
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--autotune",
        action="store_true",
        help="keep per-shape autotuning of the Triton launch configurations (default: CKAKD_AUTOTUNE=0, the first "
        "configuration, which keeps the run short)",
    )


def _print_header(info: dict, status: dict, note: str) -> None:
    print(f"ckakd {info['ckakd']} self-test")
    print(f"  python     {info['python']} ({info['platform']})")
    print(f"  torch      {info['torch']} (CUDA {info['torch_cuda']}, device available: {info['cuda_available']})")
    print(f"  triton     {info['triton']}")
    for g in info["gpus"]:
        print(f"  gpu        {g['name']}, {g['capability']}, {g['memory_gib']} GiB")
    if not info["gpus"]:
        print("  gpu        none")
    print(f"  extension  {info['extension']['detail']}")
    print(f"  note       {note}")
    print("backends:")
    for b in status.values():
        print(f"  {b}")


def main(argv: Sequence[str] | None = None) -> int:
    """``ckakd selftest`` as a function: 0 when every check passed."""
    p = argparse.ArgumentParser(prog="ckakd selftest", description=__doc__.splitlines()[0])
    add_selftest_arguments(p)
    return run_selftest_from_args(p.parse_args(argv))


def run_selftest_from_args(args: argparse.Namespace) -> int:
    """Run the self-test with parsed ``args`` (see :func:`add_selftest_arguments`)."""
    note = prepare_environment()  # before anything imports triton (TRITON_INTERPRET stays: triton reads it once)
    autotune_before = os.environ.get("CKAKD_AUTOTUNE")
    if not args.autotune:
        os.environ.setdefault("CKAKD_AUTOTUNE", "0")
    try:
        return _run_selftest(args, note)
    finally:  # a caller's process keeps its own autotuning setting
        if autotune_before is None:
            os.environ.pop("CKAKD_AUTOTUNE", None)
        else:
            os.environ["CKAKD_AUTOTUNE"] = autotune_before


def _run_selftest(args: argparse.Namespace, note: str) -> int:
    import ckakd

    if args.device == "cuda" and not torch.cuda.is_available():
        print("ckakd selftest: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda_rules = cuda_rules()
    status = ckakd.backends()
    info = versions()
    checks = build_checks(device, status, on_cuda_rules=on_cuda_rules)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        checks = [c for c in checks if any(w in c.name for w in wanted)]
        if not checks:
            print(f"ckakd selftest: error: --only {args.only!r} matches no check (see --list)", file=sys.stderr)
            return 2
    if args.list:
        for c in checks:
            print(c.name + (f"   [skip: {c.skip}]" if c.skip else ""))
        return 0
    _print_header(info, status, note)
    start = time.perf_counter()
    records = fast_path_records(status, device, on_cuda_rules)
    records += run_checks(checks, progress=not args.no_progress)
    if args.bench:
        records.append(run_bench(device, args.bench_out))
    total = time.perf_counter() - start
    counts = {s: sum(r["status"] == s for r in records) for s in ("pass", "fail", "skip")}
    ok = counts["fail"] == 0
    print()
    print(format_table(records))
    print()
    failures = [r for r in records if r["status"] == "fail"]
    for r in failures:
        print(f"FAIL {r['name']}: {r['message']}")
    skipped = sorted({r["message"] for r in records if r["status"] == "skip"})
    for why in skipped:
        print(f"skipped ({sum(r['message'] == why for r in records if r['status'] == 'skip')}): {why}")
    print(
        f"{'PASSED' if ok else 'FAILED'}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
        f"in {total:.1f} s on {device}" + (" (CUDA rule)" if on_cuda_rules else "")
    )
    if args.json:
        report = {
            "versions": info,
            "device": device,
            "cuda_rule": on_cuda_rules,
            "note": note,
            "backends": {n: {"active": b.active, "detail": b.detail} for n, b in status.items()},
            "checks": records,
            "ops": sorted({r["op"] for r in records}),
            "summary": {**counts, "ok": ok, "seconds": round(total, 2)},
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"report written to {path}")
    return 0 if ok else 1


if __name__ == "__main__":  # python -m ckakd.selftest
    raise SystemExit(main())
