"""Subprocess worker for tests/train/test_engine.py and tests/train/test_distributed.py: a tiny deterministic KD run
on random 8×8 images, in one process or under ``torchrun`` (DDP, gloo).

    python tests/train/_engine_worker.py OUT_DIR [--epochs N] [--resume]
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/train/_engine_worker.py OUT_DIR ...

Writes ``OUT_DIR/final.pt`` (the student's state_dict; rank 0) when training finishes. With the environment variable
``CKAKD_WORKER_SLEEP`` (seconds) every training batch sleeps that long and ``OUT_DIR/progress.txt`` (rank 0) holds the
current "epoch step" (0-based), so a test can kill the process inside a chosen epoch. With ``CKAKD_WORKER_IO_LOG``
(a folder) every checkpoint/metrics write and checkpoint read of the trainer is logged per rank to
``<folder>/io_rank<r>.txt`` (``write <name>`` / ``read <name>``) and each rank's process id is in
``<folder>/pid_rank<r>.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ckakd.train import engine
from ckakd.train.data import make_loader, weak_augment
from ckakd.train.distillers import KD
from ckakd.train.engine import Trainer, TrainSettings, seed_everything


def tiny_net(width: int, dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 10)
    )


class SlowKD(KD):
    """KD that can sleep per batch and report its position (for the kill test)."""

    def __init__(self, *args, out_dir: Path, sleep: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._out_dir, self._sleep, self._epoch_idx, self._step = out_dir, sleep, 0, 0
        self._report = int(os.environ.get("RANK", "0")) == 0

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        super().set_epoch(epoch, total_epochs)
        self._epoch_idx, self._step = epoch, 0

    def forward_train(self, x, y):
        if self._sleep > 0:
            if self._report:
                (self._out_dir / "progress.txt").write_text(f"{self._epoch_idx} {self._step}")
            time.sleep(self._sleep)
        self._step += 1
        return super().forward_train(x, y)


def wait_for_progress(out_dir: Path, proc, timeout: float, target: tuple[int, int] = (1, 2)) -> tuple[int, int] | None:
    """Poll ``out_dir/progress.txt`` (written by a slowed worker, see ``CKAKD_WORKER_SLEEP``) until the worker has
    reached (epoch index, batch) ``target`` with a ``latest.pt`` on disk, ``proc`` (a Popen) ended, or ``timeout``
    seconds passed; the last position read (None if none)."""
    position = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        prog = out_dir / "progress.txt"
        if prog.exists() and (out_dir / "latest.pt").exists():
            text = prog.read_text().split()
            if len(text) == 2:
                position = (int(text[0]), int(text[1]))
                if position >= target:
                    break
        time.sleep(0.02)
    return position


def log_io(folder: Path) -> None:
    """Record the trainer's file writes and checkpoint reads of this rank in ``folder/io_rank<r>.txt``."""
    rank = os.environ.get("RANK", "0")
    (folder / f"pid_rank{rank}.txt").write_text(str(os.getpid()))  # so that a test can SIGKILL every rank
    log = folder / f"io_rank{rank}.txt"

    def wrap(fn, what: str):
        def logged(path, *args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{what} {Path(path).name}\n")
            return fn(path, *args, **kwargs)

        return logged

    # the package and each of its modules that looks a name up (ckakd.train.engine.checkpoint, .metrics_log, ...)
    modules = [engine] + [m for n, m in list(sys.modules.items()) if n.startswith(engine.__name__ + ".")]
    for name, what in (("atomic_write_bytes", "write"), ("append_text", "write"), ("load_checkpoint", "read")):
        for module in modules:  # where the engine's modules look the name up
            if hasattr(module, name):  # (a trainer without append_text appends with a plain open(), not logged)
                setattr(module, name, wrap(getattr(module, name), what))


def build_trainer(out_dir: Path, epochs: int, resume: bool) -> tuple[Trainer, nn.Module]:
    """The worker's Trainer and its student (also used in-process by the tests)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(3, deterministic=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(224, 1, 8, 8, generator=gen)
    labels = (images.flatten(1) @ torch.randn(64, 10, generator=gen)).argmax(1)  # a learnable labelling
    train, val = TensorDataset(images[:160], labels[:160]), TensorDataset(images[160:], labels[160:])
    teacher = tiny_net(32, 0.0)
    student = tiny_net(16, 0.2)
    model = SlowKD(
        student, teacher, out_dir=out_dir, sleep=float(os.environ.get("CKAKD_WORKER_SLEEP", "0")), ce_weight=1.0
    )
    settings = TrainSettings.create(
        epochs=epochs,
        out_dir=out_dir,
        lr=0.05,
        milestones=(2,),
        seed=3,
        deterministic=True,
        progress=False,
        max_train_batches=6,
        cka_pairs=[("2", "2")],
        resume=resume,
    )
    train_loader = make_loader(train, 16, True, 3, transform=weak_augment(8, padding=1))
    val_loader = make_loader(val, 32, False, 3)
    return Trainer(model, train_loader, val_loader, settings), student


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if os.environ.get("CKAKD_WORKER_IO_LOG"):
        log_io(Path(os.environ["CKAKD_WORKER_IO_LOG"]))
    trainer, student = build_trainer(args.out_dir, args.epochs, args.resume)
    trainer.fit()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(student.state_dict(), args.out_dir / "final.pt")


if __name__ == "__main__":
    main()
