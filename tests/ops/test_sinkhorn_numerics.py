"""Numerics of ``ckakd.sinkhorn``: the converged mode at small ε (vs POT's exact LP and log-domain Sinkhorn), its
value/gradient consistency (finite differences, w.r.t. p, q and the cost), the fixed mode's cost gradient and its
underflow warning, half-precision histograms, empty batches, non-convergence."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

import ckakd
from ckakd.ops import sinkhorn as S
from ckakd.ops import sinkhorn_converged, sinkhorn_fixed

BACKENDS = ["torch", "cpp"]
F64, F32 = torch.float64, torch.float32


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param != "torch":
        from ckakd import _ext

        if _ext.load() is None:
            pytest.skip(f"extension not available: {_ext.status()[1]}")
    return request.param


def _problem(kind: str, b: int = 3, c: int = 6, seed: int = 0):
    """(p, q, cost) in float64, costs in [0, 1] with a zero diagonal. ``far``: p lives on the first half of the
    classes, q on the second, and every off-diagonal cost is in [0.76, 1]: all mass moves over costs with
    C/ε > 745 at ε = 1e-3, where exp(-C/ε) underflows in float64."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(c, c, generator=gen, dtype=F64)
    cost = (a + a.T) / 2
    if kind == "far":
        cost = 0.76 + 0.24 * cost
    cost.fill_diagonal_(0)
    p = F.softmax(torch.randn(b, c, generator=gen, dtype=F64) * 2, 1)
    q = F.softmax(torch.randn(b, c, generator=gen, dtype=F64) * 2, 1)
    if kind == "far":
        h = c // 2
        p[:, h:] = 0
        q[:, :h] = 0
        p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    return p, q, cost


@functools.cache
def _pot_values(kind: str, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """POT on ``_problem(kind)`` rounded to ``dtype``, as float64 unit-mass histograms: (⟨P, C⟩ of
    ``sinkhorn_log``'s plan, ``emd2``) per row (computed once for both backends)."""
    ot = pytest.importorskip("ot")
    p, q, c = (t.to(dtype).double() for t in _problem(kind))
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    logs, exact = [], []
    for i in range(p.shape[0]):
        a, b, m = p[i].numpy(), q[i].numpy(), c.numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # POT's log(0) of the zero-mass entries
            plan = ot.sinkhorn(a, b, m, eps, method="sinkhorn_log", stopThr=1e-12, numItermax=300_000)
        logs.append(float((plan * m).sum()))
        exact.append(float(ot.emd2(a, b, m)))
    return torch.tensor(logs, dtype=F64), torch.tensor(exact, dtype=F64)


# ------------------------------------------------------------------------------- converged: small eps

SMALL_EPS_CASES = [("random", 1e-1), ("random", 1e-2), ("random", 1e-3), ("random", 1e-4), ("far", 1e-3), ("far", 1e-4)]
# per dtype: |value - POT sinkhorn_log| (the solver runs in float64 on the dtype's rounded inputs; a float32 value
# is rounded once more), and the slack on top of the entropic bias bound vs the exact LP
VALUE_ATOL = {F64: 1e-10, F32: 2e-7}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind,eps", SMALL_EPS_CASES, ids=[f"{k}-{e:g}" for k, e in SMALL_EPS_CASES])
def test_converged_value_matches_pot_down_to_eps_1e4(backend, kind, eps, dtype):
    """⟨P*, C⟩ agrees with POT's log-domain Sinkhorn at every ε and tends to the exact LP (emd2): 0 <= value −
    OT <= ε·log(C²) (the entropic bias). Before: formed through exp(−C/ε)·C, far too small at ε = 1e-3 on ``far``
    and ~0 (off by 0.33) at ε = 1e-4, while reporting convergence."""
    p, q, cost = (t.to(dtype) for t in _problem(kind))
    tol = 1e-12 if dtype == F64 else 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no "not converged" warning
        ours = ckakd.sinkhorn(p, q, cost, eps=eps, tol=tol, max_iter=100_000, backend=backend)
    assert ours.dtype == dtype and ours.shape == (3,)
    log_value, exact = _pot_values(kind, eps, dtype)
    torch.testing.assert_close(ours.double(), log_value, atol=VALUE_ATOL[dtype], rtol=0)
    bias = eps * 2 * torch.log(torch.tensor(6.0, dtype=F64))
    gap = ours.double() - exact
    assert (gap >= -VALUE_ATOL[dtype]).all() and (gap <= bias + VALUE_ATOL[dtype]).all(), (gap, bias)


def test_converged_small_eps_entropic_value_and_backends_agree():
    """At ε = 1e-4 on ``far`` (every sample on the exact log-sum-exp path) the two backends give bitwise equal
    values and potentials, and the entropic value is below the transport value by ε·H(P*) > 0."""
    pytest.importorskip("ckakd._C")
    p, q, cost = _problem("far")
    eps = 1e-4
    out = {b: S.sinkhorn_converged(p, q, cost, eps, 1e-12, 100_000, b) for b in BACKENDS}
    for a, b in zip(out["torch"], out["cpp"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    transport, entropic = out["torch"][:2]
    assert (entropic < transport).all() and (transport - entropic < eps * 2 * 1.8).all()


def test_converged_lossy_product_is_detected_without_nonfinite_values():
    """The shifted product of a sample can lose its dominant terms to underflow while staying finite: those
    samples move to the exact path (before, only non-finite ones did)."""
    p, q, cost = _problem("random", seed=0)
    sol = sinkhorn_converged.converged_potentials(p, q, cost, 1e-4, 1e-12, 100_000)
    assert sorted(sol.exact.tolist()) == [0, 1, 2]
    sol = sinkhorn_converged.converged_potentials(p, q, cost, 0.05, 1e-12, 100_000)
    assert sol.exact.numel() == 0  # ordinary ε: the fast product throughout


# ---------------------------------------------------------------------- converged: value vs gradient


@pytest.mark.parametrize("value", ["transport", "entropic"])
@pytest.mark.parametrize("eps", [0.3, 0.05])
def test_converged_gradient_is_derivative_of_returned_value(backend, value, eps):
    """gradcheck (float64, central differences of the returned value) w.r.t. p, q and the cost, in every
    direction (the histograms are rescaled to unit mass inside, so off-simplex directions are defined too).
    Before: the transport value was returned with the entropic objective's gradient (off by 2-190%) and the cost
    got no gradient."""
    p, q, cost = _problem("random", b=2, c=5, seed=1)
    cost = cost + 0.05  # positive entries everywhere: log C is smooth
    inputs = [t.clone().requires_grad_() for t in (p, q, cost)]

    def fn(a, b, c):
        return ckakd.sinkhorn(a, b, c, eps=eps, tol=1e-14, max_iter=100_000, backend=backend, value=value)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_converged_transport_and_entropic_gradients_differ():
    """The two values have different gradients (so the test above tells them apart): by > 10% here."""
    p, q, cost = _problem("random", b=1, c=5, seed=1)
    grads = {}
    for value in ("transport", "entropic"):
        leaf = p.clone().requires_grad_()
        out = ckakd.sinkhorn(leaf, q, cost, eps=0.2, tol=1e-13, max_iter=10_000, backend="torch", value=value)
        out.sum().backward()
        grads[value] = leaf.grad
    diff = (grads["transport"] - grads["entropic"]).norm() / grads["transport"].norm()
    assert diff > 0.1, diff


def test_converged_gradients_zero_mass_and_backends(backend):
    """Zero-mass entries get a zero gradient; ⟨∂/∂p, p⟩ = 0 (scale invariance); the cost gradient of the
    transport value agrees between backends and with a one-sided difference at ε = 1e-3 on ``far``."""
    p, q, cost = _problem("far", b=2, c=6)
    eps = 1e-3
    leaves = [t.clone().requires_grad_() for t in (p, q, cost)]
    out = ckakd.sinkhorn(*leaves, eps=eps, tol=1e-12, max_iter=100_000, backend=backend)
    out.sum().backward()
    gp, gq, gc = (t.grad for t in leaves)
    assert (gp[p == 0] == 0).all() and (gq[q == 0] == 0).all()
    torch.testing.assert_close((gp * p).sum(1), torch.zeros(2, dtype=F64), atol=1e-10, rtol=0)
    assert torch.isfinite(gc).all()
    h = 1e-7  # the transport value is linear in the cost of a route that carries mass, to first order
    d = torch.zeros_like(cost)
    d[0, 3] = d[3, 0] = 1.0
    bumped = ckakd.sinkhorn(p, q, cost + h * d, eps=eps, tol=1e-12, max_iter=100_000, backend=backend)
    fd = (bumped - out.detach()).sum() / h
    assert (gc * d).sum().item() == pytest.approx(fd.item(), rel=1e-3, abs=1e-6)


def test_value_argument_checks():
    p, q, cost = _problem("random", b=1, c=3)
    with pytest.raises(ValueError, match="value must be one of 'transport', 'entropic'"):
        ckakd.sinkhorn(p, q, cost, tol=1e-6, value="primal")
    with pytest.raises(ValueError, match=r"value='entropic' needs the converged mode \(tol=...\)"):
        ckakd.sinkhorn(p, q, cost, value="entropic")


def test_converged_warns_when_not_converged():
    p, q, cost = _problem("random", b=2, c=5)
    with pytest.warns(RuntimeWarning, match=r"not converged after max_iter=5 iterations"):
        ckakd.sinkhorn(p, q, cost, eps=0.01, tol=1e-12, max_iter=5, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckakd.sinkhorn(p, q, cost, eps=0.1, tol=1e-9, max_iter=10_000, backend="torch")


# ------------------------------------------------------------------------------------------ fixed mode


def test_fixed_cost_gradient_gradcheck(backend):
    """A cost with requires_grad gets the exact gradient through the unrolled iterations (before: None)."""
    p, q, cost = _problem("random", b=3, c=5, seed=2)
    inputs = [t.clone().requires_grad_() for t in (p, q, cost)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: ckakd.sinkhorn(a, b, c, eps=0.1, iters=4, backend=backend), inputs, eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_fixed_cost_gradient_backends_agree(dtype):
    pytest.importorskip("ckakd._C")
    p, q, cost = (t.to(dtype) for t in _problem("random", b=4, c=7, seed=3))
    grads = {}
    for b in BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (p, q, cost)]
        out = ckakd.sinkhorn(*leaves, eps=0.05, iters=10, backend=b)
        (out * torch.arange(1.0, 5.0, dtype=dtype)).sum().backward()
        grads[b] = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(grads["torch"], grads["cpp"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12 if dtype == F64 else 1e-5, rtol=1e-5)


@pytest.fixture
def fresh_underflow_registry(monkeypatch):
    monkeypatch.setattr(sinkhorn_fixed, "_UNDERFLOW_WARNED", set())


def _underflow_warnings(fn) -> int:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return sum("underflows" in str(w.message) for w in seen if issubclass(w.category, RuntimeWarning))


def test_fixed_mode_warns_once_when_kernel_underflows(backend, fresh_underflow_registry):
    """At ε = 1e-3 exp(-C/ε) underflows in float32 (C/ε up to 1000 > 87): WKD's value is kept (≈ 0: only the
    diagonal is left) but one warning says so, also for a new cost tensor and a cost that requires grad; none
    at the default ε, and none in float64 at ε = 0.05 (C/ε <= 20)."""
    p, q, cost = (t.float() for t in _problem("random", b=2, c=6))

    def run(c, eps):
        return ckakd.sinkhorn(p, q, c, eps=eps, iters=10, backend=backend)

    assert _underflow_warnings(lambda: run(cost, 0.05)) == 0
    assert _underflow_warnings(lambda: run(cost, 0.05)) == 0
    assert _underflow_warnings(lambda: run(cost.double(), 0.05)) == 0
    n = _underflow_warnings(lambda: [run(cost, 1e-3), run(cost, 1e-3), run(cost.clone(), 1e-3)])
    assert n == 1
    value = run(cost.clone().requires_grad_(), 1e-3)
    assert value.abs().max() < 1e-6  # WKD's definition at this ε: unchanged
    assert _underflow_warnings(lambda: run(cost.clone().requires_grad_(), 1e-3)) == 0  # once per (ε, dtype)
    assert _underflow_warnings(lambda: run(cost.clone().requires_grad_(), 2e-3)) == 1


def test_solver_warnings_point_at_the_callers_line(fresh_underflow_registry):
    """The underflow warning (cached kernels, a cost that requires grad, WKD-L) and the not-converged warning are
    attributed to the line that called ckakd, not to a line inside it."""
    p, q, cost = (t.float() for t in _problem("random", b=2, c=6))
    zs, zt = torch.randn(2, 6), torch.randn(2, 6)
    calls = [
        lambda: ckakd.sinkhorn(p, q, cost, eps=1e-3),
        lambda: ckakd.sinkhorn(p, q, cost.clone().requires_grad_(), eps=2e-3),
        lambda: ckakd.wkd_logit_loss(zs, zt, cost, eps=4e-3),
        lambda: ckakd.sinkhorn(p.double(), q.double(), cost.double(), eps=0.01, tol=1e-12, max_iter=5),
    ]
    for call in calls:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        assert len(seen) == 1 and issubclass(seen[0].category, RuntimeWarning), [str(w.message) for w in seen]
        assert seen[0].filename == __file__, (seen[0].filename, str(seen[0].message))


# --------------------------------------------------------------------------- input: half precision, empty


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_softmax_batches_are_accepted(backend, dtype):
    """Softmax outputs rounded to bf16 / fp16 sum to 1 only within their rounding (bf16: up to ~4e-3): all 200
    batches pass validation (before: 150 of 200 bf16 batches failed the 1e-3 check) and give finite values close
    to the float32 ones; genuinely unnormalized rows are still refused."""
    cost = _problem("random", c=100)[2].float()
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(200):
        z = torch.randn(8, 100, generator=gen) * 3
        p, q = F.softmax(z, 1).to(dtype), F.softmax(z.roll(1, 0), 1).to(dtype)
        worst = max(worst, (p.double().sum(1) - 1).abs().max().item())
        out = ckakd.sinkhorn(p, q, cost, eps=0.05, backend=backend)
        assert out.dtype == F32 and torch.isfinite(out).all()
    if dtype == torch.bfloat16:
        assert worst > 1e-3  # the old check would have refused this
    ref = ckakd.sinkhorn(p.float() / p.float().sum(1, keepdim=True), q.float() / q.float().sum(1, keepdim=True), cost)
    torch.testing.assert_close(out, ref, atol=5e-2 * ref.abs().max().item(), rtol=0)
    bad = p.clone()
    bad[0] *= 1.05
    with pytest.raises(ValueError, match="rows of p must sum to 1"):
        ckakd.sinkhorn(bad, q, cost)
    with pytest.raises(ValueError, match="rows of q must sum to 1"):
        ckakd.sinkhorn(p, q * 0.97, cost, tol=1e-6)


@pytest.mark.parametrize("tol", [None, 1e-9], ids=["fixed", "converged"])
def test_empty_batch(backend, tol):
    """A batch of 0 histograms gives shape (0,) (and a backward that runs); 0 classes is a clear error."""
    cost = _problem("random", c=4)[2]
    p = torch.zeros(0, 4, dtype=F64, requires_grad=True)
    out = ckakd.sinkhorn(p, p.detach(), cost, tol=tol, backend=backend)
    assert out.shape == (0,) and out.dtype == F64
    out.sum().backward()
    assert p.grad is None or p.grad.shape == (0, 4)
    with pytest.raises(ValueError, match=r"at least one class \(C >= 1\)"):
        ckakd.sinkhorn(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(0, 0), tol=tol, backend=backend)
    with pytest.raises(ValueError, match=r"at least one class \(C >= 1\)"):
        ckakd.sinkhorn(torch.zeros(0), torch.zeros(0), torch.zeros(0, 0), tol=tol, backend=backend)
