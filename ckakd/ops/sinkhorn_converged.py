"""Converged Sinkhorn (log domain): the op ``ckakd::sinkhorn_converged_forward`` and its gradients.

Log-domain iterations (float64) on p, q rescaled to unit mass, until the column marginal error is below ``tol``.
The forward returns the transport value ⟨P*, C⟩ (what POT's ``sinkhorn2`` returns), formed from log-domain
quantities only (log C − C/ε, never exp(−C/ε)·C), the potentials f, g and info [iterations, marginal error].
Both implementations synchronize with the host once per convergence check (every ``CHECK_EVERY`` iterations), not
per iteration (see ``converged_potentials``). Accuracy does not depend on ε: a sample whose shifted matrix product
loses accuracy to underflow is detected and moved to an exact log-sum-exp.

Ops, one schema per job:

* ``ckakd::sinkhorn_converged_forward(p, q, cost, eps, tol, max_iter) -> (value, f, g, info)``: the C++ extension
  (csrc/sinkhorn_converged.cpp, ATen ops, one implementation for CPU and CUDA tensors), and its torch twin
  ``ckakd::sinkhorn_converged_forward_torch`` (``converged_potentials`` below, the reference, step for step);
* ``ckakd::sinkhorn_converged_entropic(p, q, cost, f, g, eps) -> value``: the entropic value
  ⟨P*, C⟩ + ε Σ P*(log P* − 1) from the potentials (``entropic_value``);
* ``ckakd::sinkhorn_converged_backward(grad, p, q, cost, f, g, eps, transport, need_cost) -> (grad_p, grad_q,
  grad_cost)``: torch ops for every backend (an op: its fallback solve is data-dependent). The entropic value's
  gradient is the dual potentials (envelope theorem); the transport value's is exact by implicit differentiation
  of the fixed point (one C×C solve per sample); both also w.r.t. the cost.

The fakes and the autograd formulas (``register``) are the same for the C++ forward and its torch twin: the
torch ops get them at import, the C++ op once when the extension loads (``ckakd._ext.when_loaded``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ckakd import _ext

FORWARD = "ckakd::sinkhorn_converged_forward"

ConvergedOutputs = tuple[Tensor, Tensor, Tensor, Tensor]

# ------------------------------------------------------------------------------------------- the solver


CHECK_EVERY = 10  # iterations between convergence checks (one host sync per check)
EXACT_CHUNK_ELEMENTS = 1 << 24  # per chunk of the exact (rows, C, C) log-sum-exp
PLAN_CHUNK_ELEMENTS = 1 << 22  # per chunk of the (samples, C, C) plans of the backward
# A shifted product Σ_j exp(w_j − max w)·K_ij loses the terms that underflow (or are flushed to zero): at most
# 2⁻¹⁰²²·max(1, max K) each. Its sum S is kept only when log S >= log(n·max(1, max K)) + LOG_FAST_FLOOR, i.e. when
# all lost terms together are below a quarter ulp of S; otherwise the row is recomputed with the exact
# log-sum-exp. (At small ε most of K underflows, e.g. all of it beyond C/ε > 745, and the shifted product of a
# sample can lose its dominant terms while staying finite: the value was then silently far too small.)
LOG_FAST_FLOOR = (-1022 + 53 + 2) * math.log(2.0)


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


# ------------------------------------------------------------------------------------------------ ops


@torch.library.custom_op(FORWARD + "_torch", mutates_args=())
def sinkhorn_converged_forward_torch(
    p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int
) -> ConvergedOutputs:
    """``ckakd::sinkhorn_converged_forward`` with torch ops (``converged_potentials``): p, q (B, C), cost (C, C) ->
    (transport value (B,), f, g (B, C) of the unit-mass problem, in p's dtype; info [iterations, marginal error]
    (2,) float64)."""
    sol = converged_potentials(p, q, cost, eps, tol, max_iter)
    info = torch.tensor([float(sol.iterations), sol.error], dtype=torch.float64, device=p.device)
    return sol.value.to(p.dtype), sol.f.to(p.dtype), sol.g.to(p.dtype), info


@torch.library.custom_op("ckakd::sinkhorn_converged_entropic", mutates_args=())
def sinkhorn_converged_entropic(p: Tensor, q: Tensor, cost: Tensor, f: Tensor, g: Tensor, eps: float) -> Tensor:
    """The entropic value (B,) of the unit-mass problem from its potentials f, g (B, C) (``entropic_value``); its
    gradient w.r.t. p, q and ``cost`` (C, C) is the envelope theorem's (f and g get none)."""
    return entropic_value(f, g, p, q, eps)


@torch.library.custom_op("ckakd::sinkhorn_converged_backward", mutates_args=())
def sinkhorn_converged_backward(
    grad: Tensor,
    p: Tensor,
    q: Tensor,
    cost: Tensor,
    f: Tensor,
    g: Tensor,
    eps: float,
    transport: bool,
    need_cost: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``converged_backward`` as an op: grad (B,) of the transport value (``transport``) or of the entropic one ->
    (grad_p, grad_q (B, C) float64, grad_cost (C, C) float64, or (0,) without ``need_cost``)."""
    gt, ge = (grad, None) if transport else (None, grad)
    gp, gq, gc = converged_backward(gt, ge, p, q, cost, f, g, eps, need_cost)
    return gp, gq, (gc if need_cost else p.new_empty((0,), dtype=torch.float64))


def forward_fake(p: Tensor, q: Tensor, cost: Tensor, eps: float, tol: float, max_iter: int) -> ConvergedOutputs:
    """Shape-only forward: (value (B,), f, g (B, C) in p's dtype, info (2,) float64)."""
    info = p.new_empty((2,), dtype=torch.float64)  # [iterations, marginal error]
    return p.new_empty((p.shape[0],)), p.new_empty(p.shape), p.new_empty(p.shape), info


@sinkhorn_converged_entropic.register_fake
def _entropic_fake(p: Tensor, q: Tensor, cost: Tensor, f: Tensor, g: Tensor, eps: float) -> Tensor:
    return f.new_empty((p.shape[0],))


@sinkhorn_converged_backward.register_fake
def _backward_fake(grad, p, q, cost, f, g, eps, transport, need_cost):
    f64 = torch.float64
    return (
        p.new_empty(p.shape, dtype=f64),
        q.new_empty(q.shape, dtype=f64),
        cost.new_empty(cost.shape if need_cost else (0,), dtype=f64),
    )


def _grads(ctx, grad: Tensor, transport: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_p, grad_q, grad_cost) in the inputs' dtypes (None where no gradient is needed)."""
    p, q, cost, f, g = ctx.saved_tensors
    need_cost = ctx.needs_input_grad[2]
    gp, gq, gc = sinkhorn_converged_backward(grad.contiguous(), p, q, cost, f, g, ctx.eps, transport, need_cost)
    return (
        gp.to(p.dtype) if ctx.needs_input_grad[0] else None,
        gq.to(q.dtype) if ctx.needs_input_grad[1] else None,
        gc.to(cost.dtype) if need_cost else None,
    )


def _forward_setup(ctx, inputs, output) -> None:
    p, q, cost, eps, _, _ = inputs
    _, f, g, info = output
    ctx.save_for_backward(p, q, cost, f, g)
    ctx.eps = eps
    ctx.mark_non_differentiable(f, g, info)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the outputs that got none


def _forward_backward(ctx, grad_value, *unused):
    if grad_value is None:
        return (None,) * 6
    return *_grads(ctx, grad_value, True), None, None, None


def _entropic_setup(ctx, inputs, output) -> None:
    p, q, cost, f, g, eps = inputs
    ctx.save_for_backward(p, q, cost, f, g)
    ctx.eps = eps


def _entropic_backward(ctx, grad_value):
    return *_grads(ctx, grad_value, False), None, None, None


def register(forward: str) -> None:
    """The fake kernel and the autograd formula (the transport value's gradient) of the forward op ``forward``."""
    torch.library.register_fake(forward, forward_fake)
    torch.library.register_autograd(forward, _forward_backward, setup_context=_forward_setup)


sinkhorn_converged_entropic.register_autograd(_entropic_backward, setup_context=_entropic_setup)
register(FORWARD + "_torch")
_ext.when_loaded(lambda: register(FORWARD))
