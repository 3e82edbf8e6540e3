"""``ckakd report``: reading run folders, grouping over seeds, Welch's t-test, markdown / CSV / figure output."""

from __future__ import annotations

import csv
import math
import random
import re
import struct
from pathlib import Path

import pytest

from ckakd.apps import report as R
from ckakd.apps.cli import main
from ckakd.apps.runs import collect_runs, load_run
from ckakd.apps.stats import mean_std, significance, welch_t_test
from ckakd.train.engine.metrics_log import write_metrics_files

yaml = pytest.importorskip("yaml")


def make_run(
    folder: Path,
    method: str,
    seed: int,
    top1: list[float],
    *,
    teacher: Path | None = None,
    task: str = "classification",
    planned: int | None = None,
    extra: dict | None = None,
    kwargs: dict | None = None,
) -> Path:
    """A run folder as the trainer writes it: config.yaml (the sections the report reads) and metrics.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "task": task,
        "run": {"name": folder.name, "out_dir": str(folder.parent), "seed": seed},
        "model": {"name": "resnet8"},
        "teacher": {"name": "resnet8x4" if teacher else None, "checkpoint": str(teacher) if teacher else None},
        "distiller": {"name": method, "kwargs": kwargs or {}},
        "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"epochs": planned or len(top1)},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    metric = "AP" if task == "detection" else "top1"
    history = []
    for i, v in enumerate(top1):
        row = {"epoch": i + 1, "lr": 0.05, "train/loss": 2.0 / (i + 1), "train/ce": 1.0 / (i + 1)}
        if method != "ce":
            row[f"train/{method}"] = 1.0 / (i + 1)
        row.update({f"val/{metric}": v, "val/loss": 1.5 / (i + 1)})
        if teacher:
            row["cka/layer3~layer3"] = 0.8 + 0.01 * i + 0.001 * seed
        row.update(extra or {})
        row["epoch_time_s"] = 0.5 + 0.1 * seed
        history.append(row)
    write_metrics_files(folder, history, rewrite=True)
    return folder


def make_study(root: Path) -> Path:
    """A teacher and ce / kd students over three seeds, kd clearly better."""
    tdir = make_run(root / "teacher", "ce", 0, [90.0, 95.0, 97.5])
    (tdir / "best.pt").write_bytes(b"")
    finals = {"ce": [92.0, 92.5, 91.5], "kd": [95.0, 95.4, 94.8]}
    for method, values in finals.items():
        for seed, v in enumerate(values):
            make_run(
                root / "students" / f"{method}-seed{seed}", method, seed, [80.0, v + 1.0, v], teacher=tdir / "best.pt"
            )
    return root


# ------------------------------------------------------------------------------------------------- statistics


def test_welch_matches_scipy_precomputed():
    # scipy.stats.ttest_ind(a, b, equal_var=False), scipy 1.17.1
    r = welch_t_test([98.2, 98.7, 98.9, 98.4, 98.0], [97.1, 97.9, 97.4, 98.0])
    assert r.t == pytest.approx(3.1392273895581786, rel=1e-12)
    assert r.df == pytest.approx(6.0178661564286395, rel=1e-12)
    assert r.p == pytest.approx(0.020008123354854246, rel=1e-9)
    r = welch_t_test([1.0, 2.0, 3.5], [2.5, 4.0, 6.0, 7.5, 9.0])
    assert (r.t, r.df) == pytest.approx((-2.6409211154684997, 5.920873508275918), rel=1e-12)
    assert r.p == pytest.approx(0.038980355137915465, rel=1e-9)


def test_welch_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.gauss(0, rng.uniform(0.1, 3)) for _ in range(rng.randint(2, 12))]
        b = [rng.gauss(rng.uniform(-3, 3), rng.uniform(0.1, 3)) for _ in range(rng.randint(2, 12))]
        ref = stats.ttest_ind(a, b, equal_var=False)
        got = welch_t_test(a, b)
        assert got.t == pytest.approx(float(ref.statistic), rel=1e-10)
        assert got.p == pytest.approx(float(ref.pvalue), rel=1e-8, abs=1e-300)


def test_welch_degenerate_samples():
    assert math.isnan(welch_t_test([1.0], [2.0, 3.0]).p)  # n < 2
    same = welch_t_test([1.0, 1.0], [1.0, 1.0])
    assert math.isnan(same.p) and math.isnan(same.t)
    apart = welch_t_test([1.0, 1.0], [2.0, 2.0])  # no spread, different means: scipy gives t=-inf, p=0
    assert apart.t == -math.inf and apart.p == 0.0
    assert welch_t_test([1.0, 2.0], [1.5, 1.5]).p == pytest.approx(1.0)


def test_mean_std_is_the_sample_std_and_significance_marks():
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx(math.sqrt(5 / 3))
    assert mean_std([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_std([])
    assert [significance(p) for p in (0.0005, 0.005, 0.03, 0.2, math.nan)] == ["***", "**", "*", "", ""]


# ------------------------------------------------------------------------------------------------- runs


def test_load_run_reads_metric_cka_time_and_seed(tmp_path):
    tdir = tmp_path / "t" / "best.pt"
    run = load_run(make_run(tmp_path / "kd-seed2", "kd", 2, [80.0, 96.0, 95.5], teacher=tdir))
    assert (run.method, run.seed, run.task, run.metric) == ("kd", 2, "classification", "top1")
    assert (run.best, run.best_epoch, run.last, run.epochs) == (96.0, 2, 95.5, 3)
    assert run.cka == {"cka/layer3~layer3": pytest.approx(0.822)}
    assert run.time_per_epoch_s == pytest.approx(0.7)
    assert run.images_per_s is None and run.complete
    rated = load_run(make_run(tmp_path / "r", "kd", 0, [1.0, 2.0], extra={"train/images_per_s": 1200.0}))
    assert rated.images_per_s == pytest.approx(1200.0)


def test_detection_runs_use_ap(tmp_path):
    run = load_run(make_run(tmp_path / "det", "pcka", 0, [10.0, 20.0, 18.0], task="detection"))
    assert run.metric == "AP" and (run.best, run.last) == (20.0, 18.0)


def test_broken_folders_are_named_and_the_others_reported(tmp_path):
    root = make_study(tmp_path / "study")
    (root / "students" / "nometrics").mkdir()
    (root / "students" / "nometrics" / "config.yaml").write_text("run: {seed: 0}\n")
    (root / "students" / "noconfig").mkdir()
    (root / "students" / "noconfig" / "metrics.csv").write_text("epoch,val/top1\n1,50\n")
    make_run(root / "students" / "kd-seed9", "kd", 9, [50.0, 60.0], planned=10, teacher=root / "teacher" / "best.pt")
    runs, problems = collect_runs([root])
    assert len(runs) == 8  # the teacher, 6 students, the incomplete one
    assert any("nometrics" in p and "metrics.csv" in p for p in problems)
    assert any("noconfig" in p and "config.yaml" in p for p in problems)
    rep = R.build_report([root])
    assert [g.label for g in rep.groups] == ["ce", "kd"] and [g.n for g in rep.groups] == [3, 3]
    assert any("kd-seed9" in p and "incomplete (2 of 10 epochs)" in p for p in rep.problems)
    assert R.build_report([root], include_incomplete=True).groups[1].n == 4


def test_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="RUN_DIR .*nosuch: no such folder"):
        collect_runs([tmp_path / "nosuch"])
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        collect_runs([tmp_path / "f.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to report.*empty: no run folders"):
        R.build_report([tmp_path / "empty"])


# ------------------------------------------------------------------------------------------------- groups


def test_groups_baseline_and_welch(tmp_path):
    rep = R.build_report([make_study(tmp_path)])
    assert rep.baseline == "ce" and rep.metric == "top1"
    assert [t.path.name for t in rep.teachers] == ["teacher"] and rep.teacher_value == 97.5
    ce, kd = rep.groups
    assert ce.seeds == [0, 1, 2] and ce.last == pytest.approx(mean_std([92.0, 92.5, 91.5]))
    assert kd.best == pytest.approx(mean_std([96.0, 96.4, 95.8]))
    assert ce.delta is None and ce.welch is None
    assert kd.delta == pytest.approx(95.0667 - 92.0, abs=1e-3)
    ref = welch_t_test([95.0, 95.4, 94.8], [92.0, 92.5, 91.5])
    assert kd.welch == ref and ref.p < 0.01
    assert kd.cka == pytest.approx(0.821) and kd.time_per_epoch_s == pytest.approx(0.6)
    best = R.build_report([tmp_path], compare="best").groups[1]
    assert best.welch == welch_t_test([96.0, 96.4, 95.8], [93.0, 93.5, 92.5])


def test_group_by_config_keys_and_errors(tmp_path):
    for seed, T in ((0, 2.0), (1, 2.0), (2, 4.0)):
        make_run(tmp_path / f"kd{seed}", "kd", seed, [90.0, 91.0 + seed], kwargs={"T": T})
    rep = R.build_report([tmp_path], group_by=["method", "distiller.kwargs.T"])
    assert [g.label for g in rep.groups] == ["kd distiller.kwargs.T=2.0", "kd distiller.kwargs.T=4.0"]
    assert rep.baseline is None  # no ce group: the default baseline is dropped
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        R.build_report([tmp_path], group_by=["optim.lrr"])
    with pytest.raises(ValueError, match=r"unknown config key 'methd' \(did you mean 'method'\?\)"):
        R.build_report([tmp_path], group_by=["methd"])
    with pytest.raises(ValueError, match=r"--baseline 'kdd': no such group"):
        R.build_report([tmp_path], group_by=["distiller.kwargs.T"], baseline="kdd")
    with pytest.raises(ValueError, match="--compare"):
        R.group_runs(rep.runs, compare="median")


def test_tasks_do_not_mix(tmp_path):
    make_run(tmp_path / "a", "kd", 0, [90.0, 91.0])
    make_run(tmp_path / "b", "pcka", 0, [10.0, 12.0], task="detection")
    rep = R.build_report([tmp_path])
    assert [r.path.name for r in rep.runs] == ["a"]
    assert any("b: a detection run among classification runs" in p for p in rep.problems)


# ------------------------------------------------------------------------------------------------- outputs


def test_markdown_table(tmp_path):
    text = R.format_markdown(R.build_report([make_study(tmp_path)]), per_run=True)
    lines = text.splitlines()
    assert lines[0].startswith("| method | n | seeds | last top-1 % (mean ± std) | best top-1 % (mean ± std) |")
    assert "| ce | 3 | 0,1,2 | 92.00 ± 0.50 | 93.00 ± 0.50 | baseline | — | 0.821 | 0.60 s | — |" in lines
    kd = next(line for line in lines if line.startswith("| kd |"))
    p = welch_t_test([95.0, 95.4, 94.8], [92.0, 92.5, 91.5]).p
    assert f"| +3.07 | {p:.3g} ** |" in kd
    assert "Welch's two-sided t-test of the last values against ce" in text and "teacher:" in text
    assert sum(line.startswith(f"| {tmp_path}") for line in lines) == 6  # one row per student run


def test_csv_files_read_back(tmp_path):
    rep = R.build_report([make_study(tmp_path / "s")])
    R.write_groups_csv(rep, tmp_path / "g.csv")
    R.write_runs_csv(rep, tmp_path / "r.csv")
    with open(tmp_path / "g.csv", newline="") as f:
        groups = list(csv.DictReader(f))
    assert [g["group"] for g in groups] == ["ce", "kd"] and groups[1]["significance"] == "**"
    assert float(groups[1]["p_value"]) == pytest.approx(rep.groups[1].welch.p)
    assert groups[0]["p_value"] == "" and groups[0]["seeds"] == "0 1 2" and groups[0]["images_per_s"] == ""
    with open(tmp_path / "r.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 6 and float(runs[0]["cka/layer3~layer3"]) == pytest.approx(0.82)
    assert {r["method"] for r in runs} == {"ce", "kd"}


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_cli_report_writes_everything(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    root = make_study(tmp_path / "study")
    (root / "students" / "broken").mkdir()
    (root / "students" / "broken" / "config.yaml").write_text("run: {seed: 0}\n")
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "report",
        str(root),
        "--csv",
        str(out / "g.csv"),
        "--runs-csv",
        str(out / "r.csv"),
        "--md",
        str(out / "t.md"),
    ]
    assert main([*args, "--plot", str(out / "curves.png"), "--plot-format", "svg", "--plot-format", "pdf"]) == 0
    captured = capsys.readouterr()
    assert "| kd | 3 | 0,1,2 |" in captured.out and "written:" in captured.out
    assert "ckakd report: skipped" in captured.err and "broken: no metrics.csv" in captured.err
    assert (out / "t.md").read_text().startswith("| method |")
    assert (out / "g.csv").read_text().splitlines()[2].startswith("kd,3,0 1 2,top1,")
    assert len((out / "r.csv").read_text().splitlines()) == 7
    assert (out / "curves.svg").read_text().lstrip().startswith("<?xml") and "<svg" in (out / "curves.svg").read_text()
    assert (out / "curves.pdf").read_bytes()[:5] == b"%PDF-"
    # 6 panels (val top-1, val loss, train loss, ce, kd, CKA) in 3 columns: 12.9 x 7.2 inches at 150 dpi
    assert _png_size(out / "curves.png") == (1935, 1080)


def test_cli_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nosuch")]) == 2
    assert "nosuch: no such folder" in capsys.readouterr().err
    make_run(tmp_path / "a", "kd", 0, [90.0, 91.0])
    assert main(["report", str(tmp_path), "--group-by", "optim.lrr"]) == 2
    assert "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--plot", str(tmp_path / "x.jpg")]) == 2
    assert "--plot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--plot-format", "eps"])


def test_readme_report_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "ckakd.apps.report" in b]
    assert len(blocks) == 1, "the README's report example"
    make_study(tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "| kd | 3 | 0,1,2 |" in out and namespace["kd"].welch.p < 0.01
    assert (tmp_path / "groups.csv").is_file() and (tmp_path / "curves.svg").is_file()


def test_markdown_says_why_p_is_missing(tmp_path):
    make_run(tmp_path / "ce0", "ce", 0, [90.0, 91.0])
    make_run(tmp_path / "ce1", "ce", 1, [90.0, 92.0])
    make_run(tmp_path / "kd0", "kd", 0, [90.0, 93.0])  # one seed: no test
    assert "| kd | 1 | 0 | 93.00 ± 0.00 | 93.00 ± 0.00 | +1.50 | n/a (n < 2) |" in R.format_markdown(
        R.build_report([tmp_path])
    )
    for seed in (1, 2):
        make_run(tmp_path / f"ce{seed}", "ce", seed, [90.0, 91.0])
        make_run(tmp_path / f"kd{seed}", "kd", seed, [90.0, 91.0])
    make_run(tmp_path / "ce0", "ce", 0, [90.0, 91.0])
    make_run(tmp_path / "kd0", "kd", 0, [90.0, 91.0])
    assert "| +0.00 | n/a (no spread) |" in R.format_markdown(R.build_report([tmp_path]))
