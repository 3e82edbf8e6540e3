"""Float64 references of :mod:`ckakd.logit_kd`: KD, logit-standardized KD, DKD and DIST written
out with explicit softmaxes, per sample, then reduced over the batch (``reduction``: "mean", "sum", "none")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd._checks import renamed_arguments
from ckakd.reference._common import as_dtype, reduce


def _softmax(z: Tensor) -> Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def standardize_logits(z: Tensor, eps: float = 1e-7, *, dtype: torch.dtype | None = None) -> Tensor:
    """(z - mean) / (std + eps) per row, std the unbiased standard deviation over the K classes."""
    z = as_dtype(z, dtype)
    k = z.shape[1]
    mean = z.sum(dim=1, keepdim=True) / k
    std = torch.sqrt(((z - mean) ** 2).sum(dim=1, keepdim=True) / (k - 1))
    return (z - mean) / (std + eps)


@renamed_arguments(T="temperature")
def kd_loss(
    z_s: Tensor,
    z_t: Tensor,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
    dtype: torch.dtype | None = None,
    reduction: str = "mean",
) -> Tensor:
    """T² · Σ_k p_t log(p_t / p_s) per sample, p = softmax(z / T) (logits (B, K); standardized first if asked)."""
    z_s, z_t = as_dtype(z_s, dtype), as_dtype(z_t, dtype)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    p_s, p_t = _softmax(z_s / temperature), _softmax(z_t / temperature)
    return reduce((p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1) * temperature**2, reduction)


@renamed_arguments(T="temperature")
def lskd_loss(
    z_s: Tensor, z_t: Tensor, temperature: float = 2.0, *, dtype: torch.dtype | None = None, reduction: str = "mean"
) -> Tensor:
    """KD on per-sample standardized logits (Sun et al. 2024)."""
    return kd_loss(z_s, z_t, temperature, standardize=True, dtype=dtype, reduction=reduction)


@renamed_arguments(T="temperature")
def dkd_loss(
    z_s: Tensor,
    z_t: Tensor,
    y: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    dtype: torch.dtype | None = None,
    reduction: str = "mean",
) -> Tensor:
    """DKD in probability space (Zhao et al. 2022): binary (target, rest) KL and the KL of the softmax
    renormalized over the non-target classes, each · T², per sample."""
    T = temperature
    z_s, z_t = as_dtype(z_s, dtype), as_dtype(z_t, dtype)
    gt = F.one_hot(y.long(), z_s.shape[1]).to(z_s.dtype)
    p_s, p_t = _softmax(z_s / T), _softmax(z_t / T)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    tckd = (b_t * (torch.log(b_t) - torch.log(b_s))).sum(1) * T**2
    q_s = p_s * (1 - gt) / b_s[:, 1:]
    q_t = p_t * (1 - gt) / b_t[:, 1:]
    keep = gt == 0
    nckd = torch.where(keep, q_t * (torch.log(q_t) - torch.log(q_s)), torch.zeros_like(q_t)).sum(1) * T**2
    return reduce(alpha * tckd + beta * nckd, reduction)


def _pearson_columns(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of the columns of a and b (n, m) -> (m,), DIST's eps in the denominator."""
    a = a - a.sum(0) / a.shape[0]
    b = b - b.sum(0) / b.shape[0]
    return (a * b).sum(0) / (torch.sqrt((a * a).sum(0)) * torch.sqrt((b * b).sum(0)) + eps)


@renamed_arguments(T="temperature")
def dist_loss(
    z_s: Tensor,
    z_t: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
    reduction: str = "mean",
) -> Tensor:
    """DIST (Huang et al. 2022): T² · [β (1 − mean_b ρ(p_s[b], p_t[b])) + γ (1 − mean_c ρ(p_s[:, c], p_t[:, c]))].

    Per sample b: T² · [β (1 − ρ(p_s[b], p_t[b])) + γ · intra], the batch-level intra term shared by all samples.
    """
    T = temperature
    z_s, z_t = as_dtype(z_s, dtype), as_dtype(z_t, dtype)
    p_s, p_t = _softmax(z_s / T), _softmax(z_t / T)
    inter = 1 - _pearson_columns(p_s.T, p_t.T)
    intra = 1 - _pearson_columns(p_s, p_t).mean()
    return reduce(T**2 * (beta * inter + gamma * intra), reduction)
