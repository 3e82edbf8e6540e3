"""The report's rows and outputs: the CSV, the markdown table, the per-kernel summary, the offending variants."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CSV_COLUMNS = (
    "kernel",
    "config",
    "num_warps",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack_bytes",
    "shared_bytes",
)
# Shared memory a block may opt in to (cudaFuncAttributeMaxDynamicSharedMemorySize), per compute capability.
SHARED_LIMITS = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}


@dataclasses.dataclass
class Row:
    kernel: str
    config: str
    num_warps: int | str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    source: str = ""
    note: str = ""

    def csv(self) -> list[Any]:
        return [getattr(self, c) for c in CSV_COLUMNS]


def write_csv(rows: Sequence[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(r.csv() for r in rows)


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(CSV_COLUMNS) + " |", "|" + "---|" * len(CSV_COLUMNS)]
    for r in rows:
        cells = [f"`{r.config}`" if c == "config" and r.config else str(getattr(r, c)) for c in CSV_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    """Per kernel: variants, how many spill, and the worst registers / spills / stack / shared memory."""
    cols = ("registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes")
    lines = [
        "| kernel | variants | spilling | max registers | max spill stores | max spill loads | max stack"
        " | max shared |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_kernel: dict[str, list[Row]] = {}
    for r in rows:
        by_kernel.setdefault(r.kernel, []).append(r)
    for name, rs in by_kernel.items():
        spilling = sum(r.spill_stores > 0 or r.spill_loads > 0 for r in rs)
        worst = [str(max(getattr(r, c) for r in rs)) for c in cols]
        lines.append(f"| {name} | {len(rs)} | {spilling} | " + " | ".join(worst) + " |")
    return "\n".join(lines)


def offenders(rows: Sequence[Row], shared_limit: int) -> tuple[list[Row], list[Row]]:
    """(variants that spill, variants over the shared-memory limit)."""
    spills = [r for r in rows if r.spill_stores > 0 or r.spill_loads > 0]
    shared = [r for r in rows if r.shared_bytes > shared_limit]
    return spills, shared
