"""Compiling the recorded variants (child process, target triton): a fake driver for the target arch, one
``kernel.warmup`` per variant, ``ptxas -v`` on its PTX, cuobjdump on its cubin; in parallel worker processes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kernel_report.launches import Launch, config_string, data_ptr, is_pointer
from kernel_report.output import Row
from kernel_report.ptxas import Usage, parse_cuobjdump, parse_ptxas


def install_fake_driver(arch: int) -> None:
    """Make Triton compile for ``GPUTarget("cuda", arch, 32)`` with no GPU (no launches possible)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    class FakeDriver(DriverBase):
        def __init__(self) -> None:
            pass

        @classmethod
        def is_active(cls) -> bool:
            return True

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_active_torch_device(self) -> Any:
            return torch.device("cpu")

        def get_device_interface(self) -> Any:
            return torch.cuda

        def get_benchmarker(self) -> Any:
            raise RuntimeError("no GPU: the compile report does not run kernels")

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

    driver.set_active(FakeDriver())


class _Ptr:
    """A pointer argument for ``warmup``: the dtype and an address with the recorded alignment."""

    def __init__(self, dtype: Any, ptr: int):
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self) -> int:
        return self._ptr


def _nvidia_tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    for cand in (env, str(bundled), shutil.which(name)):
        if cand and Path(cand).exists():
            return cand
    raise FileNotFoundError(f"no {name}: not bundled with triton at {bundled.parent} and not on PATH")


def compile_launch(launch: Launch) -> Row:
    """Compile one variant with ``warmup`` and measure it (ptxas -v on its PTX, cuobjdump on its cubin)."""
    kwargs = {name: _Ptr(v.dtype, data_ptr(v)) if is_pointer(v) else v for name, v in launch.args.items()}
    compiled = launch.kernel.warmup(grid=launch.grid, **kwargs, **launch.options)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)
    arch = target.group(1) if target else "sm_90a"
    fmad = [] if getattr(compiled.metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    extra = (getattr(compiled.metadata, "ptx_options", None) or "").split()
    with tempfile.TemporaryDirectory(prefix="compile-report-") as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        cmd = [
            _nvidia_tool("ptxas"),
            "-lineinfo",
            *fmad,
            "-v",
            *extra,
            f"--gpu-name={arch}",
            str(src),
            "-o",
            str(cubin),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"ptxas failed on {launch.name}: {res.stderr[-2000:]}")
        usage = parse_ptxas(res.stdout + res.stderr)
        dump = ""
        with contextlib.suppress(FileNotFoundError):  # the cross-check is optional
            Path(tmp, "triton.cubin").write_bytes(compiled.asm["cubin"])
            cmd = [_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(Path(tmp, "triton.cubin"))]
            dump = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    name = compiled.metadata.name if hasattr(compiled.metadata, "name") else launch.name
    u = usage.get(name) or next(iter(usage.values()), Usage())
    note = ""
    res_usage = parse_cuobjdump(dump).get(name)
    if res_usage and (res_usage.get("REG") != u.registers or res_usage.get("STACK") != u.stack_bytes):
        note = f"cuobjdump of Triton's cubin: REG {res_usage.get('REG')} STACK {res_usage.get('STACK')}"
    return Row(
        launch.name,
        config_string(launch),
        int(compiled.metadata.num_warps),
        u.registers,
        u.spill_stores,
        u.spill_loads,
        u.stack_bytes,
        int(compiled.metadata.shared),
        launch.source,
        note,
    )


_WORK: list[Launch] = []


def _compile_index(i: int) -> tuple[int, Row | None, str]:
    try:
        return i, compile_launch(_WORK[i]), ""
    except Exception as exc:
        return i, None, f"{type(exc).__name__}: {str(exc)[-1500:]}"


def compile_all(launches: Sequence[Launch], jobs: int) -> tuple[list[Row], list[str]]:
    """Compile every variant (``jobs`` forked worker processes), with a progress bar."""
    from tqdm import tqdm

    _WORK[:] = launches
    rows: list[Row | None] = [None] * len(launches)
    errors = []
    bar = tqdm(total=len(launches), desc="compiling", unit="kernel", file=sys.stderr, mininterval=1.0)
    if jobs <= 1:
        results: Iterable = map(_compile_index, range(len(launches)))
        pool = None
    else:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_compile_index, range(len(launches)))
    try:
        for i, row, err in results:
            rows[i] = row
            if err:
                errors.append(f"{launches[i].name} [{config_string(launches[i])}]: {err}")
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return [r for r in rows if r is not None], errors
