"""What a run writes besides checkpoints: ``metrics.jsonl`` / ``metrics.csv`` (:func:`write_metrics_files`; read
back by :func:`read_metrics`; the plots ``curves.png`` / ``cka.png`` are :mod:`.curves`), progress messages
(:func:`log_message`) and the check that the run's output files (:data:`OUTPUT_FILES`) can be written
(:func:`check_output_paths`)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import append_text, atomic_write_bytes

__all__ = [
    "TIMING_COLUMNS",
    "OUTPUT_FILES",
    "check_output_paths",
    "fit_summary",
    "log_message",
    "logger",
    "read_metrics",
    "write_metrics_files",
]

logger = logging.getLogger("ckakd.train")

OUTPUT_FILES = ("latest.pt", "best.pt", "metrics.csv", "metrics.jsonl", "config.yaml", "curves.png", "cka.png")


def check_output_paths(out_dir: str | os.PathLike) -> None:
    """``ValueError`` when one of the run's output files (:data:`OUTPUT_FILES`) exists in ``out_dir`` but is not a
    regular file (a folder in its place would otherwise fail the first save, after an epoch of training)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the run folder {out_dir} is a file, not a folder")
    for name in OUTPUT_FILES:
        p = out_dir / name
        if p.exists() and not p.is_file():
            kind = "a folder" if p.is_dir() else "not a regular file"
            raise ValueError(f"{p} is {kind}; the run writes its {name} there: move it away or choose another run.name")


def log_message(msg: str, level: int = logging.INFO, *, progress: bool = False) -> None:
    """``msg`` through tqdm (``progress``: it does not break the progress bar) or the ``ckakd.train`` logger."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(msg)
    else:
        logger.log(level, msg)


# Per-epoch timings: they differ between two runs of the same seed (compare runs without them).
TIMING_COLUMNS = ("images_per_s", "epoch_time_s")


def write_metrics_files(out_dir: Path, history: Sequence[dict], *, rewrite: bool) -> None:
    """``metrics.jsonl`` (``rewrite``: all of ``history``, atomically; else its last row appended) and ``metrics.csv``
    (always rewritten atomically; columns in order of first appearance, the :data:`TIMING_COLUMNS` last)."""
    jsonl = out_dir / "metrics.jsonl"
    if rewrite:
        text = "".join(json.dumps(r) + "\n" for r in history)
        atomic_write_bytes(jsonl, text.encode())
    elif history:
        append_text(jsonl, json.dumps(history[-1]) + "\n")
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    # keys first seen in a later epoch (callbacks) go before the timing columns, which stay last
    columns = [c for c in columns if c not in TIMING_COLUMNS] + [c for c in TIMING_COLUMNS if c in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    if columns:
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in history)
    atomic_write_bytes(out_dir / "metrics.csv", buf.getvalue().encode())


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``out_dir/metrics.csv`` (one per epoch; values as written, ``""`` where a column is empty);
    ``[]`` when the run wrote none."""
    path = Path(out_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def fit_summary(
    history: Sequence[dict[str, Any]],
    metric: str,
    best_value: float | None,
    best_epoch: int | None,
    epochs_run: int,
    out_dir: str | os.PathLike,
) -> dict[str, Any]:
    """What :meth:`~ckakd.train.engine.Trainer.fit` returns, from the metrics rows of every completed epoch:
    ``metric``, ``best_value``, ``best_epoch``, ``final_val`` (the last row's ``val/*`` values, keys without the
    prefix), ``final_train_loss``, ``epochs_run`` (by this call), ``epochs_completed``, ``train_time_s`` (all rows),
    ``cka`` (last values), ``out_dir``; for ``metric="top1"`` also ``best_top1``, ``final_top1``, ``final_top5``,
    ``final_val_loss``."""
    last = history[-1] if history else {}
    result: dict[str, Any] = {
        "metric": metric,
        "best_value": best_value,
        "best_epoch": best_epoch,
        "final_val": {k[4:]: v for k, v in last.items() if k.startswith("val/")},
        "final_train_loss": last.get("train/loss"),
        "epochs_run": epochs_run,
        "epochs_completed": len(history),
        "train_time_s": float(sum(r.get("epoch_time_s", 0.0) for r in history)),
        "cka": {k: v for k, v in last.items() if k.startswith("cka/")},
        "out_dir": str(out_dir),
    }
    if metric == "top1":
        result.update(
            best_top1=best_value,
            final_top1=last.get("val/top1"),
            final_top5=last.get("val/top5"),
            final_val_loss=last.get("val/loss"),
        )
    return result
