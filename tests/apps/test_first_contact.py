"""What a first-time user meets: `ckakd distill digits/rcka` without a teacher says which command trains it (and
offers the demo's teacher when `ckakd demo` left one), the trainer's progress bar does not flood a log that is not a
terminal (one line per epoch there), run folders are ignored by git, and the licence is in the package metadata."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckakd.apps import cli
from ckakd.train import Trainer, TrainSettings

REPO = Path(__file__).resolve().parents[2]
TINY = ["schedule.epochs=1", "data.max_train_batches=2", "run.progress=false"]


def test_a_missing_teacher_names_the_command_that_trains_it_then_the_demos(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["distill", "digits/rcka", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "teacher.checkpoint: file not found: runs/digits_teacher/best.pt" in err
    assert "train it with `ckakd train-teacher digits/teacher`" in err and "demo" not in err
    # the teacher `ckakd demo` writes (--out runs/demo): offered, and the offer works as written
    assert cli.main(["train-teacher", "digits/teacher", "run.name=demo/teacher", *TINY]) == 0
    capsys.readouterr()
    assert cli.main(["distill", "digits/rcka", *TINY]) == 2
    err = capsys.readouterr().err
    offer = "or reuse the teacher `ckakd demo` trained: teacher.checkpoint=runs/demo/teacher/best.pt"
    assert offer in err, err
    assert cli.main(["distill", "digits/rcka", "teacher.checkpoint=runs/demo/teacher/best.pt", *TINY]) == 0


def test_no_progress_bar_off_a_terminal_one_line_per_epoch(tmp_path, capsys, caplog):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
    loader = DataLoader(data, batch_size=4)  # 16 steps an epoch
    s = TrainSettings.create(2, tmp_path, lr=0.1, schedule="constant", device="cpu", progress=True, log_every=1)
    with caplog.at_level(logging.INFO, logger="ckakd.train"):
        Trainer(nn.Linear(4, 2), loader, loader, s).fit()
    captured = capsys.readouterr()  # pytest's capture is not a terminal
    assert "it/s" not in captured.err and "\r" not in captured.err, captured.err
    lines = [r.getMessage() for r in caplog.records] + captured.out.splitlines()  # logger or tqdm.write
    epoch_lines = [m for m in lines if m.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(" step " not in m for m in epoch_lines), epoch_lines


def test_run_folders_are_ignored_and_the_licence_is_declared():
    assert "runs/" in (REPO / ".gitignore").read_text().splitlines()
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    setup = (REPO / "setup.py").read_text()
    assert 'license_expression="MIT"' in setup and 'license_files=["LICENSE"]' in setup
