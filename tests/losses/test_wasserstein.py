"""Gaussian Wasserstein distance and WKD-F vs the float64 reference formulas (the matrix square root:
tests/ops/test_sqrtm_psd.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ckakd import reference as R
from ckakd.wasserstein import cell_bounds, cell_stats, gaussian_wasserstein, wkd_feature_loss
from tests.conftest import TOLERANCES

f64 = torch.float64


def _spd(*batch, d=4, eigs=None, dtype=f64):
    """Random symmetric positive-definite matrices (*batch, d, d), optionally with given eigenvalues."""
    q, _ = torch.linalg.qr(torch.randn(*batch, d, d, dtype=f64))
    if eigs is None:
        eigs = torch.rand(*batch, d, dtype=f64) * 2 + 0.5
    else:
        eigs = torch.as_tensor(eigs, dtype=f64).expand(*batch, d)
    return ((q * eigs.unsqueeze(-2)) @ q.mT).to(dtype)


def _close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, check_dtype=False)


# --------------------------------------------------------------------------------------------- gaussian W2


def test_gaussian_wasserstein_diag_vs_reference():
    mu1, mu2 = torch.randn(3, 4, 6, dtype=f64), torch.randn(3, 4, 6, dtype=f64)
    v1, v2 = torch.rand(3, 4, 6, dtype=f64) + 0.1, torch.rand(3, 4, 6, dtype=f64) + 0.1
    out = gaussian_wasserstein(mu1, v1, mu2, v2)
    assert out.shape == (3, 4)
    ref = torch.stack(
        [R.gaussian_wasserstein(mu1[i, j], v1[i, j], mu2[i, j], v2[i, j]) for i in range(3) for j in range(4)]
    )
    _close(out.reshape(-1), ref, f64)
    out32 = gaussian_wasserstein(mu1.float(), v1.float(), mu2.float(), v2.float())
    assert out32.dtype == torch.float32
    _close(out32.reshape(-1), ref, torch.float32)


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_gaussian_wasserstein_full_vs_reference(dtype):
    mu1, mu2 = torch.randn(5, 4, dtype=f64), torch.randn(5, 4, dtype=f64)
    c1, c2 = _spd(5, d=4), _spd(5, d=4)
    out = gaussian_wasserstein(*(t.to(dtype) for t in (mu1, c1, mu2, c2)))
    ref = torch.stack([R.gaussian_wasserstein(mu1[i], c1[i], mu2[i], c2[i]) for i in range(5)])
    _close(out, ref, dtype, scale=10.0)


def test_gaussian_wasserstein_broadcast_and_mixed():
    mu1, c1 = torch.randn(5, 3, dtype=f64), _spd(5, d=3)
    mu2, v2 = torch.randn(3, dtype=f64), torch.rand(3, dtype=f64) + 0.2  # one diagonal reference Gaussian
    out = gaussian_wasserstein(mu1, c1, mu2, v2)
    ref = torch.stack([R.gaussian_wasserstein(mu1[i], c1[i], mu2, v2) for i in range(5)])
    _close(out, ref, f64)


def test_gaussian_wasserstein_known_cases():
    mu, c = torch.randn(4, dtype=f64), _spd(d=4)
    # identical Gaussians (also singular ones)
    assert gaussian_wasserstein(mu, c, mu, c).item() == pytest.approx(0.0, abs=1e-12)
    cs = _spd(d=4, eigs=[0.0, 0.0, 1.0, 3.0])
    assert gaussian_wasserstein(mu, cs, mu, cs).item() == pytest.approx(0.0, abs=1e-12)
    # commuting covariances: ‖√Σ1 - √Σ2‖_F²
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=f64))
    e1, e2 = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=f64), torch.tensor([3.0, 0.1, 2.0, 1.0], dtype=f64)
    c1, c2 = q @ torch.diag(e1) @ q.T, q @ torch.diag(e2) @ q.T
    mu2 = torch.randn(4, dtype=f64)
    expected = (mu - mu2).square().sum() + torch.linalg.matrix_norm(R.sqrtm_psd(c1) - R.sqrtm_psd(c2)) ** 2
    _close(gaussian_wasserstein(mu, c1, mu2, c2), expected, f64)
    # 1-D: (μ1 - μ2)² + (σ1 - σ2)²
    out = gaussian_wasserstein(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert out.item() == pytest.approx(9.0 + 1.0, rel=1e-6)


def test_gaussian_wasserstein_full_with_diagonal_matrices_equals_diag():
    mu1, mu2 = torch.randn(6, 5, dtype=f64), torch.randn(6, 5, dtype=f64)
    v1, v2 = torch.rand(6, 5, dtype=f64) + 0.1, torch.rand(6, 5, dtype=f64)
    v2[0, 0] = 0.0  # a degenerate direction too
    diag = gaussian_wasserstein(mu1, v1, mu2, v2)
    full = gaussian_wasserstein(mu1, torch.diag_embed(v1), mu2, torch.diag_embed(v2))
    _close(full, diag, f64)


@pytest.mark.parametrize("eigs", [None, [2.0, 2.0, 2.0]])
def test_gaussian_wasserstein_gradcheck(eigs):
    mu1, mu2 = torch.randn(2, 3, dtype=f64), torch.randn(2, 3, dtype=f64)
    c1, c2 = _spd(2, d=3, eigs=eigs), _spd(2, d=3, eigs=eigs)
    inputs = tuple(t.requires_grad_(True) for t in (mu1, c1, mu2, c2))
    assert torch.autograd.gradcheck(gaussian_wasserstein, inputs)
    v1, v2 = torch.rand(2, 3, dtype=f64) + 0.2, torch.rand(2, 3, dtype=f64) + 0.2
    inputs = tuple(t.requires_grad_(True) for t in (mu1, v1, mu2, v2))
    assert torch.autograd.gradcheck(gaussian_wasserstein, inputs)


def test_gaussian_wasserstein_gradient_vs_reference():
    mu1, mu2 = torch.randn(3, dtype=f64), torch.randn(3, dtype=f64)
    c1, c2 = _spd(d=3), _spd(d=3)
    leaves = [t.clone().requires_grad_(True) for t in (mu1, c1, mu2, c2)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (mu1, c1, mu2, c2)]
    (-2.5 * gaussian_wasserstein(*leaves)).backward()
    (-2.5 * R.gaussian_wasserstein(*ref_leaves)).backward()
    for a, b in zip(leaves, ref_leaves, strict=True):
        g_ref = (b.grad + b.grad.mT) / 2 if b.dim() == 2 else b.grad  # ours is the symmetric gradient
        _close(a.grad, g_ref, f64, scale=100.0)


def test_gaussian_wasserstein_degenerate_gradients_finite():
    mu = torch.zeros(3, dtype=f64, requires_grad=True)
    v = torch.tensor([0.0, 1.0, 0.0], dtype=f64, requires_grad=True)
    gaussian_wasserstein(mu, v, mu.detach() + 1, torch.tensor([0.0, 2.0, 1.0], dtype=f64)).backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(mu.grad).all()
    c = _spd(d=3, eigs=[0.0, 0.0, 1.0]).requires_grad_(True)
    gaussian_wasserstein(mu.detach(), c, mu.detach(), c.detach()).backward()
    assert torch.isfinite(c.grad).all()


def test_gaussian_wasserstein_bad_inputs():
    mu, v, c = torch.randn(2, 3), torch.rand(2, 3), _spd(2, d=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"cov1 must have shape \(2, 3\).*\(2, 3, 3\).*got \(2, 4\)"):
        gaussian_wasserstein(mu, torch.rand(2, 4), mu, v)
    with pytest.raises(ValueError, match=r"mu1 and mu2 must have the same dimension d.*\(2, 3\) and \(2, 4\)"):
        gaussian_wasserstein(mu, c, torch.randn(2, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="do not broadcast"):
        gaussian_wasserstein(mu, v, torch.randn(3, 3), torch.rand(3, 3))
    with pytest.raises(TypeError, match=r"cov2 must have a floating-point dtype"):
        gaussian_wasserstein(mu, v, mu, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="mu1 must be a torch.Tensor"):
        gaussian_wasserstein([0.0, 1.0, 2.0], v, mu, v)


# --------------------------------------------------------------------------------------------- WKD-F


def test_cell_bounds_match_adaptive_avg_pool():
    x = torch.randn(2, 3, 7, 9, dtype=f64)
    for g in (1, 2, 3, 4):
        mean, _ = cell_stats(x, g, g, False, 0.0)
        pooled = F.adaptive_avg_pool2d(x, g).permute(0, 2, 3, 1).reshape(2, g * g, 3)
        _close(mean, pooled, f64)
        assert cell_bounds(7, g) == R.adaptive_bounds(7, g)


@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("grid", [1, 2, 3])
@pytest.mark.parametrize("hw", [(7, 9), (6, 6)])
def test_wkd_feature_loss_vs_reference(cov, grid, hw):
    f_s, f_t = torch.randn(3, 4, *hw, dtype=f64), torch.randn(3, 4, *hw, dtype=f64) * 1.5 + 0.3
    kw = dict(grid=grid, mean_weight=3.0, cov=cov)
    leaves = [f_s.clone().requires_grad_(True), f_t.clone().requires_grad_(True)]
    ref_leaves = [f_s.clone().requires_grad_(True), f_t.clone().requires_grad_(True)]
    out, ref = wkd_feature_loss(*leaves, **kw), R.wkd_feature_loss(*ref_leaves, **kw)
    _close(out, ref, f64)
    (-0.7 * out).backward()
    (-0.7 * ref).backward()
    for a, b in zip(leaves, ref_leaves, strict=True):
        _close(a.grad, b.grad, f64)
    out32 = wkd_feature_loss(f_s.float(), f_t.float(), **kw)
    assert out32.dtype == torch.float32
    _close(out32, ref, torch.float32, scale=10.0)


def test_wkd_feature_loss_large_offset_fp32():
    f_s, f_t = torch.randn(2, 3, 6, 5, dtype=f64) + 1000, torch.randn(2, 3, 6, 5, dtype=f64) * 2 + 1000
    ref = R.wkd_feature_loss(f_s, f_t, grid=2)
    torch.testing.assert_close(wkd_feature_loss(f_s.float(), f_t.float(), grid=2).double(), ref, rtol=1e-3, atol=0)


@pytest.mark.parametrize("grid", [1, 2])
def test_wkd_diag_equals_gaussian_wasserstein(grid):
    eps = 1e-5
    f_s, f_t = torch.randn(4, 5, 6, 8, dtype=f64), torch.randn(4, 5, 6, 8, dtype=f64)

    def stats(f):  # (B, G, C) means and variances of the grid cells (divisible map: plain reshape)
        v = f.reshape(4, 5, grid, 6 // grid, grid, 8 // grid).permute(0, 2, 4, 1, 3, 5).reshape(4, grid * grid, 5, -1)
        return v.mean(-1), v.var(-1) + eps

    w2 = gaussian_wasserstein(*stats(f_s), *stats(f_t))
    assert w2.shape == (4, grid * grid)
    _close(wkd_feature_loss(f_s, f_t, grid=grid, mean_weight=1.0, eps=eps), w2.mean(), f64)


def test_wkd_full_equals_diag_for_one_channel():
    f_s, f_t = torch.randn(3, 1, 7, 5, dtype=f64), torch.randn(3, 1, 7, 5, dtype=f64) + 1
    for grid in (1, 2, 3):
        full = wkd_feature_loss(f_s, f_t, grid=grid, cov="full")
        _close(full, wkd_feature_loss(f_s, f_t, grid=grid, cov="diag"), f64)


def test_wkd_full_equals_diag_on_uncorrelated_channels():
    # Rows of a 4×4 Hadamard matrix: centered channels with exactly zero cross-covariance.
    had = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=f64)
    pattern = had[1:].reshape(3, 2, 2)
    f_s = torch.stack([pattern * torch.tensor([2.0, 0.5, 1.0], dtype=f64)[:, None, None] + 3.0, pattern])
    f_t = torch.stack([pattern * torch.tensor([1.0, 1.5, 0.2], dtype=f64)[:, None, None] - 1.0, 4 * pattern])
    full, diag = wkd_feature_loss(f_s, f_t, cov="full"), wkd_feature_loss(f_s, f_t, cov="diag")
    assert diag.item() > 1.0
    _close(full, diag, f64)


@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_wkd_constant_features_finite(cov, eps):
    f_s = torch.full((2, 3, 4, 4), 2.0, requires_grad=True)
    f_t = torch.full((2, 3, 4, 4), 2.0)
    out = wkd_feature_loss(f_s, f_t, cov=cov, eps=eps, grid=2)
    out.backward()
    assert out.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(f_s.grad).all()
    out = wkd_feature_loss(f_s.detach(), torch.randn(2, 3, 4, 4), cov=cov, eps=eps)
    assert torch.isfinite(out)


def test_wkd_half_inputs():
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = wkd_feature_loss(f_s.half(), f_t.half(), grid=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, wkd_feature_loss(f_s.half().float(), f_t.half().float(), grid=2))


def test_wkd_bad_inputs():
    f = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"grid \(6, 6\) is larger than the feature map \(4, 5\)"):
        wkd_feature_loss(f, f, grid=6)
    with pytest.raises(ValueError, match=r"grid \(3, 3\) on a \(3, 3\) feature map gives single-element windows"):
        wkd_feature_loss(torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3), grid=3)
    wkd_feature_loss(torch.randn(2, 3, 3, 2), torch.randn(2, 3, 3, 2), grid=(3, 1))  # 1×2 windows are fine
    with pytest.raises(ValueError, match=r"f_s and f_t must have the same shape.*\(2, 3, 4, 5\) and \(2, 4, 4, 5\)"):
        wkd_feature_loss(f, torch.randn(2, 4, 4, 5))
    with pytest.raises(ValueError, match=r"f_t must have shape \(B, C, H, W\), got \(2, 60\)"):
        wkd_feature_loss(f, f.reshape(2, -1))
    with pytest.raises(TypeError, match="f_s must have a floating-point dtype"):
        wkd_feature_loss(f.long(), f)
    with pytest.raises(ValueError, match="cov must be one of"):
        wkd_feature_loss(f, f, cov="spherical")
    for grid in (0, 1.5, (1, 2, 3)):
        with pytest.raises(ValueError, match="grid must be a positive int"):
            wkd_feature_loss(f, f, grid=grid)
    with pytest.raises(ValueError, match="mean_weight must be >= 0"):
        wkd_feature_loss(f, f, mean_weight=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_wkd_cuda_matches_cpu(cov):
    f_s, f_t = torch.randn(4, 8, 7, 7), torch.randn(4, 8, 7, 7)
    ref = wkd_feature_loss(f_s.double(), f_t.double(), grid=4, cov=cov)
    out = wkd_feature_loss(f_s.cuda(), f_t.cuda(), grid=4, cov=cov)
    _close(out.cpu(), ref, torch.float32, scale=10.0)
    w2 = gaussian_wasserstein(
        torch.randn(3, 4).cuda(), _spd(3, d=4).float().cuda(), torch.zeros(4).cuda(), torch.ones(4).cuda()
    )
    assert w2.is_cuda and torch.isfinite(w2).all()
