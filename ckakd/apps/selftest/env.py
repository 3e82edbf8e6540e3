"""The machine the self-test runs on: the CUDA rule, the Triton interpreter switch, the versions it reports and a
scoped environment for one check."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator

import torch

from ckakd import __version__, _ext

__all__ = ["ASSUME_CUDA_ENV", "cuda_rules", "environment", "flag", "prepare_environment", "versions"]

ASSUME_CUDA_ENV = "CKAKD_SELFTEST_ASSUME_CUDA"


def flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other than empty or ``0``."""
    return os.environ.get(name, "0") not in ("", "0")


def cuda_rules() -> bool:
    """Whether this machine is held to the CUDA rule (a CUDA device, or ``CKAKD_SELFTEST_ASSUME_CUDA=1``)."""
    return torch.cuda.is_available() or flag(ASSUME_CUDA_ENV)


def prepare_environment() -> str:
    """Enable the Triton interpreter when no CUDA device is visible; must run before triton is imported.

    Returns a sentence saying what was done, for the report.
    """
    if "TRITON_INTERPRET" in os.environ:
        return f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} (set by the caller)"
    if torch.cuda.is_available():
        return "CUDA device present: Triton compiles for the GPU"
    if "triton" in sys.modules:
        return (
            "triton was imported before the self-test could enable its CPU interpreter: Triton is not checked "
            "(run with TRITON_INTERPRET=1)"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return "no CUDA device: set TRITON_INTERPRET=1 so that the Triton kernels run under the CPU interpreter"


def versions() -> dict[str, object]:
    """Python, torch (+ CUDA), triton, GPU and extension versions."""
    out: dict[str, object] = {
        "ckakd": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # ImportError or a broken install
        out["triton"] = f"not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        out["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(i)),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    else:
        out["gpus"] = []
    loaded, detail = _ext.status()
    out["extension"] = {"loaded": loaded, "detail": detail}
    out["env"] = {k: os.environ[k] for k in ("TRITON_INTERPRET", "CKAKD_AUTOTUNE", ASSUME_CUDA_ENV) if k in os.environ}
    return out


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, restoring the previous values (or absence) afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
