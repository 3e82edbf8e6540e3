"""Output of a run: the results, ratios and targets tables (markdown), the report, the CSV files."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from harness.measure import Ceilings
from harness.spec import BASE_PROVIDER, CSV_COLUMNS, MODES, Config, OpBench, Row, shape_label


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if abs(v) >= 10**digits:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _order(rows: Sequence[Row]) -> list[Row]:
    shapes = list(dict.fromkeys(r.shape for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    return sorted(rows, key=lambda r: (shapes.index(r.shape), MODES.index(r.mode), providers.index(r.provider)))


def results_table(rows: Sequence[Row]) -> str:
    """One line per row; a ``launches`` column when any row counted kernel launches (CUDA)."""
    with_launches = any(not math.isnan(r.launches) for r in rows)
    header = ["provider", "mode", "shape", "median ms", "p20", "p80", "peak MB"]
    header += ["launches"] * with_launches + ["floor ms", "×floor", "notes"]
    body = [
        [r.provider, r.mode, r.shape, _fmt(r.median_ms), _fmt(r.p20_ms), _fmt(r.p80_ms), _fmt(r.peak_mem_mb)]
        + [_fmt(r.launches)] * with_launches
        + [_fmt(r.floor_ms), _fmt(r.time_over_floor), r.notes]
        for r in _order(rows)
    ]
    return _table(header, body)


def ratios(rows: Sequence[Row]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(op, shape, mode) -> {provider: median / ckakd median} for rows measured in this run."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in rows:
        out.setdefault((r.op, r.shape, r.mode), {})[r.provider] = r.median_ms
    for key, medians in out.items():
        base = medians.get(BASE_PROVIDER, math.nan)
        out[key] = {p: m / base for p, m in medians.items()}
    return out


def ratios_table(rows: Sequence[Row]) -> str:
    providers = [p for p in dict.fromkeys(r.provider for r in rows) if p != BASE_PROVIDER]
    base = {(r.shape, r.mode): r.median_ms for r in rows if r.provider == BASE_PROVIDER}
    body = []
    for (_, shape, mode), rel in ratios(_order(rows)).items():
        body.append(
            [shape, mode, _fmt(base.get((shape, mode), math.nan))] + [_fmt(rel.get(p, math.nan)) for p in providers]
        )
    return _table(["shape", "mode", "ckakd ms"] + [f"{p} / ckakd" for p in providers], body)


def targets_table(benches: Sequence[OpBench], rows: Sequence[Row], device: torch.device) -> str:
    """The device's targets of ``benches`` with the value measured in ``rows`` and met / MISSED / not run."""
    medians: dict[tuple[str, str, str], dict[str, float]] = {}
    ckakd_rows: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        medians.setdefault((r.op, r.shape, r.mode), {})[r.provider] = r.median_ms
        if r.provider == BASE_PROVIDER:
            ckakd_rows[(r.op, r.shape, r.mode)] = r
    body = []
    for bench in benches:
        for t in bench.targets:
            if t.device != device.type:
                continue
            shape = shape_label(bench.shapes[t.shape])
            key = (bench.op, shape, t.mode)
            got, ok = t.measure(medians.get(key, {}), ckakd_rows.get(key))
            status = "not run" if math.isnan(got) else ("met" if ok else "MISSED")
            body.append([bench.op, t.describe(), _fmt(got), status])
    return _table(["op", "target", "measured", "status"], body) if body else ""


def report(
    benches: Sequence[OpBench],
    rows: Sequence[Row],
    cfg: Config,
    ceil: Ceilings,
    meta: dict[str, str],
    load: tuple[float, float] | None = None,
) -> str:
    parts = [
        f"## ckakd benchmarks — {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton'] or '-'}, "
        f"dtype {str(cfg.dtype).removeprefix('torch.')}, "
        f"{meta['timestamp']}{' (quick)' if cfg.quick else ''}. Ceilings: {ceil.describe()}.",
        "Times in ms (median, p20, p80); ×floor = median / floor; ratios > 1 mean slower than ckakd.",
    ]
    if cfg.device.type != "cuda":
        parts.append("CPU 'peak MB' = memory autograd saves for the backward (no CPU allocator peak in torch).")
    if load is not None:
        parts.append(
            f"1-min load average at start / end: {load[0]:.2f} / {load[1]:.2f} "
            f"on {os.cpu_count()} cores (other processes on the cores inflate and scatter CPU times)."
        )
    for bench in benches:
        op_rows = [r for r in rows if r.op == bench.op]
        if not op_rows:
            continue
        parts += [
            "",
            f"### {bench.op}",
            "",
            results_table(op_rows),
            "",
            f"#### {bench.op}: ratios to ckakd",
            "",
            ratios_table(op_rows),
        ]
    targets = targets_table(benches, rows, cfg.device)
    if targets:
        parts += ["", "### Targets", "", targets]
    return "\n".join(parts) + "\n"


def write_csv(path: Path, rows: Sequence[Row], append: bool = False) -> None:
    """Write ``rows`` to ``path``; ``append`` adds them to an existing file. A file written with other columns
    (before a column was added) is rewritten once with the current ones; its missing cells stay empty."""
    mode, carried = "w", []
    if append and path.exists():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) == CSV_COLUMNS:
                mode = "a"
            else:
                carried = list(reader)
    with path.open(mode, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        for old in carried:
            writer.writerow({k: old.get(k) or "" for k in CSV_COLUMNS})
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()})
