"""Discrete Wasserstein distillation (WKD-L): batched Sinkhorn over a shared cost and the logit loss.

``sinkhorn`` solves B entropic OT problems between the rows of p and q (B, C) with one C×C cost, and
returns the transport cost ⟨P, C⟩ per row. ``wkd_logit_loss`` is WKD-L: the WD between the softened
student and teacher predictions, optionally with target separation (the target class handled by a
cross-entropy-like term, the remaining C−1 classes by WD), exactly as the WKD public code computes it but
without its per-sample (C−1)×(C−1) cost copies: the target class gets zero mass in the shared C×C problem,
which is the same problem (its row and column of the plan are zero, and the other classes keep their costs).

Under ``torch.compile`` both trace into one graph (``fullgraph=True``): the cost's values are checked once per
cost tensor (and in-place version) in eager mode, by ``check_cost`` or at the construction of
``ckakd.nn.WKDLogitLoss``, never inside a traced region (that check is a host sync); shapes, dtypes and devices
are still checked there, and the extension's backends are resolved outside the graph.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd import _checks
from ckakd._checks import Reduction
from ckakd.ops import _backend
from ckakd.ops.sinkhorn import VALUES, sinkhorn_fixed, solve_converged
from ckakd.ops.sinkhorn_fixed import fixed_kernels

__all__ = ["sinkhorn", "wkd_logit_loss"]

SinkhornBackend = Literal["auto", "torch", "cpp", "cuda"]
SinkhornValue = Literal["transport", "entropic"]


def _row_sum_tolerance(dtype: torch.dtype) -> float:
    """Allowed |row sum - 1| of a histogram: 1e-3, plus the rounding of fp16/bf16 storage (a softmax rounded
    to bf16 sums to 1 only within ~2⁻⁸)."""
    return 1e-3 + (torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0)


def _check_histograms(p: Tensor, q: Tensor, validate: bool) -> tuple[Tensor, Tensor, bool]:
    _checks.check_float_tensor("p", p)
    _checks.check_float_tensor("q", q)
    _checks.check_same_device(p=p, q=q)
    _checks.check_rank("p", p, (1, 2), "(C,) or (B, C)")
    _checks.check_rank("q", q, (1, 2), "(C,) or (B, C)")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape (B, C), got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.shape[-1] == 0:
        raise ValueError(f"p and q must have at least one class (C >= 1), got shape {tuple(p.shape)}")
    batched = p.dim() == 2
    if not batched:
        p, q = p.unsqueeze(0), q.unsqueeze(0)
    if validate and p.shape[0] > 0:
        for name, h in (("p", p), ("q", q)):
            if bool((h < 0).any()):
                raise ValueError(
                    f"{name} must be nonnegative histograms; {name} of shape {tuple(h.shape)} has negative entries"
                )
            sums = h.sum(1, dtype=torch.float64)
            worst = (sums - 1).abs().max().item()
            tol = _row_sum_tolerance(h.dtype)
            if not worst <= tol:  # also catches NaN
                raise ValueError(
                    f"rows of {name} must sum to 1 (histograms, within {tol:.3g}), got row sums off by up to "
                    f"{worst:.3g} ({name} of shape {tuple(h.shape)})"
                )
    return p, q, batched


def check_cost(cost: Tensor, num_classes: int, device: torch.device) -> None:
    """Refuse a cost that is not a finite, nonnegative (C, C) float matrix on ``device`` with C = ``num_classes``
    (the value check, a host sync, once per cost tensor and in-place version in eager mode; skipped while
    ``torch.compile`` traces: check a cost built in compiled code with a call outside it, as
    ``ckakd.nn.WKDLogitLoss`` does at construction)."""
    _checks.check_float_tensor("cost", cost)
    if cost.device != device:
        raise ValueError(f"inputs must be on one device, got p on {device}, cost on {cost.device}")
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square (C, C) matrix, got shape {tuple(cost.shape)}")
    if cost.shape[0] != num_classes:
        raise ValueError(
            f"cost must be ({num_classes}, {num_classes}) to match C={num_classes}, got {tuple(cost.shape)}"
        )
    if torch.compiler.is_compiling() or _COST_CACHE.validated(cost):
        return
    if bool((cost < 0).any()) or not bool(torch.isfinite(cost).all()):
        raise ValueError(f"cost must be finite and nonnegative (cost of shape {tuple(cost.shape)})")
    _COST_CACHE.mark_validated(cost)


class _CostCache:
    """Per-cost-tensor memo of its validation and of K = exp(-C/ε), K∘C.

    The cost is usually one fixed matrix reused every step; checking it (a host sync) and exponentiating
    it (C² work) once per (tensor, in-place version, ε, dtype) instead of per call matters for small
    problems. Keyed by object identity with a weak reference, so a freed cost never matches a new one;
    bypassed while tracing under ``torch.compile``.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, dict]] = {}

    def _entry(self, cost: Tensor) -> dict | None:
        if torch.compiler.is_compiling():
            return None
        item = self._entries.get(id(cost))
        if item is None or item[0]() is not cost or item[1] != cost._version:
            if len(self._entries) > 64:  # drop dead or stale entries
                self._entries = {k: v for k, v in self._entries.items() if v[0]() is not None}
            try:
                item = (weakref.ref(cost), cost._version, {})
            except TypeError:
                return None
            self._entries[id(cost)] = item
        return item[2]

    def validated(self, cost: Tensor) -> bool:
        entry = self._entry(cost)
        return entry is not None and entry.get("valid", False)

    def mark_validated(self, cost: Tensor) -> None:
        entry = self._entry(cost)
        if entry is not None:
            entry["valid"] = True

    def kernels(
        self, cost: Tensor, eps: float, dtype: torch.dtype, device: torch.device, stacklevel: int = 2
    ) -> tuple[Tensor, Tensor]:
        """``fixed_kernels`` of the detached cost (C, C), memoized (``stacklevel`` of its warning as in
        ``warnings.warn``, 2: this method's caller)."""
        entry = self._entry(cost)
        key = ("kernels", float(eps), dtype, device)
        if entry is not None and key in entry:
            return entry[key]
        result = fixed_kernels(cost.detach(), eps, dtype, device, stacklevel + 1)
        if entry is not None:
            entry[key] = result
        return result


_COST_CACHE = _CostCache()
# The stacklevel (as in warnings.warn) that _solve_fp passes to the solver's warnings so that they name the user's
# line: seen from fixed_kernels / _CostCache.kernels / solve_converged, 2 is _solve_fp, 3 _solve, 4 sinkhorn or
# wkd_logit_loss, 5 their caller.
_USER = 5


def check_solver_args(eps: float, iters: int, tol: float | None, max_iter: int) -> None:
    """Refuse a bad ε, iteration count, tolerance or iteration cap of ``sinkhorn``."""
    _checks.check_positive("eps", eps)
    _checks.check_int("iters", iters, minimum=1)
    if tol is not None:
        _checks.check_positive("tol", tol)
    _checks.check_int("max_iter", max_iter, minimum=1)


def _solve(p, q, cost, eps, iters, tol, max_iter, backend, u0=None, value="transport") -> Tensor:
    """Validated inputs (B, C) -> (B,) transport costs (``value``: which one in the converged mode). Computes in
    fp32 for half inputs (as WKD does); a cost that requires grad gets its gradient."""
    with _checks.autocast_off(p, q):
        return _solve_fp(p, q, cost, eps, iters, tol, max_iter, backend, u0, value)


def _solve_fp(p, q, cost, eps, iters, tol, max_iter, backend, u0, value) -> Tensor:
    work = torch.float64 if torch.float64 in (p.dtype, q.dtype) else torch.float32
    p, q = p.to(work), q.to(work)
    resolved = _backend.resolve_sinkhorn(backend, p.device)
    if tol is not None:
        c = cost.to(device=p.device, dtype=work)  # differentiable: a cost that requires grad gets one
        return solve_converged(
            p.contiguous(), q.contiguous(), c.contiguous(), float(eps), float(tol), max_iter, resolved, value, _USER
        )
    if cost.requires_grad and torch.is_grad_enabled():  # autograd through K = exp(-C/eps), K∘C: not cached
        K, KC = fixed_kernels(cost, eps, work, p.device, _USER)
    else:
        K, KC = _COST_CACHE.kernels(cost, eps, work, p.device, _USER)
    if u0 is None:  # the uniform start, broadcast (stride 0) so the first product is one row, not a GEMM
        u0 = p.new_full((1, p.shape[1]), 1.0 / p.shape[1]).expand_as(p)
    else:
        u0 = u0.to(work).contiguous()
    return sinkhorn_fixed(p.contiguous(), q.contiguous(), K, KC, u0, iters, resolved)[0]


def sinkhorn(
    p: Tensor,
    q: Tensor,
    cost: Tensor,
    *,
    eps: float = 0.05,
    iters: int = 10,
    tol: float | None = None,
    max_iter: int = 1000,
    backend: SinkhornBackend = "auto",
    validate: bool = True,
    value: SinkhornValue = "transport",
) -> Tensor:
    """Entropic OT transport cost ⟨P, C⟩ between histograms p and q: (C,) -> scalar, (B, C) -> (B,).

    Fixed mode (``tol=None``, the default): WKD's definition — ``iters`` linear-domain iterations from
    u₀ = 1/C, v then u, with 1e-8 guards; exact gradient through the unrolled iterations. Ten iterations
    are not converged: the count, order and start are part of the loss.
    Converged mode (``tol`` given): log-domain iterations (float64) on p, q rescaled to unit mass, until the
    column marginal error (L1) is below ``tol`` (a RuntimeWarning when ``max_iter`` ends first). ``value``:
    "transport" (default) ⟨P*, C⟩ of the entropic plan P*, what POT's ``sinkhorn2`` returns, → the exact OT cost
    as ε → 0, with its exact gradient by implicit differentiation (one C×C solve per sample in the backward);
    "entropic" ⟨P*, C⟩ + ε Σ P*(log P* − 1), whose gradient is the dual potentials (free). Both are formed from
    log-domain quantities only: accurate for ε down to 1e-4 (costs in [0, 1]) and below, fp32 and fp64.
    Gradients of the converged mode satisfy ⟨∂/∂p, p⟩ = ⟨∂/∂q, q⟩ = 0 and are 0 on zero-mass entries.
    A cost with ``requires_grad`` gets its gradient in both modes (fixed: autograd through the iterations).
    The fixed mode warns once per ε and dtype when exp(−C/ε) underflows (its value then tends to 0).
    Zero-mass classes (p_i = q_i = 0) are allowed. ``validate`` checks p, q are histograms (one host sync;
    fp16/bf16 rows may be off by their rounding, 1e-3 + eps of the dtype). An empty batch (0, C) gives (0,).
    Computed in fp32 for fp16/bf16 inputs (fp64 for fp64), also under autocast; gradients in the input dtype.
    backend: "auto" (the C++/CUDA extension when built, else torch), "torch", "cpp", "cuda".
    """
    p2, q2, batched = _check_histograms(p, q, validate)
    check_cost(cost, p2.shape[1], p2.device)
    check_solver_args(eps, iters, tol, max_iter)
    _checks.check_choice("value", value, VALUES)
    if value != "transport" and tol is None:
        raise ValueError(f"value={value!r} needs the converged mode (tol=...); the fixed mode returns <P, C>")
    _checks.check_bool("validate", validate)
    if p2.shape[0] == 0:  # an empty batch: no problems, an empty (0,) result (still part of the graph)
        work = _checks.accumulation_dtype(p2, q2)
        return (p2.to(work).sum(1) + q2.to(work).sum(1)) * 0
    out = _solve(p2, q2, cost, eps, iters, tol, max_iter, backend, value=value)
    return out if batched else out[0]


def wkd_logit_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    cost: Tensor,
    *,
    temperature: float = 2.0,
    eps: float = 0.05,
    iters: int = 10,
    target: Tensor | None = None,
    gamma: float = 1.0,
    tol: float | None = None,
    backend: SinkhornBackend = "auto",
    reduction: Reduction = "mean",
) -> Tensor:
    """WKD-L: gamma · mean_b WD(softmax(z_s/T), softmax(z_t/T)) over the class cost (C, C).

    With ``target`` labels (B,) (target separation, WKD's default): the target class is taken out of the
    OT problem and handled by loss_t = −mean_b softmax(z_t)[y]·log_softmax(z_s)[y] (temperature 1, as in
    the public code); the WD runs over the other C−1 classes renormalized, and the result is
    loss_t + gamma · WD. Public-code settings: CIFAR-100 R32x4→R8x4 T=8, gamma=600 (cosine decay from
    epoch 150); ImageNet R34→R18 T=2, gamma=30; eps=0.05, 10 iterations.
    logits: (B, C) with B >= 1; returns a scalar in fp32 (fp64 for fp64 logits), also under autocast, with
    gradients in the logits' dtype. temperature > 0 and gamma >= 0 finite; target: integer labels (B,).
    ``reduction``: "mean" (default), "sum" over the batch, or "none": the (B,) per-sample losses
    (loss_t of the sample + gamma · its WD), whose mean is the "mean" value.
    """
    _checks.check_logit_pair("logits_s", logits_s, "logits_t", logits_t, k="C")
    temperature = _checks.check_positive("temperature", temperature)
    gamma = _checks.check_weight("gamma", gamma)
    B, C = logits_s.shape
    check_cost(cost, C, logits_s.device)
    check_solver_args(eps, iters, tol, 1000)
    _checks.check_reduction(reduction)
    work = torch.float64 if torch.float64 in (logits_s.dtype, logits_t.dtype) else torch.float32
    zs, zt = logits_s.to(work), logits_t.to(work)
    if target is None:
        p, q = F.softmax(zs / temperature, dim=1), F.softmax(zt / temperature, dim=1)
        wd = _solve(p, q, cost, eps, iters, tol, 1000, backend)
        return gamma * wd.mean() if reduction == "mean" else _checks.reduce_samples(gamma * wd, reduction)

    _checks.check_labels("target", target, B, C, logits_s.device, f"logits_s {tuple(logits_s.shape)}")
    if C < 3:
        raise ValueError(f"target separation needs at least 3 classes (C - 1 >= 2 for the OT part), got C={C}")
    y = target.long()[:, None]
    loss_t = -(F.softmax(zt, dim=1).gather(1, y).detach() * F.log_softmax(zs, dim=1).gather(1, y))[:, 0]
    keep = torch.ones_like(zs, dtype=torch.bool).scatter_(1, y, False)
    # softmax over the C−1 non-target logits == the target class with zero mass in the C-class problem
    neg_inf = torch.full_like(zs, float("-inf"))
    p = F.softmax(torch.where(keep, zs / temperature, neg_inf), dim=1)
    q = F.softmax(torch.where(keep, zt / temperature, neg_inf), dim=1)
    u0 = keep.to(zs.dtype) / (C - 1)
    wd = _solve(p, q, cost, eps, iters, tol, 1000, backend, u0=u0)
    if reduction == "mean":
        return loss_t.mean() + gamma * wd.mean()
    return _checks.reduce_samples(loss_t + gamma * wd, reduction)
