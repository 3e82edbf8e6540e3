"""The alignment-statistics op behind ``hsic``, ``cka`` and the CKA losses.

``ckakd::alignment_stats(x, y, mode, backend)`` takes batched features x (b, n, dx), y (b, n, dy) and
returns, per batch entry, s = [⟨K̃, L̃⟩, ⟨K̃, K̃⟩, ⟨L̃, L̃⟩] where K̃, L̃ are the linear Grams
prepared for ``mode``:

* ``centered``   K̃ = Xc Xcᵀ (features centered first) — biased HSIC·(n-1)², the paper's CKA;
* ``debiased``   K̃ = U(Xc Xcᵀ) (U-centering) — unbiased HSIC·n(n-3), Kornblith's debiased CKA;
* ``uncentered`` K̃ = X Xᵀ — plain kernel alignment (the RCKA authors' public code).

CKA and HSIC are cheap scalar functions of s (``ckakd.functional``), so autograd only needs
∂s/∂x, ∂s/∂y, which are one (n×n)·(n×d) product per input:
    ∂/∂X [g·s] = M_x Xc,  M_x = 2·g₀·L̃ + 4·g₁·K̃   (double-centered in debiased mode).
When d is small (dx + dy < n, e.g. the inter-class logit term) the torch path uses the equivalent
feature-space form s = [‖YcᵀXc‖², ‖XcᵀXc‖², ‖YcᵀYc‖²] (Theorem 1 of RCKA (Zhou et al., IJCAI 2024)).

The op also returns the matrices it built (Grams or feature-space products) and the column means,
so that the backward never recomputes a Gram: they are (n×n) or (d×d), never (n×d).

Scale: every input is first divided by a power of two 2^e (max|x| in [2^(e-1), 2^e), one cheap
reduction; folded into the chunk loads of the torch path, one scaled copy for the Triton kernels), so
the Grams and sums are those of features of magnitude ~1 and fp32 neither overflows (|x| ≳ 1e8) nor
loses digits to denormals (|x| ≲ 1e-10). The scaling is exact, the exponents are returned, and the
backward applies 2^-e exactly, so values and gradients are those of the unscaled features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd._checks import accumulation_dtype as _acc_dtype
from ckakd.ops import _gram_primitives
from ckakd.ops._backend import record_dispatch

MODES = ("centered", "debiased", "uncentered")


def use_feature_form(n: int, dx: int, dy: int, mode: str, backend: str) -> bool:
    return backend == "torch" and mode != "debiased" and dx + dy < n


@torch.library.custom_op("ckakd::alignment_stats", mutates_args=())
def alignment_stats(
    x: Tensor, y: Tensor, mode: str, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (b, n, dx), y (b, n, dy) -> (stats (b, 3) fp64, K̃, L̃, mean_x (b, dx), mean_y (b, dy), exps (b, 2)).

    Everything is computed for the rescaled features x' = x·2^-e_x, y' = y·2^-e_y, exps = [e_x, e_y]
    (int32, max|x'| in [1/2, 1)): the stats of the inputs themselves are stats ⊙ [4^(e_x+e_y), 16^e_x,
    16^e_y], which CKA never needs (it is invariant) and HSIC applies in float64. K̃, L̃ are the (b, n, n)
    Grams of x', y'; in the feature-space form K̃ = [X'cᵀX'c; Y'cᵀX'c] (b, dx + dy, dx) and
    L̃ = Y'cᵀY'c (b, dy, dy). stats are float64 so that a gradient of HSIC's size (up to 4^(e_x+e_y))
    reaches the backward unrounded.
    """
    center = mode != "uncentered"
    acc = _acc_dtype(x, y)
    b, n, dx = x.shape
    dy = y.shape[2]
    e_x, e_y = _gram_primitives.pow2_exponent(x), _gram_primitives.pow2_exponent(y)
    exps = torch.stack([e_x, e_y], dim=1)
    a_x, a_y = _gram_primitives.exp2(-e_x, acc), _gram_primitives.exp2(-e_y, acc)
    if use_feature_form(n, dx, dy, mode, backend):
        record_dispatch("feature_form", "torch")
        stats, k, l, mean_x, mean_y = _feature_stats(x, y, center, acc, a_x, a_y)
        return stats.double(), k, l, mean_x, mean_y, exps
    k, mean_x = _gram_primitives.gram(x, center, backend, a_x)
    l, mean_y = _gram_primitives.gram(y, center, backend, a_y)
    k, l = k.to(acc), l.to(acc)
    if mode == "debiased":
        k, l = _gram_primitives.u_center(k), _gram_primitives.u_center(l)
    stats = _gram_primitives.frobenius_dots(k, l, backend)
    return stats.double(), k, l, mean_x.to(acc), mean_y.to(acc), exps


def _center(t: Tensor, acc: torch.dtype, center: bool, scale: Tensor) -> tuple[Tensor, Tensor]:
    """t (b, n, d) -> (t·scale - column means, column means) in acc (scale (b,) powers of two)."""
    t = t.to(acc) * scale[:, None, None]
    mean = t.mean(dim=1) if center else t.new_zeros((t.shape[0], t.shape[2]))
    return (t - mean[:, None, :] if center else t), mean


def _feature_stats(x: Tensor, y: Tensor, center: bool, acc: torch.dtype, a_x: Tensor, a_y: Tensor):
    """Feature-space form: K̃ = [XcᵀXc | YcᵀXc] packed as (b, dx + dy, dx), L̃ = YcᵀYc (b, dy, dy)."""
    xc, mean_x = _center(x, acc, center, a_x)
    yc, mean_y = _center(y, acc, center, a_y)
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
    stats = x.new_empty((b, 3), dtype=torch.float64)
    mx, my = x.new_empty((b, dx), dtype=acc), x.new_empty((b, dy), dtype=acc)
    exps = x.new_empty((b, 2), dtype=torch.int32)
    if use_feature_form(n, dx, dy, mode, backend):
        return stats, x.new_empty((b, dx + dy, dx), dtype=acc), x.new_empty((b, dy, dy), dtype=acc), mx, my, exps
    return stats, x.new_empty((b, n, n), dtype=acc), x.new_empty((b, n, n), dtype=acc), mx, my, exps


def normalized_grad(grad: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """grad (b, 3) fp64 -> (grad·2^-e in acc, e (b,) int32) with max|grad_b·2^-e| in [1/2, 1): a gradient
    of any size (HSIC's grows as 4^(e_x+e_y)) enters the fp32 coefficient matrices without overflow."""
    e = _gram_primitives.pow2_exponent(grad)
    return _gram_primitives.mul_pow2(grad.double(), -e).to(acc), e


@torch.library.custom_op("ckakd::alignment_stats_backward", mutates_args=())
def alignment_stats_backward(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    k: Tensor,
    l: Tensor,
    mean_x: Tensor,
    mean_y: Tensor,
    exps: Tensor,
    mode: str,
    backend: str,
    need_x: bool,
    need_y: bool,
) -> tuple[Tensor, Tensor]:
    """grad (b, 3) = ∂loss/∂stats -> (∂loss/∂x, ∂loss/∂y) with the saved K̃, L̃, means and exponents.

    With x' = x·2^-e_x: ∂/∂x = 2^-e_x·∂/∂x' exactly. The gradient is normalized to max ~1 (exponent
    e_g) and every coefficient matrix M to max ~1 (e_m), and 2^(e_g + e_m - e_x) is applied in the last
    step (``_gram_primitives.mul_pow2``): the result is finite wherever it is representable in x.dtype.
    A gradient that is not needed (``need_x``/``need_y`` false, e.g. the frozen teacher) is returned
    as an empty tensor and costs nothing.
    """
    center = mode != "uncentered"
    acc = k.dtype
    g, e_g = normalized_grad(grad, acc)
    e_x, e_y = exps[:, 0], exps[:, 1]
    a_x, a_y = _gram_primitives.exp2(-e_x, acc), _gram_primitives.exp2(-e_y, acc)
    g0, g1, g2 = (g[:, i, None, None] for i in range(3))
    b, n, dx = x.shape
    dy = y.shape[2]
    if use_feature_form(n, dx, dy, mode, backend):
        kx, cross = k[:, :dx], k[:, dx:]
        xc = x.to(acc) * a_x[:, None, None]
        yc = y.to(acc) * a_y[:, None, None]
        if center:
            xc, yc = xc - mean_x[:, None, :], yc - mean_y[:, None, :]
        gx = gy = None
        if need_x:
            gx = torch.bmm(yc, 2 * g0 * cross) + torch.bmm(xc, 4 * g1 * kx)
            gx = _gram_primitives.mul_pow2(gx, e_g - e_x).to(x.dtype)
        if need_y:
            gy = torch.bmm(xc, 2 * g0 * cross.transpose(1, 2)) + torch.bmm(yc, 4 * g2 * l)
            gy = _gram_primitives.mul_pow2(gy, e_g - e_y).to(y.dtype)
        return (gx if need_x else x.new_empty(0)), (gy if need_y else y.new_empty(0))
    grads = []
    for t, m, mean, a, e, need in (
        (x, 2 * g0 * l + 4 * g1 * k, mean_x, a_x, e_x, need_x),
        (y, 2 * g0 * k + 4 * g2 * l, mean_y, a_y, e_y, need_y),
    ):
        if not need:
            grads.append(t.new_empty(0))
            continue
        if center:
            # Debiased: s depends on Xc Xcᵀ through U(·), which is self-adjoint and idempotent, so
            # ∂s/∂(XcXcᵀ) is built from the U-centered Grams and the centering of the features contributes
            # H·(·)·H. Centered: M is centered in exact arithmetic; re-centering it also cancels, to first
            # order, the rounding of an fp32 column mean (features with a large offset), which would
            # otherwise shift every row of the gradient by the same error.
            m = _gram_primitives.double_center(m)
        e_m = _gram_primitives.pow2_exponent(m)
        m = _gram_primitives.mul_pow2(m, -e_m)
        grads.append(_gram_primitives.gram_apply(m, t, mean, center, backend, a, e_g + e_m - e).contiguous())
    return grads[0], grads[1]


@alignment_stats_backward.register_fake
def _(grad, x, y, k, l, mean_x, mean_y, exps, mode, backend, need_x, need_y):
    # gradients come back contiguous whatever the input strides (e.g. transposed logits)
    return (x.new_empty(x.shape) if need_x else x.new_empty(0)), (y.new_empty(y.shape) if need_y else y.new_empty(0))


def differentiable_alignment_grads(
    grad: Tensor, x: Tensor, y: Tensor, exps: Tensor, mode: str, need_x: bool, need_y: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The backward written with differentiable torch operations (Gram form), for double backward.

    Used only when autograd records the backward (``create_graph=True``): the same ∂s/∂x, ∂s/∂y as
    ``alignment_stats_backward`` (one Gram per input, O(n²) memory), differentiable in x, y and grad.
    """
    center = mode != "uncentered"
    acc = _acc_dtype(x, y)
    g, e_g = normalized_grad(grad, acc)
    g0, g1, g2 = (g[:, i, None, None] for i in range(3))
    e_x, e_y = exps[:, 0], exps[:, 1]
    xs = x.to(acc) * _gram_primitives.exp2(-e_x, acc)[:, None, None]
    ys = y.to(acc) * _gram_primitives.exp2(-e_y, acc)[:, None, None]
    if center:
        xs, ys = xs - xs.mean(1, keepdim=True), ys - ys.mean(1, keepdim=True)
    k, l = xs @ xs.mT, ys @ ys.mT
    if mode == "debiased":
        k, l = _gram_primitives.u_center(k), _gram_primitives.u_center(l)
    out = []
    pairs = ((x, xs, 2 * g0 * l + 4 * g1 * k, e_x, need_x), (y, ys, 2 * g0 * k + 4 * g2 * l, e_y, need_y))
    for t, xc, m, e, need in pairs:
        if not need:
            out.append(None)
            continue
        m = _gram_primitives.double_center(m) if center else m
        out.append(_gram_primitives.mul_pow2(m @ xc, e_g - e).to(t.dtype))
    return out[0], out[1]


def _setup_context(ctx, inputs, output):
    x, y, mode, backend = inputs
    _, k, l, mean_x, mean_y, exps = output
    ctx.save_for_backward(x, y, k, l, mean_x, mean_y, exps)
    ctx.mode, ctx.backend = mode, backend
    ctx.mark_non_differentiable(k, l, mean_x, mean_y, exps)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs


def _backward(ctx, grad_stats, *unused):
    x, y, k, l, mean_x, mean_y, exps = ctx.saved_tensors
    if grad_stats is None:
        return None, None, None, None
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate again
        gx, gy = differentiable_alignment_grads(grad_stats, x, y, exps, ctx.mode, need_x, need_y)
        return gx, gy, None, None
    gx, gy = alignment_stats_backward(
        grad_stats, x, y, k, l, mean_x, mean_y, exps, ctx.mode, ctx.backend, need_x, need_y
    )
    return (gx if need_x else None), (gy if need_y else None), None, None


alignment_stats.register_autograd(_backward, setup_context=_setup_context)
