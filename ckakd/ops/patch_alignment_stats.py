"""``ckakd::patch_alignment_stats``: thousands of small CKA problems from patch-cut feature maps (PCKA).

Features f (B, C, H, W) with H, W multiples of the patch (ph, pw) are cut into P = (H/ph)·(W/pw)
patches, which are the samples of each problem. ``reduce`` picks what one problem is:

* ``channel``  G = C problems, features (b, i, j): D = B·ph·pw  (the best of Zhou et al., IJCAI 2024, Table 5)
* ``batch``    G = B problems, features (c, i, j): D = C·ph·pw
* ``spatial``  G = ph·pw problems (in-patch position), features (b, c): D = B·C

Per problem the op returns the same statistics as ``ckakd::alignment_stats``. The Triton path does all
problems in one launch straight from the (B, C, H, W) tensors (any strides); the torch path permutes
into a (G, P, D) copy and uses batched matrix products.

Scale: as in ``ckakd::alignment_stats``, each feature map is divided by a power of two 2^e first
(max|f| in [2^(e-1), 2^e), one per tensor: a scaled copy for the Triton kernels, folded into the
chunk loads of the torch path), and the backward applies 2^-e exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd._checks import accumulation_dtype as _acc_dtype
from ckakd.ops import _gram_primitives
from ckakd.ops._backend import record_dispatch, triton_kernels
from ckakd.ops.alignment_stats import differentiable_alignment_grads

REDUCTIONS = ("channel", "batch", "spatial")
# reduce="mix" (Zhou et al., IJCAI 2024, Table 5): the reduction of level 0, level 1 and every later level.
PATCH_MIX_ORDER = ("batch", "spatial", "channel")


def mix_reduction(level: int) -> str:
    """The reduction ``reduce="mix"`` uses at feature level ``level`` (0-based): batch, spatial, then channel."""
    return PATCH_MIX_ORDER[min(level, len(PATCH_MIX_ORDER) - 1)]


# Permutations of the 6-D view (B, C, nph, ph, npw, pw) into (problem..., patch..., feature...).
_PERMUTATIONS = {
    "channel": (1, 2, 4, 0, 3, 5),
    "batch": (0, 2, 4, 1, 3, 5),
    "spatial": (3, 5, 2, 4, 0, 1),
}


def problem_shape(shape: tuple[int, ...], ph: int, pw: int, reduce: str) -> tuple[int, int, int]:
    """(G, P, D) for features of ``shape`` (B, C, H, W)."""
    b, c, h, w = shape
    p = (h // ph) * (w // pw)
    return {"channel": (c, p, b * ph * pw), "batch": (b, p, c * ph * pw), "spatial": (ph * pw, p, b * c)}[reduce]


def to_problems(f: Tensor, ph: int, pw: int, reduce: str) -> Tensor:
    """(B, C, H, W) -> (G, P, D) copy."""
    b, c, h, w = f.shape
    v = f.reshape(b, c, h // ph, ph, w // pw, pw).permute(_PERMUTATIONS[reduce])
    return v.reshape(problem_shape(f.shape, ph, pw, reduce))


def from_problems(x: Tensor, shape: tuple[int, ...], ph: int, pw: int, reduce: str) -> Tensor:
    """Inverse of ``to_problems``: (G, P, D) -> (B, C, H, W)."""
    b, c, h, w = shape
    view = (b, c, h // ph, ph, w // pw, pw)
    perm = _PERMUTATIONS[reduce]
    permuted_shape = tuple(view[i] for i in perm)
    inverse = [perm.index(i) for i in range(6)]
    return x.reshape(permuted_shape).permute(inverse).reshape(shape)


def _triton_ok(f_s: Tensor, f_t: Tensor, backend: str) -> bool:
    return backend == "triton" and torch.float64 not in (f_s.dtype, f_t.dtype)


def _exponents(f_s: Tensor, f_t: Tensor) -> Tensor:
    """(2,) int32 [e_s, e_t]: one power-of-two exponent per feature map (see ``_gram_primitives.pow2_exponent``)."""
    return torch.cat(
        [_gram_primitives.pow2_exponent(f_s.reshape(1, -1)), _gram_primitives.pow2_exponent(f_t.reshape(1, -1))]
    )


@torch.library.custom_op("ckakd::patch_alignment_stats", mutates_args=())
def patch_alignment_stats(
    f_s: Tensor, f_t: Tensor, ph: int, pw: int, reduce: str, mode: str, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, C, H, W) pair -> (stats (G, 3) fp64, K̃_s (G, P, P), K̃_t (G, P, P), exps (2,) int32).

    All of them are those of the rescaled maps f_s·2^-e_s, f_t·2^-e_t, exps = [e_s, e_t] (CKA is
    invariant to the rescaling).
    """
    center = mode != "uncentered"
    acc = _acc_dtype(f_s, f_t)
    exps = _exponents(f_s, f_t)
    a_s, a_t = _gram_primitives.exp2(-exps[:1], acc), _gram_primitives.exp2(-exps[1:], acc)
    if _triton_ok(f_s, f_t, backend):
        kernels = triton_kernels()
        record_dispatch("patch_cka_forward", "triton")
        fs, ft = _gram_primitives.scaled_copy(f_s[None], a_s)[0], _gram_primitives.scaled_copy(f_t[None], a_t)[0]
        stats, k_s, k_t = kernels.patch_cka_forward(fs, ft, ph, pw, reduce, center)
        k_s, k_t = k_s.to(acc), k_t.to(acc)
        if mode != "debiased":
            return stats.double(), k_s, k_t, exps
    else:
        record_dispatch("patch_cka_forward", "torch")
        xs, xt = to_problems(f_s, ph, pw, reduce), to_problems(f_t, ph, pw, reduce)
        k_s, _ = _gram_primitives.gram(xs, center, "torch", a_s.expand(xs.shape[0]))
        k_t, _ = _gram_primitives.gram(xt, center, "torch", a_t.expand(xt.shape[0]))
        k_s, k_t = k_s.to(acc), k_t.to(acc)
    if mode == "debiased":
        k_s, k_t = _gram_primitives.u_center(k_s), _gram_primitives.u_center(k_t)
    return _gram_primitives.frobenius_dots(k_s, k_t, "torch").double(), k_s, k_t, exps


@patch_alignment_stats.register_fake
def _(f_s, f_t, ph, pw, reduce, mode, backend):
    g, p, _ = problem_shape(tuple(f_s.shape), ph, pw, reduce)
    acc = _acc_dtype(f_s, f_t)
    return (
        f_s.new_empty((g, 3), dtype=torch.float64),
        f_s.new_empty((g, p, p), dtype=acc),
        f_s.new_empty((g, p, p), dtype=acc),
        f_s.new_empty((2,), dtype=torch.int32),
    )


@torch.library.custom_op("ckakd::patch_alignment_stats_backward", mutates_args=())
def patch_alignment_stats_backward(
    grad: Tensor,
    f_s: Tensor,
    f_t: Tensor,
    k_s: Tensor,
    k_t: Tensor,
    exps: Tensor,
    ph: int,
    pw: int,
    reduce: str,
    mode: str,
    backend: str,
    need_s: bool,
    need_t: bool,
) -> tuple[Tensor, Tensor]:
    """∂loss/∂stats (G, 3) -> gradients for f_s, f_t (an unneeded one comes back empty, uncomputed).

    As in ``alignment_stats_backward``: the gradient and the coefficient matrices are normalized by
    powers of two (one exponent per tensor, over all problems) and 2^(e_g + e_m - e) is applied last.
    """
    center = mode != "uncentered"
    acc = k_s.dtype
    e_g = _gram_primitives.pow2_exponent(grad.reshape(1, -1))
    g = _gram_primitives.mul_pow2(grad.double().reshape(1, -1), -e_g).reshape(grad.shape).to(acc)
    g0, g1, g2 = (g[:, i, None, None] for i in range(3))
    scaled = []
    for e, k_own, k_other, g_own, need in ((exps[:1], k_s, k_t, g1, need_s), (exps[1:], k_t, k_s, g2, need_t)):
        if not need:  # an unneeded gradient stays an empty placeholder
            scaled.append((k_own.new_empty(0), None, None))
            continue
        m = 2 * g0 * k_other + 4 * g_own * k_own
        if center:  # see alignment_stats_backward: exact for debiased, rounding-robust for centered
            m = _gram_primitives.double_center(m)
        e_m = _gram_primitives.pow2_exponent(m.reshape(1, -1))
        scaled.append(
            (_gram_primitives.mul_pow2(m, -e_m.expand(m.shape[0])), _gram_primitives.exp2(-e, acc), e_g + e_m - e)
        )
    (m_s, a_s, out_s), (m_t, a_t, out_t) = scaled
    if _triton_ok(f_s, f_t, backend):
        kernels = triton_kernels()
        record_dispatch("patch_cka_backward", "triton")
        fs = _gram_primitives.scaled_copy(f_s[None], a_s)[0] if need_s else f_s
        ft = _gram_primitives.scaled_copy(f_t[None], a_t)[0] if need_t else f_t
        gs, gt = kernels.patch_cka_backward(
            m_s.float(), m_t.float(), fs, ft, ph, pw, reduce, center, need_s=need_s, need_t=need_t
        )
        gs = _gram_primitives.mul_pow2(gs[None].to(acc), out_s)[0].to(f_s.dtype) if need_s else gs
        gt = _gram_primitives.mul_pow2(gt[None].to(acc), out_t)[0].to(f_t.dtype) if need_t else gt
        return gs, gt
    record_dispatch("patch_cka_backward", "torch")
    grads = []
    for f, m, a, out, need in ((f_s, m_s, a_s, out_s, need_s), (f_t, m_t, a_t, out_t, need_t)):
        if not need:
            grads.append(f.new_empty(0))
            continue
        x = to_problems(f, ph, pw, reduce)
        a = a.expand(x.shape[0])
        if center:
            mean = (x.to(m.dtype) * a[:, None, None]).mean(dim=1)
        else:
            mean = x.new_zeros((x.shape[0], x.shape[2]), dtype=m.dtype)
        gx = _gram_primitives.gram_apply(m, x, mean, center, "torch", a, out.expand(x.shape[0]))
        grads.append(from_problems(gx, f.shape, ph, pw, reduce))
    return grads[0], grads[1]


@patch_alignment_stats_backward.register_fake
def _(grad, f_s, f_t, k_s, k_t, exps, ph, pw, reduce, mode, backend, need_s, need_t):
    def like(f, need):
        return torch.empty_like(f, memory_format=torch.contiguous_format) if need else f.new_empty(0)

    return like(f_s, need_s), like(f_t, need_t)


def _differentiable_grads(grad, f_s, f_t, exps, ph, pw, reduce, mode, need_s, need_t):
    """The backward in differentiable torch operations (for double backward, ``create_graph=True``)."""
    xs, xt = to_problems(f_s, ph, pw, reduce), to_problems(f_t, ph, pw, reduce)
    g = xs.shape[0]
    gs, gt = differentiable_alignment_grads(grad, xs, xt, exps.expand(g, 2), mode, need_s, need_t)
    return (
        from_problems(gs, f_s.shape, ph, pw, reduce) if need_s else None,
        from_problems(gt, f_t.shape, ph, pw, reduce) if need_t else None,
    )


def _setup_context(ctx, inputs, output):
    f_s, f_t, ph, pw, reduce, mode, backend = inputs
    _, k_s, k_t, exps = output
    ctx.save_for_backward(f_s, f_t, k_s, k_t, exps)
    ctx.args = (ph, pw, reduce, mode, backend)
    ctx.mark_non_differentiable(k_s, k_t, exps)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs


def _backward(ctx, grad_stats, *unused):
    if grad_stats is None:
        return (None,) * 7
    f_s, f_t, k_s, k_t, exps = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate again
        gs, gt = _differentiable_grads(grad_stats, f_s, f_t, exps, *ctx.args[:4], need_s, need_t)
        return gs, gt, None, None, None, None, None
    gs, gt = patch_alignment_stats_backward(grad_stats, f_s, f_t, k_s, k_t, exps, *ctx.args, need_s, need_t)
    return (gs if need_s else None), (gt if need_t else None), None, None, None, None, None


patch_alignment_stats.register_autograd(_backward, setup_context=_setup_context)
