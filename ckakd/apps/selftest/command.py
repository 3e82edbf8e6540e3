"""``ckakd selftest`` itself: its options, the order of the steps and the exit status."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

import ckakd

from .bench import run_bench
from .env import cuda_rules, prepare_environment, versions
from .plan import build_checks
from .report import json_report, print_header, print_summary, write_json_report
from .runner import fast_path_records, run_checks

__all__ = ["DESCRIPTION", "add_selftest_arguments", "main", "run_selftest_from_args"]

DESCRIPTION = "``ckakd selftest``: is this installation correct and fast here?"


def add_selftest_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ckakd selftest`` options."""
    p.add_argument("--json", metavar="PATH", default=None, help="write the full report (JSON) to PATH")
    p.add_argument("--bench", action="store_true", help="also run the benchmarks (bench/run_all.py of a checkout)")
    p.add_argument("--bench-out", metavar="DIR", default=None, help="output folder of --bench (default bench/out)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="tensors' device (default: cuda if present)"
    )
    p.add_argument(
        "--only",
        metavar="TEXT[,TEXT]",
        default=None,
        help="run only the checks whose name contains one of these (e.g. cka,sinkhorn); the rest are not run",
    )
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--autotune",
        action="store_true",
        help="keep per-shape autotuning of the Triton launch configurations (default: CKAKD_AUTOTUNE=0, the first "
        "configuration, which keeps the run short)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``ckakd selftest`` as a function: 0 when every check passed."""
    p = argparse.ArgumentParser(prog="ckakd selftest", description=DESCRIPTION)
    add_selftest_arguments(p)
    return run_selftest_from_args(p.parse_args(argv))


def run_selftest_from_args(args: argparse.Namespace) -> int:
    """Run the self-test with parsed ``args`` (see :func:`add_selftest_arguments`)."""
    note = prepare_environment()  # before anything imports triton (TRITON_INTERPRET stays: triton reads it once)
    autotune_before = os.environ.get("CKAKD_AUTOTUNE")
    if not args.autotune:
        os.environ.setdefault("CKAKD_AUTOTUNE", "0")
    try:
        return _run_selftest(args, note)
    finally:  # a caller's process keeps its own autotuning setting
        if autotune_before is None:
            os.environ.pop("CKAKD_AUTOTUNE", None)
        else:
            os.environ["CKAKD_AUTOTUNE"] = autotune_before


def _run_selftest(args: argparse.Namespace, note: str) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("ckakd selftest: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda_rules = cuda_rules()
    status = ckakd.backends()
    info = versions()
    checks = build_checks(device, status, on_cuda_rules=on_cuda_rules)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        checks = [c for c in checks if any(w in c.name for w in wanted)]
        if not checks:
            print(f"ckakd selftest: error: --only {args.only!r} matches no check (see --list)", file=sys.stderr)
            return 2
    if args.list:
        for c in checks:
            print(c.name + (f"   [skip: {c.skip}]" if c.skip else ""))
        return 0
    print_header(info, status, note)
    start = time.perf_counter()
    records = fast_path_records(status, device, on_cuda_rules)
    records += run_checks(checks, progress=not args.no_progress)
    if args.bench:
        records.append(run_bench(device, args.bench_out))
    total = time.perf_counter() - start
    counts = {s: sum(r["status"] == s for r in records) for s in ("pass", "fail", "skip")}
    print_summary(records, counts, total, device, on_cuda_rules)
    if args.json:
        path = write_json_report(json_report(info, device, on_cuda_rules, note, status, records, total), args.json)
        print(f"report written to {path}")
    return 0 if counts["fail"] == 0 else 1
