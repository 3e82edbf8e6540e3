"""Gaussian Wasserstein / WKD-F with non-finite and extreme inputs: NaN propagates (NaN value, NaN gradients,
no exception from ``eigh``), huge and tiny finite inputs give the scaled result of normal-range ones."""

from __future__ import annotations

import pytest
import torch

import ckakd
from ckakd.wasserstein import sqrtm_psd


def _maps(seed: int = 0, shape=(3, 4, 5, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 0.5 + 0.3


def _spd(n: int, batch=(), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, generator=g)
    return a @ a.mT / n + 0.1 * torch.eye(n)


@pytest.mark.parametrize("cov", ["full", "diag"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_wkd_feature_loss_non_finite_input_gives_nan_not_an_exception(cov, bad):
    f_s, f_t = _maps()
    f_s[1, 2, 3, 4] = bad
    f_s.requires_grad_(True)
    loss = ckakd.wkd_feature_loss(f_s, f_t, cov=cov)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(f_s.grad[1]).any()


def test_diag_nan_variance_is_not_masked_as_zero():
    mu = torch.zeros(3)
    var = torch.tensor([1.0, float("nan"), 2.0])
    assert torch.isnan(ckakd.gaussian_wasserstein(mu, var, mu, torch.ones(3)))


def test_gaussian_wasserstein_nan_stays_in_its_batch_element():
    mu1, mu2 = torch.randn(3, 4), torch.randn(3, 4)
    cov1, cov2 = _spd(4, (3,), seed=1), _spd(4, (3,), seed=2)
    clean = ckakd.gaussian_wasserstein(mu1, cov1, mu2, cov2)
    cov1 = cov1.clone()
    cov1[1, 0, 2] = float("nan")
    cov1.requires_grad_(True)
    out = ckakd.gaussian_wasserstein(mu1, cov1, mu2, cov2)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    torch.testing.assert_close(out[[0, 2]], clean[[0, 2]])
    out.sum().backward()
    assert torch.isnan(cov1.grad[1]).all() and torch.isfinite(cov1.grad[[0, 2]]).all()


@pytest.mark.parametrize("scale", [1e15, 1e-15])
@pytest.mark.parametrize("cov", ["full", "diag"])
def test_wkd_feature_loss_huge_and_tiny_features_scale_exactly(cov, scale):
    f_s, f_t = _maps(seed=3)
    ref = ckakd.wkd_feature_loss(f_s.double(), f_t.double(), cov=cov, eps=0.0)
    x_s, x_t = (f_s * scale).requires_grad_(True), f_t * scale
    loss = ckakd.wkd_feature_loss(x_s, x_t, cov=cov, eps=0.0)  # fp32: squares of 1e15 are ~1e30
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item() * scale**2, rel=2e-4)
    loss.backward()
    assert torch.isfinite(x_s.grad).all()


def test_wkd_feature_loss_overflowing_value_is_inf_not_nan_or_an_exception():
    f_s, f_t = _maps(seed=4)
    loss = ckakd.wkd_feature_loss(f_s * 1e30, f_t * 1e30, cov="full")  # the loss is ~1e60 > fp32 max
    assert torch.isinf(loss) and loss > 0


def test_gaussian_wasserstein_huge_covariances():
    mu = torch.zeros(4)
    cov1, cov2 = _spd(4, seed=5), _spd(4, seed=6)
    ref = ckakd.gaussian_wasserstein(mu.double(), cov1.double(), mu.double(), cov2.double())
    for scale in (1e30, 1e-30):
        out = ckakd.gaussian_wasserstein(mu, cov1 * scale, mu, cov2 * scale)
        assert out.item() == pytest.approx(ref.item() * scale, rel=1e-4)
    root = sqrtm_psd(cov1 * 1e36)
    torch.testing.assert_close(root.double() / 1e18, sqrtm_psd(cov1.double()), rtol=1e-5, atol=1e-6)


def test_zero_dimensional_gaussians_and_empty_batches():
    empty = ckakd.gaussian_wasserstein(torch.zeros(0), torch.zeros(0, 0), torch.zeros(0), torch.zeros(0, 0))
    assert empty.shape == () and empty.item() == 0.0
    assert sqrtm_psd(torch.zeros(0, 0)).shape == (0, 0)
    mu = torch.zeros(0, 4, requires_grad=True)
    out = ckakd.gaussian_wasserstein(mu, torch.zeros(0, 4, 4), mu, torch.eye(4).expand(0, 4, 4))
    assert out.shape == (0,)
    out.sum().backward()
    assert mu.grad.shape == (0, 4)
