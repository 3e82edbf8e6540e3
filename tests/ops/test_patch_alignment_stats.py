"""``ckakd::patch_alignment_stats``: the problem layout, the custom-op checks, the fallback past the fused
kernel's patch limit."""

from __future__ import annotations

import torch

import ckakd
from ckakd import reference as R
from ckakd.ops.patch_alignment_stats import from_problems, patch_alignment_stats, to_problems
from tests.kernel_helpers import assert_close_tol

REDUCTIONS = ["channel", "batch", "spatial"]


def test_problem_layout_roundtrip():
    f = torch.randn(2, 3, 8, 12)
    for reduce in REDUCTIONS:
        x = to_problems(f, 4, 4, reduce)
        torch.testing.assert_close(from_problems(x, f.shape, 4, 4, reduce), f)
        ref = R.patch_features(f, (4, 4), reduce)
        assert x.shape == ref.shape
        # same rows (patches) in the same order; features may be permuted within a row
        torch.testing.assert_close(x @ x.transpose(1, 2), ref @ ref.transpose(1, 2))


def test_opcheck_patch_op():
    f_s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    for reduce in REDUCTIONS:
        torch.library.opcheck(patch_alignment_stats, (f_s, f_t, 2, 2, reduce, "centered", "torch"))


def test_many_patches_fall_back_from_fused_kernel(triton_device):
    """P > 128 patches: the fused kernel's register budget is exceeded; the dispatcher uses the torch path."""
    f_s, f_t = (
        torch.randn(1, 2, 24, 24, device=triton_device),
        torch.randn(1, 2, 24, 24, device=triton_device),
    )
    out = ckakd.patch_cka(f_s, f_t, patch_size=2, backend="triton")  # 144 patches
    assert_close_tol(out, R.patch_cka(f_s.cpu(), f_t.cpu(), patch_size=(2, 2)), torch.float32)
