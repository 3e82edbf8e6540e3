"""``torch.compile(fullgraph=True)`` of WKD-L (``ckakd.wkd_logit_loss`` and ``ckakd.nn.WKDLogitLoss``): no graph
break (the cost's values are checked once, in eager mode; the extension's backend is resolved outside the
graph), values and gradients equal to eager, and no host sync in eager mode once the cost has been checked."""

from __future__ import annotations

import pytest
import torch

import ckakd
from ckakd import nn as knn

from ..aten_calls import AtenCallsInsideCkakd

pytestmark = pytest.mark.usefixtures("one_thread")

B, C = 6, 9


def _inputs():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(B, C, generator=g) * 2, torch.randn(B, C, generator=g) * 2
    y = torch.randint(0, C, (B,), generator=g)
    cost = torch.rand(C, C, generator=g)
    cost = (cost + cost.T) / 2
    cost.fill_diagonal_(0)
    return zs, zt, y, cost


def _losses(cost):
    module = knn.WKDLogitLoss(cost, temperature=2.0, gamma=3.0)
    return {
        "target": lambda zs, zt, y: ckakd.wkd_logit_loss(zs, zt, cost, temperature=2.0, gamma=3.0, target=y),
        "no_target_none": lambda zs, zt, y: ckakd.wkd_logit_loss(zs, zt, cost, gamma=3.0, reduction="none").sum(),
        "torch_backend": lambda zs, zt, y: ckakd.wkd_logit_loss(zs, zt, cost, target=y, backend="torch"),
        "converged": lambda zs, zt, y: ckakd.wkd_logit_loss(zs, zt, cost, target=y, tol=1e-6),
        "module": lambda zs, zt, y: module(zs, zt, y),
    }


@pytest.mark.parametrize("name", list(_losses(_inputs()[3])))
def test_fullgraph_compile_matches_eager(name):
    zs, zt, y, cost = _inputs()
    fn = _losses(cost)[name]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(zs, zt, y)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    got, want = compiled(a, zt, y), fn(b, zt, y)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert a.grad.abs().sum() > 0


def test_a_bad_cost_is_refused_once_in_eager_and_at_module_construction():
    zs, zt, _, cost = _inputs()
    bad = cost.clone()
    bad[0, 1] = -1.0
    with pytest.raises(ValueError, match="cost must be finite and nonnegative"):
        ckakd.wkd_logit_loss(zs, zt, bad)
    with pytest.raises(ValueError, match="cost must be finite and nonnegative"):
        knn.WKDLogitLoss(bad)
    cost2 = cost.clone()
    ckakd.wkd_logit_loss(zs, zt, cost2)
    cost2[0, 1] = float("nan")  # an in-place change is checked again
    with pytest.raises(ValueError, match="cost must be finite and nonnegative"):
        ckakd.wkd_logit_loss(zs, zt, cost2)


class _Syncs(AtenCallsInsideCkakd):
    def __init__(self):
        super().__init__()
        self.count = 0

    def observe(self, func, out):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return out


def test_eager_hot_path_has_no_host_sync_once_the_cost_is_checked():
    zs, zt, _, cost = _inputs()
    zs = zs.requires_grad_()
    first = _Syncs()
    with first:
        ckakd.wkd_logit_loss(zs, zt, cost, gamma=3.0)
    assert first.count > 0  # the cost's value check, once
    again = _Syncs()
    with again:
        loss = ckakd.wkd_logit_loss(zs, zt, cost, gamma=3.0)
        loss.backward()
    assert again.count == 0
