"""Naive, obviously-correct reference formulas (float64 by default).

Everything here is written for clarity, not speed: explicit centering matrices ``H = I - 11ᵀ/n``,
explicit Gram matrices, Python loops where they read better. Tests compare every fast path against
these functions, and the benchmarks use them as the "PyTorch reference" provider (pass ``dtype=`` to
run them in the input precision instead of float64).

Conventions: samples are rows. ``x`` is ``(n, d)``; feature maps are flattened to ``(n, -1)`` by the
loss-level functions (``cka_loss``, ``rcka_loss``).

Each module mirrors the loss module it checks: :mod:`~ckakd.reference.functional` (centered Grams, HSIC,
CKA, patch CKA, RCKA, MMD), :mod:`~ckakd.reference.logit_kd` (KD, LSKD, DKD, DIST),
:mod:`~ckakd.reference.feature_kd` (AT, FitNets), :mod:`~ckakd.reference.wasserstein` (matrix square root,
Gaussian W₂, WKD-F), :mod:`~ckakd.reference.interrelation` (class interrelation, its cost) and
:mod:`~ckakd.reference.wkd` (Sinkhorn, WKD-L, entropic OT).
"""

from __future__ import annotations

from ckakd.reference.feature_kd import at_loss, fitnet_loss
from ckakd.reference.functional import (
    alignment_gap,
    centered_gram,
    centering_matrix,
    cka,
    cka_feature_space,
    cka_loss,
    hsic,
    mmd_loss,
    patch_cka,
    patch_cka_loss,
    patch_features,
    rcka_loss,
    u_center,
)
from ckakd.reference.interrelation import cost_from_interrelation, interrelation
from ckakd.reference.logit_kd import dist_loss, dkd_loss, kd_loss, lskd_loss, standardize_logits
from ckakd.reference.wasserstein import adaptive_bounds, gaussian_wasserstein, sqrtm_psd, wkd_feature_loss
from ckakd.reference.wkd import entropic_ot, sinkhorn_fixed, wkd_logit_loss_reduced

__all__ = [
    "centering_matrix",
    "centered_gram",
    "u_center",
    "hsic",
    "cka",
    "cka_feature_space",
    "patch_features",
    "patch_cka",
    "patch_cka_loss",
    "cka_loss",
    "rcka_loss",
    "mmd_loss",
    "alignment_gap",
    "sinkhorn_fixed",
    "wkd_logit_loss_reduced",
    "entropic_ot",
    "sqrtm_psd",
    "gaussian_wasserstein",
    "adaptive_bounds",
    "wkd_feature_loss",
    "interrelation",
    "cost_from_interrelation",
    "standardize_logits",
    "kd_loss",
    "lskd_loss",
    "dkd_loss",
    "dist_loss",
    "at_loss",
    "fitnet_loss",
]
