"""Backend choice and dispatch records of the ops (``ckakd.ops._backend``): what ran, what is refused,
``ckakd.backends()``."""

from __future__ import annotations

import pytest
import torch

import ckakd
from ckakd.ops import last_dispatch, track_dispatch


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    # import triton and the kernels first, under the interpreter setting of the run (conftest): kernels first
    # imported with TRITON_INTERPRET=0 would be compiled for a GPU for the rest of the process
    ckakd.backends()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        ckakd.cka(torch.randn(5, 3), torch.randn(5, 3), backend="triton")


def test_dispatch_record_names_the_backend_that_ran(triton_device):
    """``track_dispatch`` counts what ran, not what was asked: 'auto' on CPU tensors runs torch; float64 asked
    of Triton runs torch (the kernels compute in fp32); an explicit 'triton' runs the kernels."""
    x, y = torch.randn(9, 20, requires_grad=True), torch.randn(9, 30)
    with track_dispatch() as ran:
        ckakd.cka(x, y).backward()
    assert ran[("gram", "torch")] == 2 and ran[("gram_apply", "torch")] == 1 and not ran[("gram", "triton")]
    with track_dispatch() as ran:
        ckakd.cka(x.double(), y.double(), backend="triton")
    assert ran[("gram", "torch")] == 2 and not ran[("gram", "triton")]
    xt = x.detach().to(triton_device).requires_grad_(True)
    with track_dispatch() as ran:
        ckakd.cka(xt, y.to(triton_device), backend="triton").backward()
    assert ran == {("gram", "triton"): 2, ("frobenius_dots", "triton"): 1, ("gram_apply", "triton"): 1}
    assert last_dispatch("gram_apply") == "triton"
    with track_dispatch() as outer, track_dispatch() as inner:
        ckakd.cka(x, y)
    assert outer == inner and outer[("gram", "torch")] == 2


def test_backends_report():
    status = ckakd.backends()
    assert set(status) == {"torch", "triton", "cpp", "cuda"}
    assert status["torch"].active
    for s in status.values():
        assert s.detail and str(s).startswith(s.name)
