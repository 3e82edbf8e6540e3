"""Differentiable principal square root of symmetric PSD matrices, ``sqrtm_psd`` (..., n, n) -> (..., n, n).

Used by the Gaussian 2-Wasserstein distance (``ckakd.wasserstein``, WKD-F of Lv et al., NeurIPS 2024).

Matrix square root: ``torch.linalg.eigh`` with the eigenvalues clamped at 0, and a custom backward
that solves the Sylvester equation Y dY + dY Y = dA in the eigenbasis: dY' = dA' / (s_i + s_j),
s = sqrt(eigenvalues). Unlike differentiating through ``eigh`` (whose backward divides by
λ_i - λ_j), this is exact and finite for repeated eigenvalues; pairs with s_i + s_j = 0 (a null space,
where the true derivative is infinite) get a zero gradient. Newton–Schulz was not chosen: it needs
normalization, many iterations for ill-conditioned inputs, and does not converge on singular ones.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ckakd import _checks
from ckakd.ops._gram_primitives import pow2_scale

__all__ = ["SqrtmPSD", "sqrtm_psd"]


class SqrtmPSD(torch.autograd.Function):
    """The square root without input checks or scaling, ``SqrtmPSD.apply(a)`` (..., n, n).

    Forward and backward in the input's dtype (fp32 / fp64; callers cast) with autocast off.

    Matrices with a NaN or infinite entry give an all-NaN root and an all-NaN gradient (``eigh`` would
    raise on them); the others in the batch are unaffected.
    """

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:
        with _checks.autocast_off(a):
            a = (a + a.mT) / 2
            bad = ~torch.isfinite(a).flatten(-2).all(-1)  # (...,)
            has_bad = bool(bad.any())
            if has_bad:
                eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
                a = torch.where(bad[..., None, None], eye, a)
            w, v = torch.linalg.eigh(a)
            s = w.clamp_min(0).sqrt()
            out = (v * s.unsqueeze(-2)) @ v.mT
            if has_bad:
                out = out.masked_fill(bad[..., None, None], float("nan"))
        ctx.save_for_backward(v, s, bad)
        ctx.has_bad = has_bad
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        v, s, bad = ctx.saved_tensors
        with _checks.autocast_off(grad):
            grad = grad.to(v.dtype)
            denom = s.unsqueeze(-1) + s.unsqueeze(-2)
            # Treat s_i + s_j below rounding level of the largest root as 0 (pseudo-inverse): finite gradients.
            tol = s.amax(-1, keepdim=True).unsqueeze(-1) * (s.shape[-1] * torch.finfo(s.dtype).eps)
            ok = denom > tol
            inv = torch.where(ok, 1.0 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(denom))
            # The Sylvester operator is self-adjoint; symmetrizing follows from the forward's (A + Aᵀ)/2.
            g = v.mT @ ((grad + grad.mT) / 2) @ v
            out = v @ (g * inv) @ v.mT
            if ctx.has_bad:
                out = out.masked_fill(bad[..., None, None], float("nan"))
        return out


def sqrtm_psd(a: Tensor) -> Tensor:
    """Principal square root of symmetric positive semi-definite matrices, (..., n, n) -> (..., n, n).

    The input is symmetrized ((A + Aᵀ)/2) and its negative eigenvalues (rounding) are clamped to 0.
    Differentiable (first order) with a gradient that stays finite for repeated and zero eigenvalues.
    fp16/bf16 inputs are computed in fp32 (also under autocast) and cast back. Matrices with NaN/inf
    entries give NaN (values and gradients); huge or tiny finite ones are scaled by a power of two first.
    """
    _checks.check_float_tensor("a", a)
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must have shape (..., n, n) (square matrices), got {tuple(a.shape)}")
    acc = _checks.accumulation_dtype(a)
    with _checks.autocast_off(a):
        x = a.to(acc)
        c = pow2_scale(x, (-2, -1))  # sqrt(c·A) = sqrt(c)·sqrt(A); c is a power of 4 times 1 or 2
        return (SqrtmPSD.apply(x / c) * c.sqrt()).to(a.dtype)
