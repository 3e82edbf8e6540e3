"""``ckakd report``: compare finished runs. Reads each run folder (``config.yaml`` + ``metrics.csv``, as written by
``ckakd train-teacher`` / ``distill`` / ``detect-*``), groups the runs over seeds (by method, or any config keys),
and tabulates the best and last validation metric (top-1 or COCO AP) as mean ± sample std with n, the
difference to a baseline group with Welch's two-sided t-test, the teacher–student CKA of the last epoch, time per
epoch and images/s, as markdown (stdout) and CSV; ``--plot`` draws every group's curves in one figure.

    ckakd report RUN_DIR... [--baseline ce] [--group-by method] [--compare last|best] [--csv F] [--runs-csv F]
                 [--md F] [--plot F.png] [--plot-format svg|pdf] [--per-run]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckakd.apps.errors import run_guarded
from ckakd.apps.runs import RunRecord, collect_runs, config_value, dotted_keys, split_teachers
from ckakd.apps.stats import WelchResult, mean_std, significance, welch_t_test
from ckakd.train.engine.curves import VECTOR_FORMATS, plot_run_groups
from ckakd.train.fileio import atomic_write_bytes
from ckakd.train.schema import suggest, suggest_key

__all__ = [
    "GROUP_ALIASES",
    "GroupSummary",
    "Report",
    "RunRecord",
    "WelchResult",
    "add_report_arguments",
    "build_report",
    "collect_runs",
    "format_markdown",
    "group_runs",
    "mean_std",
    "plot_report",
    "run_report_from_args",
    "welch_t_test",
    "write_groups_csv",
    "write_runs_csv",
]

# --group-by names that are not config keys
GROUP_ALIASES = {"method": "distiller.name", "model": "model.name", "teacher": "teacher.name", "data": "data.name"}
METRIC_LABELS = {"top1": "top-1 %", "AP": "AP"}
_COMPARE = ("last", "best")


# ---------------------------------------------------------------------------------------------------- groups


@dataclass
class GroupSummary:
    """The runs of one group: ``label``, the ``runs``, ``last`` / ``best`` as (mean, sample std), CKA / time per
    epoch / images/s means (``None`` when no run logged them), and against the baseline group: ``delta`` (mean
    of the compared value minus the baseline's) and ``welch``."""

    label: str
    runs: list[RunRecord]
    last: tuple[float, float]
    best: tuple[float, float]
    cka: float | None
    time_per_epoch_s: float | None
    images_per_s: float | None
    delta: float | None = None
    welch: WelchResult | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return sum(vs) / len(vs) if vs else None


def _group_keys(runs: Sequence[RunRecord], group_by: Sequence[str]) -> list[str]:
    keys = [GROUP_ALIASES.get(g, g) for g in group_by]
    if not keys:
        raise ValueError("--group-by: name at least one key (method, model, or a config key like optim.lr)")
    for g, key in zip(group_by, keys, strict=True):
        if runs and all(_missing(r.config, key) for r in runs):
            known = sorted({k for r in runs for k in dotted_keys(r.config)})
            hint = suggest_key(key, key.rsplit(".", 1)[-1], known) or suggest(g, list(GROUP_ALIASES))
            raise ValueError(f"--group-by: unknown config key {g!r}{hint}")
    return keys


def _missing(config: Mapping[str, Any], key: str) -> bool:
    try:
        config_value(config, key)
    except KeyError:
        return True
    return False


def _label(run: RunRecord, keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        try:
            v = config_value(run.config, key)
        except KeyError:
            v = "?"
        text = "none" if v is None else str(v)
        parts.append(text if key in ("distiller.name", "model.name") or len(keys) == 1 else f"{key}={text}")
    return " ".join(parts)


def group_runs(
    runs: Sequence[RunRecord],
    group_by: Sequence[str] = ("method",),
    baseline: str | None = None,
    compare: str = "last",
) -> list[GroupSummary]:
    """Group ``runs`` by the values of ``group_by`` (``method`` = ``distiller.name``, ``model``, or any dotted
    config key), in order of first appearance; with ``baseline`` (a group label), each other group's ``delta``
    and Welch test of its ``compare`` (``last`` / ``best``) values against the baseline's. ``ValueError`` naming
    the argument for an unknown key, baseline or compare."""
    if compare not in _COMPARE:
        raise ValueError(f"--compare must be one of {', '.join(_COMPARE)}, got {compare!r}")
    keys = _group_keys(runs, group_by)
    order: dict[str, list[RunRecord]] = {}
    for r in runs:
        order.setdefault(_label(r, keys), []).append(r)
    groups = [
        GroupSummary(
            label=label,
            runs=rs,
            last=mean_std([r.last for r in rs]),
            best=mean_std([r.best for r in rs]),
            cka=_mean_or_none([r.cka_last_stage for r in rs]),
            time_per_epoch_s=_mean_or_none([r.time_per_epoch_s for r in rs]),
            images_per_s=_mean_or_none([r.images_per_s for r in rs]),
        )
        for label, rs in order.items()
    ]
    if baseline is not None:
        base = next((g for g in groups if g.label == baseline), None)
        if base is None:
            labels = [g.label for g in groups]
            raise ValueError(f"--baseline {baseline!r}: no such group{suggest(baseline, labels)}; groups: {labels}")
        ref = [getattr(r, compare) for r in base.runs]
        for g in groups:
            if g is not base:
                vals = [getattr(r, compare) for r in g.runs]
                g.delta = mean_std(vals)[0] - mean_std(ref)[0]
                g.welch = welch_t_test(vals, ref)
    return groups


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """What ``ckakd report`` found: the grouped ``groups``, every reported ``runs``, the ``teachers`` (runs others
    distil from), the ``problems`` (one message per folder left out), the ``metric``, ``baseline`` and
    ``compare`` used."""

    groups: list[GroupSummary]
    runs: list[RunRecord]
    teachers: list[RunRecord]
    problems: list[str]
    metric: str
    baseline: str | None
    compare: str

    @property
    def teacher_value(self) -> float | None:
        """The best validation metric of the (one) teacher, ``None`` without one or with several."""
        values = {t.best for t in self.teachers}
        return values.pop() if len(values) == 1 else None


def build_report(
    paths: Sequence[str | os.PathLike],
    *,
    group_by: Sequence[str] = ("method",),
    baseline: str | None = "ce",
    compare: str = "last",
    include_incomplete: bool = False,
) -> Report:
    """Read the runs under ``paths`` and group them (:func:`group_runs`). The default ``baseline="ce"`` is used
    when a ``ce`` group exists (an explicit other name must exist). Runs that stopped before their planned epochs
    are left out with a message unless ``include_incomplete``; runs of another task than the first one too (top-1
    and AP do not mix). ``ValueError`` when no run is left."""
    runs, problems = collect_runs(paths)
    runs, teacher_map = split_teachers(runs)
    kept: list[RunRecord] = []
    for r in runs:
        if not r.complete and not include_incomplete:
            problems.append(
                f"{r.path}: incomplete ({r.epochs} of {r.planned_epochs} epochs); left out (--include-incomplete "
                "reports it)"
            )
        elif kept and r.task != kept[0].task:
            problems.append(f"{r.path}: a {r.task} run among {kept[0].task} runs; left out (report them apart)")
        else:
            kept.append(r)
    if not kept:
        detail = "; ".join(problems) if problems else "no runs found"
        raise ValueError(f"RUN_DIR: nothing to report ({detail})")
    metric = kept[0].metric
    teachers = [t for t in teacher_map.values() if t.metric == metric]
    labels_probe = group_runs(kept, group_by)
    if baseline == "ce" and not any(g.label == "ce" for g in labels_probe):
        baseline = None
    groups = group_runs(kept, group_by, baseline, compare)
    return Report(groups, kept, teachers, problems, metric, baseline, compare)


def _pm(ms: tuple[float, float], digits: int = 2) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _opt(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _seeds_text(seeds: Sequence[int | None]) -> str:
    known = sorted(s for s in seeds if s is not None)
    text = ",".join(str(s) for s in known)
    return text + ("," if known and len(known) < len(seeds) else "") + ("?" if len(known) < len(seeds) else "")


def _p_text(g: GroupSummary, baseline_n: int) -> str:
    if g.welch is None:
        return "—"
    if math.isnan(g.welch.p):
        return "n/a (n < 2)" if min(g.n, baseline_n) < 2 else "n/a (no spread)"
    return f"{g.welch.p:.3g}" + (f" {significance(g.welch.p)}" if significance(g.welch.p) else "")


def format_markdown(report: Report, *, per_run: bool = False) -> str:
    """The grouped table (and with ``per_run`` one row per run) as markdown, with a legend line."""
    unit = METRIC_LABELS.get(report.metric, report.metric)
    cmp = report.compare
    head = [
        "method" if _is_method(report) else "group",
        "n",
        "seeds",
        f"last {unit} (mean ± std)",
        f"best {unit} (mean ± std)",
    ]
    if report.baseline is not None:
        head += [f"Δ {cmp} vs {report.baseline}", "p (Welch)"]
    head += ["CKA to teacher (last stage)", "time / epoch", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_n = next((g.n for g in report.groups if g.label == report.baseline), 0)
    for g in report.groups:
        cells = [g.label, str(g.n), _seeds_text(g.seeds), _pm(g.last), _pm(g.best)]
        if report.baseline is not None:
            if g.label == report.baseline:
                cells += ["baseline", "—"]
            else:
                cells += [f"{g.delta:+.2f}", _p_text(g, base_n)]
        cells += [_opt(g.cka, ".3f"), _opt(g.time_per_epoch_s, ".2f") + (" s" if g.time_per_epoch_s else ""),
                  _opt(g.images_per_s, ".0f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"mean ± sample std over n runs; last = the final epoch's validation {unit}, best = its maximum"]
    if report.baseline is not None:
        notes.append(
            f"p: Welch's two-sided t-test of the {cmp} values against {report.baseline}"
            " (* < 0.05, ** < 0.01, *** < 0.001)"
        )
    if report.teachers:
        notes.append("teacher: " + ", ".join(f"{t.path} best {t.best:.2f}" for t in report.teachers))
    lines += ["", "; ".join(notes)]
    if per_run:
        lines += ["", "| run | group | seed | epochs | last | best (epoch) | CKA | time / epoch | images/s |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for g in report.groups:
            for r in g.runs:
                lines.append(
                    f"| {r.path} | {g.label} | {r.seed} | {r.epochs} | {r.last:.2f} | {r.best:.2f} ({r.best_epoch}) | "
                    f"{_opt(r.cka_last_stage, '.3f')} | {_opt(r.time_per_epoch_s, '.2f')} | "
                    f"{_opt(r.images_per_s, '.0f')} |"
                )
    return "\n".join(lines)


def _is_method(report: Report) -> bool:
    return all(len(g.runs) and g.label == g.runs[0].method for g in report.groups)


def _csv_text(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row] for row in rows])
    return buf.getvalue().encode()


def write_groups_csv(report: Report, path: str | os.PathLike) -> None:
    """One row per group: label, n, seeds, metric, last/best mean and std, delta and Welch t / df / p vs the
    baseline, significance, CKA, time per epoch (s), images/s (empty where unknown)."""
    header = ["group", "n", "seeds", "metric", "last_mean", "last_std", "best_mean", "best_std", "baseline",
              "compare", "delta", "welch_t", "welch_df", "p_value", "significance", "cka_last_stage",
              "time_per_epoch_s", "images_per_s"]  # fmt: skip
    rows = []
    for g in report.groups:
        w = g.welch
        rows.append([g.label, g.n, " ".join(str(s) for s in g.seeds), report.metric, *g.last, *g.best,
                     report.baseline, report.compare, g.delta, None if w is None else w.t,
                     None if w is None else w.df, None if w is None else w.p,
                     None if w is None else significance(w.p), g.cka, g.time_per_epoch_s, g.images_per_s])  # fmt: skip
    atomic_write_bytes(Path(path), _csv_text(header, rows))


def write_runs_csv(report: Report, path: str | os.PathLike) -> None:
    """One row per run: folder, group, method, seed, task, metric, epochs, best, best_epoch, last, each CKA
    column, time per epoch (s), images/s."""
    cka_cols: list[str] = []
    for r in report.runs:
        cka_cols += [k for k in r.cka if k not in cka_cols]
    header = ["run", "group", "method", "seed", "task", "metric", "epochs", "best", "best_epoch", "last", *cka_cols,
              "time_per_epoch_s", "images_per_s"]  # fmt: skip
    rows = [
        [
            str(r.path),
            g.label,
            r.method,
            r.seed,
            r.task,
            r.metric,
            r.epochs,
            r.best,
            r.best_epoch,
            r.last,
            *(r.cka.get(k) for k in cka_cols),
            r.time_per_epoch_s,
            r.images_per_s,
        ]  # fmt: skip
        for g in report.groups
        for r in g.runs
    ]
    atomic_write_bytes(Path(path), _csv_text(header, rows))


def plot_report(report: Report, path: str | os.PathLike, formats: Sequence[str] = (), title: str = "") -> list[Path]:
    """Every group's curves in one figure (:func:`~ckakd.train.engine.curves.plot_run_groups`): mean ± std over
    its seeds, the teacher's best validation metric as a dashed line when known; legend entries name the group
    and its seeds. Returns the files written."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: the figure is a .png file (--plot-format svg|pdf adds a vector copy)")
    groups = [(f"{g.label} (seeds {_seeds_text(g.seeds)})", [r.rows for r in g.runs]) for g in report.groups]
    teacher = report.teacher_value
    reference = None if teacher is None else (f"teacher {teacher:.2f}", teacher)
    unit = METRIC_LABELS.get(report.metric, report.metric)
    title = title or "; ".join(f"{g.label}: n={g.n} (seeds {_seeds_text(g.seeds)})" for g in report.groups)
    return plot_run_groups(
        groups, path, metric=report.metric, metric_label=unit, reference=reference, title=title, formats=formats
    )


# ---------------------------------------------------------------------------------------------------- command


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ckakd report`` options."""
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding runs")
    p.add_argument("--baseline", default="ce", help="the group the others are tested against (default ce, if any)")
    p.add_argument(
        "--group-by",
        default="method",
        help="comma-separated: method, model, or config keys (e.g. method,distiller.kwargs.T); default method",
    )
    p.add_argument("--compare", default="last", choices=_COMPARE, help="the value tested: last (default) or best")
    p.add_argument("--csv", default=None, metavar="F", help="write the grouped table as CSV")
    p.add_argument("--runs-csv", default=None, metavar="F", help="write one CSV row per run")
    p.add_argument("--md", default=None, metavar="F", help="write the markdown table to F (it is printed too)")
    p.add_argument("--plot", default=None, metavar="F.png", help="draw every group's curves in one figure")
    p.add_argument("--plot-format", action="append", default=[], choices=("png", *VECTOR_FORMATS),
                   help="also write the figure as svg / pdf (repeatable; the PNG is always written)")  # fmt: skip
    p.add_argument("--per-run", action="store_true", help="add one table row per run")
    p.add_argument("--include-incomplete", action="store_true", help="report runs that stopped early too")


def run_report_from_args(args: argparse.Namespace) -> int:
    """``ckakd report``: 0 on success, 2 on bad arguments or nothing to report, 1 when an output cannot be
    written. Folders that cannot be read are named on stderr; the others are reported."""

    def body() -> None:
        group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
        if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
            raise ValueError(f"--plot {args.plot}: the figure is a .png file (--plot-format svg|pdf adds a copy)")
        report = build_report(
            args.run_dirs,
            group_by=group_by,
            baseline=args.baseline,
            compare=args.compare,
            include_incomplete=args.include_incomplete,
        )
        for problem in report.problems:
            print(f"ckakd report: skipped {problem}", file=sys.stderr)
        text = format_markdown(report, per_run=args.per_run)
        print(text)
        written = []
        if args.md:
            atomic_write_bytes(Path(args.md), (text + "\n").encode())
            written.append(args.md)
        if args.csv:
            write_groups_csv(report, args.csv)
            written.append(args.csv)
        if args.runs_csv:
            write_runs_csv(report, args.runs_csv)
            written.append(args.runs_csv)
        if args.plot:
            formats = list(dict.fromkeys(f for f in args.plot_format if f != "png"))
            written += [str(p) for p in plot_report(report, args.plot, formats)]
        if written:
            print(f"\nwritten: {', '.join(written)}")

    return run_guarded("report", body)
