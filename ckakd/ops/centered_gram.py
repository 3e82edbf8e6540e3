"""``ckakd::centered_gram``: Kc = Xc Xcᵀ for batched features x (b, n, d), differentiable.

Backward: ∂⟨G, Kc⟩/∂X = H (G + Gᵀ) Xc = [H (G + Gᵀ) H] Xc — one (n×n)·(n×d) product.

Scale: the Gram is formed from x' = x·2^-e (max|x'| in [1/2, 1), see ``_gram_primitives.pow2_exponent``) and
multiplied by 4^e exactly at the end, so Kc is correct wherever it is representable in fp32 and ±inf
(never NaN from inf - inf) where it overflows; the backward applies the powers of two the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd._checks import accumulation_dtype as _acc_dtype
from ckakd.ops import _gram_primitives


@torch.library.custom_op("ckakd::centered_gram", mutates_args=())
def centered_gram(x: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x (b, n, d) -> (Kc (b, n, n), column means (b, d), exponents e (b,) int32), fp32 (fp64 for fp64)."""
    acc = _acc_dtype(x)
    e = _gram_primitives.pow2_exponent(x)
    k, mean = _gram_primitives.gram(x, True, backend, _gram_primitives.exp2(-e, acc))
    return _gram_primitives.mul_pow2(k.to(acc), 2 * e), _gram_primitives.mul_pow2(mean.to(acc), e), e


@centered_gram.register_fake
def _(x, backend):
    b, n, d = x.shape
    acc = _acc_dtype(x)
    return x.new_empty((b, n, n), dtype=acc), x.new_empty((b, d), dtype=acc), x.new_empty((b,), dtype=torch.int32)


@torch.library.custom_op("ckakd::centered_gram_backward", mutates_args=())
def centered_gram_backward(grad: Tensor, x: Tensor, mean: Tensor, e: Tensor, backend: str) -> Tensor:
    """grad (b, n, n) = ∂loss/∂Kc -> ∂loss/∂x (b, n, d) = 2^e·[H (G + Gᵀ) H] X'c, X'c = (x - mean)·2^-e."""
    acc = _acc_dtype(x)
    m = _gram_primitives.double_center(grad.to(acc) + grad.transpose(1, 2).to(acc))
    e_m = _gram_primitives.pow2_exponent(m)
    m = _gram_primitives.mul_pow2(m, -e_m)
    mean_scaled = _gram_primitives.mul_pow2(mean, -e)
    return _gram_primitives.gram_apply(m, x, mean_scaled, True, backend, _gram_primitives.exp2(-e, acc), e_m + e)


@centered_gram_backward.register_fake
def _(grad, x, mean, e, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    _, mean, e = output
    ctx.save_for_backward(x, mean, e)
    ctx.backend = backend
    ctx.mark_non_differentiable(mean, e)
    ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs


def _backward(ctx, grad_k, grad_mean, grad_e):
    x, mean, e = ctx.saved_tensors
    if grad_k is None:
        return None, None
    if torch.is_grad_enabled():  # create_graph=True: the same formula in differentiable operations
        xc = x.to(mean.dtype) - x.to(mean.dtype).mean(1, keepdim=True)
        m = _gram_primitives.double_center(grad_k + grad_k.transpose(1, 2))
        return (m.to(xc.dtype) @ xc).to(x.dtype), None
    return centered_gram_backward(grad_k.contiguous(), x, mean, e, ctx.backend), None


centered_gram.register_autograd(_backward, setup_context=_setup_context)
