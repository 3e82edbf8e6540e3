"""Float64 references of :mod:`ckakd.wkd` and the Sinkhorn ops: WKD's fixed-iteration Sinkhorn, WKD-L
with target separation, and the converged entropic OT value."""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd.reference._common import reduce


def sinkhorn_fixed(
    p: Tensor, q: Tensor, cost: Tensor, *, eps: float = 0.05, iters: int = 10, u0: Tensor | None = None
) -> Tensor:
    """WKD's fixed-iteration Sinkhorn, written plainly (batched (B, C) histograms, explicit B×C×C plan).

    u₀ = 1/C; for each iteration v = q / (Kᵀu + 1e-8), u = p / (K v + 1e-8); returns Σ_ij P_ij C_ij (B,).
    Differentiable by autograd through the iterations.
    """
    k = torch.exp(-cost / eps)
    u = torch.full_like(p, 1.0 / p.shape[1]) if u0 is None else u0
    v = None
    for _ in range(iters):
        v = q / (torch.einsum("bi,ij->bj", u, k) + 1e-8)
        u = p / (torch.einsum("ij,bj->bi", k, v) + 1e-8)
    plan = u[:, :, None] * k[None] * v[:, None, :]
    return (plan * cost[None]).sum(dim=(1, 2))


def wkd_logit_loss_reduced(
    logits_s: Tensor,
    logits_t: Tensor,
    target: Tensor,
    cost: Tensor,
    *,
    temperature: float,
    gamma: float,
    eps: float = 0.05,
    iters: int = 10,
    reduction: str = "mean",
) -> Tensor:
    """WKD-L with target separation as the public code formulates it: per-sample (C−1)×(C−1) costs.

    loss_t = −mean softmax(z_t)[y]·log_softmax(z_s)[y]; the non-target logits of each sample are
    softened at temperature T over C−1 classes and compared by Sinkhorn with that sample's reduced cost.
    Per sample loss_t + gamma · WD, then ``reduction`` over the samples.
    """
    n, c = logits_s.shape
    y = target.long()[:, None]
    loss_t = -(torch.softmax(logits_t, 1).gather(1, y).detach() * torch.log_softmax(logits_s, 1).gather(1, y))[:, 0]
    mask = torch.ones_like(logits_s, dtype=torch.bool).scatter_(1, y, False)
    zs, zt = logits_s[mask].reshape(n, c - 1), logits_t[mask].reshape(n, c - 1)
    pair = mask[:, :, None] & mask[:, None, :]
    costs = cost.expand(n, c, c)[pair].reshape(n, c - 1, c - 1)
    p, q = torch.softmax(zs / temperature, 1), torch.softmax(zt / temperature, 1)
    k = torch.exp(-costs / eps)
    u = torch.full_like(p, 1.0 / (c - 1))[:, :, None]
    p, q = p[:, :, None], q[:, :, None]
    v = None
    for _ in range(iters):
        v = q / (torch.bmm(k.transpose(1, 2), u) + 1e-8)
        u = p / (torch.bmm(k, v) + 1e-8)
    plan = u * k * v.transpose(1, 2)
    return reduce(loss_t + gamma * (plan * costs).sum(dim=(1, 2)), reduction)


def entropic_ot(p: Tensor, q: Tensor, cost: Tensor, eps: float, *, max_iter: int = 100000) -> Tensor:
    """min_P ⟨P, C⟩ + ε Σ P (log P − 1) over plans with marginals p, q (one pair, (C,)), float64.

    Log-domain iterations with explicit log-sum-exps, run until the potentials stop changing.
    """
    p, q, cost = p.double(), q.double(), cost.double()
    f, g = torch.zeros_like(p), torch.zeros_like(q)
    for _ in range(max_iter):
        f_new = eps * torch.log(p) - eps * torch.logsumexp((g[None, :] - cost) / eps, dim=1)
        g_new = eps * torch.log(q) - eps * torch.logsumexp((f_new[:, None] - cost) / eps, dim=0)
        done = (f_new - f).abs().max() < 1e-15 and (g_new - g).abs().max() < 1e-15
        f, g = f_new, g_new
        if done:
            break
    plan = torch.exp((f[:, None] + g[None, :] - cost) / eps)
    return (plan * cost).sum() + eps * (plan * (torch.log(plan) - 1)).sum()
