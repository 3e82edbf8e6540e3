"""Offline compile report: every Triton kernel at every configuration the launchers can start, and the CUDA
sources, compiled for sm_90 without a GPU; registers, spills, stack and shared memory per compiled variant.

python bench/compile_report.py                                  # installs triton 3.6.0 into a temp folder
python bench/compile_report.py --triton-target /tmp/triton36    # reuse (or fill) a --target folder
python bench/compile_report.py --triton-target /tmp/triton36 --repo /tmp/before --no-cu --allow-spills

How it works
------------
1. The report re-executes itself with ``PYTHONPATH=<--triton-target>``, so that ``import triton`` is the
   version the GPU machines run (3.6), and installs a fake Triton driver whose current target is
   ``GPUTarget("cuda", <--arch>, 32)``: kernels compile to PTX and cubin with no GPU present.
2. It drives the real launchers of ``ckakd.kernels`` (everything callable that the package exports) on
   ``device="meta"`` tensors inside ``ckakd.kernels._launch.recording``: launches are recorded instead of
   run, and ``_launch.choose`` offers every candidate configuration. Launchers that start a kernel with
   ``kernel[grid](...)`` directly (older code) are recorded by patching ``JITFunction.run`` for the sweep.
   While recording, ``num_sms`` reports ``--sms`` (132, an H200) so that the split heuristics choose
   what they choose on the GPU.
3. The shapes (``--sweep``, default all three):
   ``tests``: the literal shapes of the kernel test files (``tests/ops/test_*_kernels.py``, listed in
   ``TEST_FILES``, read with ``ast``), each with the patch sizes, reduces,
   centers, dtypes, ``need_*`` pairs and launcher keywords (``split_k=3``, ``block_d=16`` ...) of its own test
   function, patch inputs in the tests' layouts; ``bench``: the ``CASES`` / ``SHAPES`` of every ``bench/bench_*.py``
   as its op calls the launchers (``alignment_stats``, ``centered_gram``, ``precision``, ``patch_alignment_stats``),
   in fp32/fp16/bf16; ``tables``: a sweep that reaches every candidate of every launch table -- Gram sizes in every
   bucket (n = 7, 24, 48, 200; fp32 centered and not, bf16 centered, each at every dot precision; fp16 centered) and,
   for patch CKA, every ``P_PAD`` (16 ... ``MAX_PATCHES``) x ``reduce`` x ``center`` in fp32 (backward with both
   gradients; student-only when centered; teacher-only for channel), fp16/bf16 centered for channel and spatial. That
   is a covering design, not the full cross product (which compiles ~4x
   longer for variants that differ only in their load instructions); ``tests/test_compile_report.py``
   checks that it reaches every table entry, every ``P_PAD`` / ``reduce`` / ``center`` / ``need_*`` and
   every input dtype.
4. Launches are deduplicated on what Triton specializes on: the kernel, its constexprs, the launch options
   (``num_warps`` ...), the pointer dtypes and 16-byte alignment, and per integer argument its type and
   whether it equals 1 or is divisible by 16 (``specialization_key``). Each variant is compiled once with
   ``kernel.warmup``; ``ptxas -v`` (the target triton's, with Triton's own flags) on its PTX gives the
   registers, stack and spills, cross-checked against ``cuobjdump --dump-resource-usage`` of Triton's cubin;
   the shared memory is Triton's (``metadata.shared``, dynamic shared memory per block).
5. ``csrc/*.cu`` are compiled with ``nvcc -Xptxas -v`` for the same arch (torch's headers and nvcc flags);
   every ``__global__`` function instance becomes a row (config = its template arguments).

Output: ``--csv`` (default ``bench/out/compile_report.csv``) with
``kernel,config,num_warps,registers,spill_stores,spill_loads,stack_bytes,shared_bytes`` and a markdown
table plus a per-kernel summary on stdout. ``config`` is the constexprs, then ``ptrs=`` the pointer dtypes
(``!`` marks a pointer that is not 16-byte aligned) and ``ints=`` one letter per integer argument
(``.`` i32, ``D`` i32 divisible by 16, ``1`` equal to 1, ``l``/``L`` i64 / i64 divisible by 16, ``b`` bool,
``f`` float, ``n`` None). About 1,200 variants, ~9 CPU-minutes (``--jobs`` compiles in parallel; Triton's
cache makes a rerun fast). Exit status 1 when a variant spills (``--allow-spills``: report only), when one needs more
shared memory than a block may opt in to (232,448 bytes on sm_90), or when something does not compile.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the report's modules (bench/kernel_report/), also when loaded from its path

from kernel_report.compiling import compile_all, install_fake_driver  # noqa: E402
from kernel_report.cuda_sources import cuda_rows  # noqa: E402
from kernel_report.launches import H200_SMS, dedupe  # noqa: E402
from kernel_report.output import SHARED_LIMITS, Row, markdown, offenders, summary, write_csv  # noqa: E402
from kernel_report.sweep import SOURCES, Sweep, record  # noqa: E402

REPO = BENCH.parent
DEFAULT_CSV = REPO / "bench" / "out" / "compile_report.csv"
DEFAULT_TRITON = "3.6.0"
CHILD_ENV = "CKAKD_COMPILE_REPORT_CHILD"

# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--triton-target", type=Path, default=None,
                   help="pip --target folder holding the triton to compile with (installed there when it has none;\n"
                        "default: a new temporary folder)")  # fmt: skip
    p.add_argument(
        "--triton-version", default=DEFAULT_TRITON, help=f"triton to install / expect (default {DEFAULT_TRITON})"
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90: H100/H200)")
    p.add_argument("--sms", type=int, default=H200_SMS, help=f"SM count the launch heuristics see (default {H200_SMS})")
    p.add_argument(
        "--repo", type=Path, default=REPO, help="ckakd checkout whose kernels, tests, benchmarks and csrc to use"
    )
    p.add_argument(
        "--csv", type=Path, default=DEFAULT_CSV, help=f"CSV output (default {DEFAULT_CSV.relative_to(REPO)})"
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    p.add_argument("--sweep", default=",".join(SOURCES), help=f"shape sources (default {','.join(SOURCES)})")
    p.add_argument("--kernels", default=None, metavar="REGEX", help="only the Triton kernels whose name matches")
    p.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    p.add_argument("--no-cu", action="store_true", help="skip csrc/*.cu")
    p.add_argument("--no-triton", action="store_true", help="only csrc/*.cu (needs no triton install)")
    args = p.parse_args(argv)
    if args.arch not in SHARED_LIMITS:
        p.error(f"--arch {args.arch}: unknown compute capability; known: {', '.join(map(str, SHARED_LIMITS))}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.sms < 1:
        p.error(f"--sms must be >= 1, got {args.sms}")
    if not (args.repo / "ckakd" / "kernels").is_dir():
        p.error(f"--repo {args.repo}: no ckakd/kernels package there")
    args.sweep = tuple(x for x in args.sweep.split(",") if x)
    if not args.sweep or set(args.sweep) - set(SOURCES):
        p.error(f"--sweep {','.join(args.sweep)!r}: choose from {', '.join(SOURCES)}")
    if args.kernels is not None:
        try:
            re.compile(args.kernels)
        except re.error as exc:
            p.error(f"--kernels {args.kernels!r}: not a regular expression ({exc})")
    if args.no_cu and args.no_triton:
        p.error("--no-cu and --no-triton together leave nothing to report")
    args.repo = args.repo.resolve()
    return args


def ensure_triton(target: Path | None, version: str) -> Path:
    """A ``--target`` folder holding triton: ``target`` as is when it has one, else install ``version`` there."""
    if target is None:
        target = Path(tempfile.mkdtemp(prefix="compile-report-triton-"))
    target = target.resolve()
    if (target / "triton" / "__init__.py").exists():
        return target
    if target.exists() and not target.is_dir():
        raise SystemExit(f"--triton-target {target}: not a folder")
    print(f"installing triton=={version} into {target}", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), f"triton=={version}"]
    if subprocess.run(cmd, check=False).returncode:
        raise SystemExit(f"--triton-target {target}: pip could not install triton=={version} there")
    return target


def child(args: argparse.Namespace) -> int:
    """The report proper, run with the target triton first on the path."""
    t0 = time.perf_counter()
    rows: list[Row] = []
    errors: list[str] = []
    notes: list[str] = []
    if not args.no_triton:
        import triton

        print(f"triton {triton.__version__} from {Path(triton.__file__).parent}")
        if triton.__version__ != args.triton_version:
            where = args.triton_target or "the temporary target"
            raise SystemExit(f"--triton-target {where} holds triton {triton.__version__}, not {args.triton_version}")
        os.environ.pop("TRITON_INTERPRET", None)
        install_fake_driver(args.arch)
        sys.path.insert(0, str(args.repo))
        import ckakd.kernels

        print(f"ckakd.kernels from {Path(ckakd.kernels.__file__).parent}")
        sweep = Sweep(ckakd.kernels, args.repo)
        calls = sweep.calls(args.sweep)
        launches, refused = record(sweep, calls, args.sms)
        unique = dedupe(launches)
        if args.kernels is not None:
            unique = {k: v for k, v in unique.items() if re.search(args.kernels, v.name)}
        notes += sweep.notes
        print(
            f"{len(calls)} launcher calls ({len(refused)} refused by the launcher), {len(launches)} launches, "
            f"{len(unique)} distinct variants to compile"
        )
        triton_rows, errs = compile_all(list(unique.values()), args.jobs)
        rows += sorted(triton_rows, key=lambda r: (r.kernel, r.config))
        errors += errs
        for r in triton_rows:
            if r.note:
                notes.append(f"{r.kernel} [{r.config}]: {r.note}")
    if not args.no_cu:
        cu_rows, errs, cu_notes = cuda_rows(args.repo, args.arch)
        rows += cu_rows
        errors += errs
        notes += cu_notes
    write_csv(rows, args.csv)
    print()
    print(markdown(rows))
    print()
    print(summary(rows))
    print(f"\n{len(rows)} variants in {time.perf_counter() - t0:.0f} s; CSV: {args.csv}")
    for note in notes:
        print(f"note: {note}")
    limit = SHARED_LIMITS[args.arch]
    spills, shared = offenders(rows, limit)
    status = 0
    for r in spills:
        print(f"SPILL: {r.kernel} [{r.config}] num_warps={r.num_warps}: {r.registers} registers, "
              f"{r.spill_stores} B spill stores, {r.spill_loads} B spill loads, {r.stack_bytes} B stack "
              f"(reached by {r.source})")  # fmt: skip
    for r in shared:
        print(f"SHARED: {r.kernel} [{r.config}]: {r.shared_bytes} B > {limit} B per block on sm_{args.arch}")
    for err in errors:
        print(f"ERROR: {err}")
    if spills and not args.allow_spills:
        print(f"{len(spills)} variants spill registers (--allow-spills to only report)")
        status = 1
    if shared or errors:
        status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(CHILD_ENV) == "1" or args.no_triton:
        return child(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    temporary = args.triton_target is None
    target = ensure_triton(args.triton_target, args.triton_version)
    try:
        env = dict(os.environ, **{CHILD_ENV: "1"})
        paths = [str(target)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if temporary:
            argv += ["--triton-target", str(target)]
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env, check=False).returncode
    finally:
        if temporary:  # the folder made for this run
            shutil.rmtree(target, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
