"""Tests of the Triton Gram and Frobenius-sum kernels (``ckakd.kernels.gram``, ``.hsic``) against float64 formulas.

Without CUDA they run under the Triton CPU interpreter (``TRITON_INTERPRET=1``, set by conftest), so
shapes are small; on a CUDA machine a missing Triton or kernels package fails this module (conftest's
``require_kernels``) instead of skipping it. Every comparison uses float64 of the *same* (rounded) inputs
the kernel saw, and tolerances relative to the scale of the expected result.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require_kernels
from tests.kernel_helpers import LOW, _assert_close, _randn, _ref_dots, _ref_gram, _rel_err

kernels = require_kernels()

# ---------------------------------------------------------------------------------------------------
# gram_forward
# ---------------------------------------------------------------------------------------------------

GRAM_SHAPES = [(1, 7, 37), (2, 33, 130), (2, 16, 64), (1, 1, 5), (1, 2, 19)]


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_forward_fp32(triton_device, shape, center):
    x = _randn(shape, triton_device)
    k, mean = kernels.gram_forward(x, center)
    k_ref, mean_ref = _ref_gram(x, center)
    assert k.shape == (shape[0], shape[1], shape[1]) and k.dtype == torch.float32
    assert mean.shape == (shape[0], shape[2]) and mean.dtype == torch.float32
    _assert_close(k, k_ref, torch.float32)
    _assert_close(mean, mean_ref if center else torch.zeros_like(mean_ref), torch.float32)
    assert torch.equal(k, k.transpose(1, 2))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("center", [True, False])
def test_gram_forward_low_precision(triton_device, dtype, center):
    x = _randn((2, 33, 130), triton_device, dtype)
    k, mean = kernels.gram_forward(x, center)
    k_ref, mean_ref = _ref_gram(x, center)
    _assert_close(k, k_ref, dtype)
    if center:
        _assert_close(mean, mean_ref, dtype)


@pytest.mark.parametrize("shape", [(2, 33, 130), (1, 70, 300)], ids=lambda s: "x".join(map(str, s)))
def test_gram_forward_large_offset(triton_device, shape):
    """Mean 1000, std 1 in fp32: centering the features in-kernel keeps the Gram at fp32 accuracy."""
    x = _randn(shape, triton_device, offset=1000.0)
    k, _ = kernels.gram_forward(x, True)
    k_ref, _ = _ref_gram(x, True)
    assert _rel_err(k, k_ref) < 2e-6
    _assert_close(k, k_ref, torch.float32)


@pytest.mark.parametrize(
    "shape,split_k",
    [((2, 70, 300), 3), ((1, 130, 200), 2), ((1, 300, 20), 1), ((2, 50, 700), 3)],
    ids=["split3-3tiles", "split2-6tiles", "15tiles", "split3-1tile"],
)
def test_gram_forward_tiles_and_split(triton_device, poisoned_empty, shape, split_k):
    """Several upper-triangle tiles (mirrored), split-K reductions, and the single-tile path whose
    programs also write the column means of their d-range; every element written."""
    x = _randn(shape, triton_device, offset=3.0)
    k, mean = kernels.gram_forward(x, True, split_k=split_k)
    k_ref, mean_ref = _ref_gram(x, True)
    assert not k.isnan().any() and not mean.isnan().any()
    _assert_close(k, k_ref, torch.float32)
    _assert_close(mean, mean_ref, torch.float32)
    assert torch.equal(k, k.transpose(1, 2))


def test_gram_forward_poison_uncentered(triton_device, poisoned_empty):
    x = _randn((2, 7, 37), triton_device)
    k, mean = kernels.gram_forward(x, False)
    assert not k.isnan().any()
    assert torch.equal(mean, torch.zeros_like(mean))
    _assert_close(k, _ref_gram(x, False)[0], torch.float32)


def test_gram_forward_non_contiguous(triton_device):
    base = _randn((2, 130, 33), triton_device, offset=10.0)
    for x in (base.transpose(1, 2), _randn((2, 33, 260), triton_device)[:, :, ::2]):
        assert not x.is_contiguous()
        k, mean = kernels.gram_forward(x, True)
        k_ref, mean_ref = _ref_gram(x, True)
        _assert_close(k, k_ref, torch.float32)
        _assert_close(mean, mean_ref, torch.float32)


def test_gram_forward_float64_input_computes_in_fp32(triton_device):
    x = _randn((2, 33, 130), triton_device, torch.float64)
    k, mean = kernels.gram_forward(x, True)
    assert k.dtype == mean.dtype == torch.float32
    k_ref, mean_ref = _ref_gram(x, True)
    _assert_close(k, k_ref, torch.float32)
    _assert_close(mean, mean_ref, torch.float32)


def test_gram_forward_bad_input(triton_device):
    with pytest.raises(ValueError):
        kernels.gram_forward(_randn((7, 5), triton_device), True)


# ---------------------------------------------------------------------------------------------------
# gram_backward
# ---------------------------------------------------------------------------------------------------


def _ref_backward(m, x, mean, center):
    xd = x.double()
    return m.double() @ (xd - mean.double()[:, None] if center else xd)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_backward_fp32(triton_device, shape, center):
    b, n, d = shape
    x = _randn(shape, triton_device)
    m = _randn((b, n, n), triton_device)
    mean = x.mean(dim=1)
    out = kernels.gram_backward(m, x, mean, center)
    assert out.shape == shape and out.dtype == x.dtype and out.is_contiguous()
    _assert_close(out, _ref_backward(m, x, mean, center), torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_gram_backward_low_precision(triton_device, dtype):
    x = _randn((2, 33, 130), triton_device, dtype)
    m = _randn((2, 33, 33), triton_device)
    _, mean = kernels.gram_forward(x, True)
    out = kernels.gram_backward(m, x, mean, True)
    assert out.dtype == dtype
    _assert_close(out, _ref_backward(m, x, mean, True), dtype)


def test_gram_backward_large_offset_non_contiguous(triton_device, poisoned_empty):
    """Offset 1000 and transposed (non-contiguous) m and x; n > 128 gives several row blocks."""
    x = _randn((2, 300, 150), triton_device, offset=1000.0).transpose(1, 2)  # (2, 150, 300)
    m = _randn((2, 150, 150), triton_device).transpose(1, 2)
    _, mean = kernels.gram_forward(x, True)
    out = kernels.gram_backward(m, x, mean, True)
    assert not out.isnan().any()
    _assert_close(out, _ref_backward(m, x, mean, True), torch.float32)


def test_gram_backward_bad_input(triton_device):
    x = _randn((1, 7, 5), triton_device)
    with pytest.raises(ValueError):
        kernels.gram_backward(_randn((1, 6, 6), triton_device), x, x.mean(1), True)


# ---------------------------------------------------------------------------------------------------
# frobenius_dots
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_blocks", [None, 3])
@pytest.mark.parametrize("shape", [(1, 7, 7), (2, 33, 33), (1, 1, 1), (3, 70, 70)], ids=lambda s: str(s[1]))
def test_frobenius_dots(triton_device, poisoned_empty, shape, num_blocks):
    k = _randn(shape, triton_device)
    l = _randn(shape, triton_device) + 0.5 * k
    out = kernels.frobenius_dots(k, l, num_blocks=num_blocks)
    assert out.shape == (shape[0], 3) and out.dtype == torch.float32
    _assert_close(out, _ref_dots(k, l), torch.float32)


def test_frobenius_dots_of_grams(triton_device):
    """The CKA of two centered Grams from the kernels matches float64 CKA."""
    x = _randn((2, 33, 130), triton_device, offset=1000.0)
    y = x + _randn((2, 33, 130), triton_device)
    k, _ = kernels.gram_forward(x, True)
    l, _ = kernels.gram_forward(y, True)
    s = kernels.frobenius_dots(k, l).double().cpu()
    kr, _ = _ref_gram(x, True)
    lr, _ = _ref_gram(y, True)
    sr = _ref_dots(kr, lr).cpu()
    cka = s[:, 0] / (s[:, 1] * s[:, 2]).sqrt()
    cka_ref = sr[:, 0] / (sr[:, 1] * sr[:, 2]).sqrt()
    torch.testing.assert_close(cka, cka_ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# large shapes (GPU only)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 256, 16384), (1, 64, 200704), (1, 4096, 512), (3, 100, 5000)])
def test_gram_large_gpu(triton_device, shape):
    x = _randn(shape, triton_device, offset=1000.0)
    k, mean = kernels.gram_forward(x, True)
    k_ref, mean_ref = _ref_gram(x, True)
    assert _rel_err(k, k_ref) < 2e-6
    _assert_close(k, k_ref, torch.float32)
    m = _randn((shape[0], shape[1], shape[1]), triton_device)
    _assert_close(kernels.gram_backward(m, x, mean, True), _ref_backward(m, x, mean, True), torch.float32)
    _assert_close(kernels.frobenius_dots(k, m), _ref_dots(k_ref, m), torch.float32)
