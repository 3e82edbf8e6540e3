"""Wasserstein distances between Gaussians and the WKD-F feature loss (continuous WD of Lv et al.,
"Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation", NeurIPS 2024).

``sqrtm_psd`` (defined in :mod:`ckakd.ops.sqrtm_psd`, re-exported here): differentiable square root of
symmetric PSD matrices. ``gaussian_wasserstein``: squared 2-Wasserstein distance between (batches of)
Gaussians with diagonal or full covariances.
``wkd_feature_loss``: WKD-F, per-channel Gaussians of feature maps over grid cells.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ckakd import _checks
from ckakd._checks import Reduction
from ckakd.ops._gram_primitives import pow2_scale
from ckakd.ops.sqrtm_psd import SqrtmPSD, sqrtm_psd

__all__ = ["sqrtm_psd", "gaussian_wasserstein", "wkd_feature_loss"]

COVARIANCES = ("diag", "full")
Covariance = Literal["diag", "full"]


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt(max(x, 0)) with a zero (not infinite or NaN) gradient at x <= 0; NaN stays NaN."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), x.clamp(max=0) * 0)


def _gaussian_args(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> tuple[bool, bool]:
    """Validate the arguments; return whether cov1 and cov2 are full (..., d, d) matrices."""
    for name, t in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        _checks.check_float_tensor(name, t)
    _checks.check_same_device(mu1=mu1, cov1=cov1, mu2=mu2, cov2=cov2)
    full = []
    for mu_name, mu, cov_name, cov in (("mu1", mu1, "cov1", cov1), ("mu2", mu2, "cov2", cov2)):
        if mu.dim() < 1:
            raise ValueError(f"{mu_name} must have shape (..., d), got {tuple(mu.shape)}")
        d = mu.shape[-1]
        if cov.shape == mu.shape:
            full.append(False)
        elif cov.shape == mu.shape + (d,):
            full.append(True)
        else:
            raise ValueError(
                f"{cov_name} must have shape {tuple(mu.shape)} (variances) or {tuple(mu.shape) + (d,)} "
                f"(covariance matrices) to match {mu_name} of shape {tuple(mu.shape)}, got {tuple(cov.shape)}"
            )
    if mu1.shape[-1] != mu2.shape[-1]:
        raise ValueError(f"mu1 and mu2 must have the same dimension d, got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    try:
        torch.broadcast_shapes(mu1.shape[:-1], mu2.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"the batch dimensions of mu1 {tuple(mu1.shape)} and mu2 {tuple(mu2.shape)} do not broadcast"
        ) from None
    return full[0], full[1]


def _trace(a: Tensor) -> Tensor:
    return a.diagonal(dim1=-2, dim2=-1).sum(-1)


def _full_cov_term(cov1: Tensor, cov2: Tensor) -> Tensor:
    """tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½) for (..., d, d) covariances (autocast off).

    The term is homogeneous of degree 1 in (Σ1, Σ2): both are divided by one power of two c near their
    largest entry and the result multiplied by c, so huge or tiny covariances neither overflow in
    Σ1^½ Σ2 Σ1^½ nor make ``eigh`` fail. NaN/inf entries give NaN.
    """
    c = torch.maximum(pow2_scale(cov1, (-2, -1)), pow2_scale(cov2, (-2, -1)))
    cov1, cov2 = cov1 / c, cov2 / c
    s1 = SqrtmPSD.apply(cov1)
    cross = _trace(SqrtmPSD.apply(s1 @ cov2 @ s1))
    return (_trace(cov1) + _trace(cov2) - 2.0 * cross) * c[..., 0, 0]  # inf only where the value overflows


def gaussian_wasserstein(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance W₂² between N(mu1, cov1) and N(mu2, cov2), batched over leading dims.

    mu1, mu2: (..., d) (leading dims broadcast). cov: either (..., d) VARIANCES (diagonal covariance),
    W₂² = ‖μ1 - μ2‖² + ‖√v1 - √v2‖², or (..., d, d) symmetric PSD matrices,
    W₂² = ‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½) (one diagonal and one full is allowed).
    Returns (...,) clamped at >= 0; fp32 for fp16/bf16/fp32 inputs, fp64 for fp64, also under autocast
    (computed with autocast off; gradients in the inputs' dtypes). Negative variances or eigenvalues are
    treated as 0, and zero ones get a zero gradient (the true one is infinite). NaN (or inf) entries give
    NaN for the affected Gaussians, with NaN gradients, never an exception; huge or tiny finite covariances
    are rescaled by a power of two internally (a result beyond the dtype's range is inf).
    """
    full1, full2 = _gaussian_args(mu1, cov1, mu2, cov2)
    acc = _checks.accumulation_dtype(mu1, cov1, mu2, cov2)
    with _checks.autocast_off(mu1, cov1, mu2, cov2):
        mu1, cov1, mu2, cov2 = (t.to(acc) for t in (mu1, cov1, mu2, cov2))
        mean_term = (mu1 - mu2).square().sum(-1)
        if not (full1 or full2):
            cov_term = (_safe_sqrt(cov1) - _safe_sqrt(cov2)).square().sum(-1)
        else:
            cov1 = cov1 if full1 else torch.diag_embed(cov1)
            cov2 = cov2 if full2 else torch.diag_embed(cov2)
            cov_term = _full_cov_term(cov1, cov2)
        return (mean_term + cov_term).clamp_min(0)


# --------------------------------------------------------------------------------------------- WKD-F


def _grid_pair(grid) -> tuple[int, int]:
    return _checks.check_int_pair("grid", grid)


def cell_bounds(size: int, g: int) -> list[tuple[int, int]]:
    """Adaptive-pooling windows along one axis: cell i spans [floor(i·size/g), ceil((i+1)·size/g))."""
    return [((i * size) // g, -((-(i + 1) * size) // g)) for i in range(g)]


def _axis_index(size: int, g: int, device) -> tuple[Tensor, Tensor]:
    """Gather indices (g, k) and validity mask (g, k) of the adaptive windows, k = the largest window."""
    bounds = cell_bounds(size, g)
    k = max(e - s for s, e in bounds)
    start = torch.tensor([s for s, _ in bounds], device=device).unsqueeze(1)
    end = torch.tensor([e for _, e in bounds], device=device).unsqueeze(1)
    pos = start + torch.arange(k, device=device)
    return torch.minimum(pos, end - 1), pos < end


def _cells(x: Tensor, gh: int, gw: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """(B, C, H, W) -> values (B, G, C, P) per grid cell, mask (G, P) or None, counts (G,)."""
    b, c, h, w = x.shape
    if h % gh == 0 and w % gw == 0:  # exact tiling: a view-based reshape, no mask
        kh, kw = h // gh, w // gw
        v = x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, kh * kw)
        return v, None, torch.full((gh * gw,), kh * kw, dtype=x.dtype, device=x.device)
    ih, mh = _axis_index(h, gh, x.device)
    iw, mw = _axis_index(w, gw, x.device)
    kh, kw = ih.shape[1], iw.shape[1]
    v = x.index_select(2, ih.reshape(-1)).index_select(3, iw.reshape(-1))  # (B, C, gh·kh, gw·kw)
    v = v.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, kh * kw)
    mask = (mh[:, None, :, None] & mw[None, :, None, :]).reshape(gh * gw, kh * kw).to(x.dtype)
    return v, mask, mask.sum(-1)


def cell_stats(x: Tensor, gh: int, gw: int, full: bool, eps: float) -> tuple[Tensor, Tensor]:
    """Per (batch, cell): mean (B, G, C) and variance + eps (B, G, C) or covariance + eps·I (B, G, C, C)."""
    v, mask, n = _cells(x, gh, gw)
    if mask is None:
        mean = v.mean(-1)
        xc = v - mean.unsqueeze(-1)
    else:
        mask = mask.unsqueeze(-2)  # (G, 1, P)
        mean = (v * mask).sum(-1) / n.unsqueeze(-1)
        xc = (v - mean.unsqueeze(-1)) * mask  # two-pass: no E[x²] - E[x]² cancellation
    denom = (n - 1).unsqueeze(-1)
    if not full:
        return mean, xc.square().sum(-1) / denom + eps
    cov = xc @ xc.mT / denom.unsqueeze(-1)
    return mean, cov + eps * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)


def wkd_feature_loss(
    f_s: Tensor,
    f_t: Tensor,
    *,
    grid: int | tuple[int, int] = 1,
    mean_weight: float = 2.0,
    cov: Covariance = "diag",
    eps: float = 1e-5,
    reduction: Reduction = "mean",
) -> Tensor:
    """WKD-F: Wasserstein distance between per-cell Gaussians of student and teacher feature maps.

    f_s, f_t: (B, C, H, W), the same shape (project the student to the teacher's channels first).
    The map is split into grid×grid cells with adaptive-pooling windows (cell i spans rows
    floor(i·H/g) .. ceil((i+1)·H/g), as ``adaptive_avg_pool2d``; cells may overlap when g does not divide
    H). Per cell, μ = mean over its positions and the unbiased (co)variance + eps.
    cov="diag": σ = sqrt(var + eps) per channel, loss = mean over (batch, cells) of
        mean_weight·Σ_c (μs - μt)² + Σ_c (σs - σt)².
    cov="full": C×C covariance Σ (+ eps·I), loss = mean over (batch, cells) of
        mean_weight·‖μs - μt‖² + tr(Σs + Σt - 2 (Σs^½ Σt Σs^½)^½)   (two C×C eigh per cell).
    With mean_weight=1 each term is ``gaussian_wasserstein`` of the cell Gaussians. Returns a scalar
    (fp32, fp64 for fp64 inputs), also under autocast (computed with autocast off; gradients in the inputs'
    dtype). NaN (or inf) features give a NaN loss with NaN gradients, never an exception. Each sample is
    divided by a power of two near its largest |value| first and the loss scaled back in float64, so huge
    or tiny features work (inf only where the loss exceeds the output dtype; finite gradients for
    |f| < 2^64 in fp32). The caller applies the loss weight γ_F; the WKD public code uses
    γ_F=0.08, mean_weight=4, grid=1 on CIFAR-100 and γ_F=0.02, mean_weight=2, grid=4 on ImageNet.
    ``reduction``: "mean" (default), "sum" over the batch, or "none": the (B,) per-sample losses (the mean over
    the sample's cells), whose mean is the "mean" value.
    """
    _checks.check_feature_map_pair(f_s, f_t)
    _checks.check_choice("cov", cov, COVARIANCES)
    mean_weight = _checks.check_weight("mean_weight", mean_weight)
    eps = _checks.check_real("eps", eps, minimum=0.0)
    _checks.check_reduction(reduction)
    gh, gw = _grid_pair(grid)
    if f_s.shape[0] == 0 or f_s.shape[1] == 0:
        raise ValueError(f"f_s and f_t must have B >= 1 and C >= 1, got an empty batch {tuple(f_s.shape)}")
    h, w = f_s.shape[-2:]
    if gh > h or gw > w:
        raise ValueError(f"grid {(gh, gw)} is larger than the feature map ({h}, {w}) of f_s {tuple(f_s.shape)}")
    min_h = min(e - s for s, e in cell_bounds(h, gh))
    min_w = min(e - s for s, e in cell_bounds(w, gw))
    if min_h * min_w < 2:
        raise ValueError(
            f"grid {(gh, gw)} on a ({h}, {w}) feature map gives single-element windows: the unbiased variance "
            "needs at least 2 positions per cell; use a smaller grid"
        )
    acc = _checks.accumulation_dtype(f_s, f_t)
    full = cov == "full"
    with _checks.autocast_off(f_s, f_t):
        xs, xt = f_s.to(acc), f_t.to(acc)
        # Per sample, one power of two c near max |f| of both maps: the loss terms are homogeneous of
        # degree 2 in the features (eps scales with them), so the statistics of x / c times c² are exact
        # and squares of huge features do not overflow (nor does eigh fail on inf covariances).
        c = torch.maximum(pow2_scale(xs, (1, 2, 3)), pow2_scale(xt, (1, 2, 3)))  # (B, 1, 1, 1)
        # c² in float64 (it overflows fp32 for |f| >= 2^64): (B, 1), against the (B, G) per-cell terms
        c2 = c.to(torch.float64).square().reshape(-1, 1)
        eps_c = (eps / c2.unsqueeze(-1)).to(acc)  # (B, 1, 1), against the (B, G, C) variances
        mu_s, cov_s = cell_stats(xs / c, gh, gw, full, 0.0)
        mu_t, cov_t = cell_stats(xt / c, gh, gw, full, 0.0)
        if full:
            eye = torch.eye(f_s.shape[1], dtype=acc, device=f_s.device)
            eps_c = eps_c.unsqueeze(-1) * eye  # (B, 1, C, C)
        cov_s, cov_t = cov_s + eps_c, cov_t + eps_c
        mean_term = (mu_s - mu_t).square().sum(-1)
        if full:
            cov_term = _full_cov_term(cov_s, cov_t).clamp_min(0)
        else:
            cov_term = (_safe_sqrt(cov_s) - _safe_sqrt(cov_t)).square().sum(-1)
        # scaled back in float64: exact, inf only where the loss itself overflows the output dtype
        terms = (mean_weight * mean_term + cov_term).to(torch.float64) * c2  # (B, G)
        if reduction == "mean":
            return terms.mean().to(acc)
        return _checks.reduce_samples(terms.mean(1), reduction).to(acc)
