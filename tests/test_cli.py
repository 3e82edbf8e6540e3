"""The ``ckakd`` command end to end on tiny digits runs, and its errors on bad configs (before training)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from ckakd import cli  # noqa: E402

TINY = ["schedule.epochs=1", "data.max_train_batches=3", "run.progress=false"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A digits teacher trained for one tiny epoch (shared by the tests of this module)."""
    out = tmp_path_factory.mktemp("cli")
    code = cli.main(["train-teacher", "digits/teacher", f"run.out_dir={out}", "run.name=teacher", *TINY])
    assert code == 0
    return out / "teacher"


def test_info_and_configs(capsys):
    code, out, _ = run_cli(["info"], capsys)
    assert code == 0 and "torch" in out and "backends:" in out and "cpp" in out
    code, out, _ = run_cli(["info", "--json"], capsys)
    assert code == 0 and json.loads(out)["backends"]["torch"]["active"] is True
    code, out, _ = run_cli(["configs"], capsys)
    names = out.split()
    assert code == 0 and {"digits/teacher", "digits/rcka", "digits/wkd_l", "cifar100/rcka"} <= set(names)


def test_train_teacher_writes_outputs(teacher):
    for name in ("config.yaml", "latest.pt", "best.pt", "metrics.csv", "metrics.jsonl"):
        assert (teacher / name).is_file(), name
    from ckakd.train.config import load_config

    saved = load_config(teacher / "config.yaml")
    assert saved.schedule.epochs == 1 and saved.data.max_train_batches == 3 and saved.run.name == "teacher"


def test_eval_interrelation_and_distill(teacher, tmp_path, capsys):
    from ckakd.train.config import load_config

    tname = load_config(teacher / "config.yaml").model.name
    code, out, err = run_cli(["eval", "digits/teacher", "--checkpoint", str(teacher / "best.pt")], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert 0.0 <= metrics["top1"] <= 100.0 and metrics["n"] == 450  # percent

    cost = tmp_path / "ir.pt"
    base = [f"teacher.name={tname}", f"teacher.checkpoint={teacher / 'best.pt'}"]
    code, out, err = run_cli(["interrelation", "digits/wkd_l", *base, "--out", str(cost), "run.progress=false"], capsys)
    assert code == 0, err
    from ckakd.interrelation import load_interrelation

    ir, meta = load_interrelation(cost)
    assert ir.shape == (10, 10) and meta["kernel"] == "cka"
    assert torch.allclose(torch.diagonal(ir), torch.ones(10, dtype=ir.dtype), atol=1e-5)

    for method in ("rcka", "wkd_lf"):
        extra = [f"distiller.cost={cost}"] if method == "wkd_lf" else []
        args = ["distill", f"digits/{method}", *base, *extra, f"run.out_dir={tmp_path}", f"run.name={method}", *TINY]
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        rows = (tmp_path / method / "metrics.csv").read_text().splitlines()
        assert len(rows) == 2 and any(h.startswith("cka/") for h in rows[0].split(","))
        assert (tmp_path / method / "config.yaml").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train-teacher", "digits/teacher", "optim.lrr=0.1"], "optim.lrr"),
        (["train-teacher", "digits/teacher", "optim.lr=fast"], "optim.lr"),
        (["train-teacher", "digits/teacher", "data.name=cifar100", "data.root=/nonexistent/cifar"], "not found"),
        (["train-teacher", "digits/teacher", "model.name=resnet9000"], "resnet9000"),
        (["distill", "digits/kd"], "teacher.checkpoint"),
        (["train-teacher", "no/such/config"], "no/such/config"),
    ],
)
def test_bad_configs_fail_before_training(args, message, tmp_path, capsys):
    code, _, err = run_cli([*args, f"run.out_dir={tmp_path}", *TINY], capsys)
    assert code == 2
    assert message in err
    assert not any(tmp_path.rglob("*.pt")), "nothing may be trained or written"


def test_wrong_format_dataset_folder(tmp_path, capsys):
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "train").write_text("not a pickle")
    code, _, err = run_cli(
        ["train-teacher", "digits/teacher", "data.name=cifar100", f"data.root={tmp_path / 'cifar'}", *TINY], capsys
    )
    assert code == 2 and "CIFAR-100" in err


def test_distill_errors_name_the_problem(teacher, tmp_path, capsys):
    from ckakd.train.config import load_config

    tname = load_config(teacher / "config.yaml").model.name
    ckpt = str(teacher / "best.pt")
    other = "resnet8" if tname != "resnet8" else "resnet14"
    cases = [
        ([f"teacher.name={other}", f"teacher.checkpoint={ckpt}"], "teacher.checkpoint"),
        ([f"teacher.name={tname}", f"teacher.checkpoint={ckpt}", "train.cka_pairs=[[nolayer,layer3]]"], "nolayer"),
        ([f"teacher.name={tname}", f"teacher.checkpoint={ckpt}", "teacher.kwargs.num_classes=7"], "teacher"),
        ([f"teacher.name={tname}", f"teacher.checkpoint={ckpt}"], "distiller.cost"),
    ]
    for i, (extra, message) in enumerate(cases):
        method = "wkd_l" if message == "distiller.cost" else "kd"
        code, _, err = run_cli(["distill", f"digits/{method}", *extra, f"run.out_dir={tmp_path}", *TINY], capsys)
        assert code == 2, (i, err)
        assert message in err, (i, err)
    assert not any(tmp_path.rglob("*.pt"))


def test_demo_tiny(tmp_path, capsys):
    from ckakd.demo import run_demo

    results = run_demo(["ce", "rcka", "wkd_l"], 2, tmp_path, epochs=1, teacher_epochs=1, progress=False)
    out = capsys.readouterr().out
    assert "| rcka |" in out and "| wkd_l |" in out and "teacher val top-1" in out
    assert {s["method"] for s in results["summary"]} == {"ce", "rcka", "wkd_l"}
    assert len(results["runs"]) == 6
    for r in results["runs"]:
        assert 0.0 <= r["final_top1"] <= 100.0 and len(r["curve"]) == 1  # percent
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # a second run reuses the cached teacher
    run_demo(["ce"], 1, tmp_path, epochs=1, teacher_epochs=1, progress=False)
    assert "reusing the cached teacher" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("ckakd") is None, reason="the ckakd console script is not installed")
def test_console_script():
    proc = subprocess.run(["ckakd", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("demo", "train-teacher", "distill", "eval", "interrelation", "info"):
        assert command in proc.stdout


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ckakd.cli", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "backends:" in proc.stdout
