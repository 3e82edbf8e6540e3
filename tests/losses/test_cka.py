"""CKA family: every public op vs the float64 reference, on both backends (Triton under the interpreter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ckakd
from ckakd import reference as R
from ckakd.ops import track_dispatch
from tests import kernel_helpers
from tests.conftest import HAS_CUDA
from tests.kernel_helpers import assert_close_tol, rand_features, weighted_grads

backend_device = kernel_helpers.backend_device  # the (backend, device) fixture

MODES = ["centered", "debiased", "uncentered"]
# (n, dx, dy): aligned, odd, and "few features" (the torch path switches to the feature-space form).
SHAPES = [(16, 32, 64), (13, 37, 21), (40, 5, 7)]


# --------------------------------------------------------------------------------------------- values


def test_kornblith_published_values():
    rng = np.random.RandomState(1337)
    x = torch.from_numpy(rng.randn(100, 10))
    y = torch.from_numpy(rng.randn(100, 10)) + x
    assert ckakd.cka(x, y).item() == pytest.approx(0.55761, abs=5e-6)
    assert ckakd.cka(x, y, mode="debiased").item() == pytest.approx(0.51346, abs=5e-6)
    assert R.cka(x, y).item() == pytest.approx(0.55761, abs=5e-6)
    assert R.cka(x, y, mode="debiased").item() == pytest.approx(0.51346, abs=5e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cka_forward_and_grad(backend_device, mode, shape):
    backend, device = backend_device
    n, dx, dy = shape
    x, y = rand_features(n, dx, device=device), rand_features(n, dy, device=device)
    out, (gx, gy), w = weighted_grads(lambda a, b: ckakd.cka(a, b, mode=mode, backend=backend), x, y, weight=-2.5)
    ref, (rx, ry), _ = weighted_grads(
        lambda a, b: R.cka(a, b, mode=mode), x.double().cpu(), y.double().cpu(), weight=-2.5
    )
    assert out.dtype == torch.float32
    assert_close_tol(out, ref, torch.float32)
    assert_close_tol(gx, rx, torch.float32, scale=rx.abs().max().item())
    assert_close_tol(gy, ry, torch.float32, scale=ry.abs().max().item())


@pytest.mark.parametrize("mode", ["biased", "unbiased"])
def test_hsic_forward_and_grad(backend_device, mode):
    backend, device = backend_device
    x, y = rand_features(11, 19, device=device), rand_features(11, 6, device=device)
    out, (gx, gy), _ = weighted_grads(lambda a, b: ckakd.hsic(a, b, mode=mode, backend=backend), x, y, weight=0.7)
    ref, (rx, ry), _ = weighted_grads(
        lambda a, b: R.hsic(a, b, mode=mode), x.double().cpu(), y.double().cpu(), weight=0.7
    )
    assert_close_tol(out, ref, torch.float32, scale=ref.abs().item())
    assert_close_tol(gx, rx, torch.float32, scale=rx.abs().max().item())
    assert_close_tol(gy, ry, torch.float32, scale=ry.abs().max().item())


def test_batched_inputs_match_loop(backend_device):
    backend, device = backend_device
    x, y = rand_features(3, 9, 17, device=device), rand_features(3, 9, 5, device=device)
    batched = ckakd.cka(x, y, backend=backend)
    assert batched.shape == (3,)
    for i in range(3):
        assert_close_tol(batched[i], R.cka(x[i], y[i]), torch.float32)
    h = ckakd.hsic(x, y, mode="unbiased", backend=backend)
    for i in range(3):
        assert_close_tol(
            h[i], R.hsic(x[i], y[i], mode="unbiased"), torch.float32, scale=R.hsic(x[i], y[i]).abs().item()
        )


@pytest.mark.parametrize("mode", MODES)
def test_large_offset_fp32(backend_device, mode):
    """Features with mean 1000: centering the features before any product keeps fp32 exact."""
    backend, device = backend_device
    x0, y0 = torch.randn(24, 40, dtype=torch.float64), torch.randn(24, 30, dtype=torch.float64)
    y0 = y0 + 0.5 * x0[:, :30]
    x, y = (x0 + 1000).float().to(device), (y0 + 1000).float().to(device)
    expected = R.cka(x.double().cpu(), y.double().cpu(), mode=mode)
    out, (gx, _), _ = weighted_grads(lambda a, b: ckakd.cka(a, b, mode=mode, backend=backend), x, y, weight=1.3)
    _, (rx, _), _ = weighted_grads(lambda a, b: R.cka(a, b, mode=mode), x.double().cpu(), y.double().cpu(), weight=1.3)
    assert_close_tol(out, expected, torch.float32)
    if mode != "uncentered":
        assert_close_tol(gx, rx, torch.float32, scale=rx.abs().max().item())
        assert_close_tol(out, R.cka(x0, y0, mode=mode), torch.float32)  # offsets do not change centered CKA
    # Uncentered alignment of offset features is ≈1 with a gradient that is a cancellation of O(1)
    # terms: ill-conditioned in fp32 by definition (the reason the paper centers), so no gradient check.


@pytest.mark.parametrize("mode", MODES)
def test_invariances(mode):
    torch.manual_seed(3)
    x, y = torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 9, dtype=torch.float64)
    base = ckakd.cka(x, y, mode=mode)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    torch.testing.assert_close(ckakd.cka(x @ q, y, mode=mode), base)
    torch.testing.assert_close(ckakd.cka(7.5 * x, 0.01 * y, mode=mode), base)
    if mode != "uncentered":
        torch.testing.assert_close(ckakd.cka(x + 3.0, y - 11.0, mode=mode), base)
    else:  # plain alignment is not offset-invariant: make sure the test could tell
        assert abs(ckakd.cka(x + 3.0, y, mode=mode).item() - base.item()) > 1e-3
    assert 0.0 <= ckakd.cka(x, y).item() <= 1.0
    torch.testing.assert_close(ckakd.cka(x, x, mode=mode), torch.ones((), dtype=torch.float64))


def test_theorem2_mmd_bound():
    x, y = torch.randn(16, 20, dtype=torch.float64), torch.randn(16, 20, dtype=torch.float64) + 0.3
    gap = R.alignment_gap(x, y)
    torch.testing.assert_close(gap, 2 * (1 - ckakd.cka(x, y, mode="uncentered")))
    mmd = ckakd.mmd_loss(x, y)
    torch.testing.assert_close(mmd, R.mmd_loss(x, y))
    assert 0 < mmd.item() <= gap.item()


def test_mmd_loss_grad(backend_device):
    backend, device = backend_device
    x, y = rand_features(10, 3, 4, device=device, offset=0.5), rand_features(10, 50, device=device)
    out, (gx, gy), _ = weighted_grads(lambda a, b: ckakd.mmd_loss(a, b, backend=backend), x, y, weight=3.0)
    ref, (rx, ry), _ = weighted_grads(lambda a, b: R.mmd_loss(a, b), x.double().cpu(), y.double().cpu(), weight=3.0)
    assert_close_tol(out, ref, torch.float32, scale=max(ref.item(), 1e-3))
    assert_close_tol(gx, rx, torch.float32, scale=rx.abs().max().item())
    assert_close_tol(gy, ry, torch.float32, scale=ry.abs().max().item())


# ------------------------------------------------------------------------------------------- losses


def test_cka_loss_flattens_and_sums(backend_device):
    backend, device = backend_device
    fs = [rand_features(6, 4, 3, 3, device=device), rand_features(6, 10, device=device)]
    ft = [rand_features(6, 8, 2, 2, device=device), rand_features(6, 12, device=device)]
    loss = ckakd.cka_loss(fs, ft, backend=backend)
    expected = sum(R.cka_loss(a.cpu(), b.cpu()) for a, b in zip(fs, ft, strict=True))
    assert_close_tol(loss, expected, torch.float32)
    module = ckakd.nn.CKALoss(weight=2.0, backend=backend)
    assert_close_tol(module(fs[0], ft[0]), 2 * R.cka_loss(fs[0].cpu(), ft[0].cpu()), torch.float32)


def test_rcka_loss(backend_device):
    backend, device = backend_device
    feats_s = [rand_features(8, 4, 4, 4, device=device), rand_features(8, 16, 2, 2, device=device)]
    feats_t = [rand_features(8, 6, 4, 4, device=device), rand_features(8, 32, 2, 2, device=device)]
    zs, zt = rand_features(8, 10, device=device), rand_features(8, 10, device=device)
    args = (feats_s, feats_t, zs, zt)
    out, grads, _ = weighted_grads(
        lambda a, b, c, d, e, f: ckakd.rcka_loss([a, b], [c, d], e, f, alpha=2.0, beta=3.0, backend=backend),
        *feats_s,
        *feats_t,
        zs,
        zt,
        weight=0.5,
    )
    ref, rgrads, _ = weighted_grads(
        lambda a, b, c, d, e, f: R.rcka_loss([a, b], [c, d], e, f, alpha=2.0, beta=3.0),
        *[t.double().cpu() for t in (*feats_s, *feats_t, zs, zt)],
        weight=0.5,
    )
    assert_close_tol(out, ref, torch.float32)
    for g, r in zip(grads, rgrads, strict=True):
        assert_close_tol(g, r, torch.float32, scale=r.abs().max().item())
    parts = ckakd.rcka_loss(*args, backend=backend, return_parts=True)
    assert_close_tol(parts["loss"], 5 * parts["fcka"] + 5 * (parts["intra_lcka"] + parts["inter_lcka"]), torch.float32)
    assert_close_tol(ckakd.nn.RCKALoss(alpha=2.0, beta=3.0, backend=backend)(*args), ref, torch.float32)


def test_inter_class_term_with_many_classes():
    """K > B: the inter-class CKA uses the B×B feature-space form and still matches the K×K reference."""
    zs, zt = torch.randn(6, 200, dtype=torch.float64), torch.randn(6, 200, dtype=torch.float64)
    torch.testing.assert_close(ckakd.cka(zs.T, zt.T), R.cka(zs.T, zt.T))


# --------------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("mode", MODES)
def test_constant_features_finite_zero_gradient(backend_device, mode):
    backend, device = backend_device
    x = torch.full((9, 12), 3.0, device=device)
    y = rand_features(9, 5, device=device)
    if mode == "uncentered":
        x = torch.zeros(9, 12, device=device)  # the only "constant" input plain alignment cannot see
    out, (gx, gy), _ = weighted_grads(lambda a, b: ckakd.cka_loss(a, b, mode=mode, backend=backend), x, y, weight=1.0)
    assert torch.isfinite(out).all() and out.item() == pytest.approx(1.0)
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert gx.abs().max().item() == 0 and gy.abs().max().item() == 0


def test_two_samples_centered_is_one_with_zero_grad():
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    out, (gx, gy), _ = weighted_grads(lambda a, b: ckakd.cka(a, b), x, y, weight=1.0)
    assert out.item() == pytest.approx(1.0)
    assert gx.abs().max().item() < 1e-12 and gy.abs().max().item() < 1e-12


def test_nan_inputs_propagate():
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    assert torch.isnan(ckakd.cka(x, torch.randn(8, 4)))


# ----------------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(7, 5, 4), (5, 2, 3)])
def test_gradcheck_cka(mode, shape):
    n, dx, dy = shape
    x = torch.randn(n, dx, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, dy, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ckakd.cka(a, b, mode=mode), (x, y))


def test_gradcheck_hsic_gram_mmd():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ckakd.hsic(a, b, mode="unbiased"), (x, y))
    assert torch.autograd.gradcheck(lambda a: ckakd.centered_gram(a), (x,))
    assert torch.autograd.gradcheck(lambda a, b: ckakd.mmd_loss(a, b), (x, y))


def test_teacher_gradient_not_computed():
    x = torch.randn(8, 6, requires_grad=True)
    y = torch.randn(8, 5)  # frozen teacher
    ckakd.cka_loss(x, y).backward()
    assert x.grad is not None and y.grad is None


def test_torch_compile_fullgraph():
    loss_fn = torch.compile(lambda a, b, c, d: ckakd.rcka_loss(a, b, c, d), fullgraph=True)
    fs, ft = torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(8, 6, 3, 3)
    zs, zt = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
    out = loss_fn(fs, ft, zs, zt)
    out.backward()
    eager_fs, eager_zs = fs.detach().clone().requires_grad_(), zs.detach().clone().requires_grad_()
    eager = ckakd.rcka_loss(eager_fs, ft, eager_zs, zt)
    eager.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(fs.grad, eager_fs.grad)
    torch.testing.assert_close(zs.grad, eager_zs.grad)


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ckakd.cka(torch.randn(5), torch.randn(5)), ValueError, r"x must have shape.*\(5,\)"),
        (
            lambda: ckakd.cka(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)),
            ValueError,
            r"cka_loss.*flatten",
        ),
        (
            lambda: ckakd.cka(torch.randn(5, 3), torch.randn(6, 3)),
            ValueError,
            r"same number of samples.*\(5, 3\).*\(6, 3\)",
        ),
        (lambda: ckakd.cka(torch.randn(2, 5, 3), torch.randn(3, 5, 3)), ValueError, r"batch size"),
        (lambda: ckakd.cka(torch.randn(5, 3), torch.randn(5, 3, 1)), ValueError, r"both be \(n, d\)"),
        (
            lambda: ckakd.cka(torch.ones(5, 3, dtype=torch.long), torch.randn(5, 3)),
            TypeError,
            r"x must have a floating-point dtype",
        ),
        (lambda: ckakd.cka([1.0], torch.randn(5, 3)), TypeError, r"x must be a torch.Tensor"),
        (lambda: ckakd.cka(torch.randn(1, 3), torch.randn(1, 3)), ValueError, r"at least 2.*\(1, 3\)"),
        (lambda: ckakd.cka(torch.randn(3, 3), torch.randn(3, 3), mode="debiased"), ValueError, r"at least 4"),
        (
            lambda: ckakd.cka(torch.randn(3, 3), torch.randn(3, 3), mode="linear"),
            ValueError,
            r"mode must be one of",
        ),
        (
            lambda: ckakd.hsic(torch.randn(3, 3), torch.randn(3, 3), mode="unbiased"),
            ValueError,
            r"at least 4",
        ),
        (
            lambda: ckakd.cka(torch.randn(3, 3), torch.randn(3, 3), backend="cuda"),
            ValueError,
            r"backend must be",
        ),
        (lambda: ckakd.centered_gram(torch.randn(3)), ValueError, r"x must have shape"),
        (lambda: ckakd.cka_loss(torch.randn(4, 3, 2), torch.randn(5, 3, 2)), ValueError, r"same batch size"),
        (
            lambda: ckakd.cka_loss([torch.randn(4, 3)], [torch.randn(4, 3)] * 2),
            ValueError,
            r"has 1 tensors but",
        ),
        (lambda: ckakd.cka_loss(torch.randn(4, 3), [torch.randn(4, 3)]), TypeError, r"both be tensors"),
        (lambda: ckakd.cka_loss(torch.randn(4), torch.randn(4)), ValueError, r"feature dimension"),
        (
            lambda: ckakd.rcka_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 10), torch.randn(4, 9)),
            ValueError,
            r"logits_s and logits_t must have the same shape",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device to mix devices")
@pytest.mark.gpu
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match=r"one device.*x on cpu.*y on cuda"):
        ckakd.cka(torch.randn(5, 3), torch.randn(5, 3, device="cuda"))


def test_mixed_devices_rejected_meta():
    with pytest.raises(ValueError, match=r"one device.*x on cpu.*y on meta"):
        ckakd.cka(torch.randn(5, 3), torch.randn(5, 3, device="meta"))


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_dtypes(dtype, mode):
    x, y = (
        rand_features(64, 300, device="cuda", dtype=dtype, offset=2.0),
        rand_features(64, 200, device="cuda", dtype=dtype),
    )
    with track_dispatch() as ran:
        out, (gx, gy), _ = weighted_grads(lambda a, b: ckakd.cka(a, b, mode=mode, backend="triton"), x, y, weight=1.5)
    assert ran[("gram", "triton")] == 2 and ran[("gram_apply", "triton")] == 2 and ran[("gram", "torch")] == 0
    ref, (rx, ry), _ = weighted_grads(
        lambda a, b: R.cka(a, b, mode=mode), x.double().cpu(), y.double().cpu(), weight=1.5
    )
    assert gx.dtype == dtype
    assert_close_tol(out, ref, dtype)
    assert_close_tol(gx, rx, dtype, scale=rx.abs().max().item())
    assert_close_tol(gy, ry, dtype, scale=ry.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 16384), (64, 256 * 56 * 56), (4096, 512)])
def test_gpu_big_shapes(shape):
    n, d = shape
    x = torch.randn(n, d, device="cuda") + 5.0
    y = 0.5 * x + torch.randn(n, d, device="cuda")
    with track_dispatch() as ran:
        out, (gx, _), _ = weighted_grads(lambda a, b: ckakd.cka(a, b, backend="triton"), x, y, weight=1.0)
    assert ran[("gram", "triton")] == 2 and ran[("gram_apply", "triton")] >= 1 and ran[("gram", "torch")] == 0
    ref, (rx, _), _ = weighted_grads(lambda a, b: ckakd.cka(a, b, backend="torch"), x.double(), y.double(), weight=1.0)
    assert_close_tol(out, ref, torch.float32)
    assert_close_tol(gx, rx, torch.float32, scale=rx.abs().max().item())
