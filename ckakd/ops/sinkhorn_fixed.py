"""Fixed-iteration Sinkhorn (WKD's definition): the op ``ckakd::sinkhorn_fixed_forward`` / ``_backward``.

WKD's definition (Lv et al., "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge
Distillation", NeurIPS 2024, and its public code): fixed iterations in the linear domain, for t = 1..T,
v = q / (Kᵀu + δ), u = p / (K v + δ), δ = 1e-8, from u₀; the value is ⟨P, C⟩ = uᵀ (K∘C) v = Σᵢ uᵢ wᵢ per sample,
w = (K∘C) v (a row-vector vᵀ(K∘C)ᵀ per sample, returned by the forward so that the backward's ∂/∂u = g·w costs no
product). The backward is exact reverse mode through the unrolled iterations using the stored u_t, v_t and
denominators: O(T·B·C) state, never B×C×C.

Two implementations with one schema:

* ``ckakd::sinkhorn_fixed_forward`` / ``ckakd::sinkhorn_fixed_backward``: the C++ extension (csrc/sinkhorn.cpp on
  CPU tensors, csrc/sinkhorn_cuda.cu on CUDA tensors);
* ``ckakd::sinkhorn_fixed_forward_torch`` / ``ckakd::sinkhorn_fixed_backward_torch``: the same formulas with torch
  ops (``fixed_forward_torch`` / ``fixed_backward_torch``), for machines without the extension.

Both get the same fake kernels and the same autograd formula here (``register``): the torch pair at import, the
C++ pair once when the extension loads (``ckakd._ext.when_loaded``). Without a gradient for the teacher's
histogram q the backward skips grad_q (``need_q``). A cost that requires grad: the backward then also returns
∂/∂K, ∂/∂(K∘C) (``fixed_backward_torch``, torch ops for every backend) and autograd carries them to the cost
through ``fixed_kernels``, which warns once per ε and dtype when K = exp(−C/ε) underflows.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ckakd import _ext
from ckakd.ops._backend import record_dispatch

DELTA = 1e-8
FORWARD = "ckakd::sinkhorn_fixed_forward"
BACKWARD = "ckakd::sinkhorn_fixed_backward"

FixedOutputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


# --------------------------------------------------------------------------------------- the torch formulas


def fixed_forward_torch(p: Tensor, q: Tensor, K: Tensor, KC: Tensor, u0: Tensor, iters: int) -> FixedOutputs:
    """The WKD iterations in torch: p, q, u0 (B, C), K, KC (C, C).

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


@torch.library.custom_op(FORWARD + "_torch", mutates_args=())
def sinkhorn_fixed_forward_torch(p: Tensor, q: Tensor, K: Tensor, KC: Tensor, u0: Tensor, iters: int) -> FixedOutputs:
    """``ckakd::sinkhorn_fixed_forward`` with torch ops (``fixed_forward_torch``)."""
    return fixed_forward_torch(p, q, K, KC, u0, iters)


@torch.library.custom_op(BACKWARD + "_torch", mutates_args=())
def sinkhorn_fixed_backward_torch(
    grad_cost: Tensor,
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
) -> tuple[Tensor, Tensor]:
    """``ckakd::sinkhorn_fixed_backward`` with torch ops: (grad_p (B, C), grad_q (B, C), or (0,) without need_q)."""
    grad_p, grad_q, _, _ = fixed_backward_torch(grad_cost, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, need_q)
    return grad_p, grad_q


# ------------------------------------------------------------------------------ fakes and autograd, both pairs


def forward_fake(p: Tensor, q: Tensor, K: Tensor, KC: Tensor, u0: Tensor, iters: int) -> FixedOutputs:
    """Shape-only forward: (cost (B,), u_hist (T+1, B, C), v_hist, a_hist, b_hist (T, B, C), w (B, C))."""
    B, C = p.shape
    hists = tuple(p.new_empty((iters, B, C)) for _ in range(3))
    return p.new_empty((B,)), p.new_empty((iters + 1, B, C)), *hists, p.new_empty((B, C))


def backward_fake(
    grad_cost: Tensor,
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
) -> tuple[Tensor, Tensor]:
    """Shape-only backward: (grad_p (B, C), grad_q (B, C) or (0,) without ``need_q``)."""
    return p.new_empty(p.shape), (p.new_empty(p.shape) if need_q else p.new_empty(0))


def _autograd(backward_op, backend: str | None):
    """(setup_context, backward) of a forward op whose backward op is ``backward_op``; ``backend`` is what the
    backward records (None: "cpp" or "cuda" by the tensors' device, for the extension's op)."""

    def setup_context(ctx, inputs, output) -> None:
        p, q, K, KC, _, _ = inputs
        _, u_hist, v_hist, a_hist, b_hist, w = output
        ctx.save_for_backward(p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w)
        ctx.backend = backend or ("cuda" if p.is_cuda else "cpp")
        ctx.mark_non_differentiable(u_hist, v_hist, a_hist, b_hist, w)
        ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs

    def backward(ctx, grad_cost, *unused):
        if grad_cost is None:
            return (None,) * 6
        p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w = ctx.saved_tensors
        need_q = ctx.needs_input_grad[1]  # the teacher's histogram usually needs none: one product fewer
        grad_cost = grad_cost.contiguous()
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # a cost that requires grad: torch ops, any backend
            gp, gq, gk, gkc = fixed_backward_torch(
                grad_cost, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, need_q, True
            )
            return gp, (gq if need_q else None), gk, gkc, None, None
        record_dispatch("sinkhorn_fixed_backward", ctx.backend)
        gp, gq = backward_op(grad_cost, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, need_q)
        return gp, (gq if need_q else None), None, None, None, None

    return setup_context, backward


def register(forward: str, backward: str, backend: str | None) -> None:
    """Fakes for the ops ``forward`` and ``backward`` (qualified names) and the autograd formula of ``forward``."""
    torch.library.register_fake(forward, forward_fake)
    torch.library.register_fake(backward, backward_fake)
    setup_context, formula = _autograd(getattr(torch.ops.ckakd, backward.removeprefix("ckakd::")), backend)
    torch.library.register_autograd(forward, formula, setup_context=setup_context)


register(FORWARD + "_torch", BACKWARD + "_torch", "torch")
_ext.when_loaded(lambda: register(FORWARD, BACKWARD, None))


# ------------------------------------------------------------------------------------------ K and K∘C


_UNDERFLOW_WARNED: set[tuple[float, torch.dtype]] = set()


def warn_if_kernel_underflows(k: Tensor, cost: Tensor, eps: float, stacklevel: int = 2) -> None:
    """One RuntimeWarning per (ε, dtype) and process when K = exp(−C/ε) (C, C) has entries below the smallest
    normal number of its dtype (C/ε > ~87 in float32, ~708 in float64): those routes carry no mass and no gradient
    in the fixed-iteration mode, and with all off-diagonal entries gone its value and gradient are ~0. One host
    sync; skipped under ``torch.compile``. ``stacklevel`` as in ``warnings.warn`` (2: this function's caller)."""
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
        stacklevel=stacklevel,
    )


def fixed_kernels(
    cost: Tensor, eps: float, dtype: torch.dtype, device: torch.device, stacklevel: int = 2
) -> tuple[Tensor, Tensor]:
    """K = exp(−C/ε) and K∘C (C, C) in ``dtype``, differentiable w.r.t. ``cost`` when it requires grad. Warns
    once per ε and dtype when K underflows (``warn_if_kernel_underflows``; ``stacklevel`` as in ``warnings.warn``,
    2: this function's caller)."""
    c = cost.to(device=device, dtype=dtype)
    k = torch.exp(-c / eps)
    warn_if_kernel_underflows(k, c, eps, stacklevel + 1)
    return k, k * c
