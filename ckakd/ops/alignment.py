"""The alignment-statistics op behind ``hsic``, ``cka`` and the CKA losses.

``ckakd::alignment_stats(x, y, mode, backend)`` takes batched features x (b, n, dx), y (b, n, dy) and
returns, per batch entry, s = [⟨K̃, L̃⟩, ⟨K̃, K̃⟩, ⟨L̃, L̃⟩] where K̃, L̃ are the linear Grams
prepared for ``mode``:

* ``centered``   K̃ = Xc Xcᵀ (features centered first) — biased HSIC·(n-1)², the paper's CKA;
* ``debiased``   K̃ = U(Xc Xcᵀ) (U-centering) — unbiased HSIC·n(n-3), Kornblith's debiased CKA;
* ``uncentered`` K̃ = X Xᵀ — plain kernel alignment (the RCKA authors' public code).

CKA and HSIC are cheap scalar functions of s (``ckakd.functional``), so autograd only needs
∂s/∂x, ∂s/∂y, which are one (n×n)·(n×d) product per input (DESIGN §3):
    ∂/∂X [g·s] = M_x Xc,  M_x = 2·g₀·L̃ + 4·g₁·K̃   (double-centered in debiased mode).
When d is small (dx + dy < n, e.g. the inter-class logit term) the torch path uses the equivalent
feature-space form s = [‖YcᵀXc‖², ‖XcᵀXc‖², ‖YcᵀYc‖²] (Theorem 1 of the RCKA seed).

The op also returns the matrices it built (Grams or feature-space products) and the column means,
so that the backward never recomputes a Gram: they are (n×n) or (d×d), never (n×d).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd._checks import accumulation_dtype as _acc_dtype
from ckakd.ops import _gram
from ckakd.ops._backend import record_dispatch

MODES = ("centered", "debiased", "uncentered")


def use_feature_form(n: int, dx: int, dy: int, mode: str, backend: str) -> bool:
    return backend == "torch" and mode != "debiased" and dx + dy < n


@torch.library.custom_op("ckakd::alignment_stats", mutates_args=())
def alignment_stats(x: Tensor, y: Tensor, mode: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (b, n, dx), y (b, n, dy) -> (stats (b, 3), K̃, L̃, mean_x (b, dx), mean_y (b, dy)).

    K̃, L̃ are the (b, n, n) Grams; in the feature-space form K̃ = [XcᵀXc; YcᵀXc] (b, dx + dy, dx)
    and L̃ = YcᵀYc (b, dy, dy).
    """
    center = mode != "uncentered"
    acc = _acc_dtype(x, y)
    b, n, dx = x.shape
    dy = y.shape[2]
    if use_feature_form(n, dx, dy, mode, backend):
        record_dispatch("feature_form", "torch")
        return _feature_stats(x, y, center, acc)
    k, mean_x = _gram.gram(x, center, backend)
    l, mean_y = _gram.gram(y, center, backend)
    k, l = k.to(acc), l.to(acc)
    if mode == "debiased":
        k, l = _gram.u_center(k), _gram.u_center(l)
    stats = _gram.frobenius_dots(k, l, backend)
    return stats, k, l, mean_x.to(acc), mean_y.to(acc)


def _center(t: Tensor, acc: torch.dtype, center: bool) -> tuple[Tensor, Tensor]:
    t = t.to(acc)
    mean = t.mean(dim=1) if center else t.new_zeros((t.shape[0], t.shape[2]))
    return (t - mean[:, None, :] if center else t), mean


def _feature_stats(x: Tensor, y: Tensor, center: bool, acc: torch.dtype):
    """Feature-space form: K̃ = [XcᵀXc | YcᵀXc] packed as (b, dx + dy, dx), L̃ = YcᵀYc (b, dy, dy)."""
    xc, mean_x = _center(x, acc, center)
    yc, mean_y = _center(y, acc, center)
    kx = torch.bmm(xc.transpose(1, 2), xc)
    cross = torch.bmm(yc.transpose(1, 2), xc)
    ly = torch.bmm(yc.transpose(1, 2), yc)
    stats = torch.stack([cross.square().sum((1, 2)), kx.square().sum((1, 2)), ly.square().sum((1, 2))], dim=1)
    return stats, torch.cat([kx, cross], dim=1), ly, mean_x, mean_y


@alignment_stats.register_fake
def _(x, y, mode, backend):
    acc = _acc_dtype(x, y)
    b, n, dx = x.shape
    dy = y.shape[2]
    stats = x.new_empty((b, 3), dtype=acc)
    mx, my = x.new_empty((b, dx), dtype=acc), x.new_empty((b, dy), dtype=acc)
    if use_feature_form(n, dx, dy, mode, backend):
        return stats, x.new_empty((b, dx + dy, dx), dtype=acc), x.new_empty((b, dy, dy), dtype=acc), mx, my
    return stats, x.new_empty((b, n, n), dtype=acc), x.new_empty((b, n, n), dtype=acc), mx, my


@torch.library.custom_op("ckakd::alignment_stats_backward", mutates_args=())
def alignment_stats_backward(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    k: Tensor,
    l: Tensor,
    mean_x: Tensor,
    mean_y: Tensor,
    mode: str,
    backend: str,
    need_x: bool,
    need_y: bool,
) -> tuple[Tensor, Tensor]:
    """grad (b, 3) = ∂loss/∂stats -> (∂loss/∂x, ∂loss/∂y) with the saved K̃, L̃ and means.

    A gradient that is not needed (``need_x``/``need_y`` false, e.g. the frozen teacher) is returned
    as an empty tensor and costs nothing.
    """
    center = mode != "uncentered"
    g = grad.to(k.dtype)
    g0, g1, g2 = (g[:, i, None, None] for i in range(3))
    b, n, dx = x.shape
    dy = y.shape[2]
    if use_feature_form(n, dx, dy, mode, backend):
        kx, cross = k[:, :dx], k[:, dx:]
        xc = x.to(k.dtype) - mean_x[:, None, :] if center else x.to(k.dtype)
        yc = y.to(k.dtype) - mean_y[:, None, :] if center else y.to(k.dtype)
        gx = (torch.bmm(yc, 2 * g0 * cross) + torch.bmm(xc, 4 * g1 * kx)).to(x.dtype) if need_x else x.new_empty(0)
        gy = (
            (torch.bmm(xc, 2 * g0 * cross.transpose(1, 2)) + torch.bmm(yc, 4 * g2 * l)).to(y.dtype)
            if need_y
            else y.new_empty(0)
        )
        return gx, gy
    m_x = 2 * g0 * l + 4 * g1 * k
    m_y = 2 * g0 * k + 4 * g2 * l
    if center:
        # Debiased: s depends on Xc Xcᵀ through U(·), which is self-adjoint and idempotent, so ∂s/∂(XcXcᵀ)
        # is built from the U-centered Grams and the centering of the features contributes H·(·)·H.
        # Centered: M is centered in exact arithmetic; re-centering it also cancels, to first order, the
        # rounding of an fp32 column mean (features with a large offset), which would otherwise shift
        # every row of the gradient by the same error.
        m_x, m_y = _gram.double_center(m_x), _gram.double_center(m_y)
    gx = _gram.gram_apply(m_x, x, mean_x, center, backend).contiguous() if need_x else x.new_empty(0)
    gy = _gram.gram_apply(m_y, y, mean_y, center, backend).contiguous() if need_y else y.new_empty(0)
    return gx, gy


@alignment_stats_backward.register_fake
def _(grad, x, y, k, l, mean_x, mean_y, mode, backend, need_x, need_y):
    # gradients come back contiguous whatever the input strides (e.g. transposed logits)
    return (x.new_empty(x.shape) if need_x else x.new_empty(0)), (y.new_empty(y.shape) if need_y else y.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, y, mode, backend = inputs
    _, k, l, mean_x, mean_y = output
    ctx.save_for_backward(x, y, k, l, mean_x, mean_y)
    ctx.mode, ctx.backend = mode, backend
    ctx.mark_non_differentiable(k, l, mean_x, mean_y)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs


def _backward(ctx, grad_stats, *unused):
    x, y, k, l, mean_x, mean_y = ctx.saved_tensors
    if grad_stats is None:
        return None, None, None, None
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gy = alignment_stats_backward(grad_stats, x, y, k, l, mean_x, mean_y, ctx.mode, ctx.backend, need_x, need_y)
    return (gx if need_x else None), (gy if need_y else None), None, None


alignment_stats.register_autograd(_backward, setup_context=_setup_context)
