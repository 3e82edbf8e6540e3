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


# ---- detection PCKA against the authors' computation ---------------------------------------------------------


@pytest.mark.parametrize("inter", [False, True])
@pytest.mark.parametrize("hw", [(100, 168), (13, 21), (50, 84)])
def test_pcka_loss_matches_the_authors_code(hw, inter):
    """mode="uncentered" (their CKA), resize="ceil" (their rule, the default for uncentered), channel reduce,
    16 x 16 patches: values equal theirs plus the constant γ (per term), gradients equal."""
    w = 10.0
    s, t = _maps((2, 3, *hw), seed=hw[0])
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    ours = pcka_loss(
        [s1], [t], patch_size=16, reduce="channel", gamma=w, mode="uncentered", inter_weight=w if inter else 0.0
    )
    theirs = _authors_level(s2, t, w, inter)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()) + w * (2 if inter else 1), rel=1e-9, abs=1e-9)
    (g1,) = torch.autograd.grad(ours, s1)
    (g2,) = torch.autograd.grad(theirs, s2)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-12)


def test_nearest_and_ceil_differ_on_a_coco_p3_map():
    """The size of the effect the rule choice has (on random maps): values and gradients differ."""
    s, t = _maps((2, 3, 100, 168))
    out = {}
    for rule in ("ceil", "nearest"):
        x = s.clone().requires_grad_(True)
        loss = pcka_loss([x], [t], patch_size=16, mode="uncentered", resize=rule)
        out[rule] = (float(loss.detach()), torch.autograd.grad(loss, x)[0])
    assert out["ceil"][0] != pytest.approx(out["nearest"][0], rel=1e-3)
    rel = (out["ceil"][1] - out["nearest"][1]).norm() / out["ceil"][1].norm()
    assert float(rel) > 0.1


def test_default_resize_follows_the_mode():
    s, t = _maps((2, 3, 100, 168))
    for mode, rule in (("uncentered", "ceil"), ("centered", "nearest")):
        got = pcka_loss([s], [t], patch_size=16, mode=mode)
        assert float(got) == pytest.approx(float(pcka_loss([s], [t], patch_size=16, mode=mode, resize=rule)))
    with pytest.raises(ValueError, match="resize must be one of 'nearest', 'ceil' or None"):
        pcka_loss([s], [t], patch_size=16, resize="floor")
    with pytest.raises(ValueError, match="inter_weight must be finite and >= 0"):
        pcka_loss([s], [t], patch_size=16, inter_weight=-1.0)


@pytest.mark.parametrize("mode", ["centered", "uncentered"])
@pytest.mark.parametrize("reduce", ["channel", "batch", "spatial"])
def test_inter_term_against_the_formula(mode, reduce):
    """inter = mean over problems of 1 − CKA(X_sᵀ, X_tᵀ), the (D, P) transposes of the PCKA problems."""
    from ckakd.detection.distill import pcka_inter

    s, t = _maps((2, 3, 12, 20), seed=3)
    xs = R.patch_features(F.interpolate(s, size=(12, 20)), (4, 4), reduce)
    xt = R.patch_features(t, (4, 4), reduce)
    want = torch.stack([R.cka(a.T, b.T, mode=mode) for a, b in zip(xs, xt, strict=True)])
    got = pcka_inter(s, t, patch_size=4, reduce=reduce, mode=mode, resize="nearest")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    intra = pcka_loss([s], [t], patch_size=4, reduce=reduce, gamma=2.0, mode=mode, resize="nearest")
    both = pcka_loss([s], [t], patch_size=4, reduce=reduce, gamma=2.0, mode=mode, resize="nearest", inter_weight=3.0)
    assert float(both - intra) == pytest.approx(3.0 * float(1.0 - want.mean()), rel=1e-9)
    with pytest.raises(ValueError, match="inter term supports mode"):
        pcka_inter(s, t, patch_size=4, mode="debiased")


# ---- one patch-fitting rule --------------------------------------------------------------------------------


def test_level_patch_size_is_fit_patch_size():
    for hw in [(100, 168), (13, 21), (7, 11), (4, 4), (2, 3), (1, 2), (64, 8)]:
        for mode in ("centered", "uncentered", "debiased"):
            for rule in ("nearest", "ceil"):
                assert level_patch_size(hw, 16, mode=mode, resize=rule) == fit_patch_size(
                    hw, 16, mode=mode, resize=rule
                )


def test_fit_keeps_the_authors_patch_and_shrinks_only_when_too_few_patches():
    assert fit_patch_size((100, 168), 16, mode="uncentered", resize="ceil") == (16, 16)
    assert fit_patch_size((13, 21), 16, mode="uncentered", resize="ceil") == (16, 16)  # 2 patches, upsampled
    # centered needs 3 patches (2 give CKA = 1 whatever the maps): the larger patch side is halved
    assert fit_patch_size((13, 21), 16, mode="centered", resize="ceil") == (8, 16)
    assert fit_patch_size((7, 11), 16, mode="uncentered", resize="ceil") == (8, 8)
    assert fit_patch_size((16, 16), 4, mode="centered") == (4, 4)
    for hw in [(5, 3), (2, 2), (1, 3), (9, 1)]:
        for mode, need in (("centered", 3), ("uncentered", 2), ("debiased", 4)):
            for rule in ("nearest", "ceil"):
                ph, pw = fit_patch_size(hw, 8, mode=mode, resize=rule)
                gh, gw = patch_grid(hw, (ph, pw), rule)
                assert (gh // ph) * (gw // pw) >= need or (ph, pw) == (1, 1)


# ---- the detection distiller and the COCO reproduction configs ----------------------------------------------


def test_distiller_passes_the_pcka_options():
    from ckakd.detection.models import RetinaNet
    from ckakd.detection.trainer import DetectionDistiller

    torch.manual_seed(0)
    kw = {"depth": 18, "width": 8, "out_channels": 8, "num_convs": 1, "levels": [3, 4, 5]}
    student, teacher = RetinaNet(3, **kw), RetinaNet(3, **kw)
    d = DetectionDistiller(student, teacher, method="pcka", patch_size=(4, 4), mode="uncentered", inter_weight=5.0)
    shapes = [(2, 8, 10, 13), (2, 8, 5, 7), (2, 8, 3, 4)]
    f_s = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    f_t = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    got = d.distill_loss(f_s, f_t)["distill"]
    want = pcka_loss(f_s, f_t, patch_size=(4, 4), gamma=10.0, mode="uncentered", resize="ceil", inter_weight=5.0)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(ValueError, match="PCKA options"):
        DetectionDistiller(student, teacher, method="kd_patch", resize="ceil")
    with pytest.raises(ValueError, match="resize must be one of"):
        DetectionDistiller(student, teacher, method="pcka", resize="floor")


@pytest.mark.parametrize(
    ("name", "inter"),
    [
        ("detection/coco/pcka", 0.0),
        ("detection/coco/torchvision_retinanet_pcka", 0.0),
        ("detection/coco/torchvision_fasterrcnn_pcka", 10.0),
    ],
)
def test_coco_reproduction_configs_are_set_as_the_authors_ran_them(name, inter):
    """mmrazor configs cka_fpn_retina_r101_retina_r50_2x_coco (intra_weight=10) and
    cka_fpn_frcnn_r101_frcnn_r50_2x_coco (intra_weight=10, inter_weight=10): FPN outputs 0-3, 16 x 16 patches,
    their uncentered CKA, the ceil rule, channel reduce."""
    from ckakd.train.config import load_config

    cfg = load_config(name)
    kw = dict(cfg.distiller.kwargs)
    assert cfg.distiller.name == "pcka"
    assert kw["weight"] == 10.0 and list(kw["patch_size"]) == [16, 16] and kw["reduce"] == "channel"
    assert kw["mode"] == "uncentered" and kw["resize"] == "ceil"
    assert float(kw.get("inter_weight", 0.0)) == inter
    assert list(kw["levels"]) == [0, 1, 2, 3]
