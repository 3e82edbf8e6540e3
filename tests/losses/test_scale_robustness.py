"""Scale robustness of the CKA family: values and gradients at feature scales 1e-30 ... 1e30.

CKA (feature, logit intra/inter-class, patch-wise), ``mmd_loss`` and ``interrelation`` are invariant to
the scale of each input, so at every scale they are compared with the float64 reference of the *unscaled*
features (gradients: the reference gradient / scale). ``hsic`` and ``centered_gram`` are not invariant:
they must be right wherever the true value is representable in the output dtype and ±inf (never NaN)
where it overflows. Both backends run (Triton under the interpreter on the CPU).

``TRITON_INTERPRET=1 python -m tests.losses.test_scale_robustness`` prints the relative errors per function and
scale (with ``PYTHONPATH=<an older checkout>``, run there, it measures that checkout).
"""

from __future__ import annotations

import math

import pytest
import torch

import ckakd
from ckakd import reference as R
from ckakd.interrelation import interrelation
from ckakd.ops._gram_primitives import exp2, mul_pow2, pow2_exponent
from tests.conftest import TOLERANCES

SCALES = [1e-30, 1e-12, 1e-6, 1.0, 1e8, 1e30]
MODES = ["centered", "debiased", "uncentered"]
# (n, dx, dy): Gram form (features), feature-space form in the torch path (intra-class logits: batch of 64,
# 10 classes) and the inter-class logit term (the 10 classes are the samples, the batch the features).
# "features" is large enough (n·d ≈ 2.5e4) for fp32 sums Σ K∘K to overflow at scale 1e8 without rescaling.
SHAPES = {"features": (48, 512, 96), "logits": (64, 10, 10), "logits_T": (10, 64, 64)}
FP32_GRAD_RTOL = 1e-4  # relative error of the gradient (Frobenius norm), fp32
FP32_MAX = torch.finfo(torch.float32).max


@pytest.fixture(params=["torch", "triton"])
def backend_device(request) -> tuple[str, str]:
    """(backend, device): the torch path on the CPU, Triton on CUDA or the CPU interpreter."""
    if request.param == "torch":
        return "torch", "cpu"
    return "triton", request.getfixturevalue("triton_device")


def _pair(n: int, dx: int, dy: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated float64 features (CKA well inside (0, 1)), unscaled."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(dx, dy, generator=gen, dtype=torch.float64) / math.sqrt(dx)
    return x, y + 0.7 * torch.randn(n, dy, generator=gen, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b (float64, on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    m = b.abs().max().clamp_min(1e-300)  # norms of 1e±200 entries would over/underflow
    return ((a / m - b / m).norm() / (b / m).norm()).item()


def _value_and_grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _scaled(t: torch.Tensor, s: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (t * s).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- power-of-two helpers


def test_pow2_helpers_are_exact_and_saturate_correctly():
    """exp2 is exact for every normal exponent; pow2_exponent puts max|x| in [1/2, 1) per entry (0 for
    zero / NaN); mul_pow2 gives ±inf only on overflow, 0 on underflow, never inf·0 = NaN."""
    for dtype, lo, hi in ((torch.float32, -126, 127), (torch.float64, -1022, 1023)):
        e = torch.arange(lo, hi + 1)
        expected = torch.tensor([math.ldexp(1.0, int(i)) for i in e], dtype=torch.float64)
        assert torch.equal(exp2(e, dtype).double(), expected)
    x = torch.randn(4, 5, 7)
    x[1] *= 1e30
    x[2] = 0.0
    x[3, 0, 0] = float("nan")
    e = pow2_exponent(x.transpose(1, 2))  # any strides
    assert e[2] == 0 and e[3] == 0
    scaled = x[:2].abs().amax((1, 2)) * exp2(-e[:2], torch.float32)
    assert ((scaled >= 0.5) & (scaled < 1)).all()
    out = mul_pow2(torch.tensor([1e-30, 0.0, -3.0, 1e30, 1.5]), torch.tensor([300, 300, 300, -300, 200]))
    assert out[:4].tolist() == [float("inf"), 0.0, float("-inf"), 0.0] and out[4] == float("inf")
    assert mul_pow2(torch.tensor([2.0**-140]), torch.tensor([200])).item() == 2.0**60  # factor 2^200 > fp32 max


# ------------------------------------------------------------------------------ CKA, every form and mode


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cka_value_and_grad_across_scales(backend_device, shape, mode, scale):
    """fp32 CKA and its gradient at every scale equal the float64 reference of the unscaled features
    (before the fix: NaN or 0 from 1e8, wrong below 1e-12, NaN gradients)."""
    backend, device = backend_device
    x0, y0 = _pair(*SHAPES[shape])
    x, y = _scaled(x0, scale, torch.float32, device), _scaled(y0, scale, torch.float32, device)
    out, (gx, gy) = _value_and_grads(lambda a, b: ckakd.cka(a, b, mode=mode, backend=backend), x, y)
    ref, (rgx, rgy) = _value_and_grads(lambda a, b: R.cka(a, b, mode=mode), x0, y0)
    atol, rtol = TOLERANCES[torch.float32]
    assert torch.isfinite(out) and abs(out.item() - ref.item()) <= atol + rtol * abs(ref.item()), (out, ref)
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert _rel(gx, rgx / scale) < FP32_GRAD_RTOL and _rel(gy, rgy / scale) < FP32_GRAD_RTOL


def test_cka_independent_scales_per_input_and_batch_entry(backend_device):
    """Every input and every batch entry gets its own scale: x at 1e-30 against y at 1e30, and a batch
    whose entries span 1e-30 ... 1e30."""
    backend, device = backend_device
    x0, y0 = _pair(*SHAPES["features"])
    ref = R.cka(x0, y0).item()
    out = ckakd.cka(
        _scaled(x0, 1e-30, torch.float32, device), _scaled(y0, 1e30, torch.float32, device), backend=backend
    )
    assert out.item() == pytest.approx(ref, rel=5e-4)
    scales = torch.tensor([1e-30, 1.0, 1e30], dtype=torch.float64)[:, None, None]
    xb = (x0 * scales).to(device=device, dtype=torch.float32)
    yb = (y0 * scales.flip(0)).to(device=device, dtype=torch.float32)
    out, (gx, _) = _value_and_grads(lambda a, b: ckakd.cka(a, b, backend=backend), xb, yb)
    _, (rgx, _) = _value_and_grads(lambda a, b: R.cka(a, b), x0, y0)
    torch.testing.assert_close(out.double().cpu(), torch.full((3,), ref, dtype=torch.float64), atol=1e-5, rtol=5e-4)
    for i in range(3):
        assert _rel(gx[i], rgx / scales[i]) < FP32_GRAD_RTOL


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", ["uncentered", "centered"])
def test_rcka_logit_terms_with_l2_norm_across_scales(mode, scale):
    """rcka_loss's logit terms with the authors' row-normalized Grams (``with_l2_norm``), fp32 at every
    scale vs the same loss of the unscaled logits in float64 (before: NaN at 1e30, 1.0 at 1e-30)."""
    z0, t0 = _pair(*SHAPES["logits"])
    kw = dict(alpha=0.0, mode=mode, with_l2_norm=True, return_parts=True)
    out, (gz, _) = _value_and_grads(
        lambda a, b: ckakd.rcka_loss(a, b, a, b, **kw)["loss"], (z0 * scale).float(), (t0 * scale).float()
    )
    assert out.dtype == torch.float32
    ref, (rgz, _) = _value_and_grads(lambda a, b: ckakd.rcka_loss(a, b, a, b, **kw)["loss"], z0, t0)
    assert torch.isfinite(out) and out.item() == pytest.approx(ref.item(), rel=5e-4, abs=1e-5)
    assert _rel(gz, rgz / scale) < FP32_GRAD_RTOL


# fp16 holds |x| in ~[6e-5, 65504] (randn features reach ~4.5x their scale); bf16 has fp32's range.
LOW_PRECISION = [(torch.float16, s) for s in (1e-3, 1.0, 1e2, 1e4)] + [(torch.bfloat16, s) for s in SCALES]


@pytest.mark.parametrize(("dtype", "scale"), LOW_PRECISION, ids=lambda v: str(v).replace("torch.", ""))
def test_cka_low_precision_across_scales(backend_device, dtype, scale):
    """fp16/bf16 inputs: CKA of the rounded inputs to the dtype's tolerance, finite gradient, at every
    scale the dtype can hold (bf16 before the fix: NaN from 1e8, like fp32)."""
    backend, device = backend_device
    x0, y0 = _pair(*SHAPES["features"])
    x, y = _scaled(x0, scale, dtype, device), _scaled(y0, scale, dtype, device)
    out, (gx, gy) = _value_and_grads(lambda a, b: ckakd.cka(a, b, backend=backend), x, y)
    xr, yr = x.double().cpu() / scale, y.double().cpu() / scale  # the rounded inputs, unscaled
    ref, (rgx, _) = _value_and_grads(lambda a, b: R.cka(a, b), xr, yr)
    atol, rtol = TOLERANCES[dtype]
    assert abs(out.double().item() - ref.item()) <= atol + rtol * abs(ref.item()), (out, ref)
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    # the gradient comes back in the input dtype: fp32-computed, then rounded (2^-11 / 2^-8 relative), and
    # below fp16's normal range (~1e-4 / scale here from scale ~1) only subnormal spacing 2^-24 is left
    expected = rgx / scale
    atol = max(1e-3 * expected.abs().max().item(), 2.0**-24 if dtype == torch.float16 else 0.0)
    torch.testing.assert_close(gx.double().cpu(), expected, rtol=1e-2, atol=atol)


# ----------------------------------------------------------------------------- patch-wise CKA (PCKA)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("reduce", ["channel", "batch", "spatial"])
def test_patch_cka_value_and_grad_across_scales(backend_device, reduce, scale):
    """patch_cka_loss (fused Triton kernels or torch) at every scale vs the float64 reference."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    f0 = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    g0 = f0 + 0.6 * torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    kw = dict(patch_size=(2, 2), reduce=reduce)
    f, g = _scaled(f0, scale, torch.float32, device), _scaled(g0, scale, torch.float32, device)
    out, (gf, gg) = _value_and_grads(lambda a, b: ckakd.patch_cka_loss(a, b, backend=backend, **kw), f, g)
    ref, (rgf, rgg) = _value_and_grads(lambda a, b: R.patch_cka_loss(a, b, **kw), f0, g0)
    assert torch.isfinite(out) and out.item() == pytest.approx(ref.item(), rel=5e-4, abs=1e-5)
    assert _rel(gf, rgf / scale) < FP32_GRAD_RTOL and _rel(gg, rgg / scale) < FP32_GRAD_RTOL


@pytest.mark.parametrize(("dtype", "scale"), LOW_PRECISION, ids=lambda v: str(v).replace("torch.", ""))
def test_patch_cka_low_precision_across_scales(backend_device, dtype, scale):
    """fp16/bf16 feature maps: PCKA of the rounded maps within the dtype's tolerance, finite gradients of
    the input dtype (bf16 before the fix: NaN at 1e30)."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    f0 = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    g0 = f0 + 0.6 * torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    f, g = _scaled(f0, scale, dtype, device), _scaled(g0, scale, dtype, device)
    out, (gf, _) = _value_and_grads(lambda a, b: ckakd.patch_cka_loss(a, b, patch_size=2, backend=backend), f, g)
    ref = R.patch_cka_loss(f.double().cpu() / scale, g.double().cpu() / scale, patch_size=(2, 2))
    atol, rtol = TOLERANCES[dtype]
    assert abs(out.double().item() - ref.item()) <= atol + rtol * abs(ref.item())
    assert gf.dtype == dtype and torch.isfinite(gf).all()


# --------------------------------------------------------------------------- HSIC and the centered Gram


def _check_representable_or_inf(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """actual (fp32) is expected (fp64) where that is a normal fp32 number, ±inf of the right sign where
    it overflows, and tiny (|·| < 2^-126·(1 + rtol)) where it underflows; never NaN."""
    actual, expected = actual.double().cpu().flatten(), expected.double().cpu().flatten()
    assert not torch.isnan(actual).any()
    tiny = torch.finfo(torch.float32).tiny
    over = expected.abs() > FP32_MAX * (1 + rtol)
    under = expected.abs() < tiny
    normal = ~over & ~under & (expected.abs() < FP32_MAX * (1 - rtol))
    assert (torch.isinf(actual[over]) & (actual[over].sign() == expected[over].sign())).all()
    assert (actual[under].abs() <= tiny * (1 + rtol)).all()
    if normal.any():
        err = (actual[normal] - expected[normal]).abs() / expected[normal].abs().max()
        assert err.max() < rtol, err.max()


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", ["biased", "unbiased"])
def test_hsic_right_where_representable_inf_beyond(backend_device, mode, scale):
    """HSIC scales as s⁴: right wherever the value fits fp32, +inf/-inf beyond (before: NaN at 1e30, inf
    already at 1e8 where 1.7e35 is representable, 0 at 1e-6·... where it is not tiny)."""
    backend, device = backend_device
    x0, y0 = _pair(*SHAPES["features"])
    x, y = _scaled(x0, scale, torch.float32, device), _scaled(y0, scale, torch.float32, device)
    out = ckakd.hsic(x, y, mode=mode, backend=backend)
    expected = R.hsic(x0, y0, mode=mode) * scale**4
    _check_representable_or_inf(out, expected, rtol=1e-4)
    # the gradient (∝ s³) is finite where representable and never NaN
    xg = x.detach().clone().requires_grad_(True)
    ckakd.hsic(xg, y, mode=mode, backend=backend).backward()
    x64 = x0.clone().requires_grad_(True)
    R.hsic(x64, y0, mode=mode).backward()
    _check_representable_or_inf(xg.grad, x64.grad * scale**3, rtol=1e-4)


@pytest.mark.parametrize("scale", SCALES)
def test_centered_gram_right_where_representable_inf_beyond(backend_device, scale):
    """Kc ∝ s²: right where it fits fp32, ±inf of the right sign beyond (before: NaN from inf - inf at
    1e30); the gradient of ⟨W, Kc⟩ (∝ s) is right at every scale."""
    backend, device = backend_device
    x0, _ = _pair(*SHAPES["features"])
    x = _scaled(x0, scale, torch.float32, device)
    k = ckakd.centered_gram(x, backend=backend)
    _check_representable_or_inf(k, R.centered_gram(x0) * scale**2, rtol=1e-4)
    w = torch.randn(k.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    xg = x.detach().clone().requires_grad_(True)
    (ckakd.centered_gram(xg, backend=backend) * w.to(device=device, dtype=torch.float32)).sum().backward()
    x64 = x0.clone().requires_grad_(True)
    (R.centered_gram(x64) * w).sum().backward()
    assert torch.isfinite(xg.grad).all() and _rel(xg.grad, x64.grad * scale) < FP32_GRAD_RTOL


# --------------------------------------------------------------------------------------- MMD, IR


@pytest.mark.parametrize("scale", SCALES)
def test_mmd_loss_value_and_grad_across_scales(backend_device, scale):
    """mmd_loss is invariant to the scale of x and of y (x̂ = x / sqrt(‖XᵀX‖_F)); before: inf/NaN at
    1e-30 and 1e30, 1.0 at 1e8."""
    backend, device = backend_device
    x0, y0 = _pair(*SHAPES["features"])
    y0 = y0 + 0.5  # uncentered: a nonzero mean makes the term nonzero
    x, y = _scaled(x0, scale, torch.float32, device), _scaled(y0, scale, torch.float32, device)
    out, (gx, gy) = _value_and_grads(lambda a, b: ckakd.mmd_loss(a, b, backend=backend), x, y)
    ref, (rgx, rgy) = _value_and_grads(lambda a, b: R.mmd_loss(a, b), x0, y0)
    assert out.item() == pytest.approx(ref.item(), rel=5e-4, abs=1e-6)
    assert _rel(gx, rgx / scale) < FP32_GRAD_RTOL and _rel(gy, rgy / scale) < FP32_GRAD_RTOL


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kernel", ["cka", "poly", "rbf", "centroid", "cosine"])
def test_interrelation_across_scales(kernel, scale):
    """IR of fp32 class features at every scale vs float64 (cka, rbf, centroid, cosine are scale-invariant:
    the reference is the unscaled features; poly is not: float64 of the same scaled features). Before: NaN
    (cka) at 1e30, 0.5-0.8 off (cka, cosine) at 1e-30 and 1e-12."""
    gen = torch.Generator().manual_seed(7)
    if kernel == "cosine":
        feats = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    else:
        feats = torch.randn(5, 8, 12, generator=gen, dtype=torch.float64)
        feats = feats + 0.8 * feats[:1]  # related classes: IR well inside (-1, 1)
    x = (feats * scale).float()
    out = interrelation(x, kernel=kernel)
    expected = interrelation(x.double() if kernel == "poly" else feats, kernel=kernel)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=5e-4)


def test_interrelation_poly_high_degree_does_not_overflow():
    """(x·y/d + 1)^8 at scale 1e30 overflows float64 (1e480) unless the base is rescaled first; there the
    +1 is negligible, so the IR equals that at scale 1e5 (base ~1e10, +1 relatively 1e-10)."""
    feats = torch.randn(5, 8, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = interrelation((feats * 1e30).float(), kernel="poly", degree=8)
    expected = interrelation(feats * 1e5, kernel="poly", degree=8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_float64_inputs_at_extreme_scales(scale):
    """float64 inputs far outside fp32's range: CKA (and its gradient), mmd_loss and the interrelation
    kernels stay exact (before: inf/NaN, their Gram sums overflow float64 at 1e200)."""
    x0, y0 = _pair(*SHAPES["logits_T"])
    out, (gx, _) = _value_and_grads(lambda a, b: ckakd.cka(a, b), x0 * scale, y0 * scale)
    ref, (rgx, _) = _value_and_grads(lambda a, b: R.cka(a, b), x0, y0)
    atol, rtol = TOLERANCES[torch.float64]
    assert abs(out.item() - ref.item()) <= atol + rtol * abs(ref.item())
    assert _rel(gx, rgx / scale) < 1e-8
    assert ckakd.mmd_loss(x0 * scale, (y0 + 0.5) * scale).item() == pytest.approx(R.mmd_loss(x0, y0 + 0.5).item())
    feats = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for kernel in ("cka", "rbf", "centroid"):
        torch.testing.assert_close(interrelation(feats * scale, kernel=kernel), interrelation(feats, kernel=kernel))
    w = feats[:, 0]
    torch.testing.assert_close(interrelation(w * scale, kernel="cosine"), interrelation(w, kernel="cosine"))


# -------------------------------------------------------------------------- degenerate inputs, autograd


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("mode", MODES)
def test_constant_features_give_zero_at_any_scale(backend_device, mode, scale):
    """Constant (zero-variance) features give CKA 0 with a zero gradient, at any scale; so do all-zero
    features in every mode (the only constant input plain alignment cannot see)."""
    backend, device = backend_device
    _, y0 = _pair(*SHAPES["features"])
    y = _scaled(y0, scale, torch.float32, device)
    n = y.shape[0]
    inputs = [torch.zeros(n, 20, device=device)]
    if mode != "uncentered":
        inputs.append(torch.full((n, 20), 3.0 * scale, device=device))
    for x in inputs:
        out, (gx, gy) = _value_and_grads(lambda a, b: ckakd.cka(a, b, mode=mode, backend=backend), x, y)
        assert out.item() == 0.0
        assert gx.abs().max().item() == 0 and gy.abs().max().item() == 0
    # patch-wise: a constant map gives PCKA 0 (loss 1) with zero gradients, at any scale
    f = torch.full((2, 3, 4, 4), 0.0 if mode == "uncentered" else 5.0 * scale, device=device)
    g = _scaled(torch.randn(2, 3, 4, 4, dtype=torch.float64), scale, torch.float32, device)
    kw = dict(patch_size=2, mode=mode, backend=backend)
    out, (gf, gg) = _value_and_grads(lambda a, b: ckakd.patch_cka_loss(a, b, **kw), f, g)
    assert out.item() == 1.0 and gf.abs().max().item() == 0 and gg.abs().max().item() == 0


@pytest.mark.parametrize("loss", ["cka_loss", "mmd_loss", "rcka_loss"])
def test_empty_batch_is_a_value_error_naming_the_argument(loss):
    """n = 0 samples: a ValueError naming the arguments (before: a raw reshape RuntimeError)."""
    fn = getattr(ckakd, loss)
    empty = torch.zeros(0, 5)
    args = (empty, empty, torch.zeros(0, 3), torch.zeros(0, 3)) if loss == "rcka_loss" else (empty, empty)
    with pytest.raises(ValueError, match=r"(x|feats_s).*empty batch|empty batch.*(x|feats_s)"):
        fn(*args)


def test_fewer_than_two_samples_is_a_value_error():
    with pytest.raises(ValueError, match=r"at least 2 samples.*x has shape \(1, 5\)"):
        ckakd.cka_loss(torch.randn(1, 5), torch.randn(1, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ckakd.cka(torch.randn(1, 5), torch.randn(1, 5))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(7, 5, 4), (12, 3, 2)])
def test_double_backward_cka(mode, shape):
    """gradgradcheck in float64 (Gram and feature-space forms; before: 'no autograd formula' error)."""
    gen = torch.Generator().manual_seed(11)
    n, dx, dy = shape
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, dy, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: ckakd.cka(a, b, mode=mode), (x, y))


def test_double_backward_hsic_gram_mmd_patch():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: ckakd.hsic(a, b, mode="unbiased"), (x, y))
    assert torch.autograd.gradgradcheck(lambda a: ckakd.centered_gram(a), (x,))
    assert torch.autograd.gradgradcheck(lambda a, b: ckakd.mmd_loss(a, b), (x, y))
    f = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    for reduce in ("channel", "spatial"):
        kw = dict(patch_size=2, reduce=reduce, mode="debiased")
        assert torch.autograd.gradgradcheck(lambda a, b, kw=kw: ckakd.patch_cka_loss(a, b, **kw), (f, g))


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_double_backward_fp32_at_extreme_scales(backend_device, scale):
    """A Hessian-vector product of fp32 CKA at 1e±12 (∝ 1/scale², 1e±24: representable) matches the
    float64 reference's."""
    backend, device = backend_device
    x0, y0 = _pair(12, 6, 5)
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)

    def hvp(fn, x, y, v):
        x = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, y), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return h

    x, y = _scaled(x0, scale, torch.float32, device), _scaled(y0, scale, torch.float32, device)
    out = hvp(lambda a, b: ckakd.cka(a, b, backend=backend), x, y, v.to(device=device, dtype=torch.float32))
    ref = hvp(lambda a, b: R.cka(a, b), x0, y0, v)
    assert torch.isfinite(out).all() and _rel(out, ref / scale**2) < 1e-3


# ---------------------------------------------------------------------------------------- measurement


def _measure() -> None:  # pragma: no cover - a report, run by hand
    """Relative errors (value;gradient) per function, scale and backend vs float64, printed as a table."""
    x0, y0 = _pair(*SHAPES["features"])
    f0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g0 = f0 + 0.6 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cf = torch.randn(5, 8, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def err(fn, ref_fn, inputs, s, grad=True):
        try:
            out, grads = _value_and_grads(fn, *[(t * s).float() for t in inputs])
            ref, rgrads = _value_and_grads(ref_fn, *inputs)
            v = abs(out.double().item() - ref.item()) / abs(ref.item())
            if not grad:  # not scale-invariant: the value itself against the true one
                return f"{out.item():8.2e} (true {ref.item():8.2e})"
            return f"{v:7.1e};{_rel(grads[0], rgrads[0] / s):7.1e}"
        except Exception as exc:
            return f"{type(exc).__name__:>15}"

    print(f"(n, dx, dy) = {SHAPES['features']}; relative error of value;gradient vs float64 of the unscaled input")
    for be in ("torch", "triton"):
        for s in SCALES:
            cka = err(lambda a, b, be=be: ckakd.cka(a, b, backend=be), R.cka, (x0, y0), s)
            hsic = err(
                lambda a, b, be=be: ckakd.hsic(a, b, backend=be),
                lambda a, b, s=s: R.hsic(a, b) * s**4,
                (x0, y0),
                s,
                False,
            )
            mmd = err(lambda a, b, be=be: ckakd.mmd_loss(a, b, backend=be), R.mmd_loss, (x0, y0 + 0.5), s)
            pcka = err(
                lambda a, b, be=be: ckakd.patch_cka_loss(a, b, patch_size=2, backend=be),
                lambda a, b: R.patch_cka_loss(a, b, patch_size=(2, 2)),
                (f0, g0),
                s,
            )
            ir = ""
            if be == "torch":
                ir = f"{(interrelation((cf * s).float()).double() - interrelation(cf)).abs().max().item():7.1e}"
            print(f"{be:6} {s:5.0e} cka {cka} | hsic {hsic} | mmd {mmd} | pcka {pcka} | ir {ir}")


if __name__ == "__main__":  # pragma: no cover
    _measure()
