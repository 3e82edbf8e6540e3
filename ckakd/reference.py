"""Naive, obviously-correct reference formulas (float64 by default).

Everything here is written for clarity, not speed: explicit centering matrices ``H = I - 11ᵀ/n``,
explicit Gram matrices, Python loops where they read better. Tests compare every fast path against
these functions, and the benchmarks use them as the "PyTorch reference" provider (pass ``dtype=`` to
run them in the input precision instead of float64).

Conventions: samples are rows. ``x`` is ``(n, d)``; feature maps are flattened to ``(n, -1)`` by the
loss-level functions (``fcka``, ``rcka_loss``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd.ops.patch import mix_reduction

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
]


def _as(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x.to(torch.float64 if dtype is None else dtype)


def centering_matrix(n: int, *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """H = I - 11ᵀ/n, shape (n, n)."""
    return torch.eye(n, dtype=dtype, device=device) - torch.full((n, n), 1.0 / n, dtype=dtype, device=device)


def centered_gram(x: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """H (X Xᵀ) H for x of shape (n, d) -> (n, n)."""
    x = _as(x, dtype)
    h = centering_matrix(x.shape[0], dtype=x.dtype, device=x.device)
    return h @ (x @ x.T) @ h


def u_center(k: Tensor) -> Tensor:
    """U-centering of a Gram matrix (Székely & Rizzo 2014), as in Kornblith et al.'s ``center_gram(unbiased=True)``.

    Zero the diagonal, subtract row and column means with the 1/(n-2) factor, add back the grand
    mean with 1/((n-1)(n-2)), and zero the diagonal again. Needs n >= 3 (n >= 4 for unbiased HSIC).
    """
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0)
    total = k.sum()
    row = k.sum(dim=1, keepdim=True) / (n - 2)
    col = k.sum(dim=0, keepdim=True) / (n - 2)
    k = k - row - col + total / ((n - 1) * (n - 2))
    k.fill_diagonal_(0)
    return k


def hsic(x: Tensor, y: Tensor, *, mode: str = "biased", dtype: torch.dtype | None = None) -> Tensor:
    """HSIC with linear kernels.

    biased:   tr(K H L H) / (n-1)^2  (Gretton et al. 2005)
    unbiased: the Song et al. (2012) estimator
              [tr(K~L~) + 1ᵀK~1 · 1ᵀL~1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK~L~1] / (n(n-3)),
              K~, L~ = Grams with zeroed diagonal. Needs n >= 4.
    """
    x, y = _as(x, dtype), _as(y, dtype)
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    if mode == "biased":
        h = centering_matrix(n, dtype=x.dtype, device=x.device)
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2
    if mode == "unbiased":
        k = k - torch.diag(torch.diag(k))
        l = l - torch.diag(torch.diag(l))
        one = torch.ones(n, 1, dtype=x.dtype, device=x.device)
        term1 = torch.trace(k @ l)
        term2 = (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
        term3 = 2.0 / (n - 2) * (one.T @ k @ l @ one)
        return ((term1 + term2 - term3) / (n * (n - 3))).reshape(())
    raise ValueError(f"mode must be 'biased' or 'unbiased', got {mode!r}")


def cka(x: Tensor, y: Tensor, *, mode: str = "centered", dtype: torch.dtype | None = None) -> Tensor:
    """Linear CKA between x (n, dx) and y (n, dy).

    centered:   HSIC(K,L) / sqrt(HSIC(K,K) HSIC(L,L)) with K = X Xᵀ, L = Y Yᵀ and H K H centering.
    debiased:   the same with U-centered Grams (Kornblith's ``unbiased=True``); needs n >= 4.
    uncentered: plain kernel alignment <K, L> / (|K| |L|), as in the RCKA authors' public code.
    Returns 0 when either Gram vanishes (constant features).
    """
    x, y = _as(x, dtype), _as(y, dtype)
    if mode == "centered":
        k, l = centered_gram(x, dtype=x.dtype), centered_gram(y, dtype=y.dtype)
    elif mode == "debiased":
        k, l = u_center(x @ x.T), u_center(y @ y.T)
    elif mode == "uncentered":
        k, l = x @ x.T, y @ y.T
    else:
        raise ValueError(f"mode must be 'centered', 'debiased' or 'uncentered', got {mode!r}")
    kl, kk, ll = (k * l).sum(), (k * k).sum(), (l * l).sum()
    if mode == "debiased":
        kk, ll = kk.clamp_min(0), ll.clamp_min(0)
    denom = torch.sqrt(kk) * torch.sqrt(ll)
    if denom == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return kl / denom


def cka_feature_space(x: Tensor, y: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Theorem 1 of Zhou et al., IJCAI 2024: |YᵀX|_F^2 / (|XᵀX|_F |YᵀY|_F) on column-centered features."""
    x, y = _as(x, dtype), _as(y, dtype)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    return torch.linalg.matrix_norm(y.T @ x) ** 2 / (
        torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    )


def cka_loss(x: Tensor, y: Tensor, *, mode: str = "centered", dtype: torch.dtype | None = None) -> Tensor:
    """1 - CKA on features flattened to (n, -1)."""
    return 1.0 - cka(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1), mode=mode, dtype=dtype)


def _resize_to_patches(f: Tensor, ph: int, pw: int) -> Tensor:
    """Bilinearly resize (B, C, H, W) to the nearest multiple of the patch size (at least one patch)."""
    h, w = f.shape[-2:]
    th, tw = max(ph, round(h / ph) * ph), max(pw, round(w / pw) * pw)
    if (th, tw) == (h, w):
        return f
    return F.interpolate(f, size=(th, tw), mode="bilinear", align_corners=False)


def patch_features(f: Tensor, patch_size: tuple[int, int], reduce: str) -> Tensor:
    """Cut (B, C, H, W) features (H, W multiples of the patch) into per-problem matrices (G, P, D).

    Patches are the samples (rows). The problem axis depends on ``reduce``:
    channel: G = C, features (b, i, j); batch: G = B, features (c, i, j);
    spatial: G = ph*pw (in-patch position), features (b, c).
    """
    ph, pw = patch_size
    b, c, h, w = f.shape
    npH, npW = h // ph, w // pw
    # (B, C, npH, ph, npW, pw) -> index names b c pi i pj j
    v = f.reshape(b, c, npH, ph, npW, pw)
    problems = []
    if reduce == "channel":
        for ci in range(c):
            rows = [v[:, ci, pi, :, pj, :].reshape(-1) for pi in range(npH) for pj in range(npW)]
            problems.append(torch.stack(rows))
    elif reduce == "batch":
        for bi in range(b):
            rows = [v[bi, :, pi, :, pj, :].reshape(-1) for pi in range(npH) for pj in range(npW)]
            problems.append(torch.stack(rows))
    elif reduce == "spatial":
        for i in range(ph):
            for j in range(pw):
                rows = [v[:, :, pi, i, pj, j].reshape(-1) for pi in range(npH) for pj in range(npW)]
                problems.append(torch.stack(rows))
    else:
        raise ValueError(f"reduce must be 'channel', 'batch' or 'spatial', got {reduce!r}")
    return torch.stack(problems)


def patch_cka(
    f_s: Tensor,
    f_t: Tensor,
    *,
    patch_size: tuple[int, int] = (16, 16),
    reduce: str = "channel",
    mode: str = "centered",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-problem CKA values (G,) between student and teacher patch matrices (one Python loop per problem)."""
    f_s, f_t = _as(f_s, dtype), _as(f_t, dtype)
    ph, pw = patch_size
    f_s, f_t = _resize_to_patches(f_s, ph, pw), _resize_to_patches(f_t, ph, pw)
    xs = patch_features(f_s, patch_size, reduce)
    xt = patch_features(f_t, patch_size, reduce)
    return torch.stack([cka(a, b, mode=mode, dtype=a.dtype) for a, b in zip(xs, xt, strict=True)])


def patch_cka_loss(
    feats_s: Tensor | Sequence[Tensor],
    feats_t: Tensor | Sequence[Tensor],
    *,
    patch_size: tuple[int, int] = (16, 16),
    reduce: str = "channel",
    mode: str = "centered",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """PCKA: mean over problems of 1 - CKA, summed over levels.

    ``reduce="mix"`` (Zhou et al., IJCAI 2024, Table 5): level 0 uses batch, level 1 spatial, all later levels channel.
    """
    if isinstance(feats_s, Tensor):
        feats_s, feats_t = [feats_s], [feats_t]
    total = 0.0
    for level, (fs, ft) in enumerate(zip(feats_s, feats_t, strict=True)):
        r = mix_reduction(level) if reduce == "mix" else reduce
        values = patch_cka(fs, ft, patch_size=patch_size, reduce=r, mode=mode, dtype=dtype)
        total = total + (1.0 - values).mean()
    return total


def rcka_loss(
    feats_s: Tensor | Sequence[Tensor],
    feats_t: Tensor | Sequence[Tensor],
    logits_s: Tensor,
    logits_t: Tensor,
    *,
    alpha: float = 5.0,
    beta: float = 5.0,
    mode: str = "centered",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """RCKA distillation terms (without CE): alpha·Σ FCKA + beta·(intra-LCKA + inter-LCKA), each 1 - CKA.

    FCKA on (B, C·H·W) features; intra on (B, K) logits; inter on the transposed (K, B) logits.
    """
    if isinstance(feats_s, Tensor):
        feats_s, feats_t = [feats_s], [feats_t]
    fcka = sum(cka_loss(s, t, mode=mode, dtype=dtype) for s, t in zip(feats_s, feats_t, strict=True))
    intra = 1.0 - cka(logits_s, logits_t, mode=mode, dtype=dtype)
    inter = 1.0 - cka(logits_s.T, logits_t.T, mode=mode, dtype=dtype)
    return alpha * fcka + beta * (intra + inter)


def _normalized_gram(x: Tensor) -> Tensor:
    """K / |K|_F with K = X Xᵀ, i.e. the Gram of the rows of X / sqrt(|XᵀX|_F) (Appendix C.2)."""
    k = x @ x.T
    return k / torch.linalg.matrix_norm(k)


def mmd_loss(x: Tensor, y: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """The MMD (Jensen) term of Theorem 2: N²·(E_ij<x̂_i,x̂_j> - E_ij<ŷ_i,ŷ_j>)².

    Rows are scaled as in Appendix C.2 (x̂ = x / sqrt(|XᵀX|_F)); no centering (with centered features
    both expectations are 0). It lower-bounds Σ_ij(<x̂_i,x̂_j> - <ŷ_i,ŷ_j>)² = 2·(1 - alignment).
    """
    x = _as(x, dtype).reshape(x.shape[0], -1)
    y = _as(y, dtype).reshape(y.shape[0], -1)
    n = x.shape[0]
    kx, ky = _normalized_gram(x), _normalized_gram(y)
    return n**2 * (kx.mean() - ky.mean()) ** 2


def alignment_gap(x: Tensor, y: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Σ_ij (<x̂_i,x̂_j> - <ŷ_i,ŷ_j>)², the exact left side of Theorem 2 (equals 2·(1 - uncentered CKA))."""
    x = _as(x, dtype).reshape(x.shape[0], -1)
    y = _as(y, dtype).reshape(y.shape[0], -1)
    return ((_normalized_gram(x) - _normalized_gram(y)) ** 2).sum()


# -------------------------------------------------------------------------------- WKD (Lv et al., NeurIPS 2024)

__all__ += [
    "sqrtm_psd",
    "gaussian_wasserstein",
    "adaptive_bounds",
    "wkd_feature_loss",
    "interrelation",
    "cost_from_interrelation",
]


def sqrtm_psd(a: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Principal square root V diag(sqrt(max(λ, 0))) Vᵀ of a symmetric PSD (n, n) matrix."""
    a = _as(a, dtype)
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T


def gaussian_wasserstein(
    mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, *, dtype: torch.dtype | None = None
) -> Tensor:
    """W₂² between one pair of Gaussians: mu (d,), cov (d,) variances or (d, d) matrices.

    ‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½), with diagonal covariances written as matrices.
    """
    mu1, cov1, mu2, cov2 = (_as(t, dtype) for t in (mu1, cov1, mu2, cov2))
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
) -> Tensor:
    """WKD-F with explicit loops over samples, cells and channels (f: (B, C, H, W)).

    Per (sample, cell): μ_c = mean, var_c = unbiased variance (+ eps), loss term
    mean_weight·‖μs - μt‖² + Σ_c (sqrt(var_s) - sqrt(var_t))²  (diag) or
    mean_weight·‖μs - μt‖² + tr(Σs + Σt - 2 (Σs^½ Σt Σs^½)^½)   (full, Σ = XcXcᵀ/(n-1) + eps·I);
    averaged over samples and cells.
    """
    f_s, f_t = _as(f_s, dtype), _as(f_t, dtype)
    b, c, h, w = f_s.shape
    terms = []
    for bi in range(b):
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
    return torch.stack(terms).mean()


def _pair_alignment(k: Tensor, l: Tensor) -> Tensor:
    """⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) with an explicit centering matrix; 0 when a Gram vanishes."""
    h = centering_matrix(k.shape[0], dtype=k.dtype, device=k.device)
    kc, lc = h @ k @ h, h @ l @ h
    denom = torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(lc)
    return (kc * lc).sum() / denom if denom > 0 else torch.zeros((), dtype=k.dtype)


def _rbf_gram(x: Tensor) -> Tensor:
    b = x.shape[0]
    d2 = torch.stack([torch.stack([((x[i] - x[j]) ** 2).sum() for j in range(b)]) for i in range(b)])
    nonzero = sorted(d2[i, j].item() for i in range(b) for j in range(i + 1, b) if d2[i, j] > 0)
    sigma2 = statistics.median(nonzero) if nonzero else 1.0
    return torch.exp(-d2 / (2 * sigma2))


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    return (a * b).sum() / denom if denom > 0 else torch.zeros((), dtype=a.dtype)


def interrelation(
    class_features: Tensor, *, kernel: str = "cka", degree: int = 2, dtype: torch.dtype | None = None
) -> Tensor:
    """IR (C, C) with a Python loop over class pairs; unit diagonal.

    cka: ``cka(X_i, X_j)`` on the (b, d) class matrices. poly: Gram (x·y/d + 1)^degree; rbf: Gram
    exp(-‖x - y‖²/(2σ²)), σ² = median of the class's nonzero pairwise squared distances; both compared by
    the alignment of their H K H Grams. centroid: cosine of class means. cosine: cosine of rows of (C, d).
    """
    x = _as(class_features, dtype)
    c = x.shape[0]
    if kernel in ("poly", "rbf"):
        if kernel == "poly":
            grams = [(xi @ xi.T / xi.shape[1] + 1) ** degree for xi in x]
        else:
            grams = [_rbf_gram(xi) for xi in x]
    out = torch.empty(c, c, dtype=x.dtype)
    for i in range(c):
        for j in range(c):
            if i == j:
                out[i, j] = 1.0
            elif kernel == "cka":
                out[i, j] = cka(x[i], x[j], dtype=x.dtype)
            elif kernel in ("poly", "rbf"):
                out[i, j] = _pair_alignment(grams[i], grams[j])
            elif kernel == "centroid":
                out[i, j] = _cosine(x[i].mean(0), x[j].mean(0))
            elif kernel == "cosine":
                out[i, j] = _cosine(x[i], x[j])
            else:
                raise ValueError(f"unknown kernel {kernel!r}")
    return out


def cost_from_interrelation(ir: Tensor, *, sharpen: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """Element by element: D_ij = 1 - IR_ij (0 on the diagonal), cost = max(1 - exp(-sharpen·D), 0) + 1e-8."""
    ir = _as(ir, dtype)
    c = ir.shape[0]
    out = torch.empty_like(ir)
    for i in range(c):
        for j in range(c):
            d = 0.0 if i == j else 1.0 - ir[i, j].item()
            out[i, j] = max(1.0 - math.exp(-sharpen * d), 0.0) + 1e-8
    return out


# ------------------------------------------------------------------------------------ optimal transport


def sinkhorn_fixed(
    p: Tensor, q: Tensor, cost: Tensor, *, eps: float = 0.05, iters: int = 10, u0: Tensor | None = None
) -> Tensor:
    """WKD's fixed-iteration Sinkhorn, written plainly (batched (B, C) histograms, explicit B×C×C plan).

    u₀ = 1/C; for each iteration v = q / (Kᵀu + 1e-8), u = p / (K v + 1e-8); returns Σ_ij P_ij C_ij (B,).
    Differentiable by autograd through the iterations.
    """
    k = torch.exp(-cost / eps)
    u = torch.full_like(p, 1.0 / p.shape[1]) if u0 is None else u0
    v = None
    for _ in range(iters):
        v = q / (torch.einsum("bi,ij->bj", u, k) + 1e-8)
        u = p / (torch.einsum("ij,bj->bi", k, v) + 1e-8)
    plan = u[:, :, None] * k[None] * v[:, None, :]
    return (plan * cost[None]).sum(dim=(1, 2))


def wkd_logit_loss_reduced(
    logits_s: Tensor,
    logits_t: Tensor,
    target: Tensor,
    cost: Tensor,
    *,
    temperature: float,
    gamma: float,
    eps: float = 0.05,
    iters: int = 10,
) -> Tensor:
    """WKD-L with target separation as the public code formulates it: per-sample (C−1)×(C−1) costs.

    loss_t = −mean softmax(z_t)[y]·log_softmax(z_s)[y]; the non-target logits of each sample are
    softened at temperature T over C−1 classes and compared by Sinkhorn with that sample's reduced cost.
    """
    n, c = logits_s.shape
    y = target.long()[:, None]
    loss_t = -(torch.softmax(logits_t, 1).gather(1, y).detach() * torch.log_softmax(logits_s, 1).gather(1, y)).mean()
    mask = torch.ones_like(logits_s, dtype=torch.bool).scatter_(1, y, False)
    zs, zt = logits_s[mask].reshape(n, c - 1), logits_t[mask].reshape(n, c - 1)
    pair = mask[:, :, None] & mask[:, None, :]
    costs = cost.expand(n, c, c)[pair].reshape(n, c - 1, c - 1)
    p, q = torch.softmax(zs / temperature, 1), torch.softmax(zt / temperature, 1)
    k = torch.exp(-costs / eps)
    u = torch.full_like(p, 1.0 / (c - 1))[:, :, None]
    p, q = p[:, :, None], q[:, :, None]
    v = None
    for _ in range(iters):
        v = q / (torch.bmm(k.transpose(1, 2), u) + 1e-8)
        u = p / (torch.bmm(k, v) + 1e-8)
    plan = u * k * v.transpose(1, 2)
    return loss_t + gamma * (plan * costs).sum(dim=(1, 2)).mean()


def entropic_ot(p: Tensor, q: Tensor, cost: Tensor, eps: float, *, max_iter: int = 100000) -> Tensor:
    """min_P ⟨P, C⟩ + ε Σ P (log P − 1) over plans with marginals p, q (one pair, (C,)), float64.

    Log-domain iterations with explicit log-sum-exps, run until the potentials stop changing.
    """
    p, q, cost = p.double(), q.double(), cost.double()
    f, g = torch.zeros_like(p), torch.zeros_like(q)
    for _ in range(max_iter):
        f_new = eps * torch.log(p) - eps * torch.logsumexp((g[None, :] - cost) / eps, dim=1)
        g_new = eps * torch.log(q) - eps * torch.logsumexp((f_new[:, None] - cost) / eps, dim=0)
        done = (f_new - f).abs().max() < 1e-15 and (g_new - g).abs().max() < 1e-15
        f, g = f_new, g_new
        if done:
            break
    plan = torch.exp((f[:, None] + g[None, :] - cost) / eps)
    return (plan * cost).sum() + eps * (plan * (torch.log(plan) - 1)).sum()


# ----------------------------------------------------------------- logit and feature KD (KD, LSKD, DKD, DIST, AT)

__all__ += ["standardize_logits", "kd_loss", "lskd_loss", "dkd_loss", "dist_loss", "at_loss", "fitnet_loss"]


def _softmax(z: Tensor) -> Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def standardize_logits(z: Tensor, eps: float = 1e-7, *, dtype: torch.dtype | None = None) -> Tensor:
    """(z - mean) / (std + eps) per row, std the unbiased standard deviation over the K classes."""
    z = _as(z, dtype)
    k = z.shape[1]
    mean = z.sum(dim=1, keepdim=True) / k
    std = torch.sqrt(((z - mean) ** 2).sum(dim=1, keepdim=True) / (k - 1))
    return (z - mean) / (std + eps)


def kd_loss(
    z_s: Tensor, z_t: Tensor, T: float = 4.0, *, standardize: bool = False, dtype: torch.dtype | None = None
) -> Tensor:
    """T² · mean_b Σ_k p_t log(p_t / p_s), p = softmax(z / T) (logits (B, K); standardized first if asked)."""
    z_s, z_t = _as(z_s, dtype), _as(z_t, dtype)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    p_s, p_t = _softmax(z_s / T), _softmax(z_t / T)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1).mean() * T**2


def lskd_loss(z_s: Tensor, z_t: Tensor, T: float = 2.0, *, dtype: torch.dtype | None = None) -> Tensor:
    """KD on per-sample standardized logits (Sun et al. 2024)."""
    return kd_loss(z_s, z_t, T, standardize=True, dtype=dtype)


def dkd_loss(
    z_s: Tensor,
    z_t: Tensor,
    y: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """DKD in probability space (Zhao et al. 2022): binary (target, rest) KL and the KL of the softmax
    renormalized over the non-target classes, each · T², averaged over the batch."""
    z_s, z_t = _as(z_s, dtype), _as(z_t, dtype)
    gt = F.one_hot(y.long(), z_s.shape[1]).to(z_s.dtype)
    p_s, p_t = _softmax(z_s / T), _softmax(z_t / T)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    tckd = (b_t * (torch.log(b_t) - torch.log(b_s))).sum(1).mean() * T**2
    q_s = p_s * (1 - gt) / b_s[:, 1:]
    q_t = p_t * (1 - gt) / b_t[:, 1:]
    keep = gt == 0
    nckd = torch.where(keep, q_t * (torch.log(q_t) - torch.log(q_s)), torch.zeros_like(q_t)).sum(1).mean() * T**2
    return alpha * tckd + beta * nckd


def _pearson_columns(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of the columns of a and b (n, m) -> (m,), DIST's eps in the denominator."""
    a = a - a.sum(0) / a.shape[0]
    b = b - b.sum(0) / b.shape[0]
    return (a * b).sum(0) / (torch.sqrt((a * a).sum(0)) * torch.sqrt((b * b).sum(0)) + eps)


def dist_loss(
    z_s: Tensor,
    z_t: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    T: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """DIST (Huang et al. 2022): T² · [β (1 − mean_b ρ(p_s[b], p_t[b])) + γ (1 − mean_c ρ(p_s[:, c], p_t[:, c]))]."""
    z_s, z_t = _as(z_s, dtype), _as(z_t, dtype)
    p_s, p_t = _softmax(z_s / T), _softmax(z_t / T)
    inter = 1 - _pearson_columns(p_s.T, p_t.T).mean()
    intra = 1 - _pearson_columns(p_s, p_t).mean()
    return T**2 * (beta * inter + gamma * intra)


def _pool_to(f: Tensor, h: int, w: int) -> Tensor:
    """Adaptive average pooling (B, C, H, W) -> (B, C, h, w) with PyTorch's bins, one window at a time."""
    rows = adaptive_bounds(f.shape[-2], h)
    cols = adaptive_bounds(f.shape[-1], w)
    out = f.new_empty(f.shape[0], f.shape[1], h, w)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, :, i, j] = f[:, :, r0:r1, c0:c1].mean(dim=(-2, -1))
    return out


def _match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    h, w = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
    return _pool_to(f_s, h, w), _pool_to(f_t, h, w)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0, *, dtype: torch.dtype | None = None) -> Tensor:
    """Attention transfer: a(f) = m / max(‖m‖, 1e-12) with m = mean_c f^p flattened per sample; mean (a_s − a_t)²."""
    f_s, f_t = _match_spatial(_as(f_s, dtype), _as(f_t, dtype))

    def att(f: Tensor) -> Tensor:
        m = (f**p).mean(dim=1).reshape(f.shape[0], -1)
        return m / torch.sqrt((m * m).sum(dim=1, keepdim=True)).clamp_min(1e-12)

    return ((att(f_s) - att(f_t)) ** 2).mean()


def fitnet_loss(f_s: Tensor, f_t: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """FitNets hint: mean squared difference after adaptive-average-pooling to the smaller spatial size."""
    f_s, f_t = _match_spatial(_as(f_s, dtype), _as(f_t, dtype))
    return ((f_s - f_t) ** 2).mean()
