"""Reading run folders for ``ckakd report``: a folder written by ``ckakd train-teacher`` / ``distill`` /
``detect-*`` (``config.yaml`` + ``metrics.csv``) becomes a :class:`RunRecord`; folders of runs are searched at any
depth; a folder that cannot be read gives one message naming it (:class:`RunError`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckakd.train.engine.metrics_log import read_metrics

__all__ = ["RunError", "RunRecord", "collect_runs", "config_value", "dotted_keys", "load_run", "split_teachers"]


class RunError(ValueError):
    """A folder that cannot be reported: the message names it and what is missing."""


@dataclass
class RunRecord:
    """One run folder: ``task`` (classification / detection), ``metric`` (``top1`` / ``AP``), ``method``
    (``distiller.name``), ``seed``, the metric's ``best`` / ``best_epoch`` / ``last``, ``cka`` (the last logged
    value of each ``cka/<student>~<teacher>`` column), ``time_per_epoch_s``, ``images_per_s`` (when the run
    logged a ``*images_per_s`` column), ``epochs`` done of ``planned_epochs``, ``rows`` (its metrics.csv)."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, str]]
    task: str
    metric: str
    method: str
    seed: int | None
    best: float
    best_epoch: int
    last: float
    epochs: int
    planned_epochs: int | None
    cka: dict[str, float] = field(default_factory=dict)
    time_per_epoch_s: float | None = None
    images_per_s: float | None = None
    teacher_checkpoint: str | None = None

    @property
    def cka_last_stage(self) -> float | None:
        """The first logged CKA pair's last value (the demo's last-stage pair), ``None`` without a CKA probe."""
        return next(iter(self.cka.values()), None)

    @property
    def complete(self) -> bool:
        return self.planned_epochs is None or self.epochs >= self.planned_epochs


def _float(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _read_config(path: Path) -> dict[str, Any]:
    import yaml  # optional ([train] extra), as for every config

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RunError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: not a ckakd run config (a mapping of sections)")
    return data


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """The value of a dotted key (``distiller.kwargs.T``) in a nested config mapping; ``KeyError`` if absent."""
    node: Any = config
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, Mapping):
        out = []
        for k, v in node.items():
            out += dotted_keys(v, f"{prefix}.{k}" if prefix else str(k))
        return out or [prefix]
    return [prefix]


def load_run(path: str | os.PathLike) -> RunRecord:
    """The :class:`RunRecord` of one run folder; :class:`RunError` (a ``ValueError``) naming the folder when it
    has no ``config.yaml``, no ``metrics.csv`` or no logged validation metric."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise RunError(f"{path}: no config.yaml (not a run folder written by ckakd, or the file was removed)")
    config = _read_config(path / "config.yaml")
    rows = read_metrics(path)
    if not rows:
        raise RunError(f"{path}: no metrics.csv or no completed epoch in it (did the run finish an epoch?)")
    task = str(config.get("task") or "classification")
    metric = "AP" if task == "detection" else "top1"
    scored = [(i, _float(r.get(f"val/{metric}"))) for i, r in enumerate(rows)]
    scored = [(i, v) for i, v in scored if v is not None]
    if not scored:
        raise RunError(f"{path}: metrics.csv has no val/{metric} value (validation never ran)")
    best_i, best = max(scored, key=lambda iv: iv[1])  # the first epoch reaching the best value
    cka: dict[str, float] = {}
    for k in rows[-1]:
        if k.startswith("cka/"):
            vals = [v for v in (_float(r.get(k)) for r in rows) if v is not None]
            if vals:
                cka[k] = vals[-1]
    times = [v for v in (_float(r.get("epoch_time_s")) for r in rows) if v is not None]
    rate_cols = [k for k in rows[-1] if k.endswith("images_per_s")]
    rates = [v for v in (_float(r.get(rate_cols[0])) for r in rows) if v is not None] if rate_cols else []
    run, distiller = config.get("run") or {}, config.get("distiller") or {}
    teacher = config.get("teacher") or {}
    seed = run.get("seed")
    planned = (config.get("schedule") or {}).get("epochs")
    return RunRecord(
        path=path,
        config=config,
        rows=rows,
        task=task,
        metric=metric,
        method=str(distiller.get("name") or "?"),
        seed=int(seed) if isinstance(seed, int) else None,
        best=best,
        best_epoch=int(float(rows[best_i].get("epoch") or best_i + 1)),
        last=scored[-1][1],
        epochs=len(rows),
        planned_epochs=int(planned) if isinstance(planned, int) else None,
        cka=cka,
        time_per_epoch_s=sum(times) / len(times) if times else None,
        images_per_s=sum(rates) / len(rates) if rates else None,
        teacher_checkpoint=teacher.get("checkpoint") if isinstance(teacher, Mapping) else None,
    )


def _run_folders(root: Path) -> list[Path]:
    """``root`` when it is a run folder (has config.yaml or metrics.csv), else every run folder below it."""
    if (root / "config.yaml").is_file() or (root / "metrics.csv").is_file():
        return [root]
    found = {p.parent for name in ("config.yaml", "metrics.csv") for p in root.rglob(name)}
    return sorted(found)


def collect_runs(paths: Sequence[str | os.PathLike]) -> tuple[list[RunRecord], list[str]]:
    """Every run in ``paths`` (run folders, or folders holding runs at any depth): the records and one message
    per folder that could not be read (the others are still returned). ``ValueError`` for a path that does not
    exist or is not a folder."""
    runs: list[RunRecord] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise ValueError(f"RUN_DIR {given}: no such folder")
        if not root.is_dir():
            raise ValueError(f"RUN_DIR {given}: not a folder (give a run folder or a folder of runs)")
        folders = _run_folders(root)
        if not folders:
            problems.append(f"{root}: no run folders (config.yaml + metrics.csv) in it")
        for folder in folders:
            key = folder.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                runs.append(load_run(folder))
            except RunError as exc:
                problems.append(str(exc))
    return runs, problems


def split_teachers(runs: list[RunRecord]) -> tuple[list[RunRecord], dict[Path, RunRecord]]:
    """The runs whose checkpoints other runs distil from are teachers (kept out of the groups): ``(students and
    others, {teacher folder: run})``."""
    used = set()
    for r in runs:
        if r.teacher_checkpoint:
            used.add(Path(r.teacher_checkpoint).expanduser().resolve().parent)
    teachers = {r.path.resolve(): r for r in runs if r.path.resolve() in used}
    return [r for r in runs if r.path.resolve() not in teachers], teachers
