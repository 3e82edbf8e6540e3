"""Batched entropic Sinkhorn with one shared cost: the dispatch point behind ``ckakd.sinkhorn`` and WKD-L.

Two ops, each a ``torch.library`` custom op with a fake kernel and an autograd formula:

``ckakd::sinkhorn_fixed(p, q, K, KC, u0, iters, backend)`` — WKD's definition, fixed iterations in the
linear domain (DESIGN §3): for t = 1..T, v = q / (Kᵀu + δ), u = p / (K v + δ), δ = 1e-8, from u₀; the
value is ⟨P, C⟩ = uᵀ (K∘C) v = Σᵢ uᵢ wᵢ per sample, w = (K∘C) v (a row-vector vᵀ(K∘C)ᵀ per sample, returned by
the forward so that the backward's ∂/∂u = g·w costs no product). The backward is exact reverse mode through the unrolled
iterations using the stored u_t, v_t and denominators: O(T·B·C) state, never B×C×C. Backends: the C++
extension (``cpp`` on CPU tensors, ``cuda`` on CUDA tensors; ``torch.ops.ckakd.sinkhorn_fixed_forward``)
or ``torch`` (the same formulas with torch ops).

``ckakd::sinkhorn_converged(p, q, cost, eps, tol, max_iter, backend)`` — log-domain iterations until the column
marginal error is below ``tol`` (stable for small ε; float64 internally). The value is ⟨P*, C⟩ (what
POT's ``sinkhorn2`` returns); the gradient is the envelope (dual-potential) gradient: ∂/∂p = f − mean(f),
∂/∂q = g − mean(g) — exact for the entropic objective ⟨P, C⟩ − ε·H(P) at convergence, as POT does for
``emd2``. Backends: ``torch`` (``converged_potentials`` below, the reference) or the C++ extension (``cpp`` /
``cuda``; ``torch.ops.ckakd.sinkhorn_converged_forward``, the same algorithm with ATen ops, one implementation
for CPU and CUDA tensors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ckakd.ops._backend import record_dispatch

DELTA = 1e-8


# ------------------------------------------------------------------------------------- fixed: torch


def fixed_forward_torch(p: Tensor, q: Tensor, K: Tensor, KC: Tensor, u0: Tensor, iters: int):
    """The WKD iterations in torch.

    Returns (cost (B,), u_hist (T+1,B,C), v_hist, a_hist, b_hist (T,B,C), w (B,C)) with w = v_T KCᵀ, so that
    cost = Σᵢ u_T,i wᵢ and the backward's ū = g·w.
    """
    B, C = p.shape
    u_hist = p.new_empty((iters + 1, B, C))
    v_hist, a_hist, b_hist = (p.new_empty((iters, B, C)) for _ in range(3))
    u_hist[0] = u0
    KT = K.T
    for t in range(iters):
        if t == 0 and u0.stride(0) == 0:  # u_0 broadcast over the batch: one row product
            a = torch.mm(u0[:1], K).add_(DELTA).expand(B, C)
        else:
            a = torch.mm(u_hist[t], K).add_(DELTA)  # (Kᵀ u)ᵀ = uᵀ K
        torch.div(q, a, out=v_hist[t])
        b = torch.mm(v_hist[t], KT).add_(DELTA)  # (K v)ᵀ = vᵀ Kᵀ
        torch.div(p, b, out=u_hist[t + 1])
        a_hist[t], b_hist[t] = a, b
    w = torch.mm(v_hist[iters - 1], KC.T)  # (KC v)ᵀ = vᵀ KCᵀ
    cost = (u_hist[iters] * w).sum(1)
    return cost, u_hist, v_hist, a_hist, b_hist, w


def fixed_backward_torch(
    grad: Tensor,
    p: Tensor,
    q: Tensor,
    K: Tensor,
    KC: Tensor,
    u_hist: Tensor,
    v_hist: Tensor,
    a_hist: Tensor,
    b_hist: Tensor,
    w: Tensor,
    need_q: bool = True,
):
    """Reverse mode through the unrolled iterations; w = v_T KCᵀ from the forward. grad (B,) -> (grad_p, grad_q).

    Without ``need_q`` the last step stops after grad_p (v̄₁ only feeds grad_q) and grad_q has shape (0,).
    """
    iters = v_hist.shape[0]
    g = grad[:, None]
    u_bar = g * w
    v_bar = g * torch.mm(u_hist[-1], KC) if (need_q or iters > 1) else None
    grad_p, grad_q = torch.zeros_like(p), torch.zeros_like(q)
    for t in range(iters - 1, -1, -1):
        b, a = b_hist[t], a_hist[t]
        grad_p += u_bar / b
        if t == 0 and not need_q:
            return grad_p, q.new_empty(0)
        b_bar = -u_bar * u_hist[t + 1] / b
        v_bar = v_bar + torch.mm(b_bar, K)
        grad_q += v_bar / a
        a_bar = -v_bar * v_hist[t] / a
        if t > 0:
            u_bar = torch.mm(a_bar, K.T)
        v_bar = torch.zeros_like(v_bar)
    return grad_p, grad_q


# --------------------------------------------------------------------------------------- fixed: op


def _ext_ops():
    from ckakd import _ext

    if _ext.load() is None:
        raise RuntimeError(f"the ckakd._C extension is not available: {_ext.status()[1]}")
    return torch.ops.ckakd


@torch.library.custom_op("ckakd::sinkhorn_fixed", mutates_args=())
def sinkhorn_fixed(
    p: Tensor, q: Tensor, K: Tensor, KC: Tensor, u0: Tensor, iters: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """p, q, u0 (B, C); K = exp(-C/ε), KC = K∘C (C, C) -> (cost (B,), u_hist, v_hist, a_hist, b_hist, w)."""
    record_dispatch("sinkhorn_fixed_forward", backend)
    if backend == "torch":
        return fixed_forward_torch(p, q, K, KC, u0, iters)
    return tuple(_ext_ops().sinkhorn_fixed_forward(p, q, K, KC, u0, iters))


@sinkhorn_fixed.register_fake
def _(p, q, K, KC, u0, iters, backend):
    B, C = p.shape
    hist = p.new_empty((iters, B, C))
    hists = (hist, torch.empty_like(hist), torch.empty_like(hist))
    return p.new_empty((B,)), p.new_empty((iters + 1, B, C)), *hists, p.new_empty((B, C))


@torch.library.custom_op("ckakd::sinkhorn_fixed_grad", mutates_args=())
def sinkhorn_fixed_grad(
    grad: Tensor,
    p: Tensor,
    q: Tensor,
    K: Tensor,
    KC: Tensor,
    u_hist: Tensor,
    v_hist: Tensor,
    a_hist: Tensor,
    b_hist: Tensor,
    w: Tensor,
    backend: str,
    need_q: bool,
) -> tuple[Tensor, Tensor]:
    record_dispatch("sinkhorn_fixed_backward", backend)
    if backend == "torch":
        return fixed_backward_torch(grad, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, need_q)
    gp, gq = _ext_ops().sinkhorn_fixed_backward(grad, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, need_q)
    return gp, gq


@sinkhorn_fixed_grad.register_fake
def _(grad, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, backend, need_q):
    return torch.empty_like(p), (torch.empty_like(q) if need_q else q.new_empty(0))


def _fixed_setup(ctx, inputs, output):
    p, q, K, KC, u0, iters, backend = inputs
    _, u_hist, v_hist, a_hist, b_hist, w = output
    ctx.save_for_backward(p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w)
    ctx.backend = backend
    ctx.mark_non_differentiable(u_hist, v_hist, a_hist, b_hist, w)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs


def _fixed_backward(ctx, grad_cost, *unused):
    if grad_cost is None:
        return (None,) * 7
    p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w = ctx.saved_tensors
    need_q = ctx.needs_input_grad[1]  # the teacher's histogram usually needs none: one product fewer
    gp, gq = sinkhorn_fixed_grad(
        grad_cost.contiguous(), p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, ctx.backend, need_q
    )
    return gp, (gq if need_q else None), None, None, None, None, None


sinkhorn_fixed.register_autograd(_fixed_backward, setup_context=_fixed_setup)


# ----------------------------------------------------------------------------------------- converged


def _logsumexp_kernel(w: Tensor, log_k: Tensor, k: Tensor, transpose: bool) -> Tensor:
    """log(Σ_j exp(w_bj) K_ij) for all b, i (``transpose``: log Σ_i exp(w_bi) K_ij for all b, j), via one
    matrix product with a per-row shift.

    Falls back to the exact (B, C, C) log-sum-exp in batch chunks when the shifted product underflows.
    """
    shift = w.amax(dim=1, keepdim=True)
    prod = torch.mm(torch.exp(w - shift), k.T if not transpose else k)
    out = torch.log(prod) + shift
    bad = ~torch.isfinite(out).all(dim=1)
    if bad.any():
        lk = log_k if not transpose else log_k.T  # lk[i, j]: log K entry multiplying w_j for output i
        rows = bad.nonzero().flatten()
        step = max(1, (1 << 24) // max(1, lk.numel()))
        for s in range(0, rows.numel(), step):
            r = rows[s : s + step]
            out[r] = torch.logsumexp(w[r, None, :] + lk[None], dim=2)
    return out


def converged_potentials(p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int):
    """Log-domain Sinkhorn in float64. Returns (f, g, value (B,), iterations, marginal error)."""
    p64, q64, c64 = p.double(), q.double(), cost.double()
    log_p = torch.where(p64 > 0, p64.log(), torch.full_like(p64, -math.inf))
    log_q = torch.where(q64 > 0, q64.log(), torch.full_like(q64, -math.inf))
    log_k = -c64 / eps
    k = torch.exp(log_k)
    f = torch.zeros_like(p64)
    g = torch.zeros_like(q64)
    err = math.inf
    it = 0
    for it in range(1, max_iter + 1):
        # g_j = ε log q_j − ε log Σ_i exp(f_i/ε) K_ij ; f_i = ε log p_i − ε log Σ_j K_ij exp(g_j/ε)
        g = eps * (log_q - _logsumexp_kernel(f / eps, log_k, k, transpose=True))
        f = eps * (log_p - _logsumexp_kernel(g / eps, log_k, k, transpose=False))
        if it % 10 == 0 or it == max_iter:
            col = torch.exp(_logsumexp_kernel(f / eps, log_k, k, transpose=True) + g / eps)
            col = torch.where(q64 > 0, col, torch.zeros_like(col))
            err = (col - q64).abs().sum(dim=1).max().item()
            if err < tol:
                break
    # ⟨P, C⟩ = Σ_i exp(f_i/ε + log Σ_j (K∘C)_ij exp(g_j/ε)): every term is a plan entry (≤ 1), no overflow
    kc = k * c64
    with torch.no_grad():
        log_kc = torch.where(kc > 0, kc.log(), torch.full_like(kc, -math.inf))
    row = _logsumexp_kernel(g / eps, log_kc, kc, transpose=False)
    value = torch.exp(f / eps + row).nan_to_num(nan=0.0).sum(1)
    return f, g, value, it, err


def _centered_potential(f: Tensor, mass: Tensor) -> Tensor:
    """Potentials on zero-mass entries are -inf (log 0): give them the mean of the others, then center."""
    finite = torch.isfinite(f) & (mass > 0)
    count = finite.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(finite, f, torch.zeros_like(f)).sum(1, keepdim=True) / count
    return torch.where(finite, f - mean, torch.zeros_like(f))


@torch.library.custom_op("ckakd::sinkhorn_converged", mutates_args=())
def sinkhorn_converged(
    p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (value (B,), grad_p (B, C), grad_q (B, C)): ⟨P*, C⟩ and the centered dual potentials."""
    record_dispatch("sinkhorn_converged", backend)
    if backend != "torch":
        value, fp, gq, _ = _ext_ops().sinkhorn_converged_forward(p, q, cost, eps, tol, max_iter)
        return value, fp, gq
    f, g, value, _, _ = converged_potentials(p, q, cost, eps, tol, max_iter)
    return (
        value.to(p.dtype),
        _centered_potential(f, p.double()).to(p.dtype),
        _centered_potential(g, q.double()).to(q.dtype),
    )


@sinkhorn_converged.register_fake
def _(p, q, cost, eps, tol, max_iter, backend):
    return p.new_empty((p.shape[0],)), torch.empty_like(p), torch.empty_like(q)


def _conv_setup(ctx, inputs, output):
    _, fp, gq = output
    ctx.save_for_backward(fp, gq)
    ctx.mark_non_differentiable(fp, gq)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs


def _conv_backward(ctx, grad_value, *unused):
    fp, gq = ctx.saved_tensors
    if grad_value is None:
        return (None,) * 7
    g = grad_value[:, None]
    return g * fp, g * gq, None, None, None, None, None


sinkhorn_converged.register_autograd(_conv_backward, setup_context=_conv_setup)
