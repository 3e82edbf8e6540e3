"""The shared command line of every bench script: parse, run the benches, write CSV + markdown, print the tables."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from harness.measure import ceilings, ieee_fp32_matmul
from harness.report import report, write_csv
from harness.run import log, run_bench
from harness.spec import DTYPES, MODES, Config, OpBench, Row, shape_label


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu {model} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
    except Exception:  # not installed or broken: the torch path still runs
        return ""
    return triton.__version__


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--quick", action="store_true", help="few small shapes, few repeats (minutes on 2 CPU cores)")
    ap.add_argument(
        "--shapes",
        type=_csv_list,
        default=None,
        help="comma-separated presets (cpu, gpu, quick-cpu, quick-gpu, all) or shape names",
    )
    ap.add_argument("--providers", type=_csv_list, default=None, help="comma-separated provider names to time")
    ap.add_argument("--modes", type=_csv_list, default=MODES, help="comma-separated: forward,backward,full")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "out",
        help="output directory for the CSV and markdown (default bench/out/)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU only: torch.set_num_threads (default: torch's choice)"
    )
    ap.add_argument("--list", action="store_true", help="list shapes, presets and providers, then exit")
    ap.add_argument("-v", action="store_true", help="print tracebacks of provider failures")
    return ap


def config(args: argparse.Namespace) -> Config:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    return Config(
        torch.device(args.device),
        DTYPES[args.dtype],
        args.quick,
        args.shapes,
        args.providers,
        tuple(args.modes),
        args.out,
        args.v,
        args.threads,
    )


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return math.nan


def _listing(benches: Sequence[OpBench], device: torch.device) -> str:
    lines = []
    for b in benches:
        lines.append(f"{b.op}: providers {', '.join(p.name for p in b.providers(device))} (baseline {b.baseline})")
        for name, dims in b.shapes.items():
            lines.append(f"  {name:<28} {shape_label(dims)}")
        for name, shapes in b.presets.items():
            lines.append(f"  preset {name:<15} {', '.join(shapes)}")
    return "\n".join(lines)


def main(benches: Sequence[OpBench], argv: Sequence[str] | None = None, description: str = "") -> int:
    """Parse the shared command line, run ``benches``, write CSV + markdown, print the tables."""
    args = parser(description or "ckakd benchmarks").parse_args(argv)
    cfg = config(args)
    if args.list:
        print(_listing(benches, cfg.device))
        return 0
    unknown = [s for s in cfg.shapes or () if not any(s == "all" or s in b.presets or s in b.shapes for b in benches)]
    if unknown:
        raise SystemExit(f"unknown shape or preset name(s): {', '.join(unknown)} (see --list)")
    if cfg.threads and cfg.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    now = datetime.now(timezone.utc)
    load_start = _loadavg()
    meta = {
        "device": device_name(cfg.device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "timestamp": now.isoformat(timespec="seconds"),
    }
    rows: list[Row] = []
    failures: list[str] = []
    with ieee_fp32_matmul() if cfg.device.type == "cuda" else contextlib.nullcontext():
        log(f"measuring ceilings on {meta['device']} ...")
        ceil = ceilings(cfg.device, cfg.dtype)
        log(ceil.describe())
        for bench in benches:
            r, f = run_bench(bench, cfg, ceil, meta)
            rows += r
            failures += f
    load = None if cfg.device.type == "cuda" else (load_start, _loadavg())
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{cfg.device.type}-{now.strftime('%Y%m%d-%H%M%S')}"
    text = report(benches, rows, cfg, ceil, meta, load)
    write_csv(cfg.out / f"{stem}.csv", rows)
    write_csv(cfg.out / "history.csv", rows, append=True)
    (cfg.out / f"{stem}.md").write_text(text)
    print(text)
    log(f"wrote {cfg.out / (stem + '.csv')}, {cfg.out / (stem + '.md')} (rows also appended to history.csv)")
    if failures:
        log("CHECK FAILURES (these providers were not timed):\n  " + "\n  ".join(failures))
        return 1
    return 0
