"""Tests of the Triton patch-CKA kernels (``ckakd.kernels.patch_alignment_stats`` and ``_backward``) against
plain float64 torch formulas.

Without CUDA they run under the Triton CPU interpreter (``TRITON_INTERPRET=1``, set by conftest), so
shapes are small; on a CUDA machine a missing Triton or kernels package fails this module (conftest's
``require_kernels``) instead of skipping it. Every comparison uses float64 of the *same* (rounded) inputs
the kernel saw, and tolerances relative to the scale of the expected result.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.conftest import require_kernels
from tests.kernel_helpers import (
    LOW,
    assert_close_scaled,
    from_problem_matrices,
    problem_matrices,
    rand_input,
    ref_patch,
    rel_err,
)

kernels = require_kernels()
_launch = importlib.import_module("ckakd.kernels._launch")
pc = importlib.import_module("ckakd.kernels.patch_alignment_stats")
pcb = importlib.import_module("ckakd.kernels.patch_alignment_stats_backward")

# ---------------------------------------------------------------------------------------------------
# patch_cka_forward / patch_cka_backward
# ---------------------------------------------------------------------------------------------------

REDUCES = ["channel", "batch", "spatial"]


def _patch_inputs(shape, device, dtype=torch.float32, offset=0.0):
    """Student channels_last, teacher a strided slice: both non-contiguous, with different strides."""
    f_s = rand_input(shape, device, dtype, offset=offset).to(memory_format=torch.channels_last)
    B, C, H, W = shape
    f_t = rand_input((B, 2 * C, H, 2 * W), device, dtype, offset=offset, scale=2.0)[:, ::2, :, ::2]
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
    st_ref, ks_ref, kt_ref, xs, xt = ref_patch(f_s, f_t, ph, pw, reduce, center)
    G, P, _ = ks_ref.shape
    assert stats.shape == (G, 3) and k_s.shape == k_t.shape == (G, P, P)
    for got in (stats, k_s, k_t):
        assert got.dtype == torch.float32 and not got.isnan().any()
    assert_close_scaled(k_s, ks_ref, torch.float32)
    assert_close_scaled(k_t, kt_ref, torch.float32)
    assert_close_scaled(stats, st_ref, torch.float32)

    m_s = rand_input((G, P, P), triton_device)
    m_t = rand_input((G, P, P), triton_device).transpose(1, 2)  # non-contiguous coefficients
    g_s, g_t = kernels.patch_cka_backward(m_s, m_t, f_s, f_t, ph, pw, reduce, center, block_d=block_d)
    for got, src in ((g_s, f_s), (g_t, f_t)):
        assert got.shape == src.shape and got.dtype == src.dtype and got.is_contiguous()
        assert not got.isnan().any()
    assert_close_scaled(g_s, from_problem_matrices(m_s.double() @ xs, shape, ph, pw, reduce), torch.float32)
    assert_close_scaled(g_t, from_problem_matrices(m_t.double() @ xt, shape, ph, pw, reduce), torch.float32)


def test_patch_layout_helpers():
    """The reference reshapes agree with the element formula of the module docstring."""
    f = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    ph, pw, Pw = 2, 3, 2
    x = problem_matrices(f, ph, pw, "channel")
    b, c, pi, pj, i, j = 1, 2, 1, 0, 1, 2
    assert x[c, pi * Pw + pj, (b * ph + i) * pw + j] == f[b, c, pi * ph + i, pj * pw + j]
    x = problem_matrices(f, ph, pw, "batch")
    assert x[b, pi * Pw + pj, (c * ph + i) * pw + j] == f[b, c, pi * ph + i, pj * pw + j]
    x = problem_matrices(f, ph, pw, "spatial")
    assert x[i * pw + j, pi * Pw + pj, b * 3 + c] == f[b, c, pi * ph + i, pj * pw + j]
    for reduce in REDUCES:
        assert torch.equal(from_problem_matrices(problem_matrices(f, ph, pw, reduce), f.shape, ph, pw, reduce), f)


@pytest.mark.parametrize("reduce", REDUCES)
def test_patch_cka_large_offset(triton_device, reduce):
    f_s, f_t = _patch_inputs((2, 3, 8, 12), triton_device, offset=1000.0)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, 2, 4, reduce, True)
    st_ref, ks_ref, kt_ref, xs, xt = ref_patch(f_s, f_t, 2, 4, reduce, True)
    assert rel_err(k_s, ks_ref) < 2e-6 and rel_err(k_t, kt_ref) < 2e-6
    assert_close_scaled(stats, st_ref, torch.float32)
    G, P, _ = ks_ref.shape
    m = rand_input((G, P, P), triton_device)
    g_s, _ = kernels.patch_cka_backward(m, m, f_s, f_t, 2, 4, reduce, True)
    assert_close_scaled(g_s, from_problem_matrices(m.double() @ xs, f_s.shape, 2, 4, reduce), torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("reduce", ["channel", "spatial"])
def test_patch_cka_low_precision(triton_device, dtype, reduce):
    f_s, f_t = _patch_inputs((2, 3, 8, 12), triton_device, dtype)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, 2, 4, reduce, True)
    st_ref, ks_ref, kt_ref, xs, xt = ref_patch(f_s, f_t, 2, 4, reduce, True)
    assert_close_scaled(k_s, ks_ref, dtype)
    assert_close_scaled(k_t, kt_ref, dtype)
    assert_close_scaled(stats, st_ref, dtype)
    G, P, _ = ks_ref.shape
    m_s, m_t = rand_input((G, P, P), triton_device), rand_input((G, P, P), triton_device)
    g_s, g_t = kernels.patch_cka_backward(m_s, m_t, f_s, f_t, 2, 4, reduce, True)
    assert g_s.dtype == g_t.dtype == dtype
    assert_close_scaled(g_s, from_problem_matrices(m_s.double() @ xs, f_s.shape, 2, 4, reduce), dtype)
    assert_close_scaled(g_t, from_problem_matrices(m_t.double() @ xt, f_t.shape, 2, 4, reduce), dtype)


def test_patch_cka_max_patches(triton_device, poisoned_empty):
    """P = 128 (the largest padded size), features fewer than 16."""
    shape = (1, 2, 16, 8)
    f_s, f_t = _patch_inputs(shape, triton_device)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, 1, 1, "channel", True)
    st_ref, ks_ref, kt_ref, xs, xt = ref_patch(f_s, f_t, 1, 1, "channel", True)
    assert_close_scaled(k_s, ks_ref, torch.float32)
    assert_close_scaled(stats, st_ref, torch.float32)
    m = rand_input((2, 128, 128), triton_device)
    g_s, g_t = kernels.patch_cka_backward(m, m, f_s, f_t, 1, 1, "channel", True)
    assert_close_scaled(g_t, from_problem_matrices(m.double() @ xt, shape, 1, 1, "channel"), torch.float32)


def test_patch_cka_single_patch(triton_device):
    """P = 1: the centered Grams and gradients are exactly zero."""
    f_s, f_t = _patch_inputs((2, 3, 4, 4), triton_device)
    stats, k_s, _ = kernels.patch_cka_forward(f_s, f_t, 4, 4, "channel", True)
    assert k_s.shape == (3, 1, 1) and not k_s.any() and not stats.any()
    g_s, _ = kernels.patch_cka_backward(torch.ones(3, 1, 1, device=triton_device), k_s, f_s, f_t, 4, 4, "channel", True)
    assert not g_s.any()


def test_patch_cka_bad_input(triton_device):
    f = rand_input((1, 2, 24, 8), triton_device)
    with pytest.raises(ValueError, match="128"):
        kernels.patch_cka_forward(f, f, 1, 1, "channel", True)  # P = 192
    with pytest.raises(ValueError):
        kernels.patch_cka_forward(f, f, 5, 1, "channel", True)
    with pytest.raises(ValueError):
        kernels.patch_cka_forward(f, f, 2, 2, "mix", True)
    with pytest.raises(ValueError):
        kernels.patch_cka_forward(f, f[:, :1], 2, 2, "channel", True)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("split", [2, 3, 100])
def test_patch_cka_forward_split_over_features(triton_device, poisoned_empty, reduce, split):
    """The forward split into feature ranges (partial Grams + a fixed-order sum) is the unsplit result, every
    element written, Grams exactly symmetric; ``split`` larger than the chunk count is clamped."""
    f_s, f_t = _patch_inputs((2, 6, 8, 12), triton_device, offset=5.0)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, 2, 4, reduce, True, block_d=16, split=split)
    st_ref, ks_ref, kt_ref, _, _ = ref_patch(f_s, f_t, 2, 4, reduce, True)
    for got in (stats, k_s, k_t):
        assert not got.isnan().any()
    assert_close_scaled(k_s, ks_ref, torch.float32)
    assert_close_scaled(k_t, kt_ref, torch.float32)
    assert_close_scaled(stats, st_ref, torch.float32)
    assert torch.equal(k_s, k_s.transpose(1, 2)) and torch.equal(k_t, k_t.transpose(1, 2))
    one, _, _ = kernels.patch_cka_forward(f_s, f_t, 2, 4, reduce, True, block_d=16, split=1)
    assert_close_scaled(stats, one.double(), torch.float32)


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["student-only", "teacher-only"])
@pytest.mark.parametrize("reduce", REDUCES)
def test_patch_cka_backward_computes_only_needed(triton_device, poisoned_empty, monkeypatch, reduce, need):
    """An unneeded gradient is an empty tensor, its coefficients are never read (NaN here), and the grid has
    programs for the needed tensor only."""
    need_s, need_t = need
    f_s, f_t = _patch_inputs((2, 3, 8, 12), triton_device)
    _, _, _, xs, xt = ref_patch(f_s, f_t, 2, 4, reduce, True)
    G, P, _ = xs.shape
    m = rand_input((G, P, P), triton_device)
    poison = torch.full((G, P, P), float("nan"), device=triton_device)
    grids = []
    real_launch = _launch.launch

    def spy(kernel, grid, *args, **meta):
        grids.append(tuple(grid))
        return real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(kernels.patch_alignment_stats_backward, "launch", spy)
    g_s, g_t = kernels.patch_cka_backward(
        m if need_s else poison, m if need_t else poison, f_s, f_t, 2, 4, reduce, True, need_s=need_s, need_t=need_t
    )
    assert len(grids) == 1 and grids[0][1] == 1
    got, unneeded, x, src = (g_s, g_t, xs, f_s) if need_s else (g_t, g_s, xt, f_t)
    assert unneeded.shape == (0,)
    assert got.shape == src.shape and not got.isnan().any()
    assert_close_scaled(got, from_problem_matrices(m.double() @ x, src.shape, 2, 4, reduce), torch.float32)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_patch_cka_every_launch_candidate(triton_device, monkeypatch, which):
    """Every candidate configuration (on a GPU the autotuner may pick any) computes the same result."""
    table = pc.FWD_CONFIGS if which == "forward" else pcb.BWD_CONFIGS
    shapes = {16: ((1, 3, 8, 12), (2, 4)), 32: ((1, 2, 8, 16), (2, 2)), 64: ((1, 2, 16, 16), (2, 2)),
              128: ((1, 2, 16, 8), (1, 1))}  # fmt: skip
    assert set(table) == set(shapes)
    for p_pad, configs in table.items():
        shape, (ph, pw) = shapes[p_pad]
        f_s, f_t = _patch_inputs(shape, triton_device, offset=2.0)
        _, ks_ref, _, xs, _ = ref_patch(f_s, f_t, ph, pw, "channel", True)
        G, P, _ = ks_ref.shape
        assert pc.padded_patches(P) == p_pad
        m = rand_input((G, P, P), triton_device)
        for config in configs:
            monkeypatch.setitem(table, p_pad, [config])
            if which == "forward":
                _, k_s, _ = kernels.patch_cka_forward(f_s, f_t, ph, pw, "channel", True)
                assert_close_scaled(k_s, ks_ref, torch.float32)
            else:
                g_s, _ = kernels.patch_cka_backward(m, m, f_s, f_t, ph, pw, "channel", True, need_t=False)
                assert_close_scaled(
                    g_s, from_problem_matrices(m.double() @ xs, shape, ph, pw, "channel"), torch.float32
                )


@pytest.mark.parametrize(
    "shape,patch,reduce",
    [
        ((1, 65536, 32, 32), (8, 8), "batch"),  # D = 4,194,304 features: 131,072 backward column blocks
        ((70000, 4, 16, 16), (2, 2), "batch"),  # G = 70,000 problems
        ((2, 256, 96, 160), (16, 16), "batch"),  # the FPN bench shape: 2 wide problems
        ((4, 70000, 16, 16), (2, 2), "channel"),
    ],
    ids=["D4M", "G70k", "fpn-batch", "C70k"],
)
def test_patch_cka_grids_within_cuda_limits(monkeypatch, shape, patch, reduce):
    """Every launch of huge problems stays inside CUDA's grid limits (meta tensors: nothing is allocated or
    run), and the batch-reduce FPN forward is split over enough programs to fill an H200 (132 SMs)."""
    monkeypatch.setattr(pc, "num_sms", lambda device: 132)
    launches = []
    f = torch.empty(shape, device="meta")
    G, P, _ = _ref_shape(shape, patch, reduce)
    m = torch.empty((G, P, P), device="meta")
    with _launch.recording(lambda kernel, grid, args, meta: launches.append((kernel.__name__, grid))):
        kernels.patch_cka_forward(f, f, *patch, reduce, True)
        kernels.patch_cka_backward(m, m, f, f, *patch, reduce, True)
    assert launches
    for name, grid in launches:
        assert all(size <= limit for size, limit in zip(grid, _launch.GRID_LIMITS, strict=False)), (name, grid)
    partial = [grid for name, grid in launches if name == "_patch_gram_partial_kernel"]
    assert partial and all(grid[0] * grid[1] >= 132 for grid in partial)


def _ref_shape(shape, patch, reduce):
    B, C, H, W = shape
    ph, pw = patch
    P = (H // ph) * (W // pw)
    return {"channel": (C, P, B * ph * pw), "batch": (B, P, C * ph * pw), "spatial": (ph * pw, P, B * C)}[reduce]


# ---------------------------------------------------------------------------------------------------
# large shapes (GPU only)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patch_cka_fpn_gpu(triton_device, reduce, dtype):
    shape, ph, pw = (2, 256, 96, 160), 16, 16
    f_s = rand_input(shape, triton_device, dtype, offset=2.0).to(memory_format=torch.channels_last)
    f_t = rand_input(shape, triton_device, dtype)
    stats, k_s, k_t = kernels.patch_cka_forward(f_s, f_t, ph, pw, reduce, True)
    st_ref, ks_ref, kt_ref, xs, xt = ref_patch(f_s, f_t, ph, pw, reduce, True)
    assert_close_scaled(k_s, ks_ref, dtype)
    assert_close_scaled(stats, st_ref, dtype)
    G, P, _ = ks_ref.shape
    m = rand_input((G, P, P), triton_device)
    g_s, g_t = kernels.patch_cka_backward(m, m, f_s, f_t, ph, pw, reduce, True)
    assert_close_scaled(g_s, from_problem_matrices(m.double() @ xs, shape, ph, pw, reduce), dtype)
    assert_close_scaled(g_t, from_problem_matrices(m.double() @ xt, shape, ph, pw, reduce), dtype)
