"""Float64 references of :mod:`ckakd.wasserstein` (WKD-F, Lv et al., NeurIPS 2024): the PSD matrix
square root, W₂² between Gaussians, and WKD-F with explicit loops over samples, cells and channels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ckakd.reference._common import as_dtype, reduce


def sqrtm_psd(a: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Principal square root V diag(sqrt(max(λ, 0))) Vᵀ of a symmetric PSD (n, n) matrix."""
    a = as_dtype(a, dtype)
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T


def gaussian_wasserstein(
    mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, *, dtype: torch.dtype | None = None
) -> Tensor:
    """W₂² between one pair of Gaussians: mu (d,), cov (d,) variances or (d, d) matrices.

    ‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½), with diagonal covariances written as matrices.
    """
    mu1, cov1, mu2, cov2 = (as_dtype(t, dtype) for t in (mu1, cov1, mu2, cov2))
    cov1 = torch.diag(cov1) if cov1.dim() == 1 else cov1
    cov2 = torch.diag(cov2) if cov2.dim() == 1 else cov2
    s1 = sqrtm_psd(cov1, dtype=cov1.dtype)
    cross = sqrtm_psd(s1 @ cov2 @ s1, dtype=cov1.dtype)
    return ((mu1 - mu2) ** 2).sum() + torch.trace(cov1 + cov2 - 2 * cross)


def adaptive_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    """Windows of adaptive average pooling: cell i spans [floor(i·size/grid), ceil((i+1)·size/grid))."""
    return [(math.floor(i * size / grid), math.ceil((i + 1) * size / grid)) for i in range(grid)]


def wkd_feature_loss(
    f_s: Tensor,
    f_t: Tensor,
    *,
    grid: int = 1,
    mean_weight: float = 2.0,
    cov: str = "diag",
    eps: float = 1e-5,
    dtype: torch.dtype | None = None,
    reduction: str = "mean",
) -> Tensor:
    """WKD-F with explicit loops over samples, cells and channels (f: (B, C, H, W)).

    Per (sample, cell): μ_c = mean, var_c = unbiased variance (+ eps), loss term
    mean_weight·‖μs - μt‖² + Σ_c (sqrt(var_s) - sqrt(var_t))²  (diag) or
    mean_weight·‖μs - μt‖² + tr(Σs + Σt - 2 (Σs^½ Σt Σs^½)^½)   (full, Σ = XcXcᵀ/(n-1) + eps·I);
    averaged over the cells of each sample, then ``reduction`` over the samples.
    """
    f_s, f_t = as_dtype(f_s, dtype), as_dtype(f_t, dtype)
    b, c, h, w = f_s.shape
    per_sample = []
    for bi in range(b):
        terms = []
        for r0, r1 in adaptive_bounds(h, grid):
            for c0, c1 in adaptive_bounds(w, grid):
                xs = f_s[bi, :, r0:r1, c0:c1].reshape(c, -1)
                xt = f_t[bi, :, r0:r1, c0:c1].reshape(c, -1)
                n = xs.shape[1]
                mu_s = torch.stack([xs[ci].sum() / n for ci in range(c)])
                mu_t = torch.stack([xt[ci].sum() / n for ci in range(c)])
                mean_term = ((mu_s - mu_t) ** 2).sum()
                if cov == "diag":
                    var_s = torch.stack([((xs[ci] - mu_s[ci]) ** 2).sum() / (n - 1) for ci in range(c)]) + eps
                    var_t = torch.stack([((xt[ci] - mu_t[ci]) ** 2).sum() / (n - 1) for ci in range(c)]) + eps
                    cov_term = ((var_s.sqrt() - var_t.sqrt()) ** 2).sum()
                else:
                    eye = torch.eye(c, dtype=xs.dtype)
                    ds, dt = xs - mu_s[:, None], xt - mu_t[:, None]
                    sig_s = ds @ ds.T / (n - 1) + eps * eye
                    sig_t = dt @ dt.T / (n - 1) + eps * eye
                    root = sqrtm_psd(sig_s, dtype=xs.dtype)
                    cov_term = torch.trace(sig_s + sig_t - 2 * sqrtm_psd(root @ sig_t @ root, dtype=xs.dtype))
                terms.append(mean_weight * mean_term + cov_term)
        per_sample.append(torch.stack(terms).sum() / len(terms))
    return reduce(torch.stack(per_sample), reduction)
