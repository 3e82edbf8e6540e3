"""Patch-level feature losses of Zhou et al., IJCAI 2024 on paired (B, C, H, W) maps (one or a list of levels).

Every loss takes one map each or lists of paired levels ``(B, C, H, W)`` (student, teacher; same batch and
channels: project the student first) and works on all channels and patches at once (no Python loop over
channels). Patches are ``(P_H, P_W)`` windows; maps whose size is not a multiple are resized bilinearly to the
nearest multiple first, as ``ckakd.patch_cka_loss`` does (PCKA: or up to the next multiple, ``resize="ceil"``,
the rule of the authors' code).

* ``pcka_loss``: ``γ · patch_cka_loss`` per level with the paper's four reductions (channel / batch / spatial /
  mix, :data:`ckakd.functional.PATCH_MIX_ORDER`) plus the authors' optional inter term (:func:`pcka_inter`);
* ``kd_patch_loss``: Hinton KD inside every (sample, channel, patch): softmax over the patch's positions at
  temperature τ, KL(teacher‖student)·τ² averaged (the paper's Table 7 "KD w/ patch");
* ``at_patch_loss``: attention transfer per patch: mean-square over channels, L2-normalized within the patch;
* ``dist_patch_loss``: DIST on patch distributions: 1 − Pearson over positions (inter) and over rows (intra);
* ``mmd_patch_loss``: the paper's MMD term per channel over patches; ``wkd_feature_fpn_loss``: WKD-F per level.

No detector knowledge here: ``ckakd.detection.distill`` re-exports these names for its FPN distillers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd.functional import PATCH_MIX_ORDER, PATCH_RESIZE, fit_patch_size, mix_reduction, patch_cka_loss, patch_grid
from ckakd.logit_kd import pearson
from ckakd.ops.patch_alignment_stats import to_problems
from ckakd.wasserstein import wkd_feature_loss

__all__ = [
    "patchify",
    "level_patch_size",
    "default_resize",
    "pcka_loss",
    "pcka_inter",
    "kd_patch_loss",
    "at_patch_loss",
    "dist_patch_loss",
    "mmd_patch_loss",
    "wkd_feature_fpn_loss",
    "MIX_ORDER",
]

MIX_ORDER = PATCH_MIX_ORDER  # reduce="mix" (PCKA paper, Table 5): level 0, level 1, later levels

Maps = Tensor | Sequence[Tensor]  # one (B, C, H, W) map or a list of paired levels


def paired_lists(
    a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor], what: str, levels: str
) -> tuple[list[Tensor], list[Tensor]]:
    """One tensor or a sequence of per-level tensors each -> two lists of the same non-zero length."""
    a_list = [a] if isinstance(a, Tensor) else list(a)
    b_list = [b] if isinstance(b, Tensor) else list(b)
    if len(a_list) != len(b_list) or not a_list:
        raise ValueError(f"{what} must give the same non-zero number of {levels}, got {len(a_list)} and {len(b_list)}")
    return a_list, b_list


def paired_maps(f_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Student / teacher (B, C, H, W) maps, one each or per level, as checked pairs of the same batch and channels."""
    s_list, t_list = paired_lists(f_s, f_t, "student and teacher", "FPN levels")
    for i, (s, t) in enumerate(zip(s_list, t_list, strict=True)):
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError(f"level {i}: expected (B, C, H, W) maps, got {tuple(s.shape)} and {tuple(t.shape)}")
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"level {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in batch or channels "
                "(project the student with PatchMimic first)"
            )
    return list(zip(s_list, t_list, strict=True))


def _size(patch_size: int | Sequence[int]) -> tuple[int, int]:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    return int(ph), int(pw)


def patchify(f: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """(B, C, H, W) -> (B, C, N_p, P_H·P_W): non-overlapping patches, row-major. H, W are first resized
    bilinearly to the nearest multiple of the patch (at least one patch), as ``ckakd.patch_cka_loss`` does."""
    ph, pw = _size(patch_size)
    b, c, h, w = f.shape
    th, tw = patch_grid((h, w), (ph, pw), "nearest")
    nh, nw = th // ph, tw // pw
    if (th, tw) != (h, w):
        f = F.interpolate(f, size=(th, tw), mode="bilinear", align_corners=False)
    x = f.reshape(b, c, nh, ph, nw, pw).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(b, c, nh * nw, ph * pw)


def default_resize(mode: str) -> str:
    """The PCKA resize rule when none is given: ``"ceil"`` (the authors' rule) with their uncentered CKA,
    ``"nearest"`` (ckakd's) otherwise."""
    return "ceil" if mode == "uncentered" else "nearest"


def pcka_loss(
    f_s: Tensor | Sequence[Tensor],
    f_t: Tensor | Sequence[Tensor],
    *,
    patch_size: int | Sequence[int] = (4, 4),
    reduce: str = "channel",
    gamma: float = 10.0,
    mode: str = "centered",
    resize: str | None = None,
    inter_weight: float = 0.0,
) -> Tensor:
    """γ · Σ_levels PCKA (``ckakd.patch_cka_loss``) + inter_weight · Σ_levels inter-PCKA (:func:`pcka_inter`).

    f_s, f_t: one (B, C, H, W) map each or lists of per-level maps. The paper's best γ is 10. ``reduce="mix"``:
    batch on the first level, spatial on the second, channel on the rest; each level's patch from
    :func:`level_patch_size`. ``resize``: how a map is brought to a multiple of the patch, ``"nearest"`` or
    ``"ceil"`` (up to the next multiple, a side smaller than the patch up to one patch: the authors' rule);
    default :func:`default_resize` (``"ceil"`` for ``mode="uncentered"``, the authors' CKA, else ``"nearest"``).
    On a 100 x 168 COCO P3 map with 16 x 16 patches "ceil" gives 112 x 176 and "nearest" 96 x 160.

    ``inter_weight``: the weight of the authors' inter term (0: off). Their code (mmrazor
    ``CenterKernelAlignmentRKD``) switches the term on with ``inter_weight`` but multiplies it by
    ``intra_weight``; their COCO configs set both to 10, which ``gamma=10, inter_weight=10`` reproduces.
    Their per-level loss is ``w · mean(−CKA)``; this one ``γ · mean(1 − CKA)`` (same gradients, +γ).
    """
    if reduce not in ("channel", "batch", "spatial", "mix"):
        raise ValueError(f"reduce must be one of 'channel', 'batch', 'spatial', 'mix'; got {reduce!r}")
    resize = default_resize(mode) if resize is None else resize
    if resize not in PATCH_RESIZE:
        raise ValueError(f"resize must be one of {', '.join(map(repr, PATCH_RESIZE))} or None; got {resize!r}")
    inter_weight = float(inter_weight)
    if not math.isfinite(inter_weight) or inter_weight < 0:
        raise ValueError(f"inter_weight must be finite and >= 0, got {inter_weight}")
    pairs = paired_maps(f_s, f_t)
    total = pairs[0][0].new_zeros(())
    inter = pairs[0][0].new_zeros(())
    for level, (s, t) in enumerate(pairs):
        level_reduce = mix_reduction(level) if reduce == "mix" else reduce
        size = level_patch_size(s.shape[-2:], patch_size, mode=mode, resize=resize)
        total = total + patch_cka_loss(s, t, patch_size=size, reduce=level_reduce, mode=mode, resize=resize)
        if inter_weight > 0:
            values = pcka_inter(s, t, patch_size=size, reduce=level_reduce, mode=mode, resize=resize)
            inter = inter + (1.0 - values.mean())
    return gamma * total + inter_weight * inter if inter_weight > 0 else gamma * total


def pcka_inter(
    f_s: Tensor,
    f_t: Tensor,
    *,
    patch_size: int | Sequence[int],
    reduce: str = "channel",
    mode: str = "uncentered",
    resize: str = "ceil",
) -> Tensor:
    """Per-problem inter CKA values (G,) of one level: the transposed PCKA problems (the authors' inter term).

    Each PCKA problem g is a (P, D) matrix X_g (P patches as samples; ``reduce="channel"``: D = B·P_H·P_W);
    the inter term compares X_gᵀ (the D positions as samples, the P patches as features):
    CKA = ‖X_s X_tᵀ‖²_F / (‖X_s X_sᵀ‖_F ‖X_t X_tᵀ‖_F) with, for ``mode="centered"``, each X row centered
    over its D entries. ``"debiased"`` is not offered. Computed in fp32 (fp64 for fp64 inputs), autocast off.
    """
    if mode not in ("centered", "uncentered"):
        raise ValueError(f"the PCKA inter term supports mode 'centered' or 'uncentered', got {mode!r}")
    ph, pw = _size(patch_size)
    pair = paired_maps(f_s, f_t)[0]
    acc = torch.float64 if torch.float64 in (f_s.dtype, f_t.dtype) else torch.float32
    with torch.autocast(f_s.device.type, enabled=False):
        xs, xt = [], []
        for f, out in zip(pair, (xs, xt), strict=True):
            f = f.to(acc)
            size = patch_grid(f.shape[-2:], (ph, pw), resize)
            if tuple(f.shape[-2:]) != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            x = to_problems(f, ph, pw, reduce)  # (G, P, D)
            if mode == "centered":
                x = x - x.mean(-1, keepdim=True)
            out.append(x)
        a, b = xs[0], xt[0]
        cross = (a @ b.transpose(-1, -2)).square().sum((-1, -2))
        norm_a = (a @ a.transpose(-1, -2)).square().sum((-1, -2)).sqrt()
        norm_b = (b @ b.transpose(-1, -2)).square().sum((-1, -2)).sqrt()
        values = cross / (norm_a * norm_b).clamp_min(torch.finfo(acc).tiny)
    return values.to(torch.promote_types(f_s.dtype, f_t.dtype))


def level_patch_size(
    hw: Sequence[int], patch_size: int | Sequence[int], *, mode: str = "centered", resize: str = "nearest"
) -> tuple[int, int]:
    """The patch for one FPN level of size (H, W): :func:`ckakd.functional.fit_patch_size` (one rule for
    ckakd: ``patch_size`` kept when the map, resized by ``resize``, holds enough patches for an informative
    CKA of ``mode``, else its larger side halved; with ``"ceil"`` a map smaller than the patch is upsampled
    to one patch, as the authors do)."""
    return fit_patch_size(hw, _size(patch_size), mode=mode, resize=resize)


def kd_patch_loss(
    f_s: Maps, f_t: Maps, *, patch_size: int | Sequence[int] = (4, 4), temperature: float = 1.0, weight: float = 1.0
) -> Tensor:
    """KD inside each (sample, channel, patch): KL(softmax(t/τ) ‖ softmax(s/τ)) over positions, ·τ², mean."""
    total = None
    for s, t in paired_maps(f_s, f_t):
        ps, pt = patchify(s, patch_size) / temperature, patchify(t, patch_size) / temperature
        kl = F.kl_div(F.log_softmax(ps, -1), F.log_softmax(pt, -1), reduction="none", log_target=True).sum(-1)
        term = kl.mean() * temperature**2
        total = term if total is None else total + term
    return weight * total


def at_patch_loss(
    f_s: Maps, f_t: Maps, *, patch_size: int | Sequence[int] = (4, 4), p: float = 2.0, weight: float = 1.0
) -> Tensor:
    """Attention transfer per patch: a = normalize(mean_c |f|^p) within every patch; mean squared difference."""
    total = None
    for s, t in paired_maps(f_s, f_t):
        a_s = F.normalize(patchify(s.abs().pow(p).mean(1, keepdim=True), patch_size), dim=-1)
        a_t = F.normalize(patchify(t.abs().pow(p).mean(1, keepdim=True), patch_size), dim=-1)
        term = (a_s - a_t).pow(2).mean()
        total = term if total is None else total + term
    return weight * total


def _pearson_distance(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    return 1 - pearson(a, b, dim, eps)


def dist_patch_loss(
    f_s: Maps,
    f_t: Maps,
    *,
    patch_size: int | Sequence[int] = (4, 4),
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    """DIST on patch distributions (softmax over a patch's positions): β·inter (Pearson over positions per
    row) + γ·intra (Pearson over the (sample, channel, patch) rows per position), ·τ²."""
    total = None
    for s, t in paired_maps(f_s, f_t):
        ps = F.softmax(patchify(s, patch_size) / temperature, -1).flatten(0, 2)  # (rows, P_H·P_W)
        pt = F.softmax(patchify(t, patch_size) / temperature, -1).flatten(0, 2)
        inter = _pearson_distance(ps, pt, dim=1).mean()
        intra = _pearson_distance(ps, pt, dim=0).mean()
        term = (beta * inter + gamma * intra) * temperature**2
        total = term if total is None else total + term
    return total


def mmd_patch_loss(f_s: Maps, f_t: Maps, *, patch_size: int | Sequence[int] = (4, 4), weight: float = 1.0) -> Tensor:
    """The MMD term of Zhou et al., IJCAI 2024 (``ckakd.mmd_loss``) on every channel's patch matrix at once: per
    channel c, rows are the patches and features are (sample, in-patch position), as PCKA's ``reduce="channel"``;
    mean over channels, summed over levels (the paper's Table 7 "MMD w/ patch")."""
    total = None
    for s, t in paired_maps(f_s, f_t):
        terms = [_mmd_rows(patchify(f, patch_size).permute(1, 2, 0, 3).flatten(2)) for f in (s, t)]
        n = terms[0][1]
        term = (n**2 * (terms[0][0] - terms[1][0]).square()).mean().to(s.dtype)
        total = term if total is None else total + term
    return weight * total


def _mmd_rows(x: Tensor) -> tuple[Tensor, int]:
    """x (G, N, D) -> (E_ij <x̂_i, x̂_j> per problem (G,) in float64, N), with x̂ = x / sqrt(‖X Xᵀ‖_F)."""
    x = x.double()
    n = x.shape[1]
    gram_norm = torch.linalg.matrix_norm(x @ x.transpose(1, 2))  # ‖X Xᵀ‖_F, (G,)
    tiny = torch.finfo(torch.float64).tiny
    return x.sum(1).square().sum(-1) / (n**2 * gram_norm.clamp_min(tiny)), n


def wkd_feature_fpn_loss(
    f_s: Maps, f_t: Maps, *, grid: int = 1, mean_weight: float = 2.0, weight: float = 1.0
) -> Tensor:
    """WKD-F (``ckakd.wkd_feature_loss``: Wasserstein distance of per-channel diagonal Gaussians) summed over
    FPN levels; a level too small for the grid uses grid 1, and single-position levels (P7 of a small image:
    no variance) are skipped."""
    pairs = paired_maps(f_s, f_t)
    total = pairs[0][0].new_zeros(())
    for s, t in pairs:
        if s.shape[-2] * s.shape[-1] < 2:
            continue
        g = grid if min(s.shape[-2:]) >= 2 * grid else 1
        total = total + wkd_feature_loss(s, t, grid=g, mean_weight=mean_weight)
    return weight * total
