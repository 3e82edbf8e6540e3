"""The main job: distillation on the embedded digits data (scikit-learn's 1,797 real 8×8 images).

Trains (or reuses a cached) teacher with the shipped ``digits/teacher`` config, computes its WKD class
interrelation, then trains the ``digits/*`` students — CE, KD, DKD, RCKA, WKD-L and WKD-L+F by default —
over several seeds with the reference trainer, and reports student top-1 (mean ± std over seeds), the
teacher–student CKA of the last stage and the training time, honestly, whatever they are: the table is
``ckakd report``'s (:mod:`ckakd.apps.report`: last and best top-1 as mean ± std, the difference to CE with
Welch's t-test, CKA, time per epoch). Writes ``results.json``, ``results.md`` and ``curves.png`` (mean ± std
curves over seeds, the teacher's top-1 as a reference line) under ``--out``.

    ckakd demo [--methods ce,kd,dkd,rcka,wkd_l,wkd_lf] [--seeds 3] [--epochs N] [--out runs/demo] [--plot-format svg]
    ckakd-demo ...
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckakd.apps.errors import run_guarded, run_reporting_missing_extras
from ckakd.apps.report import Report, build_report, format_markdown, plot_report
from ckakd.apps.runs import load_run
from ckakd.train.engine.curves import VECTOR_FORMATS
from ckakd.train.fileio import atomic_write_bytes, probe_writable

DEFAULT_METHODS = ("ce", "kd", "dkd", "rcka", "wkd_l", "wkd_lf")

__all__ = ["DEFAULT_METHODS", "add_demo_arguments", "run_demo", "run_demo_from_args", "main", "write_report"]


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ckakd demo`` options."""
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated digits/<method> configs")
    p.add_argument("--seeds", type=int, default=5, help="student seeds per method (default 5)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the configs')")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the config's)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--plot-format", action="append", default=[], choices=("png", *VECTOR_FORMATS),
                   help="also write curves.svg / curves.pdf (repeatable; curves.png is always written)")  # fmt: skip


def _teacher(out: Path, teacher_epochs: int | None, retrain: bool, progress: bool) -> tuple[Path, dict]:
    """The teacher checkpoint (trained now or reused when the resolved config is unchanged) and its result."""
    # the config loader needs pyyaml (optional): imported when the demo runs, so that a missing one is reported
    from ckakd.train import config as C
    from ckakd.train import runner

    overrides = [f"run.out_dir={out}", "run.name=teacher", f"run.progress={str(progress).lower()}"]
    if teacher_epochs is not None:
        overrides.append(f"schedule.epochs={teacher_epochs}")
    cfg = C.load_config("digits/teacher", overrides)
    if retrain or not (runner.run_dir(cfg) / "best.pt").is_file():
        print(f"training the teacher ({cfg.model.name}, {cfg.schedule.epochs} epochs) ...")
    ckpt, best, reused = runner.cached_train_teacher(cfg, retrain=retrain)
    if reused:
        print(f"reusing the cached teacher {ckpt} (val top-1 {best:.2f} %); --retrain-teacher to train it again")
    return ckpt, {"best_top1": best, "reused": reused}


def write_report(out: Path, stem: str, results: dict[str, Any], table: str, files: list[str]) -> None:
    """``<stem>.json`` and ``<stem>.md`` under ``out``, then the table and where everything went."""
    atomic_write_bytes(out / f"{stem}.json", json.dumps(results, indent=2, default=float).encode())
    atomic_write_bytes(out / f"{stem}.md", (table + "\n").encode())
    print()
    print(table)
    print(f"\noutputs: {out}/ ({', '.join([f'{stem}.json', f'{stem}.md', *files])})")


def run_demo(
    methods: list[str],
    seeds: int,
    out: str | Path,
    *,
    epochs: int | None = None,
    teacher_epochs: int | None = None,
    retrain_teacher: bool = False,
    progress: bool = True,
    plot_formats: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the demo; returns ``{"teacher": ..., "runs": [...], "summary": [...]}`` (also written as JSON).
    ``plot_formats``: ``"svg"`` / ``"pdf"`` copies of ``curves.png``."""
    # the config loader needs pyyaml (optional): imported when the demo runs, so that a missing one is reported
    from ckakd.train import config as C
    from ckakd.train import runner

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    for flag, value in (("--epochs", epochs), ("--teacher-epochs", teacher_epochs)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    known = set(C.list_configs())
    unknown = [m for m in methods if f"digits/{m}" not in known]
    if unknown:
        shipped = sorted(n.split("/", 1)[1] for n in known if n.startswith("digits/") and n != "digits/base")
        raise ValueError(f"unknown demo method(s) {unknown}; shipped digits configs: {', '.join(shipped)}")
    out = Path(out).expanduser()
    problem = probe_writable(out)
    if problem:
        raise ValueError(f"--out {out}: {problem}")
    # every student config resolves (epochs included) before the teacher trains
    extra = [] if epochs is None else [f"schedule.epochs={epochs}"]
    for m in methods:
        C.load_config(f"digits/{m}", [f"run.out_dir={out / 'students'}", *extra])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt, teacher = _teacher(out, teacher_epochs, retrain_teacher, progress)
    tcfg = C.load_config("digits/teacher", [f"run.out_dir={out}", "run.name=teacher"])
    cost_path = ckpt.parent / "interrelation_cka.pt"
    if not cost_path.is_file() or cost_path.stat().st_mtime < ckpt.stat().st_mtime:
        icfg = C.load_config(
            "digits/kd", [f"teacher.name={tcfg.model.name}", f"teacher.checkpoint={ckpt}", "run.progress=false"]
        )
        runner.compute_interrelation(icfg, kernel="cka", out=cost_path)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a demo dependency
        tqdm = None
    jobs = [(m, s) for m in methods for s in range(seeds)]
    bar = tqdm(total=len(jobs), desc="students", disable=not progress) if tqdm else None
    runs: list[dict[str, Any]] = []
    for method, seed in jobs:
        overrides = [
            f"run.out_dir={out / 'students'}",
            f"run.name={method}-seed{seed}",
            f"run.seed={seed}",
            "run.progress=false",
            f"teacher.name={tcfg.model.name}",
            f"teacher.checkpoint={ckpt}",
        ]
        if method in ("wkd_l", "wkd_lf"):
            overrides.append(f"distiller.cost={cost_path}")
        if epochs is not None:
            overrides.append(f"schedule.epochs={epochs}")
        cfg = C.load_config(f"digits/{method}", overrides)
        start = time.perf_counter()
        result = runner.distill(cfg, baseline=True)  # the `ce` row is the student trained alone
        record = load_run(result["out_dir"])
        runs.append(
            {
                "method": method,
                "seed": seed,
                "student": cfg.model.name,
                "final_top1": float(result["final_top1"]),
                "best_top1": float(result["best_top1"]),
                "cka": float("nan") if record.cka_last_stage is None else record.cka_last_stage,
                "train_time_s": time.perf_counter() - start,
                "curve": [float(r["val/top1"]) for r in record.rows if r.get("val/top1")],
                "out_dir": result["out_dir"],
            }
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(last=f"{method}/{seed}: {runs[-1]['final_top1']:.3f}")
    if bar is not None:
        bar.close()

    report = build_report([ckpt.parent, *(r["out_dir"] for r in runs)], baseline="ce" if "ce" in methods else None)
    results = {
        "teacher": {"checkpoint": str(ckpt), **{k: v for k, v in teacher.items() if k != "out_dir"}},
        "student": runs[0]["student"] if runs else None,
        "runs": runs,
        "summary": _summary(report, runs),
        "total_time_s": time.perf_counter() - t0,
    }
    files = _plot(report, out / "curves.png", [f for f in plot_formats if f != "png"])
    write_report(out, "results", results, _table(results, report), [*files, "teacher/", "students/"])
    return results


def _summary(report: Report, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results.json``'s per-method summary from the report's groups (wall-clock time per run from ``runs``)."""
    out = []
    for g in report.groups:
        wall = [r["train_time_s"] for r in runs if r["method"] == g.label]
        out.append(
            {
                "method": g.label,
                "top1_mean": g.last[0],
                "top1_std": g.last[1],
                "best_top1_mean": g.best[0],
                "best_top1_std": g.best[1],
                "cka_mean": float("nan") if g.cka is None else g.cka,
                "time_s_mean": sum(wall) / len(wall) if wall else float("nan"),
                "time_per_epoch_s": g.time_per_epoch_s,
                "delta_vs_ce": g.delta,
                "p_welch_vs_ce": None if g.welch is None else g.welch.p,
                "seeds": g.n,
            }
        )
    return out


def _plot(report: Report, path: Path, formats: Sequence[str]) -> list[str]:
    """``curves.png`` (+ ``formats``) of the report; ``[]`` and a line saying so without matplotlib."""
    try:
        return [p.name for p in plot_report(report, path, formats, title=_plot_title(report))]
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return []


def _plot_title(report: Report) -> str:
    seeds = sorted({s for g in report.groups for s in g.seeds if s is not None})
    return f"ckakd demo (digits): {', '.join(g.label for g in report.groups)}; mean ± std over seeds {seeds}"


def _table(results: dict[str, Any], report: Report) -> str:
    """The teacher line, then ``ckakd report``'s table of the students."""
    t = results["teacher"]
    wall = ", ".join(f"{s['method']} {s['time_s_mean']:.1f} s" for s in results["summary"])
    return "\n".join(
        [
            f"teacher val top-1: {t.get('best_top1', float('nan')):.2f} %"
            f" ({'cached' if t.get('reused') else 'trained now'}); student: {results['student']}; "
            f"total time {results['total_time_s']:.0f} s",
            "",
            format_markdown(report),
            f"wall-clock time per student run: {wall}",
        ]
    )


def run_demo_from_args(args: argparse.Namespace) -> int:
    """``ckakd demo``: 0 on success, 2 on bad arguments, 1 when an output cannot be written, 130 on Ctrl-C."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    def body() -> None:
        run_demo(
            methods,
            args.seeds,
            args.out,
            epochs=args.epochs,
            teacher_epochs=args.teacher_epochs,
            retrain_teacher=args.retrain_teacher,
            progress=not args.no_progress,
            plot_formats=args.plot_format,
        )

    return run_guarded("demo", body, after_interrupt="run it again to continue (a trained teacher is reused)")


def main(argv: list[str] | None = None) -> int:
    """``ckakd-demo``: ``ckakd demo`` as its own console script; the exit status."""
    parser = argparse.ArgumentParser(prog="ckakd demo", description=__doc__.split("\n\n")[0])
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_missing_extras("demo", lambda: run_demo_from_args(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
