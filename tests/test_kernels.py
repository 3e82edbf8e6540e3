"""Tests of the Triton kernels (``ckakd.kernels``) against plain float64 torch formulas.

Without CUDA they run under the Triton CPU interpreter (``TRITON_INTERPRET=1``, set by conftest), so
shapes are small. Every comparison uses float64 of the *same* (rounded) inputs the kernel saw, and
tolerances relative to the scale of the expected result.
"""

from __future__ import annotations

import pytest
import torch

kernels = pytest.importorskip("ckakd.kernels")

# (atol, rtol) per dtype, DESIGN §5 (same values as conftest.TOLERANCES)
TOLERANCES = {
    torch.float32: (1e-5, 5e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (5e-3, 5e-2),
}

LOW = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _randn(shape, device, dtype=torch.float32, offset: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """assert_close with the dtype's (atol, rtol), both relative to max |expected| (at least 1)."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu() / scale, expected.double().cpu() / scale, atol=atol, rtol=rtol)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected.cpu()).norm() / expected.cpu().norm().clamp_min(1e-300)).item()


def _ref_gram(x: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(dim=1)
    xc = x - mean[:, None] if center else x
    return xc @ xc.transpose(1, 2), mean


def _ref_dots(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    k, l = k.double(), l.double()
    return torch.stack([(k * l).sum((1, 2)), (k * k).sum((1, 2)), (l * l).sum((1, 2))], dim=1)


def _problems(f: torch.Tensor, ph: int, pw: int, reduce: str) -> torch.Tensor:
    """(G, P, D) problem matrices of a (B, C, H, W) tensor, feature order as in kernels.patch_cka."""
    B, C, H, W = f.shape
    v = f.reshape(B, C, H // ph, ph, W // pw, pw)  # b c pi i pj j
    P = (H // ph) * (W // pw)
    if reduce == "channel":
        return v.permute(1, 2, 4, 0, 3, 5).reshape(C, P, B * ph * pw)
    if reduce == "batch":
        return v.permute(0, 2, 4, 1, 3, 5).reshape(B, P, C * ph * pw)
    return v.permute(3, 5, 2, 4, 0, 1).reshape(ph * pw, P, B * C)


def _unproblems(x: torch.Tensor, shape, ph: int, pw: int, reduce: str) -> torch.Tensor:
    """Inverse of :func:`_problems`."""
    B, C, H, W = shape
    Ph, Pw = H // ph, W // pw
    if reduce == "channel":
        return x.reshape(C, Ph, Pw, B, ph, pw).permute(3, 0, 1, 4, 2, 5).reshape(shape)
    if reduce == "batch":
        return x.reshape(B, Ph, Pw, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(shape)
    return x.reshape(ph, pw, Ph, Pw, B, C).permute(4, 5, 2, 0, 3, 1).reshape(shape)


def _center_problems(x: torch.Tensor, center: bool) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True) if center else x


def _ref_patch(f_s, f_t, ph, pw, reduce, center):
    xs = _center_problems(_problems(f_s.double(), ph, pw, reduce), center)
    xt = _center_problems(_problems(f_t.double(), ph, pw, reduce), center)
    ks, kt = xs @ xs.transpose(1, 2), xt @ xt.transpose(1, 2)
    return _ref_dots(ks, kt), ks, kt, xs, xt


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make ``torch.empty`` return NaN-filled tensors, so that any element a kernel leaves unwritten
    shows up (integer scratch gets a huge value)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", empty)


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
# patch_cka_forward / patch_cka_backward
# ---------------------------------------------------------------------------------------------------

REDUCES = ["channel", "batch", "spatial"]


def _patch_inputs(shape, device, dtype=torch.float32, offset=0.0):
    """Student channels_last, teacher a strided slice: both non-contiguous, with different strides."""
    f_s = _randn(shape, device, dtype, offset=offset).to(memory_format=torch.channels_last)
    B, C, H, W = shape
    f_t = _randn((B, 2 * C, H, 2 * W), device, dtype, offset=offset, scale=2.0)[:, ::2, :, ::2]
    f_t.add_(0.5 * f_s)  # correlated with the student; in place keeps the strided layout
    assert not f_s.is_contiguous() and not f_t.is_contiguous()
    return f_s, f_t


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(
    "shape,patch,block_d",
    [((2, 3, 8, 12), (2, 4), 16), ((1, 5, 10, 6), (2, 3), None)],
    ids=["P12", "P10-odd"],
)
def test_patch_cka_fp32(triton_device, poisoned_empty, shape, patch, block_d, reduce, center):
    ph, pw = patch
    f_s, f_t = _patch_inputs(shape, triton_device)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, ph, pw, reduce, center, block_d=block_d)
    st_ref, ks_ref, kt_ref, xs, xt = _ref_patch(f_s, f_t, ph, pw, reduce, center)
    G, P, _ = ks_ref.shape
    assert stats.shape == (G, 3) and k_s.shape == k_t.shape == (G, P, P)
    for got in (stats, k_s, k_t):
        assert got.dtype == torch.float32 and not got.isnan().any()
    _assert_close(k_s, ks_ref, torch.float32)
    _assert_close(k_t, kt_ref, torch.float32)
    _assert_close(stats, st_ref, torch.float32)

    m_s = _randn((G, P, P), triton_device)
    m_t = _randn((G, P, P), triton_device).transpose(1, 2)  # non-contiguous coefficients
    g_s, g_t = kernels.patch_cka_backward(m_s, m_t, f_s, f_t, ph, pw, reduce, center, block_d=block_d)
    for got, src in ((g_s, f_s), (g_t, f_t)):
        assert got.shape == src.shape and got.dtype == src.dtype and got.is_contiguous()
        assert not got.isnan().any()
    _assert_close(g_s, _unproblems(m_s.double() @ xs, shape, ph, pw, reduce), torch.float32)
    _assert_close(g_t, _unproblems(m_t.double() @ xt, shape, ph, pw, reduce), torch.float32)


def test_patch_layout_helpers():
    """The reference reshapes agree with the element formula of the module docstring."""
    f = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    ph, pw, Pw = 2, 3, 2
    x = _problems(f, ph, pw, "channel")
    b, c, pi, pj, i, j = 1, 2, 1, 0, 1, 2
    assert x[c, pi * Pw + pj, (b * ph + i) * pw + j] == f[b, c, pi * ph + i, pj * pw + j]
    x = _problems(f, ph, pw, "batch")
    assert x[b, pi * Pw + pj, (c * ph + i) * pw + j] == f[b, c, pi * ph + i, pj * pw + j]
    x = _problems(f, ph, pw, "spatial")
    assert x[i * pw + j, pi * Pw + pj, b * 3 + c] == f[b, c, pi * ph + i, pj * pw + j]
    for reduce in REDUCES:
        assert torch.equal(_unproblems(_problems(f, ph, pw, reduce), f.shape, ph, pw, reduce), f)


@pytest.mark.parametrize("reduce", REDUCES)
def test_patch_cka_large_offset(triton_device, reduce):
    f_s, f_t = _patch_inputs((2, 3, 8, 12), triton_device, offset=1000.0)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, 2, 4, reduce, True)
    st_ref, ks_ref, kt_ref, xs, xt = _ref_patch(f_s, f_t, 2, 4, reduce, True)
    assert _rel_err(k_s, ks_ref) < 2e-6 and _rel_err(k_t, kt_ref) < 2e-6
    _assert_close(stats, st_ref, torch.float32)
    G, P, _ = ks_ref.shape
    m = _randn((G, P, P), triton_device)
    g_s, _ = kernels.patch_cka_backward(m, m, f_s, f_t, 2, 4, reduce, True)
    _assert_close(g_s, _unproblems(m.double() @ xs, f_s.shape, 2, 4, reduce), torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("reduce", ["channel", "spatial"])
def test_patch_cka_low_precision(triton_device, dtype, reduce):
    f_s, f_t = _patch_inputs((2, 3, 8, 12), triton_device, dtype)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, 2, 4, reduce, True)
    st_ref, ks_ref, kt_ref, xs, xt = _ref_patch(f_s, f_t, 2, 4, reduce, True)
    _assert_close(k_s, ks_ref, dtype)
    _assert_close(k_t, kt_ref, dtype)
    _assert_close(stats, st_ref, dtype)
    G, P, _ = ks_ref.shape
    m_s, m_t = _randn((G, P, P), triton_device), _randn((G, P, P), triton_device)
    g_s, g_t = kernels.patch_cka_backward(m_s, m_t, f_s, f_t, 2, 4, reduce, True)
    assert g_s.dtype == g_t.dtype == dtype
    _assert_close(g_s, _unproblems(m_s.double() @ xs, f_s.shape, 2, 4, reduce), dtype)
    _assert_close(g_t, _unproblems(m_t.double() @ xt, f_t.shape, 2, 4, reduce), dtype)


def test_patch_cka_max_patches(triton_device, poisoned_empty):
    """P = 128 (the largest padded size), features fewer than 16."""
    shape = (1, 2, 16, 8)
    f_s, f_t = _patch_inputs(shape, triton_device)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, 1, 1, "channel", True)
    st_ref, ks_ref, kt_ref, xs, xt = _ref_patch(f_s, f_t, 1, 1, "channel", True)
    _assert_close(k_s, ks_ref, torch.float32)
    _assert_close(stats, st_ref, torch.float32)
    m = _randn((2, 128, 128), triton_device)
    g_s, g_t = kernels.patch_cka_backward(m, m, f_s, f_t, 1, 1, "channel", True)
    _assert_close(g_t, _unproblems(m.double() @ xt, shape, 1, 1, "channel"), torch.float32)


def test_patch_cka_single_patch(triton_device):
    """P = 1: the centered Grams and gradients are exactly zero."""
    f_s, f_t = _patch_inputs((2, 3, 4, 4), triton_device)
    stats, k_s, _ = kernels.patch_cka_forward(f_s, f_t, 4, 4, "channel", True)
    assert k_s.shape == (3, 1, 1) and not k_s.any() and not stats.any()
    g_s, _ = kernels.patch_cka_backward(torch.ones(3, 1, 1, device=triton_device), k_s, f_s, f_t, 4, 4, "channel", True)
    assert not g_s.any()


def test_patch_cka_bad_input(triton_device):
    f = _randn((1, 2, 24, 8), triton_device)
    with pytest.raises(ValueError, match="128"):
        kernels.patch_cka_forward(f, f, 1, 1, "channel", True)  # P = 192
    with pytest.raises(ValueError):
        kernels.patch_cka_forward(f, f, 5, 1, "channel", True)
    with pytest.raises(ValueError):
        kernels.patch_cka_forward(f, f, 2, 2, "mix", True)
    with pytest.raises(ValueError):
        kernels.patch_cka_forward(f, f[:, :1], 2, 2, "channel", True)


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


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patch_cka_fpn_gpu(triton_device, reduce, dtype):
    shape, ph, pw = (2, 256, 96, 160), 16, 16
    f_s = _randn(shape, triton_device, dtype, offset=2.0).to(memory_format=torch.channels_last)
    f_t = _randn(shape, triton_device, dtype)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, ph, pw, reduce, True)
    st_ref, ks_ref, kt_ref, xs, xt = _ref_patch(f_s, f_t, ph, pw, reduce, True)
    _assert_close(k_s, ks_ref, dtype)
    _assert_close(stats, st_ref, dtype)
    G, P, _ = ks_ref.shape
    m = _randn((G, P, P), triton_device)
    g_s, g_t = kernels.patch_cka_backward(m, m, f_s, f_t, ph, pw, reduce, True)
    _assert_close(g_s, _unproblems(m.double() @ xs, shape, ph, pw, reduce), dtype)
    _assert_close(g_t, _unproblems(m.double() @ xt, shape, ph, pw, reduce), dtype)
