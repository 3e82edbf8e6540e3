"""Sinkhorn and WKD-L: fixed iterations vs a float64 autograd reference, target separation vs per-sample
reduced costs, converged mode vs POT, oracles, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ckakd
from ckakd import reference as R
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


def test_opcheck_fixed_op():
    from ckakd.ops.sinkhorn import sinkhorn_fixed

    p, q = _histograms(3, 5)
    cost = _random_cost(5)
    K = torch.exp(-cost / 0.1)
    u0 = torch.full_like(p, 0.2)
    torch.library.opcheck(sinkhorn_fixed, (p.requires_grad_(), q.requires_grad_(), K, K * cost, u0, 4, "torch"))


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


def test_converged_matches_pot_sinkhorn2():
    ot = pytest.importorskip("ot")
    p, q = _histograms(4, 12)
    cost = _random_cost(12)
    eps = 0.05
    ours = ckakd.sinkhorn(p, q, cost, eps=eps, tol=1e-10, max_iter=5000)
    for i in range(4):
        pot = ot.sinkhorn2(p[i].numpy(), q[i].numpy(), cost.numpy(), eps, stopThr=1e-12, numItermax=100000)
        assert ours[i].item() == pytest.approx(float(pot), rel=1e-6, abs=1e-9)


def test_converged_small_eps_matches_exact_lp():
    ot = pytest.importorskip("ot")
    p, q = _histograms(3, 8)
    cost = _random_cost(8)
    ours = ckakd.sinkhorn(p, q, cost, eps=1e-3, tol=1e-9, max_iter=20000)
    for i in range(3):
        exact = ot.emd2(p[i].numpy(), q[i].numpy(), cost.numpy())
        assert ours[i].item() == pytest.approx(float(exact), abs=1e-2 * float(cost.max()))


def test_flat_cost_oracle_total_variation():
    """Flat off-diagonal cost c(1 - δ_ij): exact OT = c·TV(p, q)."""
    p, q = _histograms(5, 10)
    c = 0.8
    cost = c * (1 - torch.eye(10, dtype=torch.float64))
    ours = ckakd.sinkhorn(p, q, cost, eps=2e-3, tol=1e-10, max_iter=50000)
    tv = 0.5 * (p - q).abs().sum(1)
    torch.testing.assert_close(ours, c * tv, atol=5e-3 * c, rtol=0)


def test_converged_envelope_gradient_matches_finite_differences():
    """∂/∂p of the entropic objective ⟨P, C⟩ − εH(P) at convergence is the (centered) potential f."""
    p, q = _histograms(1, 6)
    cost = _random_cost(6)
    eps = 0.2
    leaf = p.clone().requires_grad_(True)
    ckakd.sinkhorn(leaf, q, cost, eps=eps, tol=1e-12, max_iter=20000).sum().backward()
    direction = torch.randn(1, 6, dtype=torch.float64)
    direction -= direction.mean()  # stay on the simplex
    h = 1e-6

    def objective(pp):
        return R.entropic_ot(pp[0], q[0], cost, eps)

    fd = (objective(p + h * direction) - objective(p - h * direction)) / (2 * h)
    assert (leaf.grad * direction).sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


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
