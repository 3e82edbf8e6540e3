"""Patch CKA (PCKA): batched small CKAs vs the per-problem reference loop, on both backends."""

from __future__ import annotations

import pytest
import torch

import ckakd
from ckakd import reference as R
from ckakd.ops import track_dispatch
from tests import kernel_helpers
from tests.kernel_helpers import assert_close_tol, weighted_grads

backend_device = kernel_helpers.backend_device  # the (backend, device) fixture

REDUCTIONS = ["channel", "batch", "spatial"]
# (shape, patch): aligned; odd sizes that need resizing (10x9 -> 9x9 with 3x3 patches).
CASES = [((2, 3, 8, 12), (4, 4)), ((3, 5, 10, 9), (3, 3))]


@pytest.mark.parametrize("mode", ["centered", "debiased", "uncentered"])
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
def test_patch_cka_values_and_grads(backend_device, reduce, mode, case):
    backend, device = backend_device
    shape, patch = case
    f_s = torch.randn(shape, dtype=torch.float64).float().to(device)
    f_t = (0.6 * f_s.double().cpu() + torch.randn(shape, dtype=torch.float64)).float().to(device)
    out, (gs, gt), _ = weighted_grads(
        lambda a, b: ckakd.patch_cka(a, b, patch_size=patch, reduce=reduce, mode=mode, backend=backend),
        f_s,
        f_t,
    )
    ref, (rs, rt), _ = weighted_grads(
        lambda a, b: R.patch_cka(a, b, patch_size=patch, reduce=reduce, mode=mode),
        f_s.double().cpu(),
        f_t.double().cpu(),
    )
    assert out.shape == ref.shape
    assert_close_tol(out, ref, torch.float32)
    assert_close_tol(gs, rs, torch.float32, scale=rs.abs().max().item())
    assert_close_tol(gt, rt, torch.float32, scale=rt.abs().max().item())


@pytest.mark.parametrize("reduce", ["channel", "mix"])
def test_patch_cka_loss_levels(backend_device, reduce):
    backend, device = backend_device
    levels_s = [
        torch.randn(2, 4, 8, 8, device=device),
        torch.randn(2, 4, 4, 8, device=device),
        torch.randn(2, 4, 4, 4, device=device),
    ]
    levels_t = [torch.randn_like(f) for f in levels_s]
    loss = ckakd.patch_cka_loss(levels_s, levels_t, patch_size=2, reduce=reduce, backend=backend)
    ref = R.patch_cka_loss([f.cpu() for f in levels_s], [f.cpu() for f in levels_t], patch_size=(2, 2), reduce=reduce)
    assert_close_tol(loss, ref, torch.float32)
    module = ckakd.nn.PatchCKALoss(patch_size=2, reduce=reduce, backend=backend)
    assert_close_tol(module(levels_s, levels_t), 10 * ref, torch.float32)


def test_patch_cka_non_contiguous_input(backend_device):
    backend, device = backend_device
    f_s = torch.randn(2, 6, 8, 8, device=device).to(memory_format=torch.channels_last)
    f_t = torch.randn(2, 6, 8, 8, device=device)[:, :, :, :]
    f_t = f_t.transpose(2, 3)  # a strided view
    out, (gs, _), _ = weighted_grads(lambda a, b: ckakd.patch_cka(a, b, patch_size=4, backend=backend), f_s, f_t)
    ref, (rs, _), _ = weighted_grads(
        lambda a, b: R.patch_cka(a, b, patch_size=(4, 4)), f_s.double().cpu(), f_t.double().cpu()
    )
    assert_close_tol(out, ref, torch.float32)
    assert_close_tol(gs, rs, torch.float32, scale=rs.abs().max().item())


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck_patch_cka(reduce):
    f_s = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ckakd.patch_cka(a, b, patch_size=2, reduce=reduce), (f_s, f_t))


def test_constant_patch_features_finite():
    f_s = torch.ones(2, 3, 8, 8, requires_grad=True)
    loss = ckakd.patch_cka_loss(f_s, torch.randn(2, 3, 8, 8), patch_size=4)
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(f_s.grad).all() and f_s.grad.abs().max() == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: ckakd.patch_cka_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), patch_size=16),
            r"patch_size \(16, 16\) is larger than the feature map f_s of shape \(2, 3, 8, 8\)",
        ),
        (
            lambda: ckakd.patch_cka_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), patch_size=4),
            r"same shape.*\(2, 3, 8, 8\).*\(2, 4, 8, 8\)",
        ),
        (
            lambda: ckakd.patch_cka_loss(torch.randn(2, 3, 8), torch.randn(2, 3, 8), patch_size=4),
            r"f_s must have shape \(B, C, H, W\)",
        ),
        (
            lambda: ckakd.patch_cka_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), patch_size=8),
            r"at least 2 patches of size \(8, 8\)",
        ),
        (
            lambda: ckakd.patch_cka_loss(
                torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), patch_size=4, reduce="pixel"
            ),
            r"reduce must be one of",
        ),
        (
            lambda: ckakd.patch_cka_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), patch_size=(4, 0)),
            r"patch_size must be",
        ),
        (
            lambda: ckakd.patch_cka_loss(
                torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), patch_size=(4, 8), mode="debiased"
            ),
            r"at least 4 patches",
        ),
    ],
)
def test_patch_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_patch_fpn_shape(dtype):
    f_s = torch.randn(2, 256, 100, 168, device="cuda", dtype=dtype)
    f_t = (0.5 * f_s.float() + torch.randn(2, 256, 100, 168, device="cuda")).to(dtype)
    with track_dispatch() as ran:
        out, (gs, _), _ = weighted_grads(lambda a, b: ckakd.patch_cka(a, b, patch_size=16, backend="triton"), f_s, f_t)
    assert ran[("patch_cka_forward", "triton")] == 1 and ran[("patch_cka_backward", "triton")] == 1
    assert ran[("patch_cka_forward", "torch")] == 0
    ref, (rs, _), _ = weighted_grads(
        lambda a, b: ckakd.patch_cka(a, b, patch_size=16, backend="torch"), f_s.double(), f_t.double()
    )
    assert gs.dtype == dtype
    assert_close_tol(out, ref, dtype)
    assert_close_tol(gs, rs, dtype, scale=rs.abs().max().item())
