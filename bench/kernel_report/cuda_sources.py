"""``csrc/*.cu`` compiled with ``nvcc -Xptxas -v`` for the target arch: one row per ``__global__`` function instance."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from kernel_report.output import Row
from kernel_report.ptxas import demangle, parse_ptxas, split_demangled


def nvcc_flags(arch: int) -> tuple[list[str], list[str]]:
    """(flags, include args) for a compile-only nvcc run against torch's headers, as ``.ci/run`` had."""
    import sysconfig

    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    dirs = include_paths() + [sysconfig.get_paths()["include"]]
    flags = ["-std=c++20", "-O3", "-DWITH_CUDA", "-gencode", f"arch=compute_{arch},code=sm_{arch}", *COMMON_NVCC_FLAGS]
    # The CPU torch wheel ships the c10/cuda headers but not the CMake-generated cuda_cmake_macros.h (it only
    # sets C10_CUDA_BUILD_SHARED_LIBS, for Windows DLL exports); c10's own switch skips that include.
    if not any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in dirs):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags, sum((["-I", p] for p in dirs), [])


def cuda_rows(repo: Path, arch: int) -> tuple[list[Row], list[str], list[str]]:
    """Rows for every ``__global__`` instance in ``csrc/*.cu``; (rows, errors, notes)."""
    sources = sorted((repo / "csrc").glob("*.cu"))
    if not sources:
        return [], [], ["no csrc/*.cu: nothing for nvcc"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [], [], ["nvcc not found: the .cu part of the report is skipped"]
    flags, inc = nvcc_flags(arch)
    rows, errors = [], []
    for src in sources:
        res = subprocess.run(
            [nvcc, "-c", *flags, "-Xptxas", "-v", str(src), "-o", os.devnull, *inc],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode:
            errors.append(f"nvcc failed on {src.relative_to(repo)} (exit {res.returncode}):\n{res.stderr[-4000:]}")
            continue
        usage = parse_ptxas(res.stdout + res.stderr)
        for mangled, plain in zip(usage, demangle(list(usage)), strict=True):
            name, config = split_demangled(plain)
            u = usage[mangled]
            rows.append(
                Row(
                    name,
                    config,
                    "",
                    u.registers,
                    u.spill_stores,
                    u.spill_loads,
                    u.stack_bytes,
                    u.shared_bytes,
                    f"nvcc:{src.name}",
                )  # fmt: skip
            )
        print(f"nvcc compiled {src.relative_to(repo)}: {len(usage)} kernels")
    return sorted(rows, key=lambda r: (r.kernel, r.config)), errors, []
