"""Sinkhorn and WKD-L: fixed iterations vs a float64 autograd reference, target separation vs per-sample
reduced costs, converged mode vs POT, oracles, gradients, bad input."""

from __future__ import annotations

import collections
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import ckakd
from ckakd import reference as R
from tests.aten_calls import AtenCallsInsideCkakd
from tests.conftest import TOLERANCES


def _random_cost(c: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(c, c, generator=gen, dtype=torch.float64)
    cost = (a + a.T) / 2
    cost.fill_diagonal_(0)
    return (cost + 1e-8).to(dtype)


def _histograms(b: int, c: int, scale: float = 2.0, seed: int = 1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=gen, dtype=torch.float64) * scale
    zt = torch.randn(b, c, generator=gen, dtype=torch.float64) * scale
    return F.softmax(zs, 1).to(dtype), F.softmax(zt, 1).to(dtype)


def _value_and_grads(fn, p, q, weight):
    p = p.detach().clone().requires_grad_(True)
    q = q.detach().clone().requires_grad_(True)
    out = fn(p, q)
    (out * weight).sum().backward()
    return out.detach(), p.grad, q.grad


BACKENDS = ["torch", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param != "torch":
        from ckakd import _ext

        if _ext.load() is None:
            pytest.skip(f"extension not available: {_ext.status()[1]}")
    return request.param


@pytest.mark.parametrize("shape", [(1, 2), (3, 7), (8, 100)])
@pytest.mark.parametrize("iters", [1, 10])
@pytest.mark.parametrize("eps", [0.05, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixed_matches_reference(backend, shape, iters, eps, dtype):
    b, c = shape
    p, q = _histograms(b, c, dtype=dtype)
    cost = _random_cost(c, dtype=dtype)
    w = torch.randn(b, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, gp, gq = _value_and_grads(
        lambda a, b_: ckakd.sinkhorn(a, b_, cost, eps=eps, iters=iters, backend=backend), p, q, w.to(dtype)
    )
    ref, rp, rq = _value_and_grads(
        lambda a, b_: R.sinkhorn_fixed(a, b_, cost.double(), eps=eps, iters=iters), p.double(), q.double(), w
    )
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol * ref.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(gp.double(), rp, atol=atol * rp.abs().max().item(), rtol=rtol * 10)
    torch.testing.assert_close(gq.double(), rq, atol=atol * rq.abs().max().item(), rtol=rtol * 10)


def test_gradcheck_fixed(backend):
    p, q = _histograms(3, 6)
    cost = _random_cost(6)
    p.requires_grad_(True)
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ckakd.sinkhorn(a, b, cost, eps=0.1, iters=5, backend=backend, validate=False), (p, q)
    )


@pytest.mark.parametrize("iters", [1, 4])
def test_student_only_gradient_skips_nothing_it_needs(backend, iters):
    """q without grad (the teacher) takes the shorter backward; grad_p must not change."""
    p, q = _histograms(5, 9)
    cost = _random_cost(9)
    p_both, q_both = p.clone().requires_grad_(), q.clone().requires_grad_()
    ckakd.sinkhorn(p_both, q_both, cost, eps=0.1, iters=iters, backend=backend).sum().backward()
    p_only = p.clone().requires_grad_()
    ckakd.sinkhorn(p_only, q, cost, eps=0.1, iters=iters, backend=backend).sum().backward()
    torch.testing.assert_close(p_only.grad, p_both.grad, rtol=1e-13, atol=0)
    rp = p.double().requires_grad_()
    R.sinkhorn_fixed(rp, q.double(), cost.double(), eps=0.1, iters=iters).sum().backward()
    torch.testing.assert_close(p_only.grad, rp.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a: ckakd.sinkhorn(a, q, cost, eps=0.1, iters=iters, backend=backend, validate=False),
        (p.clone().requires_grad_(),),
    )


def _fixed_ops(backend: str):
    """The fixed-mode (forward, backward) ops of ``backend``: the extension's, or their torch twins."""
    ops = _ext_or_skip() if backend != "torch" else torch.ops.ckakd
    suffix = "_torch" if backend == "torch" else ""
    return getattr(ops, "sinkhorn_fixed_forward" + suffix), getattr(ops, "sinkhorn_fixed_backward" + suffix)


def test_opcheck_fixed_op(backend):
    """Schema, fakes and the registered autograd of the fixed-mode ops (with and without a gradient for q)."""
    forward, backward = _fixed_ops(backend)
    p, q = _histograms(3, 5)
    cost = _random_cost(5)
    K = torch.exp(-cost / 0.1)
    u0 = torch.full_like(p, 0.2)
    torch.library.opcheck(forward.default, (p.requires_grad_(), q.requires_grad_(), K, K * cost, u0, 4))
    torch.library.opcheck(forward.default, (p, q.detach(), K, K * cost, u0, 4))
    out = forward(p.detach(), q.detach(), K, K * cost, u0, 4)
    g = torch.randn(3, dtype=torch.float64)
    for need_q in (True, False):
        torch.library.opcheck(backward.default, (g, p.detach(), q.detach(), K, K * cost, *out[1:], need_q))


def test_target_separation_equals_per_sample_reduced_costs(backend):
    """Zero mass for the target class in the shared problem == the public code's (C-1)x(C-1) problems."""
    b, c, temp = 6, 9, 3.0
    gen = torch.Generator().manual_seed(7)
    zs = torch.randn(b, c, generator=gen, dtype=torch.float64) * 2
    zt = torch.randn(b, c, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, c, (b,), generator=gen)
    cost = _random_cost(c)

    def ours(a, t):
        return ckakd.wkd_logit_loss(a, t, cost, temperature=temp, target=y, gamma=7.0, backend=backend)

    def public(a, t):
        return R.wkd_logit_loss_reduced(a, t, y, cost, temperature=temp, gamma=7.0)

    out, gs, gt = _value_and_grads(ours, zs, zt, torch.tensor(1.0, dtype=torch.float64))
    ref, rs, rt = _value_and_grads(public, zs, zt, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(gs, rs, atol=1e-10, rtol=1e-8)
    # the teacher side only enters through the WD term (the target term detaches it)
    torch.testing.assert_close(gt, rt, atol=1e-10, rtol=1e-8)
    out32 = ckakd.wkd_logit_loss(
        zs.float(), zt.float(), cost.float(), temperature=temp, target=y, gamma=7.0, backend=backend
    )
    assert abs(out32.item() - ref.item()) < 3e-6 * max(1.0, abs(ref.item()))


def test_wkd_logit_loss_without_target(backend):
    zs, zt = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    cost = _random_cost(10)
    loss = ckakd.wkd_logit_loss(zs, zt, cost, temperature=2.0, gamma=3.0, backend=backend)
    p, q = F.softmax(zs / 2, 1), F.softmax(zt / 2, 1)
    torch.testing.assert_close(loss, 3.0 * R.sinkhorn_fixed(p, q, cost, eps=0.05, iters=10).mean())
    module = ckakd.nn.WKDLogitLoss(cost, temperature=2.0, gamma=3.0, backend=backend)
    torch.testing.assert_close(module(zs, zt), loss)


def test_peaked_softmax_finite(backend):
    zs, zt = torch.randn(4, 50) * 60, torch.randn(4, 50) * 60  # most probabilities underflow to 0
    zs.requires_grad_(True)
    cost = _random_cost(50, dtype=torch.float32)
    for target in (None, torch.randint(0, 50, (4,))):
        loss = ckakd.wkd_logit_loss(zs, zt, cost, temperature=1.0, target=target, backend=backend)
        (grad,) = torch.autograd.grad(loss, zs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_edge_cases(backend):
    p = torch.tensor([1.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 1.0], dtype=torch.float64)
    cost = torch.tensor([[0.0, 0.7], [0.7, 0.0]], dtype=torch.float64)
    # the only plan moves all mass across: one iteration reaches it (with eps = 0.01 the 1e-8 guards of
    # WKD's definition would dominate the exp(-70) kernel entries: that is the definition, not a bug)
    value = ckakd.sinkhorn(p, q, cost, eps=0.5, iters=10, backend=backend)
    assert value.shape == () and value.item() == pytest.approx(0.7, rel=1e-6)
    same = ckakd.sinkhorn(p, p, cost, eps=0.01, iters=10, backend=backend)
    assert same.item() == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ converged


@functools.cache
def _pot_sinkhorn2(b: int, c: int, eps: float) -> tuple[float, ...]:
    """POT's values for _histograms(b, c) / _random_cost(c), computed once for all backends."""
    ot = pytest.importorskip("ot")
    p, q = _histograms(b, c)
    cost = _random_cost(c).numpy()
    return tuple(
        float(ot.sinkhorn2(p[i].numpy(), q[i].numpy(), cost, eps, stopThr=1e-12, numItermax=100000)) for i in range(b)
    )


def test_converged_matches_pot_sinkhorn2(backend):
    p, q = _histograms(4, 12)
    cost = _random_cost(12)
    eps = 0.05
    pot = _pot_sinkhorn2(4, 12, eps)
    ours = ckakd.sinkhorn(p, q, cost, eps=eps, tol=1e-10, max_iter=5000, backend=backend)
    for i in range(4):
        assert ours[i].item() == pytest.approx(pot[i], rel=1e-6, abs=1e-9)


def test_converged_small_eps_matches_exact_lp(backend):
    ot = pytest.importorskip("ot")
    p, q = _histograms(3, 8)
    cost = _random_cost(8)
    ours = ckakd.sinkhorn(p, q, cost, eps=1e-3, tol=1e-9, max_iter=20000, backend=backend)
    for i in range(3):
        exact = ot.emd2(p[i].numpy(), q[i].numpy(), cost.numpy())
        assert ours[i].item() == pytest.approx(float(exact), abs=1e-2 * float(cost.max()))


def test_flat_cost_oracle_total_variation(backend):
    """Flat off-diagonal cost c(1 - δ_ij): exact OT = c·TV(p, q)."""
    p, q = _histograms(5, 10)
    c = 0.8
    cost = c * (1 - torch.eye(10, dtype=torch.float64))
    ours = ckakd.sinkhorn(p, q, cost, eps=2e-3, tol=1e-10, max_iter=50000, backend=backend)
    tv = 0.5 * (p - q).abs().sum(1)
    torch.testing.assert_close(ours, c * tv, atol=5e-3 * c, rtol=0)


def test_converged_envelope_gradient_matches_finite_differences(backend):
    """value="entropic": ∂/∂p of the entropic objective ⟨P, C⟩ − εH(P) at convergence is the potential f
    (along zero-sum directions), and the value is reference.entropic_ot's."""
    p, q = _histograms(1, 6)
    cost = _random_cost(6)
    eps = 0.2
    leaf = p.clone().requires_grad_(True)
    out = ckakd.sinkhorn(leaf, q, cost, eps=eps, tol=1e-12, max_iter=20000, backend=backend, value="entropic")
    assert out.item() == pytest.approx(R.entropic_ot(p[0], q[0], cost, eps).item(), rel=1e-9, abs=1e-12)
    out.sum().backward()
    direction = torch.randn(1, 6, dtype=torch.float64)
    direction -= direction.mean()  # stay on the simplex
    h = 1e-6

    def objective(pp):
        return R.entropic_ot(pp[0], q[0], cost, eps)

    fd = (objective(p + h * direction) - objective(p - h * direction)) / (2 * h)
    assert (leaf.grad * direction).sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def _ext_or_skip():
    from ckakd import _ext

    if _ext.load() is None:
        pytest.skip(f"extension not available: {_ext.status()[1]}")
    return torch.ops.ckakd


def _converged_problem(kind: str, b: int, c: int, dtype=torch.float64):
    """(p, q, cost) for the ext-vs-torch comparisons. ``zero_mass``: one class per row without mass (target
    separation); ``far_class``: that too, and class 3 (zero mass in rows 1, 2) at cost 2 from all others, so at
    eps = 2e-3 its kernel row exp(-1000) underflows to 0 and the shifted product of its row is 0: the exact
    log-sum-exp path must run (rows 1, 2 fail first; the others, whose class-3 mass cannot move anywhere, later).
    ``partial_far``: the far class 3 without mass in rows 1, 2 and with p_3 = q_3 elsewhere (it stays in place):
    only rows 1, 2 need the exact path, the others keep the shifted product throughout."""
    p, q = _histograms(b, c)
    cost = _random_cost(c)
    if kind in ("zero_mass", "far_class"):
        gen = torch.Generator().manual_seed(11)
        y = torch.randint(0, c, (b,), generator=gen)
        if kind == "far_class":
            y[1:3] = 3
            cost[3, :] = 2.0
            cost[:, 3] = 2.0
            cost[3, 3] = 0.0
        mask = torch.zeros(b, c, dtype=torch.bool)
        mask[torch.arange(b), y] = True
        p, q = p.masked_fill(mask, 0), q.masked_fill(mask, 0)
        p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    if kind == "partial_far":
        cost[3, :] = 2.0
        cost[:, 3] = 2.0
        cost[3, 3] = 0.0
        p[1:3, 3] = 0
        q[1:3, 3] = 0
        p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
        keep = torch.tensor([i for i in range(b) if i not in (1, 2)])
        rest = q[keep].clone()
        rest[:, 3] = 0
        q[keep] = rest / rest.sum(1, keepdim=True) * (1 - p[keep, 3:4])
        q[keep, 3] = p[keep, 3]
    return p.to(dtype), q.to(dtype), cost.to(dtype)


CONVERGED_CASES = [  # kind, B, C, eps, max_iter
    ("softmax", 3, 7, 0.05, 1000),
    ("softmax", 8, 100, 0.05, 1000),
    ("softmax", 4, 10, 2e-3, 300),
    ("zero_mass", 5, 9, 0.05, 1000),
    ("zero_mass", 6, 10, 2e-3, 300),
    ("far_class", 6, 10, 2e-3, 300),
    ("partial_far", 6, 10, 2e-3, 300),
    ("softmax", 1, 1, 0.1, 20),
]
EXACT_ROWS = {"far_class": [0, 1, 2, 3, 4, 5], "partial_far": [1, 2]}  # samples that take the exact path


@pytest.mark.parametrize(
    "kind,B,C,eps,max_iter", CONVERGED_CASES, ids=[f"{k}-{b}x{c}-{e}" for k, b, c, e, _ in CONVERGED_CASES]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_converged_ext_matches_torch(kind, B, C, eps, max_iter, dtype):
    """The extension's converged op is the torch reference's algorithm: values, envelope gradients,
    iteration count and marginal error agree to rounding (they are computed by the same ATen calls)."""
    from ckakd.ops.sinkhorn_converged import converged_potentials

    ext = _ext_or_skip()
    p, q, cost = _converged_problem(kind, B, C, dtype)
    tol = 1e-10
    w = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    run = {
        name: _value_and_grads(
            lambda a, b_, name=name: ckakd.sinkhorn(a, b_, cost, eps=eps, tol=tol, max_iter=max_iter, backend=name),
            p,
            q,
            w,
        )
        for name in ("torch", "cpp")
    }
    for got, expected, what in zip(run["cpp"], run["torch"], ("value", "grad_p", "grad_q"), strict=True):
        assert got.dtype == dtype and torch.isfinite(got).all(), what
        scale = max(1.0, expected.abs().max().item())
        atol = 1e-10 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got, expected, atol=atol * scale, rtol=0, msg=what)
    solution = converged_potentials(p, q, cost, eps, tol, max_iter)
    it, err = solution.iterations, solution.error
    info = ext.sinkhorn_converged_forward(p, q, cost, eps, tol, max_iter)[3]
    assert info.dtype == torch.float64 and info.shape == (2,)
    assert int(info[0]) == it and info[1].item() == pytest.approx(err, rel=1e-6, abs=1e-14)
    if kind in EXACT_ROWS:
        assert sorted(solution.exact.tolist()) == EXACT_ROWS[kind], "the exact path did not run where expected"
        zero = p == 0
        assert (run["cpp"][1][zero] == 0).all() and (run["cpp"][2][q == 0] == 0).all()


def test_converged_ext_argument_checks():
    ops = _ext_or_skip()
    p, q, cost = _converged_problem("softmax", 3, 6)
    fwd = ops.sinkhorn_converged_forward
    with pytest.raises(RuntimeError, match="q must have the shape of p"):
        fwd(p, q[:, :5], cost, 0.1, 1e-9, 10)
    with pytest.raises(RuntimeError, match=r"cost must have shape \(C, C\)"):
        fwd(p, q, cost[:5], 0.1, 1e-9, 10)
    with pytest.raises(RuntimeError, match="same dtype"):
        fwd(p, q.float(), cost, 0.1, 1e-9, 10)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        fwd(p.half(), q.half(), cost.half(), 0.1, 1e-9, 10)
    with pytest.raises(RuntimeError, match="eps must be finite and > 0"):
        fwd(p, q, cost, 0.0, 1e-9, 10)
    with pytest.raises(RuntimeError, match="tol must be > 0"):
        fwd(p, q, cost, 0.1, 0.0, 10)
    with pytest.raises(RuntimeError, match="max_iter must be >= 1"):
        fwd(p, q, cost, 0.1, 1e-9, 0)
    with pytest.raises(RuntimeError, match=r"p must have shape \(B, C\)"):
        fwd(p[0], q[0], cost, 0.1, 1e-9, 10)
    value, gp, gq, info = fwd(p[:0], q[:0], cost, 0.1, 1e-9, 10)
    assert value.shape == (0,) and gp.shape == (0, 6) and gq.shape == (0, 6) and info.shape == (2,)


@pytest.mark.parametrize("kind", ["softmax", "far_class"])
def test_opcheck_converged_ext_op(kind):
    ops = _ext_or_skip()
    p, q, cost = _converged_problem(kind, 4, 6)
    eps = 2e-3 if kind == "far_class" else 0.1
    torch.library.opcheck(ops.sinkhorn_converged_forward.default, (p, q, cost, eps, 1e-9, 30))


def test_opcheck_converged_op(backend):
    """Schema, fakes and the registered autograd of the converged forward op of ``backend`` (the extension's or
    its torch twin), of the entropic value's op and of the backward op they share."""
    ops = _ext_or_skip() if backend != "torch" else torch.ops.ckakd
    forward = ops.sinkhorn_converged_forward_torch if backend == "torch" else ops.sinkhorn_converged_forward
    p, q, cost = _converged_problem("zero_mass", 3, 5)
    torch.library.opcheck(forward.default, (p.requires_grad_(), q.requires_grad_(), cost, 0.1, 1e-9, 50))
    _, f, g, _ = forward(p.detach(), q.detach(), cost, 0.1, 1e-9, 50)
    entropic = torch.ops.ckakd.sinkhorn_converged_entropic.default
    torch.library.opcheck(entropic, (p, q, cost.clone().requires_grad_(), f, g, 0.1))
    grad = torch.randn(3, dtype=torch.float64)
    for transport, need_cost in ((True, True), (False, False)):
        args = (grad, p.detach(), q.detach(), cost, f, g, 0.1, transport, need_cost)
        torch.library.opcheck(torch.ops.ckakd.sinkhorn_converged_backward.default, args)


def _log_marginals(p, q):
    inf = torch.full_like(p, -math.inf)
    return torch.where(p > 0, p.log(), inf), torch.where(q > 0, q.log(), inf)


def _previous_converged(p, q, cost, eps, tol, max_iter):
    """The converged iterations as they were before the host syncs were taken out of the loop (written here on
    purpose): every log-sum-exp checks its shifted product (one sync) and recomputes the non-finite samples of
    that one product exactly. Returns (f, g, iterations, error)."""
    log_p, log_q = _log_marginals(p, q)
    log_k = -cost / eps
    k = log_k.exp()

    def lse(w, transpose):
        shift = w.amax(1, keepdim=True)
        out = torch.log(torch.mm(torch.exp(w - shift), k if transpose else k.T)) + shift
        bad = ~torch.isfinite(out).all(1)
        if bad.any():
            lk = log_k.T if transpose else log_k
            out[bad] = torch.logsumexp(w[bad][:, None, :] + lk[None], dim=2)
        return out

    f, g, err, it = torch.zeros_like(p), torch.zeros_like(q), math.inf, 0
    for it in range(1, max_iter + 1):
        g = eps * (log_q - lse(f / eps, True))
        f = eps * (log_p - lse(g / eps, False))
        if it % 10 == 0 or it == max_iter:
            col = torch.where(q > 0, torch.exp(lse(f / eps, True) + g / eps), torch.zeros_like(q))
            err = (col - q).abs().sum(1).max().item()
            if err < tol:
                break
    return f, g, it, err


def _exact_iterations(p, q, cost, eps, iters):
    """``iters`` log-domain iterations with the exact (B, C, C) log-sum-exp only: (f, g)."""
    log_p, log_q = _log_marginals(p, q)
    log_k = -cost / eps
    f, g = torch.zeros_like(p), torch.zeros_like(q)
    for _ in range(iters):
        g = eps * (log_q - torch.logsumexp(f[:, :, None] / eps + log_k[None], dim=1))
        f = eps * (log_p - torch.logsumexp(log_k[None] + g[:, None, :] / eps, dim=2))
    return f, g


@pytest.mark.parametrize(
    "kind,B,C,eps,max_iter", CONVERGED_CASES, ids=[f"{k}-{b}x{c}-{e}" for k, b, c, e, _ in CONVERGED_CASES]
)
def test_converged_results_unchanged_by_sync_free_loop(kind, B, C, eps, max_iter):
    """Samples on the shifted product are bitwise what the per-product-checking loop gave; samples on the exact
    path equal the exact iteration. (In ``far_class`` the old loop differs from both by ~5e-4: it kept the
    shifted product where it was finite but had lost its dominant terms to underflow.)"""
    from ckakd.ops.sinkhorn_converged import converged_potentials, unit_mass

    p, q, cost = _converged_problem(kind, B, C)
    new = converged_potentials(p, q, cost, eps, 1e-10, max_iter)
    p, q = unit_mass(p), unit_mass(q)  # what the solver iterates on
    f_old, g_old, it, err = _previous_converged(p, q, cost, eps, 1e-10, max_iter)
    assert new.iterations == it
    exact = sorted(new.exact.tolist())
    assert exact == EXACT_ROWS.get(kind, [])
    fast = [i for i in range(B) if i not in exact]
    torch.testing.assert_close(new.f[fast], f_old[fast], rtol=0, atol=0)
    torch.testing.assert_close(new.g[fast], g_old[fast], rtol=0, atol=0)
    if not exact:
        assert new.error == err
        return
    f_ex, g_ex = _exact_iterations(p[exact], q[exact], cost, eps, it)
    torch.testing.assert_close(new.f[exact], f_ex, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.g[exact], g_ex, rtol=0, atol=1e-12)


SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero")  # ATen ops that wait for the device


class _AtenCalls(AtenCallsInsideCkakd):
    """Counts the ATen calls made inside the block, including the ones inside ckakd's ops (a ``ckakd::`` op is
    redispatched to its CPU kernel with this mode active again; plain dispatch would show only the op itself).

    ``corrupt`` {n: b}: the n-th (0-based) ``aten.mm`` result gets sample b's row zeroed, which is what a shifted
    product that underflowed looks like."""

    def __init__(self, corrupt: dict[int, int] | None = None):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.corrupt = corrupt or {}

    def observe(self, func, out):
        name = func.overloadpacket.__name__
        if name == "mm" and self.calls["mm"] in self.corrupt:
            out[self.corrupt[self.calls["mm"]]] = 0
        self.calls[name] += 1
        return out

    @property
    def syncs(self) -> int:
        return sum(self.calls[op] for op in SYNC_OPS)


def _converged_op(p, q, cost, eps, tol, max_iter, backend):
    from ckakd.ops.sinkhorn import sinkhorn_converged

    return sinkhorn_converged(p, q, cost, eps, tol, max_iter, backend)


@pytest.mark.parametrize("kind,eps,transitions", [("softmax", 0.05, 0), ("partial_far", 2e-3, 1)])
def test_converged_syncs_once_per_check(backend, kind, eps, transitions):
    """200 iterations (tol never met): one host sync per check (20), one for the final value's log-sum-exp, two
    more per check at which samples switch to the exact path. Before: 441 (two per log-sum-exp)."""
    p, q, cost = _converged_problem(kind, 6, 10)
    with _AtenCalls() as calls:
        _converged_op(p, q, cost, eps, 1e-300, 200, backend)
    assert calls.calls["mm"] >= 420  # the solve ran inside the mode (2 products per iteration + 1 per check)
    assert calls.syncs <= 200 // 10 + 1 + 2 * transitions, calls.calls


@pytest.mark.parametrize("max_iter,mm_call,row", [(60, 25, 2), (60, 41, 0), (25, 45, 3), (60, 0, 1)])
def test_converged_failed_sample_restarts_from_snapshot(backend, max_iter, mm_call, row):
    """A sample whose shifted product fails (zeroed: log 0 = -inf, then NaN) in some half-iteration or check is
    restored from the previous check and iterated again exactly: the result equals the undisturbed solve.
    mm calls: 2 per iteration, 1 per check (after iterations 10, 20, ...): 25 is iteration 13's g half, 41 the
    check at 20, 45 iteration 23's f half with max_iter 25 (restart from 20 for 5 iterations), 0 the very first."""
    from ckakd.ops.sinkhorn_converged import converged_potentials

    p, q, cost = _converged_problem("zero_mass", 5, 9)
    clean = _converged_op(p, q, cost, 0.05, 1e-300, max_iter, backend)
    with _AtenCalls(corrupt={mm_call: row}) as calls:
        hit = _converged_op(p, q, cost, 0.05, 1e-300, max_iter, backend)
    assert calls.calls["mm"] > mm_call
    for got, expected in zip(hit, clean, strict=True):  # values, potentials (-inf without mass), info
        assert not got.isnan().any()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.isfinite(hit[0]).all() and torch.isfinite(hit[1]).all()
    if backend == "torch":
        with _AtenCalls(corrupt={mm_call: row}):
            assert converged_potentials(p, q, cost, 0.05, 1e-300, max_iter).exact.tolist() == [row]


GPU_CONVERGED_CASES = [("softmax", 16, 100, 0.05), ("zero_mass", 8, 257, 0.05), ("far_class", 6, 10, 2e-3)]


def _converged_cross_device(kind, B, C, eps, device, dtype=torch.float64):
    """The ext op on ``device`` vs on the CPU (and vs the torch path on ``device``): converged values and
    potentials (f, g of the unit-mass problem) agree to the accuracy the stopping rule gives (GEMM summation
    orders differ across devices)."""
    ops = _ext_or_skip()
    p, q, cost = _converged_problem(kind, B, C, dtype)
    tol, max_iter = 1e-11, 20000 if kind != "far_class" else 300
    cpu = ops.sinkhorn_converged_forward(p, q, cost, eps, tol, max_iter)
    dev_in = [t.to(device) for t in (p, q, cost)]
    dev = ops.sinkhorn_converged_forward(*dev_in, eps, tol, max_iter)
    torch_dev = ckakd.sinkhorn(*dev_in[:2], dev_in[2], eps=eps, tol=tol, max_iter=max_iter, backend="torch")
    for got, expected, what in zip(dev[:3], cpu[:3], ("value", "f", "g"), strict=True):
        assert got.device.type == torch.device(device).type and got.dtype == dtype, what
        scale = max(1.0, expected[torch.isfinite(expected)].abs().max().item())  # f, g: -inf without mass
        torch.testing.assert_close(got.cpu(), expected, atol=1e-7 * scale, rtol=0, msg=what)
    torch.testing.assert_close(torch_dev.cpu(), cpu[0], atol=1e-7, rtol=0)
    assert dev[3].device.type == torch.device(device).type and dev[3].dtype == torch.float64
    assert abs(dev[3][0].item() - cpu[3][0].item()) <= (0 if kind == "far_class" else 20)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind,B,C,eps", GPU_CONVERGED_CASES, ids=[f"{k}-{b}x{c}" for k, b, c, _ in GPU_CONVERGED_CASES]
)
def test_converged_cuda_matches_cpu(kind, B, C, eps):
    _converged_cross_device(kind, B, C, eps, "cuda")


@pytest.mark.gpu
def test_converged_cuda_autograd_and_opcheck():
    p, q, cost = (t.cuda() for t in _converged_problem("zero_mass", 5, 40))
    value, gp, gq = _value_and_grads(
        lambda a, b_: ckakd.sinkhorn(a, b_, cost, eps=0.05, tol=1e-10, max_iter=5000),
        p,
        q,
        torch.ones((), device="cuda"),
    )
    ref, rp, rq = _value_and_grads(
        lambda a, b_: ckakd.sinkhorn(a, b_, cost.cpu(), eps=0.05, tol=1e-10, max_iter=5000, backend="torch"),
        p.cpu(),
        q.cpu(),
        torch.ones((), dtype=torch.float64),
    )
    for got, expected in ((value, ref), (gp, rp), (gq, rq)):
        torch.testing.assert_close(got.cpu(), expected, atol=1e-7, rtol=0)
    torch.library.opcheck(_ext_or_skip().sinkhorn_converged_forward.default, (p, q, cost, 0.1, 1e-9, 30))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p=torch.tensor([[0.5, 0.6]])), r"rows of p must sum to 1"),
        (dict(q=torch.tensor([[1.5, -0.5]])), r"q must be nonnegative"),
        (dict(cost=torch.ones(2, 3)), r"cost must be a square"),
        (dict(cost=torch.ones(3, 3)), r"cost must be \(2, 2\) to match C=2"),
        (dict(cost=-torch.ones(2, 2)), r"cost must be finite and nonnegative"),
        (dict(eps=0.0), r"eps must be > 0"),
        (dict(iters=0), r"iters must be an integer >= 1"),
        (dict(q=torch.tensor([[0.5, 0.5], [0.5, 0.5]])), r"p and q must have the same shape"),
        (dict(tol=-1.0), r"tol must be > 0"),
        (dict(backend="gpu"), r"backend must be one of"),
    ],
)
def test_sinkhorn_bad_inputs(kwargs, match):
    args = dict(p=torch.tensor([[0.5, 0.5]]), q=torch.tensor([[0.25, 0.75]]), cost=torch.ones(2, 2), eps=0.1, iters=3)
    args.update(kwargs)
    p, q, cost = args.pop("p"), args.pop("q"), args.pop("cost")
    with pytest.raises(ValueError, match=match):
        ckakd.sinkhorn(p, q, cost, **args)


def test_wkd_logit_loss_bad_inputs():
    zs, zt, cost = torch.randn(4, 5), torch.randn(4, 5), _random_cost(5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"same shape \(B, C\)"):
        ckakd.wkd_logit_loss(zs, torch.randn(4, 6), cost)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        ckakd.wkd_logit_loss(zs, zt, cost, target=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"target must be an integer tensor"):
        ckakd.wkd_logit_loss(zs, zt, cost, target=torch.zeros(4))
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 5\)"):
        ckakd.wkd_logit_loss(zs, zt, cost, target=torch.full((4,), 5))
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        ckakd.wkd_logit_loss(zs, zt, cost, temperature=0.0)
    with pytest.raises(ValueError, match=r"cost must be \(5, 5\)"):
        ckakd.wkd_logit_loss(zs, zt, _random_cost(4, dtype=torch.float32))


def test_cost_cache_follows_in_place_changes_and_eps():
    """The per-cost memo of validation and K = exp(-C/ε) never serves a stale matrix."""
    p, q = _histograms(2, 5)
    cost = _random_cost(5)
    first = ckakd.sinkhorn(p, q, cost, eps=0.1, backend="torch")
    torch.testing.assert_close(first, R.sinkhorn_fixed(p, q, cost, eps=0.1, iters=10))
    torch.testing.assert_close(
        ckakd.sinkhorn(p, q, cost, eps=0.3, backend="torch"), R.sinkhorn_fixed(p, q, cost, eps=0.3, iters=10)
    )
    cost.mul_(2.0)  # in place: a new version of the same tensor
    torch.testing.assert_close(
        ckakd.sinkhorn(p, q, cost, eps=0.1, backend="torch"), R.sinkhorn_fixed(p, q, cost, eps=0.1, iters=10)
    )
    cost[0, 1] = -1.0
    with pytest.raises(ValueError, match="finite and nonnegative"):
        ckakd.sinkhorn(p, q, cost, eps=0.1, backend="torch")
