"""The launch point of every Triton kernel (``ckakd.kernels._launch``): grid limits, device guard, candidate
choice and recording. No kernel runs here: fake kernels record what they were given."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.conftest import require_kernels

require_kernels()
from ckakd.kernels import _launch  # noqa: E402


class FakeKernel:
    __name__ = "fake_kernel"

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((grid, args, meta))


def test_grid_limits_are_enforced():
    _launch.check_grid("k", (2**31 - 1, 65535, 65535))
    with pytest.raises(ValueError, match=r"k: grid axis 1 would have 65536 programs"):
        _launch.check_grid("k", (1, 65536))
    with pytest.raises(ValueError, match=r"grid axis 0 would have 2147483648"):
        _launch.check_grid("k", (2**31,))
    kernel = FakeKernel()
    with pytest.raises(ValueError, match="fake_kernel: grid axis 2"):
        _launch.launch(kernel, (1, 1, 70000), device=torch.device("cpu"))
    assert kernel.calls == []


def test_launch_runs_inside_the_device_guard_of_its_tensors(monkeypatch):
    """A launch for tensors on cuda:1 makes cuda:1 current around the kernel call (a CUDA launch on another
    device than the current one would hit an illegal address)."""
    events = []

    @contextlib.contextmanager
    def guard(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    kernel = FakeKernel()
    real_getitem = FakeKernel.__getitem__

    def getitem(self, grid):
        run = real_getitem(self, grid)
        return lambda *a, **m: (events.append(("run", grid)), run(*a, **m))

    monkeypatch.setattr(FakeKernel, "__getitem__", getitem)
    monkeypatch.setattr(_launch, "device_guard", guard)
    dev = torch.device("cuda", 1)
    _launch.launch(kernel, (3, 2), "x", 7, device=dev, BLOCK=16, num_warps=4)
    assert events == [("enter", dev), ("run", (3, 2)), ("exit", dev)]
    assert kernel.calls == [((3, 2), ("x", 7), {"BLOCK": 16, "num_warps": 4})]


def test_device_guard_targets_the_tensor_device():
    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_empty_grid_launches_nothing():
    kernel = FakeKernel()
    _launch.launch(kernel, (0, 4), device=torch.device("cpu"))
    assert kernel.calls == []


def test_choose_uses_the_first_candidate_off_gpu_and_records_all():
    ran = []
    candidates = [{"B": 16, "num_warps": 4}, {"B": 32, "num_warps": 8}]
    chosen = _launch.choose("op", ("k",), candidates, ran.append, torch.device("cpu"))
    assert chosen == candidates[0] and ran == [candidates[0]]
    ran.clear()
    recorded = []
    with _launch.recording(lambda *a: recorded.append(a)):
        _launch.choose("op", ("k",), candidates, ran.append, torch.device("cpu"))
        _launch.launch(FakeKernel(), (5,), 1, device=torch.device("cpu"), B=16)
    assert ran == candidates  # the compile report sees every candidate
    assert len(recorded) == 1 and recorded[0][1] == (5,) and recorded[0][3] == {"B": 16}
    with pytest.raises(ValueError, match="no launch configuration"):
        _launch.choose("op", ("k",), [], ran.append, torch.device("cpu"))


def test_choose_autotunes_on_gpu_once_per_key(monkeypatch):
    """On a GPU each candidate is timed once per key and the fastest is kept; CKAKD_AUTOTUNE=0 and graph
    capture use the first candidate."""
    import triton.testing

    cost = {16: 3.0, 32: 1.0, 64: 2.0}
    timed = []

    def do_bench(fn, warmup, rep):
        fn()
        timed.append(ran[-1]["B"])
        return cost[ran[-1]["B"]]

    monkeypatch.delenv("CKAKD_AUTOTUNE", raising=False)  # autotuning is on unless the environment turns it off
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(_launch, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_launch, "_tuned", {})
    ran = []
    candidates = [{"B": b} for b in (16, 32, 64)]
    dev = torch.device("cuda", 0)
    assert _launch.choose("op", ("k1",), candidates, ran.append, dev) == {"B": 32}
    assert timed == [16, 32, 64] and ran[-1] == {"B": 32}
    timed.clear()
    assert _launch.choose("op", ("k1",), candidates, ran.append, dev) == {"B": 32}
    assert timed == []  # cached
    monkeypatch.setenv("CKAKD_AUTOTUNE", "0")
    assert _launch.choose("op", ("k2",), candidates, ran.append, dev) == {"B": 16}
    monkeypatch.delenv("CKAKD_AUTOTUNE")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _launch.choose("op", ("k3",), candidates, ran.append, dev) == {"B": 16} and timed == []
