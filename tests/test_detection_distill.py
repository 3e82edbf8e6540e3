"""Detection feature distillation on FPN-shaped maps: PCKA vs the reference module, the "w/ patch" losses vs
direct loops, projectors and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ckakd
from ckakd import reference as R
from ckakd.detection.distill import PatchMimic, at_patch_loss, dist_patch_loss, kd_patch_loss, patchify, pcka_loss


def fpn(seed: int, channels: int = 6, sizes=((16, 16), (8, 8), (4, 4)), batch: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) for h, w in sizes]


def test_patchify_matches_a_loop():
    f = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    p = patchify(f, (4, 3))
    assert p.shape == (2, 3, 2 * 4, 12)
    for pi in range(2):
        for pj in range(4):
            window = f[:, :, pi * 4 : (pi + 1) * 4, pj * 3 : (pj + 1) * 3].reshape(2, 3, -1)
            torch.testing.assert_close(p[:, :, pi * 4 + pj], window)


@pytest.mark.parametrize("reduce", ["channel", "batch", "spatial", "mix"])
def test_pcka_matches_the_reference_module(reduce):
    fs, ft = fpn(0), fpn(1)
    got = pcka_loss(fs, ft, patch_size=(4, 4), reduce=reduce, gamma=10.0)
    # the 4x4 level holds one 4x4 patch: its patch is halved to 2x2; mix = batch, spatial, channel by level
    sizes, mix = [(4, 4), (4, 4), (2, 2)], ["batch", "spatial", "channel"]
    expected = 10.0 * sum(
        R.patch_cka_loss(s, t, patch_size=size, reduce=mix[i] if reduce == "mix" else reduce)
        for i, (s, t, size) in enumerate(zip(fs, ft, sizes, strict=True))
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert float(pcka_loss(fs, fs, patch_size=(4, 4), reduce=reduce)) == pytest.approx(0.0, abs=1e-9)


def test_level_patch_size_keeps_two_patches():
    from ckakd.detection.distill import level_patch_size

    assert level_patch_size((16, 16), 4) == (4, 4)
    assert level_patch_size((4, 4), 4) == (2, 2)
    assert level_patch_size((2, 2), (4, 4)) == (1, 1)
    assert level_patch_size((1, 2), (4, 4)) == (1, 1)


def test_kd_patch_matches_a_loop_and_vanishes_on_identical_maps():
    fs, ft = fpn(2, sizes=((8, 8),)), fpn(3, sizes=((8, 8),))
    tau = 2.0
    got = kd_patch_loss(fs, ft, patch_size=(4, 4), temperature=tau)
    s, t = fs[0], ft[0]
    terms = []
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            for pi in range(2):
                for pj in range(2):
                    ws = s[b, c, pi * 4 : pi * 4 + 4, pj * 4 : pj * 4 + 4].reshape(-1) / tau
                    wt = t[b, c, pi * 4 : pi * 4 + 4, pj * 4 : pj * 4 + 4].reshape(-1) / tau
                    p_t = F.softmax(wt, 0)
                    terms.append((p_t * (F.log_softmax(wt, 0) - F.log_softmax(ws, 0))).sum())
    torch.testing.assert_close(got, torch.stack(terms).mean() * tau**2)
    assert float(kd_patch_loss(fs, fs, patch_size=(4, 4))) == pytest.approx(0.0, abs=1e-12)


def test_at_patch_matches_a_loop():
    fs, ft = fpn(4, sizes=((8, 8),)), fpn(5, sizes=((8, 8),))
    got = at_patch_loss(fs, ft, patch_size=(4, 4))
    a_s, a_t = fs[0].pow(2).mean(1), ft[0].pow(2).mean(1)  # (B, H, W)
    diffs = []
    for pi in range(2):
        for pj in range(2):
            ws = F.normalize(a_s[:, pi * 4 : pi * 4 + 4, pj * 4 : pj * 4 + 4].reshape(3, -1), dim=1)
            wt = F.normalize(a_t[:, pi * 4 : pi * 4 + 4, pj * 4 : pj * 4 + 4].reshape(3, -1), dim=1)
            diffs.append((ws - wt).pow(2))
    torch.testing.assert_close(got, torch.stack(diffs).mean())


def test_dist_patch_is_zero_on_identical_maps_and_positive_otherwise():
    fs, ft = fpn(6), fpn(7)
    assert float(dist_patch_loss(fs, fs, patch_size=(4, 4))) == pytest.approx(0.0, abs=1e-5)  # Pearson's eps
    assert float(dist_patch_loss(fs, ft, patch_size=(4, 4))) > 0.1


def test_gradients_reach_the_student_and_projector_only():
    fs = [f.float().requires_grad_() for f in fpn(8, channels=4)]
    ft = [f.float() for f in fpn(9, channels=6)]
    mimic = PatchMimic([4, 4, 4], [6, 6, 6])
    projected = mimic(fs)
    loss = pcka_loss(projected, ft, patch_size=(4, 4)) + mimic.mimic_loss(fs, ft)
    for fn in (kd_patch_loss, at_patch_loss, dist_patch_loss):
        loss = loss + fn(projected, ft, patch_size=(4, 4))
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    assert all(p.grad is not None for p in mimic.parameters())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="same non-zero number of FPN levels"):
        pcka_loss(fpn(0), fpn(1)[:2])
    with pytest.raises(ValueError, match="level 0: .* differ in batch or channels"):
        kd_patch_loss(fpn(0, channels=4), fpn(1, channels=6))
    with pytest.raises(ValueError, match="patch_size must be positive"):
        at_patch_loss(fpn(0), fpn(1), patch_size=(0, 2))


def test_mmd_patch_matches_mmd_loss_per_channel():
    from ckakd.detection.distill import mmd_patch_loss

    fs, ft = fpn(10, sizes=((8, 8),)), fpn(11, sizes=((8, 8),))
    got = mmd_patch_loss(fs, ft, patch_size=(4, 4))
    ps, pt = patchify(fs[0], (4, 4)), patchify(ft[0], (4, 4))  # (B, C, Np, P)
    per_channel = []
    for c in range(ps.shape[1]):
        rows_s = ps[:, c].permute(1, 0, 2).reshape(ps.shape[2], -1)  # (Np, B·P)
        rows_t = pt[:, c].permute(1, 0, 2).reshape(pt.shape[2], -1)
        per_channel.append(ckakd.mmd_loss(rows_s, rows_t))
    torch.testing.assert_close(got, torch.stack(per_channel).mean())
    assert float(mmd_patch_loss(fs, fs, patch_size=(4, 4))) == pytest.approx(0.0, abs=1e-12)


def test_wkd_feature_fpn_loss_sums_levels():
    from ckakd.detection.distill import wkd_feature_fpn_loss

    fs, ft = fpn(12), fpn(13)
    expected = sum(ckakd.wkd_feature_loss(s, t, grid=1, mean_weight=2.0) for s, t in zip(fs, ft, strict=True))
    torch.testing.assert_close(wkd_feature_fpn_loss(fs, ft), expected)
    assert float(wkd_feature_fpn_loss(fs, fs)) == pytest.approx(0.0, abs=1e-12)
    one = [torch.randn(2, 6, 1, 1, dtype=torch.float64)]  # a single position has no variance: skipped
    torch.testing.assert_close(wkd_feature_fpn_loss([*fs, *one], [*ft, *one]), expected)
