"""Test configuration.

Without CUDA the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set before
triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by pytest itself
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances (atol, rtol) per dtype, DESIGN §5.
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


@pytest.fixture
def triton_device() -> str:
    """Device on which the Triton path runs: CUDA when present, otherwise the CPU interpreter."""
    if not triton_usable():
        pytest.skip("triton is not installed")
    return "cuda" if HAS_CUDA else "cpu"


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
