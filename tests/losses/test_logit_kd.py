"""Logit / feature KD losses (ckakd.logit_kd, ckakd.feature_kd) against the float64 formulas in ckakd.reference,
mdistiller's DKD form, argument validation, the shared PCKA "mix" order and the re-exported old names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ckakd.functional as CF
from ckakd import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-12, "rtol": 1e-10}}


def _logits(seed: int, dtype: torch.dtype, b: int = 6, k: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(b, k, generator=g, dtype=torch.float64) * 3).to(dtype)
    zt = (torch.randn(b, k, generator=g, dtype=torch.float64) * 3).to(dtype)
    return zs, zt, torch.randint(0, k, (b,), generator=g)


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logit_losses_match_reference(dtype, seed):
    zs, zt, y = _logits(seed, dtype)
    _check(CF.standardize_logits(zs), R.standardize_logits(zs), dtype)
    for T in (1.0, 4.0):
        _check(CF.kd_loss(zs, zt, T), R.kd_loss(zs, zt, T), dtype)
        _check(CF.kd_loss(zs, zt, T, standardize=True), R.kd_loss(zs, zt, T, standardize=True), dtype)
        _check(CF.lskd_loss(zs, zt, T), R.lskd_loss(zs, zt, T), dtype)
        _check(CF.dkd_loss(zs, zt, y, 1.5, 8.0, T), R.dkd_loss(zs, zt, y, 1.5, 8.0, T), dtype)
        _check(CF.dist_loss(zs, zt, 1.5, 0.5, T), R.dist_loss(zs, zt, 1.5, 0.5, T), dtype)


def test_reference_dkd_is_mdistiller_form():
    """The reference DKD equals mdistiller's implementation (log of binary probs, -1000 masking)."""
    zs, zt, y = _logits(3, torch.float64)
    T, alpha, beta, b = 4.0, 1.0, 8.0, zs.shape[0]
    gt = F.one_hot(y, zs.shape[1]).double()
    ps, pt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="sum") * T**2 / b
    nckd = F.kl_div(F.log_softmax(zs / T - 1000 * gt, 1), F.softmax(zt / T - 1000 * gt, 1), reduction="sum")
    torch.testing.assert_close(R.dkd_loss(zs, zt, y, alpha, beta, T), alpha * tckd + beta * nckd * T**2 / b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feature_losses_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(3, 4, 9, 6, generator=g, dtype=torch.float64).to(dtype)
    ft = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64).to(dtype)
    for p in (1.0, 2.0, 3.0):
        _check(CF.at_loss(fs, ft, p), R.at_loss(fs, ft, p), dtype)
    ft4 = torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64).to(dtype)
    _check(CF.fitnet_loss(fs, ft4), R.fitnet_loss(fs, ft4), dtype)


def test_zero_for_identical_inputs():
    zs, _, y = _logits(4, torch.float64)
    for value in (CF.kd_loss(zs, zs), CF.lskd_loss(zs, zs), CF.dkd_loss(zs, zs, y), CF.dist_loss(zs, zs)):
        assert abs(value.item()) < 1e-5  # DIST: 1e-8 in the Pearson denominator
    f = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert CF.at_loss(f, f).item() == 0.0 and CF.fitnet_loss(f, f).item() == 0.0


def test_validation():
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="same shape"):
        CF.kd_loss(z, torch.randn(4, 6))
    with pytest.raises(ValueError, match="transpose"):
        CF.dist_loss(z, torch.randn(5, 4))
    with pytest.raises(ValueError, match="must be > 0"):
        CF.kd_loss(z, z, 0.0)
    with pytest.raises(TypeError, match="floating-point"):
        CF.kd_loss(z.long(), z.long())
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        CF.kd_loss(torch.randn(4), torch.randn(4))
    with pytest.raises(TypeError, match="standardize"):
        CF.kd_loss(z, z, 2.0, standardize=1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        CF.dkd_loss(z, z, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(TypeError, match="integer tensor"):
        CF.dkd_loss(z, z, torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        CF.dkd_loss(z, z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        CF.at_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch size"):
        CF.at_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))
    with pytest.raises(ValueError, match="p must be > 0"):
        CF.at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), 0.0)
    with pytest.raises(ValueError, match="channels"):
        CF.fitnet_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))


def test_old_names_are_the_loss_layer_functions():
    from ckakd.detection import distill as D
    from ckakd.train import distillers as TD
    from ckakd.train.distillers import losses as TL

    for name in ("kd_loss", "dkd_loss", "dist_loss", "standardize_logits", "at_loss"):
        assert getattr(TL, name) is getattr(CF, name) is getattr(TD, name)
    import ckakd.patch_baselines as PB

    for name in PB.__all__:
        assert getattr(D, name) is getattr(PB, name)


def test_one_mix_order():
    from ckakd.detection import distill as D

    assert CF.PATCH_MIX_ORDER == ("batch", "spatial", "channel") == D.MIX_ORDER
    assert [CF.mix_reduction(level) for level in range(5)] == ["batch", "spatial", "channel", "channel", "channel"]
