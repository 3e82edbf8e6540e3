"""Tests of the Triton Gram kernels (``ckakd.kernels.gram``, ``.gram_backward``; the tests that drive every
launcher at once too) against float64 formulas.

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
    launch_metas,
    rand_input,
    record_launches,
    ref_dots,
    ref_gram,
    ref_gram_backward,
    rel_err,
    sum_f64,
    table_ids,
)

kernels = require_kernels()
gram_mod = importlib.import_module("ckakd.kernels.gram")
gram_backward_mod = importlib.import_module("ckakd.kernels.gram_backward")
column_mean_mod = importlib.import_module("ckakd.kernels.column_mean")
frobenius_mod = importlib.import_module("ckakd.kernels.frobenius")
_launch = importlib.import_module("ckakd.kernels._launch")

# ---------------------------------------------------------------------------------------------------
# gram_forward
# ---------------------------------------------------------------------------------------------------

GRAM_SHAPES = [(1, 7, 37), (2, 33, 130), (2, 16, 64), (1, 1, 5), (1, 2, 19)]


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_forward_fp32(triton_device, shape, center):
    x = rand_input(shape, triton_device)
    k, mean = kernels.gram_forward(x, center)
    k_ref, mean_ref = ref_gram(x, center)
    assert k.shape == (shape[0], shape[1], shape[1]) and k.dtype == torch.float32
    assert mean.shape == (shape[0], shape[2]) and mean.dtype == torch.float32
    assert_close_scaled(k, k_ref, torch.float32)
    assert_close_scaled(mean, mean_ref if center else torch.zeros_like(mean_ref), torch.float32)
    assert torch.equal(k, k.transpose(1, 2))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("center", [True, False])
def test_gram_forward_low_precision(triton_device, dtype, center):
    x = rand_input((2, 33, 130), triton_device, dtype)
    k, mean = kernels.gram_forward(x, center)
    k_ref, mean_ref = ref_gram(x, center)
    assert_close_scaled(k, k_ref, dtype)
    if center:
        assert_close_scaled(mean, mean_ref, dtype)


@pytest.mark.parametrize("shape", [(2, 33, 130), (1, 70, 300)], ids=lambda s: "x".join(map(str, s)))
def test_gram_forward_large_offset(triton_device, shape):
    """Mean 1000, std 1 in fp32: centering the features in-kernel keeps the Gram at fp32 accuracy."""
    x = rand_input(shape, triton_device, offset=1000.0)
    k, _ = kernels.gram_forward(x, True)
    k_ref, _ = ref_gram(x, True)
    assert rel_err(k, k_ref) < 2e-6
    assert_close_scaled(k, k_ref, torch.float32)


@pytest.mark.parametrize(
    "shape,split_k",
    [((2, 70, 300), 3), ((1, 130, 200), 2), ((1, 300, 20), 1), ((2, 50, 700), 3)],
    ids=["split3-3tiles", "split2-6tiles", "15tiles", "split3-1tile"],
)
def test_gram_forward_tiles_and_split(triton_device, poisoned_empty, shape, split_k):
    """Several upper-triangle tiles (mirrored), split-K reductions, and the single-tile path whose
    programs also write the column means of their d-range; every element written."""
    x = rand_input(shape, triton_device, offset=3.0)
    k, mean = kernels.gram_forward(x, True, split_k=split_k)
    k_ref, mean_ref = ref_gram(x, True)
    assert not k.isnan().any() and not mean.isnan().any()
    assert_close_scaled(k, k_ref, torch.float32)
    assert_close_scaled(mean, mean_ref, torch.float32)
    assert torch.equal(k, k.transpose(1, 2))


def test_gram_forward_poison_uncentered(triton_device, poisoned_empty):
    x = rand_input((2, 7, 37), triton_device)
    k, mean = kernels.gram_forward(x, False)
    assert not k.isnan().any()
    assert torch.equal(mean, torch.zeros_like(mean))
    assert_close_scaled(k, ref_gram(x, False)[0], torch.float32)


def test_gram_forward_non_contiguous(triton_device):
    base = rand_input((2, 130, 33), triton_device, offset=10.0)
    for x in (base.transpose(1, 2), rand_input((2, 33, 260), triton_device)[:, :, ::2]):
        assert not x.is_contiguous()
        k, mean = kernels.gram_forward(x, True)
        k_ref, mean_ref = ref_gram(x, True)
        assert_close_scaled(k, k_ref, torch.float32)
        assert_close_scaled(mean, mean_ref, torch.float32)


def test_float64_input_computes_in_fp32(triton_device):
    x = rand_input((2, 33, 130), triton_device, torch.float64)
    k, mean = kernels.gram_forward(x, True)
    assert k.dtype == mean.dtype == torch.float32
    k_ref, mean_ref = ref_gram(x, True)
    assert_close_scaled(k, k_ref, torch.float32)
    assert_close_scaled(mean, mean_ref, torch.float32)
    m = rand_input((2, 33, 33), triton_device, torch.float64)
    out = kernels.gram_backward(m, x, mean, True)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert_close_scaled(out, m @ (x - mean.double()[:, None]), torch.float32)


def test_gram_forward_bad_input(triton_device):
    with pytest.raises(ValueError):
        kernels.gram_forward(rand_input((7, 5), triton_device), True)


# ---------------------------------------------------------------------------------------------------
# gram_backward
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_backward_fp32(triton_device, shape, center):
    b, n, d = shape
    x = rand_input(shape, triton_device)
    m = rand_input((b, n, n), triton_device)
    mean = x.mean(dim=1)
    out = kernels.gram_backward(m, x, mean, center)
    assert out.shape == shape and out.dtype == x.dtype and out.is_contiguous()
    assert_close_scaled(out, ref_gram_backward(m, x, mean, center), torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_gram_backward_low_precision(triton_device, dtype):
    x = rand_input((2, 33, 130), triton_device, dtype)
    m = rand_input((2, 33, 33), triton_device)
    _, mean = kernels.gram_forward(x, True)
    out = kernels.gram_backward(m, x, mean, True)
    assert out.dtype == dtype
    assert_close_scaled(out, ref_gram_backward(m, x, mean, True), dtype)


def test_gram_backward_large_offset_non_contiguous(triton_device, poisoned_empty):
    """Offset 1000 and transposed (non-contiguous) m and x; n > 128 gives several row blocks."""
    x = rand_input((2, 300, 150), triton_device, offset=1000.0).transpose(1, 2)  # (2, 150, 300)
    m = rand_input((2, 150, 150), triton_device).transpose(1, 2)
    _, mean = kernels.gram_forward(x, True)
    out = kernels.gram_backward(m, x, mean, True)
    assert not out.isnan().any()
    assert_close_scaled(out, ref_gram_backward(m, x, mean, True), torch.float32)


def test_gram_backward_bad_input(triton_device):
    x = rand_input((1, 7, 5), triton_device)
    with pytest.raises(ValueError):
        kernels.gram_backward(rand_input((1, 6, 6), triton_device), x, x.mean(1), True)


# ---------------------------------------------------------------------------------------------------
# launch candidates: every entry of every table runs under the interpreter
# ---------------------------------------------------------------------------------------------------


# one shape per bucket of GRAM_CONFIGS / GRAM_BWD_CONFIGS (128: n > 128, so BLOCK_N = 128 applies too)
_BUCKET_ROWS = {16: 11, 32: 27, 64: 50, 128: 150}


@pytest.mark.parametrize("bucket,index", table_ids(gram_mod.GRAM_CONFIGS), ids=lambda v: str(v))
def test_gram_forward_each_candidate(triton_device, poisoned_empty, monkeypatch, bucket, index):
    """Each forward candidate, forced as the only one, computes the centered (offset 1000, split-K) and
    plain Gram; the recorded launch shows the candidate really ran."""
    config = gram_mod.GRAM_CONFIGS[bucket][index]
    monkeypatch.setitem(gram_mod.GRAM_CONFIGS, bucket, [config])
    x = rand_input((2, _BUCKET_ROWS[bucket], 90), triton_device, offset=1000.0)
    (meta,) = launch_metas(record_launches(lambda: kernels.gram_forward(x, True, split_k=2)), "_gram_kernel")
    assert config.items() <= meta.items()
    k, mean = kernels.gram_forward(x, True, split_k=2)
    k_ref, mean_ref = ref_gram(x, True)
    assert rel_err(k, k_ref) < 2e-6
    assert_close_scaled(mean, mean_ref, torch.float32)
    assert torch.equal(k, k.transpose(1, 2))
    y = x - 1000.0
    k, mean = kernels.gram_forward(y, False)
    assert_close_scaled(k, ref_gram(y, False)[0], torch.float32)
    assert torch.equal(mean, torch.zeros_like(mean))


@pytest.mark.parametrize("bucket,index", table_ids(gram_backward_mod.GRAM_BWD_CONFIGS), ids=lambda v: str(v))
def test_gram_backward_each_candidate(triton_device, poisoned_empty, monkeypatch, bucket, index):
    """Each backward candidate, forced: several row blocks (n = 150) and column blocks (d = 150)."""
    config = gram_backward_mod.GRAM_BWD_CONFIGS[bucket][index]
    monkeypatch.setitem(gram_backward_mod.GRAM_BWD_CONFIGS, bucket, [config])
    n = _BUCKET_ROWS[bucket]
    x = rand_input((2, n, 150), triton_device, offset=10.0)
    m = rand_input((2, n, n), triton_device)
    mean = x.mean(dim=1)
    for center in (True, False):
        (meta,) = launch_metas(
            record_launches(lambda c=center: kernels.gram_backward(m, x, mean, c)), "_gram_backward_kernel"
        )
        assert config.items() <= meta.items()
        out = kernels.gram_backward(m, x, mean, center)
        assert_close_scaled(out, ref_gram_backward(m, x, mean, center), torch.float32)


# ---------------------------------------------------------------------------------------------------
# column-mean row splits, batch decoding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,row_split,expected",
    [((2, 70, 300), 2, 2), ((2, 70, 300), 5, 3), ((3, 130, 37), 3, 3), ((3, 130, 37), 5, 5), ((1, 97, 20), 4, 4)],
    ids=["70rows-2", "70rows-5clamped", "130rows-3", "130rows-5", "97rows-4"],
)
def test_gram_forward_row_split_large_offset(triton_device, poisoned_empty, shape, row_split, expected):
    """The column means from several row ranges (partials summed by the second stage) keep the Gram at
    fp32 accuracy for offset-1000 features; odd n and d; ``row_split`` is capped at the 32-row chunks."""
    x = rand_input(shape, triton_device, offset=1000.0)
    launches = record_launches(lambda: kernels.gram_forward(x, True, row_split=row_split))
    grids = [g for name, g, _, _ in launches if name == "_column_mean_kernel"]  # one per candidate
    assert grids[0][1] == expected  # the first candidate (32-row chunks) is the one that runs here
    k, mean = kernels.gram_forward(x, True, row_split=row_split)
    k_ref, mean_ref = ref_gram(x, True)
    assert rel_err(k, k_ref) < 2e-6
    assert_close_scaled(k, k_ref, torch.float32)
    assert_close_scaled(mean, mean_ref, torch.float32)


def _batch_of_scales(shape, device) -> torch.Tensor:
    """Entries with different offsets and scales, so that reading another entry's data shows."""
    b = shape[0]
    scale = torch.arange(1, b + 1, dtype=torch.float64).view(b, 1, 1)
    return (rand_input(shape, "cpu").double() * scale + 10.0 * scale).float().to(device)


def test_batch_folded_into_grid_axis0(triton_device, poisoned_empty):
    """b = 5 in every launcher: the batch index is decoded from grid axis 0 (with tiles, splits, row
    and column blocks alongside)."""
    for shape, split_k, row_split in (((5, 70, 90), 2, 2), ((5, 20, 90), 2, None), ((5, 150, 40), None, 3)):
        x = _batch_of_scales(shape, triton_device)
        k, mean = kernels.gram_forward(x, True, split_k=split_k, row_split=row_split)
        k_ref, mean_ref = ref_gram(x, True)
        assert_close_scaled(k, k_ref, torch.float32)
        assert_close_scaled(mean, mean_ref, torch.float32)
    x = _batch_of_scales((5, 150, 40), triton_device)
    m = _batch_of_scales((5, 150, 150), triton_device)
    mean = x.mean(dim=1)
    assert_close_scaled(kernels.gram_backward(m, x, mean, True), ref_gram_backward(m, x, mean, True), torch.float32)
    k = _batch_of_scales((5, 40, 40), triton_device)
    assert_close_scaled(kernels.frobenius_dots(k, k.flip(0), num_blocks=2), ref_dots(k, k.flip(0)), torch.float32)


# ---------------------------------------------------------------------------------------------------
# grid limits and 64-bit extents: launchers driven with meta tensors (nothing is allocated or run)
# ---------------------------------------------------------------------------------------------------

_BIG = 2**31 + 100  # more elements than an int32 offset can address
HUGE_LAUNCHES = [
    ("forward", (131072, 8, 16), {}),  # b over 65,535 (was grid axis 2)
    ("forward", (70000, 100, 64), {}),  # the column-mean grid's axis 1 and the Gram's axis 2 were b
    ("forward", (1, 100000, 64), {}),  # 1.2 million upper-triangle tiles
    ("forward", (2, 3, _BIG), {}),  # d past 2**31
    ("forward", (1, 4096, _BIG), {"split_k": 10**9, "row_split": 10**9}),  # forced splits, clamped
    ("forward", (1, 20000, 1024), {"split_k": 8}),  # split offsets s * n² past 2**31
    ("backward", (131072, 16, 16), {}),
    ("backward", (70000, 200, 300), {}),
    ("backward", (1, 2, _BIG), {}),
    ("dots", (131072, 16, 16), {}),
    ("dots", (1, 50000, 50000), {"num_blocks": 1}),  # n² past 2**31 in one program
    ("dots", (1, 50000, 50000), {"num_blocks": 10**12}),
]


def _launch_huge(kind: str, shape, kwargs) -> None:
    b, n, d = shape
    if kind == "forward":
        x = torch.empty(shape, device="meta")
        kernels.gram_forward(x, True, **kwargs)
        kernels.gram_forward(x, False, **kwargs)
    elif kind == "backward":
        x = torch.empty(shape, device="meta")
        m = torch.empty((b, n, n), device="meta")
        kernels.gram_backward(m, x, torch.empty((b, d), device="meta"), True)
    else:
        k = torch.empty((b, n, n), device="meta")
        kernels.frobenius_dots(k, k, **kwargs)


def _check_coverage(name: str, grid, args, meta, shape) -> None:
    """The launch arguments cover the whole problem with no empty program ranges (Python ints: no wrap)."""
    b, n, d = shape
    if name == "_gram_kernel":
        tiles, k_per_split, numel = args[6], args[7], args[11]
        nt = -(-n // meta["BLOCK_N"])
        assert tiles == nt * (nt + 1) // 2 and grid[0] == b * tiles and numel == b * n * n
        assert (grid[1] - 1) * k_per_split < d <= grid[1] * k_per_split
    elif name == "_sum_splits_kernel":
        numel, n_split = args[2], args[3]
        assert numel == b * n * n and n_split > 1 and (grid[0] - 1) * meta["BLOCK"] < numel <= grid[0] * meta["BLOCK"]
    elif name == "_column_mean_kernel":
        n_col_blocks, rows_per_split = args[7], args[8]
        assert (
            grid[0] == b * n_col_blocks and (n_col_blocks - 1) * meta["BLOCK_D"] < d <= n_col_blocks * meta["BLOCK_D"]
        )
        assert (grid[1] - 1) * rows_per_split < n <= grid[1] * rows_per_split
    elif name == "_gram_backward_kernel":
        n_row_blocks, n_col_blocks = args[6], args[7]
        assert grid[0] == b * n_row_blocks * n_col_blocks
        assert n <= n_row_blocks * meta["BLOCK_M"] and d <= n_col_blocks * meta["BLOCK_D"]
    elif name == "_frobenius_dots_kernel":
        nn, blocks, per_block = args[3], args[4], args[5]
        assert nn == n * n and grid[0] == b * blocks
        assert (blocks - 1) * per_block * meta["BLOCK"] < nn <= blocks * per_block * meta["BLOCK"]


@pytest.mark.parametrize("sms", [1, 132], ids=["cpu", "h200-sms"])
@pytest.mark.parametrize(
    "kind,shape,kwargs", HUGE_LAUNCHES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None
)
def test_huge_shapes_launch_within_grid_limits(monkeypatch, kind, shape, kwargs, sms):
    """Every launch any of these shapes makes (every candidate, as ``choose`` offers all of them while
    recording) has a grid inside CUDA's limits and arguments that cover the problem; with the SM count of
    an H200 the split heuristics are active too."""
    monkeypatch.setattr(gram_mod, "num_sms", lambda device: sms)
    monkeypatch.setattr(column_mean_mod, "num_sms", lambda device: sms)
    monkeypatch.setattr(frobenius_mod, "num_sms", lambda device: sms)
    launches = record_launches(lambda: _launch_huge(kind, shape, kwargs))
    expected = {"forward": "_gram_kernel", "backward": "_gram_backward_kernel", "dots": "_frobenius_dots_kernel"}
    assert expected[kind] in {name for name, *_ in launches}
    for name, grid, args, meta in launches:
        assert 1 <= len(grid) <= 3
        assert all(1 <= g <= limit for g, limit in zip(grid, _launch.GRID_LIMITS, strict=False)), (name, grid)
        _check_coverage(name, grid, args, meta, shape)
    if kwargs.get("split_k") == 8:  # the case the GPU test runs for real: split offsets need 64 bits
        sums = [args for name, _, args, _ in launches if name == "_sum_splits_kernel"]
        assert sums and all((n_split - 1) * numel >= 2**31 for _, _, numel, n_split in sums)


# ---------------------------------------------------------------------------------------------------
# dot precision
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", gram_mod.PRECISIONS)
def test_precision_reaches_every_dot(triton_device, precision):
    """``precision=`` is the PRECISION constexpr of both dot kernels (the interpreter computes every
    precision as fp32, so the values are checked at fp32 tolerance here; the GPU test checks accuracy)."""
    x = rand_input((2, 70, 40), triton_device)
    m = rand_input((2, 70, 70), triton_device)
    mean = x.mean(dim=1)

    def both():
        kernels.gram_forward(x, True, split_k=2, precision=precision)
        kernels.gram_backward(m, x, mean, True, precision=precision)

    launches = record_launches(both)
    fwd, bwd = launch_metas(launches, "_gram_kernel"), launch_metas(launches, "_gram_backward_kernel")
    assert fwd and bwd and all(meta["PRECISION"] == precision for meta in fwd + bwd)
    k, mean = kernels.gram_forward(x, True, precision=precision)
    assert_close_scaled(k, ref_gram(x, True)[0], torch.float32)
    out = kernels.gram_backward(m, x, mean, True, precision=precision)
    assert_close_scaled(out, ref_gram_backward(m, x, mean, True), torch.float32)


def test_precision_rejects_unknown(triton_device):
    x = rand_input((1, 7, 5), triton_device)
    with pytest.raises(ValueError, match="precision"):
        kernels.gram_forward(x, True, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        kernels.gram_backward(rand_input((1, 7, 7), triton_device), x, x.mean(1), True, precision="TF32")


# ---------------------------------------------------------------------------------------------------
# large shapes (GPU only)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 256, 16384), (1, 64, 200704), (1, 64, 802816), (1, 4096, 512), (3, 100, 5000)])
def test_gram_large_gpu(triton_device, shape):
    x = rand_input(shape, triton_device, offset=1000.0)
    k, mean = kernels.gram_forward(x, True)
    k_ref, mean_ref = ref_gram(x, True)
    assert rel_err(k, k_ref) < 2e-6
    assert_close_scaled(k, k_ref, torch.float32)
    m = rand_input((shape[0], shape[1], shape[1]), triton_device)
    assert_close_scaled(kernels.gram_backward(m, x, mean, True), ref_gram_backward(m, x, mean, True), torch.float32)
    assert_close_scaled(kernels.frobenius_dots(k, m), ref_dots(k_ref, m), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(70000, 8, 16), (66000, 70, 24)], ids=["single-tile", "tiled"])
def test_batch_past_grid_axis_limit_gpu(triton_device, shape):
    """More than 65,535 problems in one launch (the batch was a grid axis limited to 65,535)."""
    x = rand_input(shape, triton_device, offset=3.0)
    k, mean = kernels.gram_forward(x, True)
    k_ref, mean_ref = ref_gram(x, True)
    assert_close_scaled(k, k_ref, torch.float32)
    assert_close_scaled(mean, mean_ref, torch.float32)
    m = rand_input(k.shape, triton_device)
    assert_close_scaled(kernels.gram_backward(m, x, mean, True), ref_gram_backward(m, x, mean, True), torch.float32)
    assert_close_scaled(kernels.frobenius_dots(k, m), ref_dots(k_ref, m), torch.float32)


@pytest.mark.gpu
def test_split_offsets_past_int32_gpu(triton_device, monkeypatch):
    """Split-K partials (8, 1, 20000, 20000): partial s starts s · 4e8 floats in, past 2³¹ for s >= 6,
    so the second stage must form those offsets in 64 bits (test_huge_shapes_launch_within_grid_limits
    checks on the CPU that this shape launches that split)."""
    monkeypatch.setenv("CKAKD_AUTOTUNE", "0")
    x = torch.randn((1, 20000, 1024), device=triton_device)
    k, _ = kernels.gram_forward(x, False, split_k=8)
    for rows in (slice(0, 64), slice(-64, None)):
        assert_close_scaled(k[0, rows], x[0, rows].double() @ x[0].double().T, torch.float32)


@pytest.mark.gpu
def test_feature_offsets_past_int32_gpu(triton_device, monkeypatch):
    """Two samples of d = 2³¹ + 64 features: the split-K d-ranges, the means the single-tile Gram writes
    and the backward's column blocks all address elements past 2³¹."""
    monkeypatch.setenv("CKAKD_AUTOTUNE", "0")
    d = 2**31 + 64
    x = torch.randn((1, 2, d), device=triton_device)
    k, _ = kernels.gram_forward(x, False)
    ref = [[sum_f64(x[0, i], x[0, j], rows=1 << 28) for j in range(2)] for i in range(2)]
    assert_close_scaled(k[0], torch.tensor(ref, dtype=torch.float64), torch.float32)
    k, mean = kernels.gram_forward(x, True)  # centered: [[a, -a], [-a, a]], a = Σ ((x0 - x1) / 2)²
    half = (x[0, 0] - x[0, 1]) * 0.5
    a = sum_f64(half, half, rows=1 << 28)
    assert_close_scaled(k[0], torch.tensor([[a, -a], [-a, a]], dtype=torch.float64), torch.float32)
    tail = slice(2**31 - 1024, None)  # the means written past 2³¹
    torch.testing.assert_close(mean[0, tail], (x[0, 0, tail] + x[0, 1, tail]) * 0.5, atol=1e-6, rtol=1e-6)
    del mean, half
    m = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]], device=triton_device)
    out = kernels.gram_backward(m, x, x[:, 0], False)
    assert torch.equal(out[0, 0], x[0, 0] * 2) and torch.equal(out[0, 1], x[0, 1] * 3)


@pytest.mark.gpu
def test_precision_accuracy_gpu(triton_device):
    """ieee is fp32-exact, tf32x3 close to it, tf32 measurably coarser (so the keyword reaches tl.dot)."""
    x = torch.randn((1, 256, 16384), device=triton_device)
    m = torch.randn((1, 256, 256), device=triton_device)
    k_ref, _ = ref_gram(x, True)
    err_k, err_g = {}, {}
    for precision in gram_mod.PRECISIONS:
        k, mean = kernels.gram_forward(x, True, precision=precision)
        err_k[precision] = rel_err(k, k_ref)
        g = kernels.gram_backward(m, x, mean, True, precision=precision)
        err_g[precision] = rel_err(g, ref_gram_backward(m, x, mean, True))
    assert err_k["ieee"] < 2e-6 and err_g["ieee"] < 2e-6
    assert err_k["tf32x3"] < 1e-5 and err_g["tf32x3"] < 1e-5
    assert err_g["tf32"] > 1e-5 and err_g["tf32"] > 10 * err_g["ieee"] and err_k["tf32"] < 1e-2


@pytest.mark.gpu
def test_split_paths_deterministic_gpu(triton_device):
    """Split-K and row-split reductions are two-stage in a fixed order: bitwise-equal reruns."""
    x = rand_input((2, 4096, 512), triton_device, offset=1000.0)
    k1, mean1 = kernels.gram_forward(x, True, split_k=4, row_split=8)
    k2, mean2 = kernels.gram_forward(x, True, split_k=4, row_split=8)
    assert torch.equal(k1, k2) and torch.equal(mean1, mean2)
    assert rel_err(k1, ref_gram(x, True)[0]) < 2e-6
