"""``ckakd::centered_gram`` (through ``ckakd.centered_gram`` and the Gram primitive of its torch path) vs the
float64 reference, on both backends (Triton under the interpreter)."""

from __future__ import annotations

import pytest
import torch

import ckakd
from ckakd import reference as R
from ckakd.ops import _gram_primitives
from tests import kernel_helpers
from tests.kernel_helpers import assert_close_tol, rand_features, weighted_grads

backend_device = kernel_helpers.backend_device  # the (backend, device) fixture


@pytest.mark.parametrize("shape", [(8, 16), (13, 37)])
def test_centered_gram_forward_and_grad(backend_device, shape):
    backend, device = backend_device
    x = rand_features(*shape, device=device)
    out, (gx,), w = weighted_grads(lambda a: ckakd.centered_gram(a, backend=backend), x)
    leaf = x.double().cpu().requires_grad_(True)
    ref = R.centered_gram(leaf)
    (ref * w.double().cpu()).sum().backward()
    assert_close_tol(out, ref, torch.float32, scale=ref.abs().max().item())
    assert_close_tol(gx, leaf.grad, torch.float32, scale=leaf.grad.abs().max().item())
    kb = ckakd.centered_gram(x.unsqueeze(0).repeat(2, 1, 1), backend=backend)
    assert kb.shape == (2, shape[0], shape[0])
    assert_close_tol(kb[1], ref, torch.float32, scale=ref.abs().max().item())


@pytest.mark.parametrize("batch", [None, 3], ids=["single", "batched"])
def test_torch_path_centered_gram_is_fp32_exact_at_a_large_offset(batch):
    """Features with mean 1000: the torch path subtracts row 0 before the mean (a rounded fp32 mean is off by
    ~3e-5 and shifted every centered value: 2e-5 of the Gram's scale before), so the Gram keeps fp32 accuracy."""
    shape = (64, 300) if batch is None else (batch, 64, 300)
    x = (torch.randn(shape, dtype=torch.float64) + 1000.0).float()
    x3 = x if batch else x[None]
    k, mean = _gram_primitives.gram(x3, True, "torch")
    ref = torch.stack([R.centered_gram(t.double()) for t in x3])
    assert ((k.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6
    torch.testing.assert_close(mean.double(), x3.double().mean(1), atol=1e-4, rtol=0)
