"""Pure-torch logit and feature KD losses used by the distillers (KD, DKD, DIST, AT) and the WKD schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["standardize_logits", "kd_loss", "dkd_loss", "dist_loss", "at_loss", "cosine_decay_weight"]


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardization (Sun et al. 2024): ``(z - mean) / (std + eps)`` per sample (row).

    ``std`` is the unbiased standard deviation over the classes, as in the authors' code.
    """
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + eps)


def kd_loss(z_s: Tensor, z_t: Tensor, T: float = 4.0, *, standardize: bool = False) -> Tensor:
    """Hinton KD: ``KL(p_t ‖ p_s) · T²`` with ``p = softmax(z / T)``, averaged over the batch (batchmean).

    ``standardize=True`` standardizes both nets' logits per sample first (logit-standardized KD).
    """
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    if z_s.shape != z_t.shape:
        raise ValueError(f"z_s and z_t must have the same shape, got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / T, dim=1)
    log_p_t = F.log_softmax(z_t / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T**2


def _kd_to_probs(z_s: Tensor, p_t: Tensor, T: float) -> Tensor:
    """``KL(p_t ‖ softmax(z_s/T)) · T²`` (batchmean) for given teacher probabilities."""
    log_p_s = F.log_softmax(z_s / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * T**2


def dkd_loss(z_s: Tensor, z_t: Tensor, y: Tensor, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha · TCKD + beta · NCKD``, both ``· T²`` and batch-averaged.

    TCKD: KL between the binary (target, non-target) distributions of teacher and student.
    NCKD: KL between the distributions over the non-target classes (target class removed).
    Computed in log space (no ``log`` of a probability, no ``-1000`` masking trick).
    """
    if z_s.shape != z_t.shape:
        raise ValueError(f"z_s and z_t must have the same shape, got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
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
    tckd = (bt.exp() * (bt - bs)).sum() / B * T**2
    ls2 = F.log_softmax(zs.masked_fill(gt, neg_inf), dim=1)
    lt2 = F.log_softmax(zt.masked_fill(gt, neg_inf), dim=1)
    pt2 = lt2.exp()  # exactly 0 at the target class
    nckd = (pt2 * (lt2 - ls2)).masked_fill(gt, 0.0).sum() / B * T**2
    return alpha * tckd + beta * nckd


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(z_s: Tensor, z_t: Tensor, beta: float = 1.0, gamma: float = 1.0, T: float = 1.0) -> Tensor:
    """DIST (Huang et al. 2022): ``T² · [beta · inter + gamma · intra]`` on ``p = softmax(z / T)``.

    inter = 1 − mean_b Pearson(p_s[b, :], p_t[b, :]) (per sample, across classes);
    intra = 1 − mean_c Pearson(p_s[:, c], p_t[:, c]) (per class, across the batch).
    """
    if z_s.shape != z_t.shape:
        raise ValueError(f"z_s and z_t must have the same shape, got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    p_s, p_t = F.softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.T, p_t.T).mean()
    return T**2 * (beta * inter + gamma * intra)


def _match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two (B, C, H, W) maps down to (min H, min W) of the pair."""
    h, w = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
    if tuple(f_s.shape[-2:]) != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if tuple(f_t.shape[-2:]) != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t


def _attention(f: Tensor, p: float) -> Tensor:
    return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017), mdistiller's form, for one feature pair.

    f_s: (B, Cs, Hs, Ws), f_t: (B, Ct, Ht, Wt); the larger map is adaptive-average-pooled to the smaller
    size. ``at(f) = normalize(f.pow(p).mean(1).view(B, -1))``; loss = ``(at(f_s) - at(f_t)).pow(2).mean()``.
    """
    for name, f in (("f_s", f_s), ("f_t", f_t)):
        if not isinstance(f, Tensor) or f.dim() != 4:
            raise ValueError(f"{name} must be a (B, C, H, W) feature map, got {getattr(f, 'shape', type(f))}")
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"f_s and f_t must have the same batch size, got {tuple(f_s.shape)} and {tuple(f_t.shape)}")
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    f_s, f_t = _match_spatial(f_s, f_t)
    return (_attention(f_s, p) - _attention(f_t, p)).pow(2).mean()


def cosine_decay_weight(weight: float, epoch: int, total_epochs: int, decay_start: int) -> float:
    """A loss weight held constant, then cosine-decayed to 0 at the last epoch (the WKD public code).

    ``epoch`` is 0-based. For ``epoch < decay_start`` the weight is returned unchanged; afterwards it is
    ``0.5 · weight · (1 + cos(π · (epoch + 1 − decay_start) / (total_epochs − decay_start)))``, i.e. the
    public code's formula with its 1-based epoch ``epoch + 1``: exactly 0 at ``epoch = total_epochs − 1``.
    CIFAR-100 WKD-L uses ``decay_start=150`` of 240 epochs.
    """
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs={total_epochs}), got {epoch}")
    if decay_start < 0:
        raise ValueError(f"decay_start must be >= 0, got {decay_start}")
    if epoch < decay_start:
        return float(weight)
    progress = (epoch + 1 - decay_start) / (total_epochs - decay_start)
    return 0.5 * float(weight) * (1.0 + math.cos(math.pi * progress))
