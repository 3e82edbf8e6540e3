"""Batched entropic Sinkhorn with one shared cost: the dispatch point behind ``ckakd.sinkhorn`` and WKD-L.

Two ops, each a ``torch.library`` custom op with a fake kernel and an autograd formula:

``ckakd::sinkhorn_fixed(p, q, K, KC, u0, iters, backend)`` — WKD's definition (Lv et al., "Wasserstein
Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation", NeurIPS 2024, and its public code),
fixed iterations in the linear domain: for t = 1..T, v = q / (Kᵀu + δ), u = p / (K v + δ), δ = 1e-8, from u₀; the
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
for CPU and CUDA tensors). Both synchronize with the host once per convergence check (every ``CHECK_EVERY``
iterations), not per iteration (see ``converged_potentials``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


CHECK_EVERY = 10  # iterations between convergence checks (one host sync per check)
EXACT_CHUNK_ELEMENTS = 1 << 24  # per chunk of the exact (rows, C, C) log-sum-exp


def _exact_logsumexp_rows(out: Tensor, w: Tensor, lk: Tensor, rows: Tensor) -> Tensor:
    """Overwrite rows ``rows`` (int64 (R,)) of ``out`` (B, C) with the exact log Σ_j exp(w_rj + lk_ij) (w (B, C),
    lk (C, C)), as (rows, C, C) tensors in chunks of at most 2^24 elements. No host sync; returns ``out``."""
    step = max(1, EXACT_CHUNK_ELEMENTS // max(1, lk.numel()))
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        out.index_copy_(0, r, torch.logsumexp(w.index_select(0, r)[:, None, :] + lk[None], dim=2))
    return out


def _logsumexp_kernel(w: Tensor, log_k: Tensor, k: Tensor, transpose: bool, exact: Tensor | None = None) -> Tensor:
    """log(Σ_j exp(w_bj) K_ij) for all b, i (``transpose``: log Σ_i exp(w_bi) K_ij for all b, j): (B, C).

    One matrix product of exp(w − rowmax w) with K. The samples ``exact`` (int64 indices) are recomputed with
    the exact chunked log-sum-exp (their shifted product underflowed before). Never synchronizes with the host.
    """
    shift = w.amax(dim=1, keepdim=True)
    out = torch.mm(torch.exp(w - shift), k if transpose else k.T).log_().add_(shift)
    if exact is not None and exact.numel():
        _exact_logsumexp_rows(out, w, log_k.T if transpose else log_k, exact)  # lk[i, j] multiplies w_j
    return out


def _logsumexp_checked(w: Tensor, log_k: Tensor, k: Tensor, transpose: bool) -> Tensor:
    """``_logsumexp_kernel`` with every sample whose shifted product is not finite recomputed exactly (one sync)."""
    out = _logsumexp_kernel(w, log_k, k, transpose)
    rows = (~torch.isfinite(out).all(dim=1)).nonzero().flatten()
    return _exact_logsumexp_rows(out, w, log_k.T if transpose else log_k, rows)


def _iterate(
    f: Tensor, g: Tensor, log_p: Tensor, log_q: Tensor, log_k: Tensor, k: Tensor, eps: float, n: int, exact: Tensor
) -> tuple[Tensor, Tensor]:
    """``n`` log-domain iterations from (f, g) (B, C); the samples ``exact`` use the exact log-sum-exp."""
    for _ in range(n):
        # g_j = ε log q_j − ε log Σ_i exp(f_i/ε) K_ij ; f_i = ε log p_i − ε log Σ_j K_ij exp(g_j/ε)
        g = eps * (log_q - _logsumexp_kernel(f / eps, log_k, k, True, exact))
        f = eps * (log_p - _logsumexp_kernel(g / eps, log_k, k, False, exact))
    return f, g


def _nonfinite(x: Tensor, mass: Tensor) -> Tensor:
    """(B,) bool: the sample has a NaN, or an infinite potential where its mass is > 0 (log 0 = −inf is fine)."""
    return (x.isnan() | (x.isinf() & (mass > 0))).any(dim=1)


def _check(
    f: Tensor, g: Tensor, p: Tensor, q: Tensor, log_k: Tensor, k: Tensor, eps: float, exact: Tensor
) -> tuple[Tensor, Tensor]:
    """The convergence check: (column marginal L1 error (B,), samples whose fast path failed (B,) bool).

    A failure is a non-finite potential (``_nonfinite``) or a non-finite column log-sum-exp of the check itself
    (the next half-iteration's), i.e. a shifted product that underflowed to 0 somewhere since the last check.
    """
    lse = _logsumexp_kernel(f / eps, log_k, k, True, exact)
    col = torch.exp(lse + g / eps)
    col = torch.where(q > 0, col, torch.zeros_like(col))
    err = (col - q).abs().sum(dim=1)
    bad = _nonfinite(f, p) | _nonfinite(g, q) | ~torch.isfinite(lse).all(dim=1)
    return err, bad


class ConvergedSolution(NamedTuple):
    """``converged_potentials``' result: potentials f, g (B, C), value ⟨P, C⟩ (B,), iterations, marginal error
    (max over the batch), and the samples (int64 indices) that took the exact log-sum-exp path."""

    f: Tensor
    g: Tensor
    value: Tensor
    iterations: int
    error: float
    exact: Tensor


def converged_potentials(
    p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int
) -> ConvergedSolution:
    """Log-domain Sinkhorn in float64 for p, q (B, C) and cost (C, C), with one host sync per convergence check.

    Each half-iteration is one shifted matrix product per sample (``_logsumexp_kernel``). At small ε that product
    can underflow to 0 for a sample (e.g. a zero-mass class far from all others); its potentials then turn
    non-finite, and stay so (NaN and ±inf propagate through the next row maximum), until the next check, every
    ``CHECK_EVERY`` iterations (and at ``max_iter``). There, failed samples are restored from the previous check's
    snapshot of (f, g) and iterated again, and from then on, with the exact chunked log-sum-exp; the others keep
    the fast product. Samples are independent, so every sample still runs exactly ``iterations`` iterations.
    """
    p64, q64, c64 = p.double(), q.double(), cost.double()
    log_p = torch.where(p64 > 0, p64.log(), torch.full_like(p64, -math.inf))
    log_q = torch.where(q64 > 0, q64.log(), torch.full_like(q64, -math.inf))
    log_k = -c64 / eps
    k = torch.exp(log_k)
    f = torch.zeros_like(p64)
    g = torch.zeros_like(q64)
    exact = torch.zeros(0, dtype=torch.long, device=p64.device)  # samples on the exact path
    is_exact = torch.zeros(p64.shape[0], dtype=torch.bool, device=p64.device)
    snap_f, snap_g, snap_it = f, g, 0  # the last check's state (no copy: every iteration makes new tensors)
    err = math.inf
    it = 0
    while it < max_iter and p64.shape[0] > 0:
        n = min(CHECK_EVERY - it % CHECK_EVERY, max_iter - it)
        f, g = _iterate(f, g, log_p, log_q, log_k, k, eps, n, exact)
        it += n
        errs, bad = _check(f, g, p64, q64, log_k, k, eps, exact)
        bad = bad & ~is_exact
        status = torch.where(bad.any(), math.nan, errs.max()).item()  # the check's one host sync
        if math.isnan(status):
            rows = bad.nonzero().flatten()  # each sample fails at most once: it is exact from then on
            if rows.numel():
                is_exact.index_fill_(0, rows, True)
                exact = torch.cat([exact, rows])
                sub = torch.arange(rows.numel(), device=rows.device)
                fr, gr = _iterate(
                    snap_f.index_select(0, rows),
                    snap_g.index_select(0, rows),
                    log_p.index_select(0, rows),
                    log_q.index_select(0, rows),
                    log_k,
                    k,
                    eps,
                    it - snap_it,
                    sub,
                )
                f, g = f.index_copy(0, rows, fr), g.index_copy(0, rows, gr)
                errs, _ = _check(f, g, p64, q64, log_k, k, eps, exact)
                status = errs.max().item()
        err = status
        snap_f, snap_g, snap_it = f, g, it
        if err < tol:
            break
    # ⟨P, C⟩ = Σ_i exp(f_i/ε + log Σ_j (K∘C)_ij exp(g_j/ε)): every term is a plan entry (≤ 1), no overflow
    kc = k * c64
    with torch.no_grad():
        log_kc = torch.where(kc > 0, kc.log(), torch.full_like(kc, -math.inf))
    row = _logsumexp_checked(g / eps, log_kc, kc, transpose=False)
    value = torch.exp(f / eps + row).nan_to_num(nan=0.0).sum(1)
    return ConvergedSolution(f, g, value, it, err, exact)


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
    f, g, value, *_ = converged_potentials(p, q, cost, eps, tol, max_iter)
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
