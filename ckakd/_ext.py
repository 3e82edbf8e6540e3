"""Loader for the C++/CUDA extension (batched Sinkhorn: ``torch.ops.ckakd.sinkhorn_fixed_*``, fixed iterations,
and ``torch.ops.ckakd.sinkhorn_converged_forward``, the log-domain converged mode).

``load()`` returns the extension module, trying in order:

1. the prebuilt ``ckakd._C`` (built by ``pip install --no-build-isolation -e .``);
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja, torch's default build folder;
   CUDA sources too when torch has CUDA and ``CUDA_HOME`` is found). Skipped when ``CKAKD_NO_JIT=1`` or when
   the sources are not next to the package (a non-editable install);
3. ``None``: callers use the pure-torch Sinkhorn; one warning per process says so and why.

The result is cached. ``status()`` tells what was loaded. Right after loading, the registrations queued with
``when_loaded`` run once: the op modules give the extension's ops their fake kernels and autograd formulas there
(so the ops work under autograd, fake tensors and ``torch.compile``; ``torch.library.opcheck`` passes).
"""

from __future__ import annotations

import functools
import os
import re
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

JIT_NAME = "ckakd_C_jit"
CSRC = Path(__file__).resolve().parent.parent / "csrc"

_state: dict[str, object] = {"ok": False, "detail": "ckakd._ext.load() has not been called yet"}
_registrations: list[Callable[[], None]] = []  # see when_loaded


def _prebuilt() -> tuple[types.ModuleType | None, str]:
    try:
        from ckakd import _C
    except Exception as exc:  # ImportError, or an ABI mismatch with the installed torch
        return None, f"no prebuilt ckakd._C ({type(exc).__name__}: {exc})"
    return _C, "prebuilt ckakd._C"


def _jit() -> tuple[types.ModuleType | None, str]:
    if os.environ.get("CKAKD_NO_JIT", "0") not in ("", "0"):
        return None, "JIT build skipped (CKAKD_NO_JIT is set)"
    cpp = sorted(CSRC.glob("*.cpp"))
    if not cpp:
        return None, f"JIT build skipped: no C++ sources in {CSRC} (not an editable install)"
    try:
        from torch.utils import cpp_extension

        cu = sorted(CSRC.glob("*.cu"))
        with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
        sources = [str(s) for s in cpp + (cu if with_cuda else [])]
        if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() and torch.cuda.device_count() == 0:
            # torch's own arch detection fails without a visible GPU; build Hopper code + PTX, as setup.py does
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        module = cpp_extension.load(
            name=JIT_NAME,
            sources=sources,
            extra_cflags=["-O3", "-fopenmp"] + (["-DWITH_CUDA"] if with_cuda else []),
            extra_cuda_cflags=["-O3"],
            extra_ldflags=["-fopenmp"],
            with_cuda=with_cuda,
            verbose=False,
        )
    except Exception as exc:  # compiler missing, build error, ...
        return None, f"JIT build failed ({build_error_summary(exc)})"
    return module, f"JIT-built {JIT_NAME} from {CSRC}" + (" (with CUDA)" if with_cuda else " (CPU only)")


_ERROR_LINE = re.compile(r"(\berror\b|^FAILED:|undefined reference|ninja: build stopped|command not found)", re.I)


def build_error_summary(exc: BaseException, max_lines: int = 12) -> str:
    """What a failed JIT build said, short: the exception's first line up to the build log (``Error building
    extension 'x'``), then the compiler's and linker's own error lines (each with the source excerpt gcc/clang
    print under it), not the warnings and the command lines around them."""
    text = str(exc).strip()
    head, _, log = text.partition("\n")
    if ": " in head and not log:  # the log may start on the first line: "Error building extension 'x': [1/2] c++ .."
        head, _, log = head.partition(": ")
    elif ": [" in head:
        head, _, first = head.partition(": ")
        log = f"{first}\n{log}"
    lines = log.splitlines()
    picked: list[str] = []
    for i, line in enumerate(lines):
        if _ERROR_LINE.search(line) and "warning" not in line.lower():
            picked.append(line.rstrip())
            for follow in lines[i + 1 : i + 3]:  # gcc/clang: "   12 | code" and the caret line, right below
                if not re.match(r"^\s*(\d+\s*)?\|", follow):
                    break
                picked.append(follow.rstrip())
        if len(picked) >= max_lines:
            break
    if not picked:
        picked = [ln.rstrip() for ln in lines[-max_lines:] if ln.strip()]
    summary = f"{type(exc).__name__}: {head.strip()}"
    return summary + ("".join(f"\n    {ln}" for ln in picked[:max_lines]) if picked else "")


def when_loaded(register: Callable[[], None]) -> None:
    """Run ``register`` once the extension is loaded: at the end of the first successful ``load()``, or now if
    that has happened. The op modules (``ckakd.ops.sinkhorn_fixed``, ``ckakd.ops.sinkhorn_converged``) register the
    fake kernels and autograd formulas of the extension's ops this way, once per process."""
    _registrations.append(register)
    if _state["ok"]:
        register()


@functools.cache
def load() -> types.ModuleType | None:
    """The extension module (prebuilt ``ckakd._C`` or JIT build), or ``None`` with one warning."""
    module, why_prebuilt = _prebuilt()
    if module is not None:
        detail = why_prebuilt
    else:
        module, why_jit = _jit()
        detail = f"{why_jit} ({why_prebuilt})" if module is not None else f"{why_prebuilt}; {why_jit}"
    if module is None:
        _state.update(ok=False, detail=detail)
        warnings.warn(
            f"ckakd: the C++/CUDA Sinkhorn extension is unavailable, the pure-torch Sinkhorn will be used: {detail}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    has_cuda = bool(getattr(module, "has_cuda", lambda: False)())
    _state.update(ok=True, detail=f"{detail}, {'with' if has_cuda else 'without'} CUDA kernels")
    for register in _registrations:
        register()
    return module


def kernels() -> str:
    """What the extension runs: ``"none"`` (not loaded), ``"cpu"`` or ``"cuda"`` (built with CUDA kernels).

    Calls ``load()`` (cached). A constant for ``torch.compile``: it is evaluated once while tracing, outside the
    graph (the extension's ``has_cuda`` is a pybind function Dynamo cannot trace)."""
    module = load()
    if module is None:
        return "none"
    return "cuda" if bool(getattr(module, "has_cuda", lambda: False)()) else "cpu"


# What @torch.compiler.assume_constant_result does (it only sets this marker), without importing torch._dynamo
# when ckakd is imported: that imports triton, which `ckakd selftest` must be able to configure first
# (TRITON_INTERPRET). tests/losses/test_compile.py fails if Dynamo stops honouring it (a graph break).
kernels._dynamo_marked_constant = True  # type: ignore[attr-defined]


def status(*, load_now: bool = True) -> tuple[bool, str]:
    """(loaded, description): prebuilt / JIT / none and why.

    Calls ``load()`` first (cached; it may JIT-compile once) unless ``load_now=False``, in which case a
    process that has not loaded the extension yet gets ``(False, "... has not been called yet")``.
    """
    if load_now:
        load()
    return bool(_state["ok"]), str(_state["detail"])
