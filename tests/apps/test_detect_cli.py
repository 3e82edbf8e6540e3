"""The detect-* commands refuse what they cannot run before training (device, run folder, resume changes, the
`none` distiller), stop with one message on Ctrl-C, and continue with the command they print."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from ckakd.apps import cli
from ckakd.train.engine import Trainer, load_checkpoint


def tiny(out: Path, epochs: int = 1) -> list[str]:
    return [
        "data.num_train=8",
        "data.num_val=4",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        f"schedule.epochs={epochs}",
        "schedule.milestones=[]",
        "schedule.warmup_steps=2",
        "run.progress=false",
        f"run.out_dir={out}",
        "model.kwargs.width=8",
        "model.kwargs.depth=18",
    ]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_detect_distill_refuses_the_none_distiller(tmp_path, capsys):
    code, _, err = run_cli(["detect-distill", "detection/retinanet_student", *tiny(tmp_path)], capsys)
    assert code == 2 and "distiller.name='none' trains the student alone" in err and "detect-train" in err, err
    assert not any(tmp_path.rglob("*.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_detect_train_refuses_cuda_without_gpu(tmp_path, capsys):
    code, _, err = run_cli(["detect-train", "detection/retinanet_student", *tiny(tmp_path), "run.device=cuda"], capsys)
    assert code == 2 and "run.device='cuda' but" in err, err
    assert not any(tmp_path.rglob("*"))


def test_detect_train_refuses_unusable_run_folders(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    args = ["detect-train", "detection/retinanet_student", *tiny(tmp_path / "file" / "runs")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "file is a file, not a folder" in err, err
    (tmp_path / "runs" / "retinanet_student" / "latest.pt").mkdir(parents=True)
    code, _, err = run_cli(
        ["detect-train", "detection/retinanet_student", *tiny(tmp_path / "runs"), "--resume"], capsys
    )
    assert code == 2 and "latest.pt is a folder" in err, err
    assert not any(tmp_path.rglob("metrics.jsonl"))


def test_detect_train_ctrl_c_then_resume_and_refused_changes(tmp_path, capsys, monkeypatch, one_thread):
    real = Trainer._run_epoch

    def run_epoch(self, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt
        real(self, epoch)

    monkeypatch.setattr(Trainer, "_run_epoch", run_epoch)
    args = ["detect-train", "detection/retinanet_student", *tiny(tmp_path, epochs=2)]
    try:
        code, _, err = run_cli(args, capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped ckakd as a traceback")
    assert code == 130 and len(err.strip().splitlines()) == 1, err
    command = err.split("continue with: ", 1)[1].strip()
    assert command.startswith("ckakd detect-train detection/retinanet_student") and command.endswith("--resume")
    run = tmp_path / "retinanet_student"
    assert load_checkpoint(run / "latest.pt")["epoch"] == 1
    monkeypatch.setattr(Trainer, "_run_epoch", real)

    before = (run / "config.yaml").read_bytes()
    code, _, err = run_cli([*shlex.split(command)[1:], "model.kwargs.width=16"], capsys)
    assert code == 2 and "model.kwargs.width: checkpoint 8, this run 16" in err, err
    code, _, err = run_cli([*shlex.split(command)[1:], "optim.lr=1e9"], capsys)
    assert code == 2 and "optim.lr: checkpoint 0.05, this run 1000000000.0" in err, err
    assert (run / "config.yaml").read_bytes() == before

    code, out, err = run_cli(shlex.split(command)[1:], capsys)
    assert code == 0 and "epochs_run=1" in out, err
    assert load_checkpoint(run / "latest.pt")["epoch"] == 2


def test_detect_demo_bad_method_is_one_line_on_stderr(tmp_path, capsys):
    code, out, err = run_cli(["detect-demo", "--methods", "baseline,nosuch", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("ckakd detect-demo: error: unknown demo methods ['nosuch']"), err
    assert not any(tmp_path.iterdir())
