"""Every public loss and op under autocast (``run.amp=true``): forward and backward run, values are finite and
match the same computation without autocast on the same input values, gradients have the inputs' dtype.

The guarantee tested: the numerically sensitive parts (Grams, eigh / matrix square roots, Sinkhorn,
softmax) run in fp32 (fp64 for fp64 inputs) with autocast off, so autocast changes a loss only by
summation order: values within rtol = atol = 1e-4 of the autocast-free result (on CUDA, where the Triton
kernels may use other reduction orders, 1e-3). Gradients are cast to the input dtype (fp16/bf16 leaves get
fp16/bf16 gradients), so they are compared with the input dtype's resolution: rtol 2e-2, atol 2e-2·max|g|.
CPU autocast runs bf16; the CUDA variant (``gpu`` marker, skipped without a GPU) runs fp16 and bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import ckakd
from ckakd import nn as cnn
from ckakd.wasserstein import sqrtm_psd

C = 10


def _cost(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = torch.rand(C, C, generator=g)
    return ((c + c.T) / 2).fill_diagonal_(0).to(device)


def _psd(a: torch.Tensor) -> torch.Tensor:
    """A @ Aᵀ / d + I computed in fp32 with autocast off (the test's own input preparation)."""
    with torch.autocast(a.device.type, enabled=False):
        a32 = a.float()
        return a32 @ a32.mT / a.shape[-1] + torch.eye(a.shape[-1], device=a.device)


# name -> (function of the input tensors, input shapes (see _inputs)); every input gets a gradient
CASES: dict[str, tuple[Callable[..., torch.Tensor], list[tuple[int, ...]]]] = {
    "centered_gram": (lambda x: ckakd.centered_gram(x), [(8, 6)]),
    "hsic[biased]": (lambda x, y: ckakd.hsic(x, y), [(8, 6), (8, 5)]),
    "hsic[unbiased]": (lambda x, y: ckakd.hsic(x, y, mode="unbiased"), [(8, 6), (8, 5)]),
    "cka": (lambda x, y: ckakd.cka(x, y), [(8, 6), (8, 5)]),
    "cka_loss[centered]": (lambda x, y: ckakd.cka_loss(x, y), [(8, 3, 2, 2), (8, 5)]),
    "cka_loss[debiased]": (lambda x, y: ckakd.cka_loss(x, y, mode="debiased"), [(8, 6), (8, 5)]),
    "cka_loss[uncentered]": (lambda x, y: ckakd.cka_loss(x, y, mode="uncentered"), [(8, 6), (8, 5)]),
    "patch_cka": (lambda a, b: ckakd.patch_cka(a, b, patch_size=2), [(2, 3, 8, 8), (2, 3, 8, 8)]),
    "patch_cka_loss": (lambda a, b: ckakd.patch_cka_loss(a, b, patch_size=2, reduce="mix"), [(2, 3, 8, 8)] * 2),
    "rcka_loss": (lambda a, b, zs, zt: ckakd.rcka_loss(a, b, zs, zt), [(8, 6), (8, 5), (8, C), (8, C)]),
    "rcka_loss[l2,soften]": (
        lambda a, b, zs, zt: ckakd.rcka_loss(
            a, b, zs, zt, mode="uncentered", with_l2_norm=True, soften=True, temperature=4.0
        ),
        [(8, 6), (8, 5), (8, C), (8, C)],
    ),
    "lcka (rcka logit terms)": (
        lambda zs, zt: ckakd.rcka_loss(zs, zt, zs, zt, alpha=0.0, with_l2_norm=True),
        [(8, C), (8, C)],
    ),
    "mmd_loss": (lambda x, y: ckakd.mmd_loss(x, y), [(8, 6), (8, 5)]),
    # histograms rounded to bf16 are validated with the bf16 row-sum tolerance; the fp32 reference copy of
    # the same rounded values is not a valid fp32 histogram (rows off by ~1e-3), so it skips validation
    "sinkhorn[fixed]": (
        lambda p, q: ckakd.sinkhorn(p, q, _cost(p.device), validate=p.dtype != torch.float32),
        [("hist", (4, C))] * 2,
    ),
    "sinkhorn[fixed,torch]": (
        lambda p, q: ckakd.sinkhorn(p, q, _cost(p.device), backend="torch", validate=p.dtype != torch.float32),
        [("hist", (4, C))] * 2,
    ),
    "sinkhorn[converged]": (
        lambda p, q: ckakd.sinkhorn(p, q, _cost(p.device), tol=1e-5, validate=p.dtype != torch.float32),
        [("hist", (4, C))] * 2,
    ),
    "wkd_logit_loss": (lambda zs, zt: ckakd.wkd_logit_loss(zs, zt, _cost(zs.device)), [(4, C)] * 2),
    "wkd_logit_loss[target]": (
        lambda zs, zt: ckakd.wkd_logit_loss(
            zs, zt, _cost(zs.device), temperature=4.0, target=torch.arange(4, device=zs.device)
        ),
        [(4, C)] * 2,
    ),
    "wkd_feature_loss[diag]": (lambda a, b: ckakd.wkd_feature_loss(a, b, grid=2), [(2, 3, 4, 4)] * 2),
    "wkd_feature_loss[full]": (lambda a, b: ckakd.wkd_feature_loss(a, b, cov="full"), [(2, 3, 4, 4)] * 2),
    "gaussian_wasserstein[diag]": (
        lambda m1, v1, m2, v2: ckakd.gaussian_wasserstein(m1, v1, m2, v2),
        [(3, 4), ("positive", (3, 4)), (3, 4), ("positive", (3, 4))],
    ),
    "gaussian_wasserstein[full]": (
        lambda m1, a1, m2, a2: ckakd.gaussian_wasserstein(m1, _psd(a1), m2, _psd(a2)),
        [(3, 4), (3, 4, 4), (3, 4), (3, 4, 4)],
    ),
    "sqrtm_psd": (lambda a: sqrtm_psd(_psd(a)), [(2, 4, 4)]),
    "interrelation[cka]": (lambda x: ckakd.interrelation(x), [(5, 4, 6)]),
    "interrelation[rbf]": (lambda x: ckakd.interrelation(x, kernel="rbf"), [(5, 4, 6)]),
    "cost_from_interrelation": (lambda x: ckakd.cost_from_interrelation(ckakd.interrelation(x)), [(5, 4, 6)]),
    "nn.CKALoss": (lambda x, y: cnn.CKALoss(2.0)(x, y), [(8, 6), (8, 5)]),
    "nn.PatchCKALoss": (lambda a, b: cnn.PatchCKALoss(patch_size=2)(a, b), [(2, 3, 8, 8)] * 2),
    "nn.RCKALoss": (lambda a, b, zs, zt: cnn.RCKALoss()(a, b, zs, zt), [(8, 6), (8, 5), (8, C), (8, C)]),
    "nn.MMDLoss": (lambda x, y: cnn.MMDLoss()(x, y), [(8, 6), (8, 5)]),
    "nn.WKDLogitLoss": (lambda zs, zt: cnn.WKDLogitLoss(_cost("cpu")).to(zs.device)(zs, zt), [(4, C)] * 2),
    "nn.WKDFeatureLoss": (lambda a, b: cnn.WKDFeatureLoss(0.5, cov="full")(a, b), [(2, 3, 4, 4)] * 2),
}


def _inputs(shapes, dtype, device, seed=0) -> list[torch.Tensor]:
    """Leaves of ``dtype``: normal samples for a shape, rows of a softmax for ("hist", shape), values in
    [0.1, 1.1) for ("positive", shape); made in fp32 and rounded once, so the reference sees the same values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        kind, shape = s if isinstance(s[0], str) else ("normal", s)
        t = torch.randn(*shape, generator=g)
        if kind == "hist":
            t = t.softmax(-1)
        elif kind == "positive":
            t = torch.rand(*shape, generator=g) + 0.1
        out.append(t.to(device=device, dtype=dtype).requires_grad_(True))
    return out


def _run(fn, inputs, amp_dtype=None):
    if amp_dtype is None:
        out = fn(*inputs)
    else:
        with torch.autocast(inputs[0].device.type, dtype=amp_dtype):
            out = fn(*inputs)
    grads = torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)
    return out, grads


def _check(name: str, device: str, amp_dtype: torch.dtype, in_dtype: torch.dtype, value_tol: float) -> None:
    fn, shapes = CASES[name]
    inputs = _inputs(shapes, in_dtype, device)
    out, grads = _run(fn, inputs, amp_dtype)
    # reference: the same input values in fp32, no autocast
    ref_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
    ref, ref_grads = _run(fn, ref_inputs)
    assert out.is_floating_point() and torch.isfinite(out).all(), f"{name}: non-finite value {out}"
    torch.testing.assert_close(out.float(), ref.float(), rtol=value_tol, atol=value_tol, msg=f"{name}: value")
    for i, (g, gr) in enumerate(zip(grads, ref_grads, strict=True)):
        assert (g is None) == (gr is None), f"{name}: input {i} gradient presence differs"
        if g is None:
            continue
        assert g.dtype == in_dtype, f"{name}: input {i} gradient dtype {g.dtype}, expected {in_dtype}"
        assert torch.isfinite(g).all(), f"{name}: input {i} has non-finite gradients"
        scale = gr.abs().max().item() or 1.0
        torch.testing.assert_close(
            g.float(), gr.float(), rtol=2e-2, atol=2e-2 * scale, msg=f"{name}: input {i} gradient"
        )


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=["fp32-inputs", "bf16-inputs"])
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_autocast_bf16(name, in_dtype):
    _check(name, "cpu", torch.bfloat16, in_dtype, value_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_autocast(name, amp_dtype):
    for in_dtype in (torch.float32, amp_dtype):
        _check(name, "cuda", amp_dtype, in_dtype, value_tol=1e-3)


def test_autocast_is_back_on_after_the_losses():
    """The autocast-off regions are local: an op after a loss call is autocast again."""
    a, b = _inputs([(2, 3, 4, 4)] * 2, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ckakd.wkd_feature_loss(a, b, cov="full")
        assert torch.is_autocast_enabled("cpu")
        assert (a.flatten(1) @ b.flatten(1).T).dtype == torch.bfloat16
