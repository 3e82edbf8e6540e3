"""``sqrtm_psd`` (``ckakd.ops.sqrtm_psd``): principal square root of SPD matrices vs the float64 reference,
its dtype handling, input checks, gradients (repeated, zero eigenvalues) and NaN propagation."""

from __future__ import annotations

import pytest
import torch

from ckakd import reference as R
from ckakd.wasserstein import sqrtm_psd

f64 = torch.float64


def _spd(*batch, d=4, eigs=None, dtype=f64):
    """Random symmetric positive-definite matrices (*batch, d, d), optionally with given eigenvalues."""
    q, _ = torch.linalg.qr(torch.randn(*batch, d, d, dtype=f64))
    if eigs is None:
        eigs = torch.rand(*batch, d, dtype=f64) * 2 + 0.5
    else:
        eigs = torch.as_tensor(eigs, dtype=f64).expand(*batch, d)
    return ((q * eigs.unsqueeze(-2)) @ q.mT).to(dtype)


def _seeded_spd(n: int, batch=(), seed: int = 0) -> torch.Tensor:
    """Seeded SPD matrices (*batch, n, n): a aᵀ / n + 0.1 I."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, generator=g)
    return a @ a.mT / n + 0.1 * torch.eye(n)


def test_sqrtm_psd_squares_back_batched():
    a = _spd(3, 2, d=5)
    y = sqrtm_psd(a)
    assert y.shape == a.shape
    torch.testing.assert_close(y @ y, a)
    torch.testing.assert_close(y, y.mT)
    for idx in [(0, 0), (2, 1)]:
        torch.testing.assert_close(y[idx], R.sqrtm_psd(a[idx]))


def test_sqrtm_psd_half_and_bad_input():
    a = _spd(d=3, dtype=torch.float16)
    assert sqrtm_psd(a).dtype == torch.float16
    with pytest.raises(ValueError, match=r"a must have shape \(\.\.\., n, n\).*\(3, 4\)"):
        sqrtm_psd(torch.randn(3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        sqrtm_psd(torch.eye(3, dtype=torch.long))


@pytest.mark.parametrize("eigs", [None, [1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
def test_sqrtm_psd_gradcheck(eigs):
    # The Sylvester backward is exact for repeated eigenvalues (the square root is analytic on SPD matrices).
    a = _spd(2, d=4, eigs=eigs).requires_grad_(True)
    assert torch.autograd.gradcheck(sqrtm_psd, (a,))


def test_sqrtm_psd_singular_gradient_finite():
    a = _spd(d=4, eigs=[0.0, 0.0, 1.0, 1.0]).requires_grad_(True)
    g = torch.randn(4, 4, dtype=f64)
    (sqrtm_psd(a) * g).sum().backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, a.grad.mT)


def test_sqrtm_nan_matrix_is_nan_and_the_others_exact():
    a = _seeded_spd(3, (2,))
    a[0, 1, 1] = float("nan")
    root = sqrtm_psd(a)
    assert torch.isnan(root[0]).all()
    torch.testing.assert_close(root[1] @ root[1], a[1], atol=1e-5, rtol=1e-5)
