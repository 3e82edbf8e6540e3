"""Float64 references of :mod:`ckakd.functional`: centered Grams, HSIC, CKA (centered, debiased,
uncentered), patch CKA, RCKA and the MMD term, with explicit centering matrices ``H = I - 11ᵀ/n``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd.ops.patch_alignment_stats import mix_reduction
from ckakd.reference._common import as_dtype


def centering_matrix(n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """H = I - 11ᵀ/n, shape (n, n)."""
    return torch.eye(n, dtype=dtype, device=device) - torch.full((n, n), 1.0 / n, dtype=dtype, device=device)


def centered_gram(x: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """H (X Xᵀ) H for x of shape (n, d) -> (n, n)."""
    x = as_dtype(x, dtype)
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
    x, y = as_dtype(x, dtype), as_dtype(y, dtype)
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
    x, y = as_dtype(x, dtype), as_dtype(y, dtype)
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
    x, y = as_dtype(x, dtype), as_dtype(y, dtype)
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
    f_s, f_t = as_dtype(f_s, dtype), as_dtype(f_t, dtype)
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
    x = as_dtype(x, dtype).reshape(x.shape[0], -1)
    y = as_dtype(y, dtype).reshape(y.shape[0], -1)
    n = x.shape[0]
    kx, ky = _normalized_gram(x), _normalized_gram(y)
    return n**2 * (kx.mean() - ky.mean()) ** 2


def alignment_gap(x: Tensor, y: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Σ_ij (<x̂_i,x̂_j> - <ŷ_i,ŷ_j>)², the exact left side of Theorem 2 (equals 2·(1 - uncentered CKA))."""
    x = as_dtype(x, dtype).reshape(x.shape[0], -1)
    y = as_dtype(y, dtype).reshape(y.shape[0], -1)
    return ((_normalized_gram(x) - _normalized_gram(y)) ** 2).sum()
