"""PCKA options of the authors' code (Zhou et al., "Rethinking Centered Kernel Alignment in Knowledge
Distillation", IJCAI 2024; mmrazor ``cka_loss.py``): the ceil resize rule, maps smaller than the patch,
the inter term, one patch-fitting rule, and the COCO reproduction configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ckakd
from ckakd import reference as R
from ckakd.detection.distill import level_patch_size, pcka_loss
from ckakd.functional import fit_patch_size, patch_grid


def _maps(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    s = 0.6 * t + torch.randn(*shape, generator=g, dtype=torch.float64)
    return s, t


# ---- an independent transcription of the authors' computation (per channel, traces of Grams) --------------


def _authors_ceil(v: int, p: int = 16) -> int:
    return v // p * p + int(v % p > 0) * p


def _authors_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """tr(Kx Kyᵀ) / sqrt(tr(Kx Kxᵀ) tr(Ky Kyᵀ)), Kx = X Xᵀ: their uncentered CKA (no row normalisation)."""
    kx, ky = x @ x.T, y @ y.T
    return torch.trace(kx @ ky.T) / torch.sqrt(torch.trace(kx @ kx.T) * torch.trace(ky @ ky.T))


def _authors_level(s: torch.Tensor, t: torch.Tensor, intra_weight: float, inter: bool, p: int = 16) -> torch.Tensor:
    """One FPN level of ``CenterKernelAlignmentRKD``: (1/C) Σ_c w·(−CKA_c) [+ w·(−CKA_cᵀ) when inter is on]."""
    b, c, h, w = t.shape
    size = [_authors_ceil(h, p), _authors_ceil(w, p)]
    ts = F.interpolate(t.permute(1, 0, 2, 3), size, mode="bilinear")
    ss = F.interpolate(s.permute(1, 0, 2, 3), size, mode="bilinear")
    u, v = size[0] // p, size[1] // p

    def rows(f: torch.Tensor) -> torch.Tensor:  # 'c b (u h) (v w) -> c (u v) (b h w)'
        return f.reshape(c, b, u, p, v, p).permute(0, 2, 4, 1, 3, 5).reshape(c, u * v, b * p * p)

    xs, xt = rows(ss), rows(ts)
    total = 0.0
    for i in range(c):
        total = total + intra_weight * -_authors_cka(xt[i], xs[i])
        if inter:  # their code weighs the inter term by intra_weight; inter_weight only switches it on
            total = total + intra_weight * -_authors_cka(xt[i].T, xs[i].T)
    return total / c


# ---- the resize rule ----------------------------------------------------------------------------------------


def test_patch_grid_ceil_and_nearest_on_a_coco_p3_map():
    assert patch_grid((100, 168), 16, "ceil") == (112, 176)
    assert patch_grid((100, 168), 16, "nearest") == (96, 160)
    assert patch_grid((13, 21), 16, "ceil") == (16, 32)  # RetinaNet P6: one patch row, two patches
    assert patch_grid((32, 48), 16, "ceil") == patch_grid((32, 48), 16, "nearest") == (32, 48)
    with pytest.raises(ValueError, match="resize must be one of 'nearest', 'ceil'"):
        patch_grid((8, 8), 4, "floor")


def test_patch_cka_loss_ceil_resizes_up_like_the_authors():
    s, t = _maps((2, 3, 100, 168))
    s.requires_grad_(True)
    got = ckakd.patch_cka_loss(s, t, patch_size=16, mode="uncentered", resize="ceil")
    up = [F.interpolate(x, size=(112, 176), mode="bilinear", align_corners=False) for x in (s, t)]
    want = R.patch_cka_loss(up[0], up[1], patch_size=(16, 16), mode="uncentered")
    assert float(got) == pytest.approx(float(want), rel=1e-9)
    nearest = ckakd.patch_cka_loss(s, t, patch_size=16, mode="uncentered")  # the default is unchanged
    down = [F.interpolate(x, size=(96, 160), mode="bilinear", align_corners=False) for x in (s, t)]
    assert float(nearest) == pytest.approx(float(R.patch_cka_loss(*down, patch_size=(16, 16), mode="uncentered")))
    assert abs(float(got) - float(nearest)) > 1e-4 * abs(float(got))  # the two rules really differ


def test_map_smaller_than_the_patch_is_upsampled_to_one_patch_with_ceil():
    s, t = _maps((2, 4, 13, 21))  # RetinaNet P6 of an 800 x 1333 input
    with pytest.raises(ValueError, match="larger than the feature map"):
        ckakd.patch_cka_loss(s, t, patch_size=16, mode="uncentered")
    got = ckakd.patch_cka_loss(s, t, patch_size=16, mode="uncentered", resize="ceil")
    up = [F.interpolate(x, size=(16, 32), mode="bilinear", align_corners=False) for x in (s, t)]
    want = R.patch_cka_loss(*up, patch_size=(16, 16), mode="uncentered")
    assert float(got) == pytest.approx(float(want), rel=1e-9) and float(got) > 1e-3
