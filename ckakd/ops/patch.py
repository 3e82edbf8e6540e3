"""``ckakd::patch_alignment_stats``: thousands of small CKA problems from patch-cut feature maps (PCKA).

Features f (B, C, H, W) with H, W multiples of the patch (ph, pw) are cut into P = (H/ph)·(W/pw)
patches, which are the samples of each problem. ``reduce`` picks what one problem is:

* ``channel``  G = C problems, features (b, i, j): D = B·ph·pw  (the seed's best, Table 5)
* ``batch``    G = B problems, features (c, i, j): D = C·ph·pw
* ``spatial``  G = ph·pw problems (in-patch position), features (b, c): D = B·C

Per problem the op returns the same statistics as ``ckakd::alignment_stats``. The Triton path does all
problems in one launch straight from the (B, C, H, W) tensors (any strides); the torch path permutes
into a (G, P, D) copy and uses batched matrix products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd._checks import accumulation_dtype as _acc_dtype
from ckakd.ops import _gram
from ckakd.ops._backend import record_dispatch

REDUCTIONS = ("channel", "batch", "spatial")
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


@torch.library.custom_op("ckakd::patch_alignment_stats", mutates_args=())
def patch_alignment_stats(
    f_s: Tensor, f_t: Tensor, ph: int, pw: int, reduce: str, mode: str, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C, H, W) pair -> (stats (G, 3), K̃_s (G, P, P), K̃_t (G, P, P))."""
    center = mode != "uncentered"
    acc = _acc_dtype(f_s, f_t)
    if _triton_ok(f_s, f_t, backend):
        from ckakd import kernels

        record_dispatch("patch_cka_forward", "triton")
        stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, ph, pw, reduce, center)
        k_s, k_t = k_s.to(acc), k_t.to(acc)
        if mode != "debiased":
            return stats.to(acc), k_s, k_t
    else:
        record_dispatch("patch_cka_forward", "torch")
        k_s, _ = _gram.gram(to_problems(f_s, ph, pw, reduce), center, "torch")
        k_t, _ = _gram.gram(to_problems(f_t, ph, pw, reduce), center, "torch")
        k_s, k_t = k_s.to(acc), k_t.to(acc)
    if mode == "debiased":
        k_s, k_t = _gram.u_center(k_s), _gram.u_center(k_t)
    return _gram.frobenius_dots(k_s, k_t, "torch"), k_s, k_t


@patch_alignment_stats.register_fake
def _(f_s, f_t, ph, pw, reduce, mode, backend):
    g, p, _ = problem_shape(tuple(f_s.shape), ph, pw, reduce)
    acc = _acc_dtype(f_s, f_t)
    return (
        f_s.new_empty((g, 3), dtype=acc),
        f_s.new_empty((g, p, p), dtype=acc),
        f_s.new_empty((g, p, p), dtype=acc),
    )


@torch.library.custom_op("ckakd::patch_alignment_stats_backward", mutates_args=())
def patch_alignment_stats_backward(
    grad: Tensor,
    f_s: Tensor,
    f_t: Tensor,
    k_s: Tensor,
    k_t: Tensor,
    ph: int,
    pw: int,
    reduce: str,
    mode: str,
    backend: str,
    need_s: bool,
    need_t: bool,
) -> tuple[Tensor, Tensor]:
    """∂loss/∂stats (G, 3) -> gradients for f_s, f_t (an unneeded one comes back empty, uncomputed)."""
    center = mode != "uncentered"
    g = grad.to(k_s.dtype)
    g0, g1, g2 = (g[:, i, None, None] for i in range(3))
    # coefficient matrices of the needed gradients only (an unneeded one stays an empty placeholder)
    m_s = 2 * g0 * k_t + 4 * g1 * k_s if need_s else k_s.new_empty(0)
    m_t = 2 * g0 * k_s + 4 * g2 * k_t if need_t else k_t.new_empty(0)
    if center:  # see alignment_stats_backward: exact for debiased, rounding-robust for centered
        m_s = _gram.double_center(m_s) if need_s else m_s
        m_t = _gram.double_center(m_t) if need_t else m_t
    if _triton_ok(f_s, f_t, backend):
        from ckakd import kernels

        record_dispatch("patch_cka_backward", "triton")
        return kernels.patch_cka_backward(
            m_s.float(), m_t.float(), f_s, f_t, ph, pw, reduce, center, need_s=need_s, need_t=need_t
        )
    record_dispatch("patch_cka_backward", "torch")
    grads = []
    for f, m, need in ((f_s, m_s, need_s), (f_t, m_t, need_t)):
        if not need:
            grads.append(f.new_empty(0))
            continue
        x = to_problems(f, ph, pw, reduce)
        mean = x.mean(dim=1, dtype=m.dtype) if center else x.new_zeros((x.shape[0], x.shape[2]), dtype=m.dtype)
        grads.append(from_problems(_gram.gram_apply(m, x, mean, center, "torch"), f.shape, ph, pw, reduce))
    return grads[0], grads[1]


@patch_alignment_stats_backward.register_fake
def _(grad, f_s, f_t, k_s, k_t, ph, pw, reduce, mode, backend, need_s, need_t):
    def like(f, need):
        return torch.empty_like(f, memory_format=torch.contiguous_format) if need else f.new_empty(0)

    return like(f_s, need_s), like(f_t, need_t)


def _setup_context(ctx, inputs, output):
    f_s, f_t, ph, pw, reduce, mode, backend = inputs
    _, k_s, k_t = output
    ctx.save_for_backward(f_s, f_t, k_s, k_t)
    ctx.args = (ph, pw, reduce, mode, backend)
    ctx.mark_non_differentiable(k_s, k_t)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs


def _backward(ctx, grad_stats, *unused):
    if grad_stats is None:
        return (None,) * 7
    f_s, f_t, k_s, k_t = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gs, gt = patch_alignment_stats_backward(grad_stats, f_s, f_t, k_s, k_t, *ctx.args, need_s, need_t)
    return (gs if need_s else None), (gt if need_t else None), None, None, None, None, None


patch_alignment_stats.register_autograd(_backward, setup_context=_setup_context)
