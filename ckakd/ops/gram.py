"""``ckakd::centered_gram``: Kc = Xc Xcᵀ for batched features x (b, n, d), differentiable.

Backward: ∂⟨G, Kc⟩/∂X = H (G + Gᵀ) Xc = [H (G + Gᵀ) H] Xc — one (n×n)·(n×d) product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckakd._checks import accumulation_dtype as _acc_dtype
from ckakd.ops import _gram


@torch.library.custom_op("ckakd::centered_gram", mutates_args=())
def centered_gram(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """x (b, n, d) -> (Kc (b, n, n), column means (b, d)), fp32 (fp64 for fp64 input)."""
    k, mean = _gram.gram(x, True, backend)
    return k.to(_acc_dtype(x)), mean.to(_acc_dtype(x))


@centered_gram.register_fake
def _(x, backend):
    b, n, d = x.shape
    return x.new_empty((b, n, n), dtype=_acc_dtype(x)), x.new_empty((b, d), dtype=_acc_dtype(x))


@torch.library.custom_op("ckakd::centered_gram_backward", mutates_args=())
def centered_gram_backward(grad: Tensor, x: Tensor, mean: Tensor, backend: str) -> Tensor:
    m = _gram.double_center(grad + grad.transpose(1, 2))
    return _gram.gram_apply(m, x, mean, True, backend)


@centered_gram_backward.register_fake
def _(grad, x, mean, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled grads for the non-differentiable outputs


def _backward(ctx, grad_k, grad_mean):
    x, mean = ctx.saved_tensors
    if grad_k is None:
        return None, None
    return centered_gram_backward(grad_k.contiguous(), x, mean, ctx.backend), None


centered_gram.register_autograd(_backward, setup_context=_setup_context)
