"""Feature distillation for detectors on FPN outputs: PCKA and the seed's "w/ patch" baselines.

Every loss takes lists of paired FPN levels ``(B, C, H, W)`` (student, teacher; same channels — use
``PatchMimic`` projectors when they differ) and works on all channels and patches at once (no Python loop
over channels). Patches are ``(P_H, P_W)`` windows; maps whose size is not a multiple are resized
bilinearly to the nearest multiple first, as ``ckakd.patch_cka_loss`` does.

* ``pcka``: ``γ · ckakd.patch_cka_loss`` per level with the seed's four reductions (channel / batch /
  spatial / mix) — the fused patch-CKA kernel on CUDA;
* ``kd_patch``: Hinton KD inside every (sample, channel, patch): softmax over the patch's positions at
  temperature τ, KL(teacher‖student)·τ² averaged (the seed's Table 7 "KD w/ patch");
* ``at_patch``: attention transfer per patch: mean-square over channels, L2-normalized within the patch;
* ``dist_patch``: DIST on patch distributions: 1 − Pearson over positions (inter) and over rows (intra);
* ``mmd_patch``: the seed's MMD term per channel over patches; ``wkd_feature_fpn_loss``: WKD-F per level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ckakd

__all__ = [
    "patchify",
    "level_patch_size",
    "pcka_loss",
    "kd_patch_loss",
    "mmd_patch_loss",
    "wkd_feature_fpn_loss",
    "at_patch_loss",
    "dist_patch_loss",
    "PatchMimic",
    "PATCH_LOSSES",
]


def _pairs(f_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    s_list = [f_s] if isinstance(f_s, Tensor) else list(f_s)
    t_list = [f_t] if isinstance(f_t, Tensor) else list(f_t)
    if len(s_list) != len(t_list) or not s_list:
        raise ValueError(
            f"student and teacher must give the same non-zero number of FPN levels, got {len(s_list)} and {len(t_list)}"
        )
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
    nh, nw = max(1, round(h / ph)), max(1, round(w / pw))
    if (nh * ph, nw * pw) != (h, w):
        f = F.interpolate(f, size=(nh * ph, nw * pw), mode="bilinear", align_corners=False)
    x = f.reshape(b, c, nh, ph, nw, pw).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(b, c, nh * nw, ph * pw)


def pcka_loss(
    f_s: Tensor | Sequence[Tensor],
    f_t: Tensor | Sequence[Tensor],
    *,
    patch_size: int | Sequence[int] = (4, 4),
    reduce: str = "channel",
    gamma: float = 10.0,
    mode: str = "centered",
) -> Tensor:
    """γ · Σ_levels PCKA (``ckakd.patch_cka_loss``); the seed's best γ is 10. ``reduce="mix"``: batch on the
    first level, spatial on the second, channel on the rest; each level's patch from :func:`level_patch_size`."""
    pairs = _pairs(f_s, f_t)
    total = pairs[0][0].new_zeros(())
    for level, (s, t) in enumerate(pairs):
        level_reduce = MIX_ORDER[min(level, len(MIX_ORDER) - 1)] if reduce == "mix" else reduce
        size = level_patch_size(s.shape[-2:], patch_size)
        total = total + ckakd.patch_cka_loss(s, t, patch_size=size, reduce=level_reduce, mode=mode)
    return gamma * total


MIX_ORDER = ("batch", "spatial", "channel")  # reduce="mix" (seed Table 5): level 0, level 1, later levels


def level_patch_size(hw: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, int]:
    """The patch for one FPN level: ``patch_size`` halved until the (H, W) map holds at least 2 patches
    (centered CKA over one patch is undefined; RetinaNet's P6/P7 are tiny)."""
    ph, pw = _size(patch_size)
    h, w = int(hw[0]), int(hw[1])
    ph, pw = min(ph, h), min(pw, w)
    while max(1, round(h / ph)) * max(1, round(w / pw)) < 2 and (ph > 1 or pw > 1):
        ph, pw = max(1, ph // 2), max(1, pw // 2)
    return ph, pw


def kd_patch_loss(f_s, f_t, *, patch_size=(4, 4), temperature: float = 1.0, weight: float = 1.0) -> Tensor:
    """KD inside each (sample, channel, patch): KL(softmax(t/τ) ‖ softmax(s/τ)) over positions, ·τ², mean."""
    total = None
    for s, t in _pairs(f_s, f_t):
        ps, pt = patchify(s, patch_size) / temperature, patchify(t, patch_size) / temperature
        kl = F.kl_div(F.log_softmax(ps, -1), F.log_softmax(pt, -1), reduction="none", log_target=True).sum(-1)
        term = kl.mean() * temperature**2
        total = term if total is None else total + term
    return weight * total


def at_patch_loss(f_s, f_t, *, patch_size=(4, 4), p: float = 2.0, weight: float = 1.0) -> Tensor:
    """Attention transfer per patch: a = normalize(mean_c |f|^p) within every patch; mean squared difference."""
    total = None
    for s, t in _pairs(f_s, f_t):
        a_s = F.normalize(patchify(s.abs().pow(p).mean(1, keepdim=True), patch_size), dim=-1)
        a_t = F.normalize(patchify(t.abs().pow(p).mean(1, keepdim=True), patch_size), dim=-1)
        term = (a_s - a_t).pow(2).mean()
        total = term if total is None else total + term
    return weight * total


def _pearson_distance(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return 1 - (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_patch_loss(
    f_s, f_t, *, patch_size=(4, 4), temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0
) -> Tensor:
    """DIST on patch distributions (softmax over a patch's positions): β·inter (Pearson over positions per
    row) + γ·intra (Pearson over the (sample, channel, patch) rows per position), ·τ²."""
    total = None
    for s, t in _pairs(f_s, f_t):
        ps = F.softmax(patchify(s, patch_size) / temperature, -1).flatten(0, 2)  # (rows, P_H·P_W)
        pt = F.softmax(patchify(t, patch_size) / temperature, -1).flatten(0, 2)
        inter = _pearson_distance(ps, pt, dim=1).mean()
        intra = _pearson_distance(ps, pt, dim=0).mean()
        term = (beta * inter + gamma * intra) * temperature**2
        total = term if total is None else total + term
    return total


def mmd_patch_loss(f_s, f_t, *, patch_size=(4, 4), weight: float = 1.0) -> Tensor:
    """The RCKA seed's MMD term (``ckakd.mmd_loss``) on every channel's patch matrix at once: per channel c,
    rows are the patches and features are (sample, in-patch position), as PCKA's ``reduce="channel"``;
    mean over channels, summed over levels (the seed's Table 7 "MMD w/ patch")."""
    total = None
    for s, t in _pairs(f_s, f_t):
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


def wkd_feature_fpn_loss(f_s, f_t, *, grid: int = 1, mean_weight: float = 2.0, weight: float = 1.0) -> Tensor:
    """WKD-F (``ckakd.wkd_feature_loss``: Wasserstein distance of per-channel diagonal Gaussians) summed over
    FPN levels; a level too small for the grid uses grid 1, and single-position levels (P7 of a small image:
    no variance) are skipped."""
    pairs = _pairs(f_s, f_t)
    total = pairs[0][0].new_zeros(())
    for s, t in pairs:
        if s.shape[-2] * s.shape[-1] < 2:
            continue
        g = grid if min(s.shape[-2:]) >= 2 * grid else 1
        total = total + ckakd.wkd_feature_loss(s, t, grid=g, mean_weight=mean_weight)
    return weight * total


PATCH_LOSSES = {
    "pcka": pcka_loss,
    "kd_patch": kd_patch_loss,
    "at_patch": at_patch_loss,
    "dist_patch": dist_patch_loss,
    "mmd_patch": mmd_patch_loss,
}


class PatchMimic(nn.Module):
    """Per-level 1×1 conv projectors student → teacher channels, plus the mimic MSE the seed adds to PCKA
    ("Ours + mimic", following DIST+mimic): ``forward(f_s) -> projected levels``, ``mimic_loss(f_s, f_t)``."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != len(out_channels):
            raise ValueError(f"got {len(in_channels)} student and {len(out_channels)} teacher levels")
        self.proj = nn.ModuleList(nn.Conv2d(ci, co, 1) for ci, co in zip(in_channels, out_channels, strict=True))

    def forward(self, f_s: Sequence[Tensor]) -> list[Tensor]:
        if len(f_s) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} FPN levels, got {len(f_s)}")
        return [p(f) for p, f in zip(self.proj, f_s, strict=True)]

    def mimic_loss(self, f_s: Sequence[Tensor], f_t: Sequence[Tensor], weight: float = 1.0) -> Tensor:
        projected = self(f_s)
        pairs = _pairs(projected, list(f_t))
        return weight * sum(F.mse_loss(s, t) for s, t in pairs)
