"""Feature distillation losses on one pair of feature maps: attention transfer (AT) and the FitNets hint.

f_s: (B, Cs, Hs, Ws), f_t: (B, Ct, Ht, Wt) on one device; when the spatial sizes differ the larger map is
adaptive-average-pooled to the smaller (:func:`match_spatial`). ``reduction``: "mean" (default), "sum" over
the batch, or "none" (the (B,) per-sample losses, whose mean is the "mean" value). Float64 formulas are in
``ckakd.reference``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ckakd import _checks
from ckakd._checks import Reduction

__all__ = ["at_loss", "fitnet_loss", "match_spatial"]


def _check_maps(f_s: object, f_t: object) -> None:
    for name, f in (("f_s", f_s), ("f_t", f_t)):
        _checks.check_float_tensor(name, f)
        _checks.check_rank(name, f, (4,), "(B, C, H, W)")
    _checks.check_same_device(f_s=f_s, f_t=f_t)
    _checks.check_same_size("f_s", f_s, "f_t", f_t, (0,), "batch size")


def match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two (B, C, H, W) maps down to (min H, min W) of the pair."""
    h, w = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
    if tuple(f_s.shape[-2:]) != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if tuple(f_t.shape[-2:]) != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t


def _attention(f: Tensor, p: float) -> Tensor:
    return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))


def _reduce_positions(sq: Tensor, reduction: str) -> Tensor:
    """Squared differences (B, ...) -> their mean over everything (exactly ``.mean()``), the sum over the
    batch of the per-sample means, or the per-sample means (B,)."""
    if reduction == "mean":
        return sq.mean()
    return _checks.reduce_samples(sq.flatten(1).mean(1), reduction)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0, *, reduction: Reduction = "mean") -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017), mdistiller's form, for one feature pair.

    f_s: (B, Cs, Hs, Ws), f_t: (B, Ct, Ht, Wt) -> scalar, or (B,) with ``reduction="none"``; the larger map is
    adaptive-average-pooled to the smaller size. ``at(f) = normalize(f.pow(p).mean(1).view(B, -1))``;
    loss = ``(at(f_s) - at(f_t)).pow(2).mean()`` (per sample: the mean over the H·W positions).
    """
    _check_maps(f_s, f_t)
    _checks.check_positive("p", p)
    _checks.check_reduction(reduction)
    f_s, f_t = match_spatial(f_s, f_t)
    return _reduce_positions((_attention(f_s, p) - _attention(f_t, p)).pow(2), reduction)


def fitnet_loss(f_s: Tensor, f_t: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """FitNets hint loss: ``MSE(f_s, f_t)`` (mean over all elements) after :func:`match_spatial`.

    f_s: (B, C, Hs, Ws) (the student's map already projected to the teacher's C channels), f_t: (B, C, Ht, Wt)
    -> scalar, or (B,) with ``reduction="none"`` (per sample: the mean over C·H·W).
    """
    _check_maps(f_s, f_t)
    _checks.check_same_size("f_s", f_s, "f_t", f_t, (1,), "channels (project the student first)")
    _checks.check_reduction(reduction)
    f_s, f_t = match_spatial(f_s, f_t)
    if reduction == "mean":
        return F.mse_loss(f_s, f_t)
    return _reduce_positions((f_s - f_t).square(), reduction)
