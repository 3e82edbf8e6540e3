"""Tests of the Triton Frobenius-sum kernel (``ckakd.kernels.frobenius``) against float64 formulas.

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
    assert_close_scaled,
    launch_metas,
    rand_input,
    record_launches,
    ref_dots,
    ref_gram,
    sum_f64,
)

kernels = require_kernels()
frobenius_mod = importlib.import_module("ckakd.kernels.frobenius")


@pytest.mark.parametrize("num_blocks", [None, 3])
@pytest.mark.parametrize("shape", [(1, 7, 7), (2, 33, 33), (1, 1, 1), (3, 70, 70)], ids=lambda s: str(s[1]))
def test_frobenius_dots(triton_device, poisoned_empty, shape, num_blocks):
    k = rand_input(shape, triton_device)
    l = rand_input(shape, triton_device) + 0.5 * k
    out = kernels.frobenius_dots(k, l, num_blocks=num_blocks)
    assert out.shape == (shape[0], 3) and out.dtype == torch.float32
    assert_close_scaled(out, ref_dots(k, l), torch.float32)


def test_frobenius_dots_of_grams(triton_device):
    """The CKA of two centered Grams from the kernels matches float64 CKA."""
    x = rand_input((2, 33, 130), triton_device, offset=1000.0)
    y = x + rand_input((2, 33, 130), triton_device)
    k, _ = kernels.gram_forward(x, True)
    l, _ = kernels.gram_forward(y, True)
    s = kernels.frobenius_dots(k, l).double().cpu()
    kr, _ = ref_gram(x, True)
    lr, _ = ref_gram(y, True)
    sr = ref_dots(kr, lr).cpu()
    cka = s[:, 0] / (s[:, 1] * s[:, 2]).sqrt()
    cka_ref = sr[:, 0] / (sr[:, 1] * sr[:, 2]).sqrt()
    torch.testing.assert_close(cka, cka_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("index", range(len(frobenius_mod.FROBENIUS_CONFIGS)))
def test_frobenius_dots_each_candidate(triton_device, poisoned_empty, monkeypatch, index):
    config = frobenius_mod.FROBENIUS_CONFIGS[index]
    monkeypatch.setattr(frobenius_mod, "FROBENIUS_CONFIGS", [config])
    k = rand_input((3, 90, 90), triton_device)
    l = rand_input((3, 90, 90), triton_device) + 0.5 * k
    for num_blocks in (None, 2):
        (meta,) = launch_metas(
            record_launches(lambda nb=num_blocks: kernels.frobenius_dots(k, l, num_blocks=nb)), "_frobenius_dots_kernel"
        )
        assert config.items() <= meta.items()
        assert_close_scaled(kernels.frobenius_dots(k, l, num_blocks=num_blocks), ref_dots(k, l), torch.float32)


@pytest.mark.gpu
def test_frobenius_dots_past_int32_gpu(triton_device, monkeypatch):
    """n² = 2,147,488,281 > 2³¹ − 1 elements walked by a single program (num_blocks=1)."""
    monkeypatch.setenv("CKAKD_AUTOTUNE", "0")
    n = 46341
    k = torch.randn((1, n, n), device=triton_device)
    l = torch.randn((1, n, n), device=triton_device).add_(k, alpha=0.5)
    out = kernels.frobenius_dots(k, l, num_blocks=1)[0].double().cpu()
    kl, kk, ll = sum_f64(k[0], l[0]), sum_f64(k[0], k[0]), sum_f64(l[0], l[0])
    scale = (kk * ll) ** 0.5
    assert (out - torch.tensor([kl, kk, ll], dtype=torch.float64)).abs().max().item() <= 1e-3 * scale
