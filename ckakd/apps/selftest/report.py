"""What the self-test prints and writes: the header, the table of checks, the summary lines and the JSON report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["fmt", "format_table", "json_report", "print_header", "print_summary", "write_json_report"]


def fmt(v: float | None) -> str:
    """A table cell for an error or ratio: ``-`` (none), ``inf`` or 3 significant digits."""
    if v is None:
        return "-"
    if v == math.inf:
        return "inf"
    return f"{v:.2e}"


def format_table(records: Sequence[dict]) -> str:
    """The final table: one line per check."""
    header = ("check", "result", "max err", "tolerance", "err/tol", "ms")
    rows = [
        (
            r["name"],
            r["status"].upper(),
            fmt(r.get("max_err")),
            r.get("tol") or "-",
            "-" if r.get("ratio") is None else f"{r['ratio']:.3f}",
            f"{1000 * r['seconds']:.0f}",
        )
        for r in records
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def print_header(info: dict, status: dict, note: str) -> None:
    """The versions (:func:`~ckakd.apps.selftest.env.versions`), the environment ``note`` and the backends."""
    print(f"ckakd {info['ckakd']} self-test")
    print(f"  python     {info['python']} ({info['platform']})")
    print(f"  torch      {info['torch']} (CUDA {info['torch_cuda']}, device available: {info['cuda_available']})")
    print(f"  triton     {info['triton']}")
    for g in info["gpus"]:
        print(f"  gpu        {g['name']}, {g['capability']}, {g['memory_gib']} GiB")
    if not info["gpus"]:
        print("  gpu        none")
    print(f"  extension  {info['extension']['detail']}")
    print(f"  note       {note}")
    print("backends:")
    for b in status.values():
        print(f"  {b}")


def print_summary(
    records: Sequence[dict], counts: dict[str, int], seconds: float, device: str, cuda_rule: bool
) -> None:
    """The table, one line per failure and per skip reason, then PASSED / FAILED with the counts."""
    ok = counts["fail"] == 0
    print()
    print(format_table(records))
    print()
    failures = [r for r in records if r["status"] == "fail"]
    for r in failures:
        print(f"FAIL {r['name']}: {r['message']}")
    skipped = sorted({r["message"] for r in records if r["status"] == "skip"})
    for why in skipped:
        print(f"skipped ({sum(r['message'] == why for r in records if r['status'] == 'skip')}): {why}")
    print(
        f"{'PASSED' if ok else 'FAILED'}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
        f"in {seconds:.1f} s on {device}" + (" (CUDA rule)" if cuda_rule else "")
    )


def json_report(
    info: dict, device: str, cuda_rule: bool, note: str, status: dict, records: Sequence[dict], seconds: float
) -> dict:
    """The whole report (``--json``): versions, device, rule, backends, every record, the ops and the summary."""
    counts = {s: sum(r["status"] == s for r in records) for s in ("pass", "fail", "skip")}
    return {
        "versions": info,
        "device": device,
        "cuda_rule": cuda_rule,
        "note": note,
        "backends": {n: {"active": b.active, "detail": b.detail} for n, b in status.items()},
        "checks": list(records),
        "ops": sorted({r["op"] for r in records}),
        "summary": {**counts, "ok": counts["fail"] == 0, "seconds": round(seconds, 2)},
    }


def write_json_report(report: dict, path: str | Path) -> Path:
    """Write ``report`` as indented JSON to ``path`` (its folder created); the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path
