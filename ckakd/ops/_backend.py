"""Backend selection: one place decides which implementation an op runs.

``auto`` picks Triton for CUDA tensors when Triton imports, otherwise the pure-torch path. A forced
``backend="triton"`` on CPU tensors is allowed only under the Triton interpreter (``TRITON_INTERPRET=1``),
which is how the kernels are tested without a GPU.

Every primitive records which implementation actually ran (``record_dispatch``): ``track_dispatch()``
collects those records, so tests and ``ckakd selftest`` can assert that a fast path ran instead of
trusting the backend that was asked for (``auto`` on a machine without Triton silently means torch).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ckakd import _ext

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    active: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.name:<7} {'active' if self.active else 'inactive'}: {self.detail}"


_trackers: list[collections.Counter] = []
_last: dict[str, str] = {}


def record_dispatch(op: str, backend: str) -> None:
    """Note that primitive ``op`` ran on ``backend`` ('torch', 'triton', 'cpp', 'cuda')."""
    _last[op] = backend
    for counter in _trackers:
        counter[(op, backend)] += 1


@contextlib.contextmanager
def track_dispatch() -> Iterator[collections.Counter]:
    """Count the primitives that run inside the block, keyed ``(op, backend)``.

    >>> with track_dispatch() as ran:
    ...     ckakd.cka(x, y)
    >>> ran[("gram", "triton")]  # 2 on a GPU: both Grams came from the Triton kernel
    """
    counter: collections.Counter = collections.Counter()
    _trackers.append(counter)
    try:
        yield counter
    finally:
        _trackers.remove(counter)


def last_dispatch(op: str) -> str | None:
    """The backend the most recent call of primitive ``op`` ran on in this process (None: never ran)."""
    return _last.get(op)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_kernels() -> types.ModuleType:
    """The Triton kernels package ``ckakd.kernels``, imported on first use (it imports triton, an optional
    dependency): the one place the ops reach the kernels from."""
    import ckakd.kernels

    return ckakd.kernels


@functools.cache
def _triton_import() -> tuple[bool, str]:
    try:
        import triton

        triton_kernels()
    except Exception as exc:  # ImportError, or a broken triton install
        return False, f"cannot import triton / ckakd.kernels ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def triton_status() -> BackendStatus:
    ok, detail = _triton_import()
    if not ok:
        return BackendStatus("triton", False, detail)
    if torch.cuda.is_available():
        return BackendStatus("triton", True, f"{detail} on {torch.cuda.get_device_name()} (CUDA tensors)")
    if interpreter_enabled():
        return BackendStatus("triton", True, f"{detail} under the CPU interpreter (TRITON_INTERPRET=1)")
    return BackendStatus("triton", False, f"{detail} installed, but no CUDA device (and TRITON_INTERPRET unset)")


def extension_status() -> tuple[BackendStatus, BackendStatus]:
    """The C++ extension (batched Sinkhorn): prebuilt ``ckakd._C`` or a JIT build of ``csrc/`` (see ``_ext``)."""
    ext = _ext.load()
    loaded, detail = _ext.status(load_now=False)
    if ext is None:
        return BackendStatus("cpp", False, detail), BackendStatus("cuda", False, detail)
    cpp = BackendStatus("cpp", True, detail)
    if not ext.has_cuda():
        return cpp, BackendStatus("cuda", False, "the extension was built without CUDA")
    if not torch.cuda.is_available():
        return cpp, BackendStatus("cuda", False, "the extension has CUDA code but no CUDA device is visible")
    return cpp, BackendStatus("cuda", True, f"{detail}, CUDA kernels")


def backends() -> dict[str, BackendStatus]:
    """Which backends are active on this machine and, for inactive ones, why not."""
    torch_status = BackendStatus(
        "torch", True, f"torch {torch.__version__} (always available; used for CPU tensors by 'auto')"
    )
    cpp, cuda = extension_status()
    return {"torch": torch_status, "triton": triton_status(), "cpp": cpp, "cuda": cuda}


def resolve(backend: str, *tensors: torch.Tensor) -> str:
    """Turn ``backend`` ('auto' | 'torch' | 'triton') into the concrete backend for these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))} for this op; got {backend!r}")
    on_cuda = tensors[0].device.type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and _triton_import()[0] else "torch"
    if backend == "triton":
        ok, detail = _triton_import()
        if not ok:
            raise RuntimeError(f"backend='triton' requested but {detail}")
        if not on_cuda and not interpreter_enabled():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
                f"interpreter); got tensors on {tensors[0].device}"
            )
    return backend


SINKHORN_BACKENDS = ("auto", "torch", "cpp", "cuda")


def resolve_sinkhorn(backend: str, device: torch.device) -> str:
    """The Sinkhorn ops' backend: 'auto' | 'torch' | 'cpp' | 'cuda' for tensors on ``device``.

    'auto' takes the C++/CUDA extension when it is loaded (with CUDA kernels for CUDA tensors), else torch.
    """
    if backend not in SINKHORN_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, SINKHORN_BACKENDS))}; got {backend!r}")
    if backend == "torch":
        return backend
    kernels = _ext.kernels()  # "none" | "cpu" | "cuda"; a constant under torch.compile
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if kernels == "none":
            return "torch"
        if on_cuda:
            return "cuda" if kernels == "cuda" else "torch"
        return "cpp"
    if kernels == "none":
        raise RuntimeError(f"backend={backend!r} requested but {_ext.status()[1]}")
    if backend == "cpp" and on_cuda:
        raise ValueError("backend='cpp' runs on CPU tensors; got CUDA tensors (use 'cuda' or 'auto')")
    if backend == "cuda" and (not on_cuda or kernels != "cuda"):
        raise ValueError(
            "backend='cuda' needs CUDA tensors and an extension built with CUDA; "
            f"tensors on {device}, extension CUDA={kernels == 'cuda'}"
        )
    return backend
