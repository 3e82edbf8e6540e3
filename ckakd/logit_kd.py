"""Logit distillation losses: Hinton KD, logit-standardized KD (LSKD), decoupled KD (DKD) and DIST.

Every loss takes student and teacher logits ``z_s``, ``z_t`` of shape (B, K) (one shape, one device) and a
``temperature``; ``reduction``: "mean" (the default, averaged over the batch), "sum" (over the batch) or
"none" (the (B,) per-sample losses, whose mean is the "mean" value). They run in the inputs' dtype (no
autocast change); float64 formulas to test them against are in ``ckakd.reference``. The temperature's old
spelling ``T=`` still works, with a DeprecationWarning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd import _checks
from ckakd._checks import Reduction, renamed_arguments

__all__ = ["standardize_logits", "kd_loss", "kd_to_probs", "lskd_loss", "dkd_loss", "pearson", "dist_loss"]


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardization (Sun et al. 2024): ``(z - mean) / (std + eps)`` per sample (row).

    z: (B, K) -> (B, K). ``std`` is the unbiased standard deviation over the classes, as in the authors' code.
    """
    _checks.check_float_tensor("z", z)
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + eps)


def _kl_rows(log_p_s: Tensor, target: Tensor, temperature: float, reduction: str, *, log_target: bool) -> Tensor:
    """``KL(target ‖ p_s) · T²`` of (B, K) rows: batchmean (exactly ``F.kl_div``'s), sum, or per row (B,)."""
    if reduction == "mean":
        return F.kl_div(log_p_s, target, reduction="batchmean", log_target=log_target) * temperature**2
    per_row = F.kl_div(log_p_s, target, reduction="none", log_target=log_target).sum(1) * temperature**2
    return _checks.reduce_samples(per_row, reduction)


@renamed_arguments(T="temperature")
def kd_loss(
    z_s: Tensor,
    z_t: Tensor,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Hinton KD: ``KL(p_t ‖ p_s) · T²`` with ``p = softmax(z / T)``, T = ``temperature``.

    z_s, z_t: (B, K) logits -> scalar (``reduction`` "mean", the batchmean of mdistiller, or "sum") or (B,)
    (``"none"``: per sample). ``standardize=True`` standardizes both nets' logits per sample first
    (logit-standardized KD, :func:`lskd_loss`).
    """
    _checks.check_logit_pair("z_s", z_s, "z_t", z_t)
    temperature = _checks.check_positive("temperature", temperature)
    _checks.check_bool("standardize", standardize)
    _checks.check_reduction(reduction)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t / temperature, dim=1)
    return _kl_rows(log_p_s, log_p_t, temperature, reduction, log_target=True)


@renamed_arguments(T="temperature")
def lskd_loss(z_s: Tensor, z_t: Tensor, temperature: float = 2.0, *, reduction: Reduction = "mean") -> Tensor:
    """Logit-standardized KD (Sun et al. 2024): :func:`kd_loss` on per-sample standardized logits.

    z_s, z_t: (B, K) -> scalar, or (B,) with ``reduction="none"``. The paper uses T=2 (and KD weight 9).
    """
    return kd_loss(z_s, z_t, temperature, standardize=True, reduction=reduction)


@renamed_arguments(T="temperature")
def kd_to_probs(z_s: Tensor, p_t: Tensor, temperature: float, *, reduction: Reduction = "mean") -> Tensor:
    """``KL(p_t ‖ softmax(z_s/T)) · T²`` for given teacher probabilities, T = ``temperature``.

    z_s: (B, K) student logits, p_t: (B, K) teacher probabilities (e.g. an ensemble's mean) -> scalar
    (batchmean), or (B,) with ``reduction="none"``.
    """
    _checks.check_reduction(reduction)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    return _kl_rows(log_p_s, p_t, temperature, reduction, log_target=False)


@renamed_arguments(T="temperature")
def dkd_loss(
    z_s: Tensor,
    z_t: Tensor,
    y: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha · TCKD + beta · NCKD``, both ``· T²`` (T = ``temperature``).

    z_s, z_t: (B, K) logits, y: (B,) integer labels in [0, K) -> scalar (batch mean, or "sum"), or (B,) with
    ``reduction="none"`` (both terms are per sample).
    TCKD: KL between the binary (target, non-target) distributions of teacher and student.
    NCKD: KL between the distributions over the non-target classes (target class removed).
    Computed in log space (no ``log`` of a probability, no ``-1000`` masking trick).
    """
    _checks.check_logit_pair("z_s", z_s, "z_t", z_t)
    _checks.check_labels("y", y, z_s.shape[0], z_s.shape[1], z_s.device, "z_s")
    _checks.check_real("alpha", alpha)
    _checks.check_real("beta", beta)
    T = _checks.check_positive("temperature", temperature)
    _checks.check_reduction(reduction)
    B = z_s.shape[0]
    y = y.long().view(-1, 1)
    gt = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, y, True)
    zs, zt = z_s / T, z_t / T
    log_ps, log_pt = F.log_softmax(zs, dim=1), F.log_softmax(zt, dim=1)
    neg_inf = torch.finfo(zs.dtype).min

    def binary(log_p: Tensor) -> Tensor:
        log_gt = log_p.gather(1, y)
        log_other = torch.logsumexp(log_p.masked_fill(gt, neg_inf), dim=1, keepdim=True)
        return torch.cat([log_gt, log_other], dim=1)

    bs, bt = binary(log_ps), binary(log_pt)
    tckd_terms = bt.exp() * (bt - bs)
    ls2 = F.log_softmax(zs.masked_fill(gt, neg_inf), dim=1)
    lt2 = F.log_softmax(zt.masked_fill(gt, neg_inf), dim=1)
    pt2 = lt2.exp()  # exactly 0 at the target class
    nckd_terms = (pt2 * (lt2 - ls2)).masked_fill(gt, 0.0)
    if reduction == "mean":
        tckd = tckd_terms.sum() / B * T**2
        nckd = nckd_terms.sum() / B * T**2
        return alpha * tckd + beta * nckd
    per_sample = alpha * (tckd_terms.sum(1) * T**2) + beta * (nckd_terms.sum(1) * T**2)
    return _checks.reduce_samples(per_sample, reduction)


def pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` (one shape) along ``dim``, ``eps`` added to the denominator
    (DIST's form): ``Σ â b̂ / (‖â‖ ‖b̂‖ + eps)`` with â, b̂ centered along ``dim``; ``dim`` is reduced."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


@renamed_arguments(T="temperature")
def dist_loss(
    z_s: Tensor,
    z_t: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """DIST (Huang et al. 2022): ``T² · [beta · inter + gamma · intra]`` on ``p = softmax(z / T)``.

    z_s, z_t: (B, K) logits -> scalar, or (B,) with ``reduction="none"``.
    inter = 1 − mean_b Pearson(p_s[b, :], p_t[b, :]) (per sample, across classes);
    intra = 1 − mean_c Pearson(p_s[:, c], p_t[:, c]) (per class, across the batch: a batch-level term).
    ``reduction="none"``: sample b gets ``T² · [beta · (1 − Pearson(p_s[b], p_t[b])) + gamma · intra]``, the
    batch-level intra term shared by every sample (so the mean of the (B,) values is the "mean" loss; with
    ``gamma=0`` the values are purely per sample); "sum" is B × the mean.
    """
    _checks.check_logit_pair("z_s", z_s, "z_t", z_t)
    _checks.check_real("beta", beta)
    _checks.check_real("gamma", gamma)
    T = _checks.check_positive("temperature", temperature)
    _checks.check_reduction(reduction)
    p_s, p_t = F.softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1)
    intra = 1.0 - pearson(p_s.T, p_t.T, 1).mean()
    if reduction == "mean":
        inter = 1.0 - pearson(p_s, p_t, 1).mean()
        return T**2 * (beta * inter + gamma * intra)
    per_sample = T**2 * (beta * (1.0 - pearson(p_s, p_t, 1)) + gamma * intra)
    return _checks.reduce_samples(per_sample, reduction)
