"""Test configuration.

Without CUDA the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set before
triton is first imported, so it is set here, at collection time.

On a CUDA machine a test run must not pass on the torch fallbacks: a missing Triton, ``ckakd.kernels`` or
C++/CUDA extension is a *failure* there (``require_kernels`` / ``require_extension`` raise at import, and
``tests/ops/test_fast_paths.py`` checks every backend), while on a CPU machine the same absence skips. The
environment variable ``CKAKD_TEST_ASSUME_CUDA=1`` makes this conftest treat the machine as a CUDA one, so that
the rule itself can be tested on a CPU (``test_fast_paths.py`` does, in a subprocess).
"""

from __future__ import annotations

import os


def _cuda_available() -> bool:
    if os.environ.get("CKAKD_TEST_ASSUME_CUDA", "0") not in ("", "0"):
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by pytest itself
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances (atol, rtol) per dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 5e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (5e-3, 5e-2),
}

HAS_CUDA = _cuda_available()


def triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def fast_path_problems() -> list[str]:
    """Why a fast path would not run on this CUDA machine (empty: Triton kernels and CUDA extension active)."""
    import ckakd

    status = ckakd.backends()
    return [f"{name}: {status[name].detail}" for name in ("triton", "cuda") if not status[name].active]


def require_kernels():
    """``ckakd.kernels`` for a test module: an import error fails the module on CUDA, skips it elsewhere."""
    if HAS_CUDA:
        import ckakd.kernels

        return ckakd.kernels
    return pytest.importorskip("ckakd.kernels")


def require_extension():
    """The loaded C++/CUDA extension: on CUDA a missing one (or one built without CUDA) fails the module."""
    from ckakd import _ext

    ext = _ext.load()
    if HAS_CUDA:
        if ext is None or not ext.has_cuda():
            raise ImportError(f"the C++/CUDA extension must be built with CUDA on a CUDA machine: {_ext.status()[1]}")
        return ext
    if ext is None:
        pytest.skip(f"the Sinkhorn extension is unavailable: {_ext.status()[1]}", allow_module_level=True)
    return ext


@pytest.fixture
def triton_device() -> str:
    """Device on which the Triton path runs: CUDA when present, otherwise the CPU interpreter."""
    if HAS_CUDA:
        return "cuda"  # no skip on a CUDA machine: a missing triton fails the test where it is used
    if not triton_usable():
        pytest.skip("triton is not installed")
    return "cpu"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make ``torch.empty`` return NaN-filled tensors, so that any element a kernel leaves unwritten
    shows up (integer scratch gets a huge value)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets: intra-op threads only add contention on a shared 2-core machine (measured ~6x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
