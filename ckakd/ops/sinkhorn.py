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

``ckakd::sinkhorn_converged(p, q, cost, eps, tol, max_iter, backend)`` — log-domain iterations (float64) on p, q
rescaled to unit mass, until the column marginal error is below ``tol``. Returns the transport value ⟨P*, C⟩ (what
POT's ``sinkhorn2`` returns) and the entropic value ⟨P*, C⟩ + ε Σ P*(log P* − 1), both formed from log-domain
quantities only (log C − C/ε, never exp(−C/ε)·C), and the potentials. Gradients (``converged_backward``, torch
ops, for every backend): the entropic value's is the dual potentials (envelope theorem); the transport value's is
exact by implicit differentiation of the fixed point (one C×C solve per sample); both also w.r.t. the cost.
Backends: ``torch`` (``converged_potentials`` below, the reference) or the C++ extension (``cpp`` / ``cuda``;
``torch.ops.ckakd.sinkhorn_converged_forward``, the same algorithm with ATen ops, one implementation for CPU and
CUDA tensors). Both synchronize with the host once per convergence check (every ``CHECK_EVERY`` iterations), not
per iteration (see ``converged_potentials``). Accuracy does not depend on ε: a sample whose shifted matrix
product loses accuracy to underflow is detected and moved to an exact log-sum-exp.

A cost that requires grad: the fixed mode's backward then also returns ∂/∂K, ∂/∂(K∘C) (``fixed_backward_torch``,
torch ops for every backend) and autograd carries them to the cost; the fixed mode warns once per ε and dtype
when K = exp(−C/ε) underflows (``warn_if_kernel_underflows``).
"""

from __future__ import annotations

import math
import warnings
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
    need_kernel: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Reverse mode through the unrolled iterations; w = v_T KCᵀ from the forward. grad (B,) -> (grad_p, grad_q,
    grad_K, grad_KC). Without ``need_q`` the last step stops after grad_p (v̄₁ only feeds grad_q) and grad_q has
    shape (0,). With ``need_kernel`` it also returns grad_K, grad_KC (C, C) (else None):
    ∂/∂KC = (g∘u_T)ᵀ v_T; each a_t = u_{t−1} K + δ adds u_{t−1}ᵀ ā_t and each b_t = v_t Kᵀ + δ adds b̄_tᵀ v_t to ∂/∂K.
    (The cost's gradient follows by autograd through K = exp(−C/ε), K∘C.)"""
    iters = v_hist.shape[0]
    g = grad[:, None]
    u_bar = g * w
    v_bar = g * torch.mm(u_hist[-1], KC) if (need_q or need_kernel or iters > 1) else None
    grad_p, grad_q = torch.zeros_like(p), torch.zeros_like(q)
    grad_k = torch.zeros_like(K) if need_kernel else None
    grad_kc = torch.mm((g * u_hist[-1]).T, v_hist[-1]) if need_kernel else None
    for t in range(iters - 1, -1, -1):
        b, a = b_hist[t], a_hist[t]
        grad_p += u_bar / b
        if t == 0 and not (need_q or need_kernel):
            return grad_p, q.new_empty(0), None, None
        b_bar = -u_bar * u_hist[t + 1] / b
        v_bar = v_bar + torch.mm(b_bar, K)
        grad_q += v_bar / a
        a_bar = -v_bar * v_hist[t] / a
        if need_kernel:
            grad_k.addmm_(b_bar.T, v_hist[t]).addmm_(u_hist[t].T, a_bar)
        if t > 0:
            u_bar = torch.mm(a_bar, K.T)
        v_bar = torch.zeros_like(v_bar)
    return grad_p, (grad_q if need_q else q.new_empty(0)), grad_k, grad_kc


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
        return fixed_backward_torch(grad, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, need_q)[:2]
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
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # a cost that requires grad: torch ops, any backend
        gp, gq, gk, gkc = fixed_backward_torch(
            grad_cost.contiguous(), p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, need_q, True
        )
        return gp, (gq if need_q else None), gk, gkc, None, None, None
    gp, gq = sinkhorn_fixed_grad(
        grad_cost.contiguous(), p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, ctx.backend, need_q
    )
    return gp, (gq if need_q else None), None, None, None, None, None


sinkhorn_fixed.register_autograd(_fixed_backward, setup_context=_fixed_setup)


# ----------------------------------------------------------------------------------------- converged


CHECK_EVERY = 10  # iterations between convergence checks (one host sync per check)
EXACT_CHUNK_ELEMENTS = 1 << 24  # per chunk of the exact (rows, C, C) log-sum-exp
PLAN_CHUNK_ELEMENTS = 1 << 22  # per chunk of the (samples, C, C) plans of the backward
# A shifted product Σ_j exp(w_j − max w)·K_ij loses the terms that underflow (or are flushed to zero): at most
# 2⁻¹⁰²²·max(1, max K) each. Its sum S is kept only when log S >= log(n·max(1, max K)) + LOG_FAST_FLOOR, i.e. when
# all lost terms together are below a quarter ulp of S; otherwise the row is recomputed with the exact
# log-sum-exp. (At small ε most of K underflows, e.g. all of it beyond C/ε > 745, and the shifted product of a
# sample can lose its dominant terms while staying finite: the value was then silently far too small.)
LOG_FAST_FLOOR = (-1022 + 53 + 2) * math.log(2.0)
VALUES = ("transport", "entropic")


def _fast_floor(k: Tensor) -> Tensor:
    """0-dim: the smallest log of a shifted product's sum over the (C, C) kernel ``k`` that is accurate (see
    ``LOG_FAST_FLOOR``). No host sync."""
    return torch.log(k.amax().clamp_min(1.0) * k.shape[1]) + LOG_FAST_FLOOR


def _exact_step(lk: Tensor) -> int:
    """Samples per chunk of the exact (samples, C, C) log-sum-exp: at most 2^24 elements."""
    return max(1, EXACT_CHUNK_ELEMENTS // max(1, lk.numel()))


def _exact_logsumexp_rows(out: Tensor, w: Tensor, lk: Tensor, rows: Tensor) -> Tensor:
    """Overwrite rows ``rows`` (int64 (R,)) of ``out`` (B, C) with the exact log Σ_j exp(w_rj + lk_ij) (w (B, C),
    lk (C, C)), as (rows, C, C) tensors in chunks of at most 2^24 elements. No host sync; returns ``out``."""
    step = _exact_step(lk)
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        out.index_copy_(0, r, torch.logsumexp(w.index_select(0, r)[:, None, :] + lk[None], dim=2))
    return out


def _logsumexp_kernel(
    w: Tensor,
    log_k: Tensor,
    k: Tensor,
    transpose: bool,
    exact: Tensor | None = None,
    floor: Tensor | None = None,
    mass: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log(Σ_j exp(w_bj) K_ij) for all b, i (``transpose``: log Σ_i exp(w_bi) K_ij for all b, j): (B, C).

    One matrix product of exp(w − rowmax w) with K. The samples ``exact`` (int64 indices) are recomputed with
    the exact chunked log-sum-exp (all of them: no product at all). With ``floor`` (``_fast_floor(k)``) and
    ``mass`` (B, C) also returns, per sample (B,) bool, whether an output entry with mass > 0 fell below the floor
    (the product lost accuracy to underflow); otherwise None. Never synchronizes with the host.
    """
    lk = log_k.T if transpose else log_k  # lk[i, j] multiplies w_j
    if exact is not None and exact.numel() == w.shape[0]:  # every sample exact (host metadata, no sync)
        out = torch.cat([torch.logsumexp(c[:, None, :] + lk[None], dim=2) for c in w.split(_exact_step(lk))])
        return out, (None if floor is None else torch.zeros(w.shape[0], dtype=torch.bool, device=w.device))
    shift = w.amax(dim=1, keepdim=True)
    log_s = torch.mm(torch.exp(w - shift), k if transpose else k.T).log_()
    lossy = None if floor is None else ((log_s < floor) & (mass > 0)).any(dim=1)
    out = log_s.add_(shift)
    if exact is not None and exact.numel():
        _exact_logsumexp_rows(out, w, lk, exact)
    return out, lossy


def _logsumexp_checked(w: Tensor, log_k: Tensor, k: Tensor, transpose: bool, mass: Tensor) -> Tensor:
    """``_logsumexp_kernel`` with every sample whose shifted product lost accuracy or is not finite where
    ``mass`` > 0 recomputed exactly (one host sync)."""
    out, lossy = _logsumexp_kernel(w, log_k, k, transpose, None, _fast_floor(k), mass)
    bad = lossy | (~torch.isfinite(out) & (mass > 0)).any(dim=1)
    return _exact_logsumexp_rows(out, w, log_k.T if transpose else log_k, bad.nonzero().flatten())


def _iterate(
    f: Tensor,
    g: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    log_k: Tensor,
    k: Tensor,
    eps: float,
    n: int,
    exact: Tensor,
    track: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``n`` log-domain iterations from (f, g) (B, C); the samples ``exact`` use the exact log-sum-exp.

    ``track`` = (floor, p, q): also return the samples (B,) bool whose shifted product lost accuracy in any of
    the half-iterations (``_logsumexp_kernel``); otherwise None.
    """
    floor, p, q = track if track is not None else (None, None, None)
    lossy = None
    for _ in range(n):
        # g_j = ε log q_j − ε log Σ_i exp(f_i/ε) K_ij ; f_i = ε log p_i − ε log Σ_j K_ij exp(g_j/ε)
        lse, lost_g = _logsumexp_kernel(f / eps, log_k, k, True, exact, floor, q)
        g = eps * (log_q - lse)
        lse, lost_f = _logsumexp_kernel(g / eps, log_k, k, False, exact, floor, p)
        f = eps * (log_p - lse)
        if track is not None:
            lossy = (lost_g | lost_f) if lossy is None else lossy.logical_or_(lost_g).logical_or_(lost_f)
    return f, g, lossy


def _nonfinite(x: Tensor, mass: Tensor) -> Tensor:
    """(B,) bool: the sample has a NaN, or an infinite potential where its mass is > 0 (log 0 = −inf is fine)."""
    return (x.isnan() | (x.isinf() & (mass > 0))).any(dim=1)


def _check(
    f: Tensor, g: Tensor, p: Tensor, q: Tensor, log_k: Tensor, k: Tensor, eps: float, exact: Tensor, floor: Tensor
) -> tuple[Tensor, Tensor]:
    """The convergence check: (column marginal L1 error (B,), samples whose fast path failed (B,) bool).

    A failure is a non-finite potential (``_nonfinite``), or a column log-sum-exp of the check itself (the next
    half-iteration's) that is not finite or lost accuracy to underflow.
    """
    lse, lossy = _logsumexp_kernel(f / eps, log_k, k, True, exact, floor, q)
    col = torch.exp(lse + g / eps)
    col = torch.where(q > 0, col, torch.zeros_like(col))
    err = (col - q).abs().sum(dim=1)
    bad = _nonfinite(f, p) | _nonfinite(g, q) | ~torch.isfinite(lse).all(dim=1) | lossy
    return err, bad


class ConvergedSolution(NamedTuple):
    """``converged_potentials``' result: potentials f, g (B, C) of the unit-mass problem, its transport value
    ⟨P*, C⟩ (B,), its entropic value (B,), iterations, marginal error (max over the batch), and the samples
    (int64 indices) that took the exact log-sum-exp path."""

    f: Tensor
    g: Tensor
    value: Tensor
    entropic: Tensor
    iterations: int
    error: float
    exact: Tensor


def unit_mass(h: Tensor) -> Tensor:
    """(B, C) histograms rescaled to unit mass in float64 (balanced OT needs equal masses; this absorbs the
    rounding of half-precision softmax outputs)."""
    h = h.double()
    return h / h.sum(1, keepdim=True)


def transport_value(f: Tensor, g: Tensor, p: Tensor, cost: Tensor, eps: float) -> Tensor:
    """⟨P, C⟩ = Σ_ij exp((f_i + g_j − C_ij)/ε) C_ij (B,) from log-domain quantities only (float64, one sync).

    Each row is exp(f_i/ε + LSE_j(g_j/ε − C_ij/ε + log C_ij)): the kernel is formed as log C − C/ε, never as
    exp(−C/ε)·C (which underflows once C/ε > ~745 while the plan entries it multiplies are of order 1).
    """
    c = cost.double()
    with torch.no_grad():
        log_kc = torch.where(c > 0, c.log() - c / eps, torch.full_like(c, -math.inf))
    row = _logsumexp_checked(g / eps, log_kc, log_kc.exp(), False, p)
    return torch.exp(f / eps + row).nan_to_num(nan=0.0).sum(1)


def entropic_value(f: Tensor, g: Tensor, p: Tensor, q: Tensor, eps: float) -> Tensor:
    """min_P ⟨P, C⟩ + ε Σ P (log P − 1) over unit-mass plans (B,): at the optimum ⟨f, p̂⟩ + ⟨g, q̂⟩ − ε, with p̂, q̂
    the unit-mass histograms (zero-mass entries, whose potentials are −inf, contribute 0)."""
    ph, qh = unit_mass(p), unit_mass(q)
    fp = torch.where(ph > 0, f * ph, torch.zeros_like(f)).sum(1)
    gq = torch.where(qh > 0, g * qh, torch.zeros_like(g)).sum(1)
    return fp + gq - eps


def converged_potentials(
    p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int
) -> ConvergedSolution:
    """Log-domain Sinkhorn in float64 for p, q (B, C) (rescaled to unit mass) and cost (C, C), with one host sync
    per convergence check.

    Each half-iteration is one shifted matrix product per sample (``_logsumexp_kernel``). At small ε that product
    loses accuracy for a sample when its terms underflow (the largest one below ~2⁻⁹⁶⁷, see ``LOG_FAST_FLOOR``),
    or fails outright (non-finite potentials, which then stay so until the next check). Both are recorded without
    a host sync; at the next check, every ``CHECK_EVERY`` iterations (and at ``max_iter``), the affected samples
    are restored from the previous check's snapshot of (f, g) and iterated again, and from then on, with the
    exact chunked log-sum-exp; the others keep the fast product. Samples are independent, so every sample still
    runs exactly ``iterations`` iterations. The values are formed from log-domain quantities only.
    """
    p64, q64, c64 = unit_mass(p), unit_mass(q), cost.double()
    log_p = torch.where(p64 > 0, p64.log(), torch.full_like(p64, -math.inf))
    log_q = torch.where(q64 > 0, q64.log(), torch.full_like(q64, -math.inf))
    log_k = -c64 / eps
    k = torch.exp(log_k)
    floor = _fast_floor(k)
    f = torch.zeros_like(p64)
    g = torch.zeros_like(q64)
    exact = torch.zeros(0, dtype=torch.long, device=p64.device)  # samples on the exact path
    is_exact = torch.zeros(p64.shape[0], dtype=torch.bool, device=p64.device)
    snap_f, snap_g, snap_it = f, g, 0  # the last check's state (no copy: every iteration makes new tensors)
    err = math.inf
    it = 0
    while it < max_iter and p64.shape[0] > 0:
        n = min(CHECK_EVERY - it % CHECK_EVERY, max_iter - it)
        f, g, lossy = _iterate(f, g, log_p, log_q, log_k, k, eps, n, exact, (floor, p64, q64))
        it += n
        errs, bad = _check(f, g, p64, q64, log_k, k, eps, exact, floor)
        bad = (bad | lossy) & ~is_exact
        status = torch.where(bad.any(), math.nan, errs.max()).item()  # the check's one host sync
        if math.isnan(status):
            rows = bad.nonzero().flatten()  # each sample fails at most once: it is exact from then on
            if rows.numel():
                is_exact.index_fill_(0, rows, True)
                exact = torch.cat([exact, rows])
                sub = torch.arange(rows.numel(), device=rows.device)
                fr, gr, _ = _iterate(
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
                errs, _ = _check(f, g, p64, q64, log_k, k, eps, exact, floor)
                status = errs.max().item()
        err = status
        snap_f, snap_g, snap_it = f, g, it
        if err < tol:
            break
    value = transport_value(f, g, p64, c64, eps)
    return ConvergedSolution(f, g, value, entropic_value(f, g, p64, q64, eps), it, err, exact)


def _transport_adjoint(plan: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
    """Implicit differentiation of ⟨P, C⟩ through the entropic fixed point: (x, y) (b, C) for plans (b, C, C).

    With r = P1, c = Pᵀ1, a = (P∘C)1, b = (P∘C)ᵀ1, the linearized marginal constraints give
    [[diag r, P], [Pᵀ, diag c]] [x; y] = [a; b], and then d⟨P, C⟩ = ⟨x, dp⟩ + ⟨y, dq⟩ + Σ P_ij (1 + (x_i + y_j −
    C_ij)/ε) dC_ij. Solved through the Schur complement (diag c − Pᵀ diag(1/r) P) y = b − Pᵀ(a/r), whose null
    vector 1 (over the columns with mass) is fixed by a rank-one term; entries without mass get 0. A sample whose
    system the LU solve cannot handle (a plan split into blocks by underflow) is solved by a pseudo-inverse.
    """
    r, col = plan.sum(2), plan.sum(1)
    pc = plan * cost
    a, b = pc.sum(2), pc.sum(1)
    rinv = torch.where(r > 0, 1.0 / r, torch.zeros_like(r))
    pt = plan.mT
    schur = torch.diag_embed(col) - pt @ (plan * rinv[:, :, None])
    rhs = b - (pt @ (a * rinv)[..., None])[..., 0]
    support = col > 0
    m = support.to(plan.dtype)
    kappa = col.sum(1) / m.sum(1).clamp_min(1.0)  # the scale of the diagonal
    schur = schur + kappa[:, None, None] * m[:, :, None] * m[:, None, :] + torch.diag_embed(1.0 - m)
    rhs = torch.where(support, rhs, torch.zeros_like(rhs))
    y, info = torch.linalg.solve_ex(schur, rhs)
    bad = (info != 0) | ~torch.isfinite(y).all(dim=1)
    if bool(bad.any()):
        y = y.clone()
        y[bad] = (torch.linalg.pinv(schur[bad], hermitian=True) @ rhs[bad][..., None])[..., 0]
    x = (a - (plan @ y[..., None])[..., 0]) * rinv
    return x, y


def converged_backward(
    grad_transport: Tensor | None,
    grad_entropic: Tensor | None,
    p: Tensor,
    q: Tensor,
    cost: Tensor,
    f: Tensor,
    g: Tensor,
    eps: float,
    need_cost: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Exact gradients of the converged values of the unit-mass problem (p̂ = p / Σp, q̂ = q / Σq), float64.

    grads (B,) or None, p, q (B, C), cost (C, C), potentials f, g (B, C) -> (grad_p, grad_q (B, C),
    grad_cost (C, C) or None). Entropic value: ∂/∂p̂ = f, ∂/∂q̂ = g, ∂/∂C = P (the envelope theorem). Transport
    value ⟨P*, C⟩: implicit differentiation (``_transport_adjoint``). Through the rescaling,
    ∂/∂p = (∂/∂p̂ − ⟨∂/∂p̂, p̂⟩) / Σp, so ⟨∂/∂p, p⟩ = 0; entries without mass get 0 (the true derivative there is
    unbounded). Plans are formed per chunk of samples, at most 2^22 elements, never B×C×C at once.
    """
    p64, q64, c64 = p.double(), q.double(), cost.double()
    sp, sq = p64.sum(1, keepdim=True), q64.sum(1, keepdim=True)
    ph, qh = p64 / sp, q64 / sq
    B, C = p64.shape
    pos_p, pos_q = ph > 0, qh > 0
    zero = torch.zeros_like(f)
    ge = p64.new_zeros(B) if grad_entropic is None else grad_entropic.double()
    dp = ge[:, None] * torch.where(pos_p, f, zero)  # ∂/∂p̂, then ∂/∂q̂
    dq = ge[:, None] * torch.where(pos_q, g, zero)
    grad_cost = c64.new_zeros(C, C) if need_cost else None
    if grad_transport is not None or need_cost:
        gt = None if grad_transport is None else grad_transport.double()
        step = max(1, PLAN_CHUNK_ELEMENTS // (C * C))
        for s in range(0, B, step):
            sl = slice(s, s + step)
            plan = torch.exp((f[sl, :, None] + g[sl, None, :] - c64) / eps)  # 0 on rows / columns without mass
            weight = ge[sl, None, None] * plan if need_cost else None
            if gt is not None:
                x, y = _transport_adjoint(plan, c64)
                dp[sl] += gt[sl, None] * x
                dq[sl] += gt[sl, None] * y
                if need_cost:
                    weight = weight + gt[sl, None, None] * plan * (1 + (x[:, :, None] + y[:, None, :] - c64) / eps)
            if need_cost:
                grad_cost += weight.sum(0)
    grad_p = torch.where(pos_p, dp - (dp * ph).sum(1, keepdim=True), zero) / sp
    grad_q = torch.where(pos_q, dq - (dq * qh).sum(1, keepdim=True), zero) / sq
    return grad_p, grad_q, grad_cost


@torch.library.custom_op("ckakd::sinkhorn_converged", mutates_args=())
def sinkhorn_converged(
    p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """p, q (B, C), cost (C, C) -> (transport ⟨P*, C⟩ (B,), entropic value (B,) (p's dtype), potentials f, g
    (B, C) and info [iterations, marginal error] (2,), float64) of the unit-mass problem."""
    record_dispatch("sinkhorn_converged", backend)
    p64, q64, c64 = (t.double().contiguous() for t in (p, q, cost))
    if backend != "torch":
        transport, f, g, info = _ext_ops().sinkhorn_converged_forward(p64, q64, c64, eps, tol, max_iter)
    else:
        sol = converged_potentials(p64, q64, c64, eps, tol, max_iter)
        transport, f, g = sol.value, sol.f, sol.g
        info = torch.tensor([float(sol.iterations), sol.error], dtype=torch.float64, device=p.device)
    entropic = entropic_value(f, g, p64, q64, eps)
    return transport.to(p.dtype), entropic.to(p.dtype), f, g, info


@sinkhorn_converged.register_fake
def _(p, q, cost, eps, tol, max_iter, backend):
    B, C = p.shape
    f64 = torch.float64
    return (
        p.new_empty((B,)),
        p.new_empty((B,)),
        p.new_empty((B, C), dtype=f64),
        p.new_empty((B, C), dtype=f64),
        p.new_empty((2,), dtype=f64),
    )


def _conv_setup(ctx, inputs, output):
    p, q, cost, eps, *_ = inputs
    _, _, f, g, info = output
    ctx.save_for_backward(p, q, cost, f, g)
    ctx.eps = eps
    ctx.mark_non_differentiable(f, g, info)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the outputs that got none


@torch.library.custom_op("ckakd::sinkhorn_converged_grad", mutates_args=())
def sinkhorn_converged_grad(
    grad_transport: Tensor,
    grad_entropic: Tensor,
    p: Tensor,
    q: Tensor,
    cost: Tensor,
    f: Tensor,
    g: Tensor,
    eps: float,
    with_transport: bool,
    need_cost: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``converged_backward`` as an op (its fallback solve is data-dependent): grads (B,) of the two values
    (``grad_transport`` is ignored without ``with_transport``: no solve) -> (grad_p, grad_q (B, C) float64,
    grad_cost (C, C) float64, or (0,) without ``need_cost``)."""
    gt = grad_transport if with_transport else None
    gp, gq, gc = converged_backward(gt, grad_entropic, p, q, cost, f, g, eps, need_cost)
    return gp, gq, (gc if need_cost else p.new_empty((0,), dtype=torch.float64))


@sinkhorn_converged_grad.register_fake
def _(grad_transport, grad_entropic, p, q, cost, f, g, eps, with_transport, need_cost):
    f64 = torch.float64
    return (
        p.new_empty(p.shape, dtype=f64),
        q.new_empty(q.shape, dtype=f64),
        cost.new_empty(cost.shape if need_cost else (0,), dtype=f64),
    )


def _conv_backward(ctx, grad_transport, grad_entropic, *unused):
    if grad_transport is None and grad_entropic is None:
        return (None,) * 7
    p, q, cost, f, g = ctx.saved_tensors
    need_cost = ctx.needs_input_grad[2]
    with_transport = grad_transport is not None  # the transport solve runs only when that value has a gradient
    gt = grad_transport if with_transport else torch.zeros_like(grad_entropic)
    ge = grad_entropic if grad_entropic is not None else torch.zeros_like(grad_transport)
    gp, gq, gc = sinkhorn_converged_grad(
        gt.contiguous(), ge.contiguous(), p, q, cost, f, g, ctx.eps, with_transport, need_cost
    )
    return (
        gp.to(p.dtype) if ctx.needs_input_grad[0] else None,
        gq.to(q.dtype) if ctx.needs_input_grad[1] else None,
        gc.to(cost.dtype) if need_cost else None,
        None,
        None,
        None,
        None,
    )


sinkhorn_converged.register_autograd(_conv_backward, setup_context=_conv_setup)


def solve_converged(
    p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int, backend: str, value: str
) -> Tensor:
    """The converged mode behind ``ckakd.sinkhorn(tol=...)``: p, q (B, C), cost (C, C) (may require grad) -> (B,),
    ``value`` "transport" (⟨P*, C⟩) or "entropic". Warns when ``max_iter`` ends before the marginal error is
    below ``tol`` (one host sync, outside ``torch.compile``)."""
    transport, entropic, _, _, info = sinkhorn_converged(p, q, cost, eps, tol, max_iter, backend)
    if p.shape[0] > 0 and not torch.compiler.is_compiling():
        iterations, error = info.tolist()
        if not error < tol:
            warnings.warn(
                f"ckakd.sinkhorn: not converged after max_iter={int(iterations)} iterations (column marginal L1 "
                f"error {error:.3g} >= tol={tol:g}, eps={eps:g}); raise max_iter, or tol",
                RuntimeWarning,
                stacklevel=3,
            )
    return transport if value == "transport" else entropic


# ------------------------------------------------------------------------------------ fixed: kernels


_UNDERFLOW_WARNED: set[tuple[float, torch.dtype]] = set()


def warn_if_kernel_underflows(k: Tensor, cost: Tensor, eps: float) -> None:
    """One RuntimeWarning per (ε, dtype) and process when K = exp(−C/ε) (C, C) has entries below the smallest
    normal number of its dtype (C/ε > ~87 in float32, ~708 in float64): those routes carry no mass and no gradient
    in the fixed-iteration mode, and with all off-diagonal entries gone its value and gradient are ~0. One host
    sync; skipped under ``torch.compile``."""
    key = (float(eps), k.dtype)
    if key in _UNDERFLOW_WARNED or torch.compiler.is_compiling():
        return
    with torch.no_grad():
        under = int((k < torch.finfo(k.dtype).tiny).sum())
        if under == 0:
            return
        ratio = float(cost.detach().max()) / eps
    _UNDERFLOW_WARNED.add(key)
    c = k.shape[0]
    warnings.warn(
        f"ckakd.sinkhorn: K = exp(-cost/eps) underflows in {str(k.dtype).replace('torch.', '')} for {under} of "
        f"{c * c} entries (eps={eps:g}, max cost/eps = {ratio:.4g}): in the fixed-iteration mode (WKD's definition, "
        "kept) those routes carry no mass and no gradient, and the value tends to 0. Use a larger eps, or the "
        "log-domain converged mode (tol=...). Shown once per eps and dtype.",
        RuntimeWarning,
        stacklevel=4,
    )


def fixed_kernels(cost: Tensor, eps: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """K = exp(−C/ε) and K∘C (C, C) in ``dtype``, differentiable w.r.t. ``cost`` (for a cost that requires grad;
    ``ckakd.sinkhorn`` caches the detached ones otherwise). Warns once when K underflows."""
    c = cost.to(device=device, dtype=dtype)
    k = torch.exp(-c / eps)
    warn_if_kernel_underflows(k, c, eps)
    return k, k * c
