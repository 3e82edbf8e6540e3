"""The experiment loggers (ckakd.train.engine.loggers): what TensorBoard and Weights & Biases receive from a run, the
W&B run kept across resume, a failed run closed as failed, and a missing library stopping a run before it writes
anything. The libraries are replaced by fakes in ``sys.modules`` (whether or not they are installed)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from ckakd.train.engine import Trainer, TrainSettings
from ckakd.train.engine.loggers import TensorBoardLogger, WandbLogger, check_logger_packages
from ckakd.train.engine.settings import RunConfig, WandbConfig

# ------------------------------------------------------------------------------------------------- fakes


class FakeSummaryWriter:
    """Records every call of the SummaryWriter methods the logger uses."""

    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.texts: list[tuple[str, str, int]] = []
        self.hparams: list[dict] = []
        self.closed = False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        assert not self.closed
        self.scalars.append((tag, value, step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text, step))

    def add_hparams(self, hparams: dict, metrics: dict, run_name: str | None = None) -> None:
        self.hparams.append(hparams)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeWandbRun:
    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.id = kwargs.get("id") or f"run{len(FakeWandb.runs)}"
        self.logs: list[tuple[dict, int]] = []
        self.exit_code: int | None = None

    def log(self, values: dict, step: int) -> None:
        assert self.exit_code is None
        self.logs.append((values, step))

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


class FakeWandb:
    runs: list[FakeWandbRun] = []

    @staticmethod
    def init(**kwargs: Any) -> FakeWandbRun:
        run = FakeWandbRun(kwargs)
        FakeWandb.runs.append(run)
        return run


@pytest.fixture
def fake_loggers(monkeypatch):
    FakeSummaryWriter.instances.clear()
    FakeWandb.runs.clear()
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = FakeSummaryWriter
    wandb = types.ModuleType("wandb")
    wandb.init = FakeWandb.init
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return FakeSummaryWriter.instances, FakeWandb.runs


@pytest.fixture
def no_logger_libraries(monkeypatch):
    for name in ("torch.utils.tensorboard", "tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError


# ----------------------------------------------------------------------------------------------- helpers


def data(n: int = 48, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def settings(out: Path, **kw: Any) -> TrainSettings:
    base = dict(lr=0.1, schedule="constant", progress=False, device="cpu", log_every=2)
    return TrainSettings.create(kw.pop("epochs", 2), out, **{**base, **kw})


class Boom:
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if epoch == 1:
            raise RuntimeError("boom")


# -------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_gets_the_config_once_every_epoch_row_and_every_log_step(tmp_path, fake_loggers):
    writers, _ = fake_loggers
    tr, va = data()
    result = Trainer(model(), tr, va, settings(tmp_path, tensorboard=True)).fit()
    (w,) = writers
    assert w.log_dir == str(tmp_path / "tensorboard") and w.closed
    assert [t for t, _, _ in w.texts] == ["config"] and '"lr": 0.1' in w.texts[0][1]
    assert len(w.hparams) == 1 and w.hparams[0]["lr"] == 0.1 and w.hparams[0]["epochs"] == 2
    epoch_tags = {(t, s) for t, _, s in w.scalars if not t.startswith("step/")}
    for tag in ("lr", "train/loss", "train/ce", "train/top1", "val/top1", "val/loss", "train/images_per_s"):
        assert {(tag, 1), (tag, 2)} <= epoch_tags, tag
    # the epoch values are the metrics row's
    assert [v for t, v, _ in w.scalars if t == "val/top1"][-1] == result["final_top1"]
    # 6 batches an epoch, log_every=2: global steps 2, 4, ..., 12
    steps = [s for t, _, s in w.scalars if t == "step/train/loss"]
    assert steps == [2, 4, 6, 8, 10, 12]
    step_tags = {t for t, _, _ in w.scalars if t.startswith("step/")}
    assert step_tags == {"step/train/loss", "step/train/ce", "step/lr", "step/train/images_per_s"}
    assert all(v > 0 for t, v, _ in w.scalars if t.endswith("images_per_s"))


def test_tensorboard_logger_in_python_with_a_chosen_folder_and_epochs_only(tmp_path, fake_loggers):
    writers, _ = fake_loggers
    tr, va = data()
    logger = TensorBoardLogger(tmp_path / "tb", log_steps=False)
    Trainer(model(), tr, va, settings(tmp_path / "run", epochs=1), callbacks=[logger]).fit()
    (w,) = writers
    assert w.log_dir == str(tmp_path / "tb") and not any(t.startswith("step/") for t, _, _ in w.scalars)
    assert any(t == "train/loss" for t, _, _ in w.scalars)


# ---------------------------------------------------------------------------------------- Weights & Biases


def test_wandb_run_gets_config_steps_and_epochs_and_is_continued_on_resume(tmp_path, fake_loggers):
    _, runs = fake_loggers
    tr, va = data()
    logger = WandbLogger("kd-study", mode="offline", tags=["digits", "kd"])
    Trainer(model(), tr, va, settings(tmp_path, epochs=1), callbacks=[logger]).fit()
    (run,) = runs
    kw = run.kwargs
    assert (kw["project"], kw["name"], kw["mode"], kw["dir"]) == ("kd-study", tmp_path.name, "offline", str(tmp_path))
    assert kw["tags"] == ["digits", "kd"] and kw["config"]["lr"] == 0.1 and kw["id"] is None
    assert run.exit_code == 0
    steps = [step for _, step in run.logs]
    assert steps == sorted(steps) and steps[-1] == 6  # never decreasing: W&B drops earlier steps
    epoch_logs = [values for values, _ in run.logs if "epoch" in values]
    assert len(epoch_logs) == 1 and {"train/loss", "val/top1", "lr", "train/images_per_s"} <= set(epoch_logs[0])
    assert [v for v, _ in run.logs if "step/train/loss" in v][0]["step/lr"] == 0.1
    assert (tmp_path / "wandb_run_id.txt").read_text() == run.id
    # resume: the same W&B run continues, its steps after the first run's
    logger = WandbLogger("kd-study", mode="offline")
    Trainer(model(), tr, va, settings(tmp_path, epochs=2, resume=True), callbacks=[logger]).fit()
    assert runs[1].kwargs["id"] == run.id and runs[1].kwargs["resume"] == "allow"
    assert min(step for _, step in runs[1].logs) > 6


def test_a_failed_run_finishes_wandb_as_failed_and_closes_tensorboard(tmp_path, fake_loggers):
    writers, runs = fake_loggers
    tr, va = data()
    s = settings(tmp_path, tensorboard=True)
    s.run.wandb = WandbConfig(mode="offline", project="p")
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(model(), tr, va, s, callbacks=[Boom()]).fit()
    assert runs[0].exit_code == 1 and writers[0].closed
    assert (tmp_path / "latest.pt").exists()


def test_wandb_logger_checks_its_arguments(fake_loggers):
    with pytest.raises(ValueError, match="WandbLogger.mode: expected one of online, offline, disabled"):
        WandbLogger(mode="ofline")
    with pytest.raises(ValueError, match="WandbLogger.tags"):
        WandbLogger(tags="a,b")


# ------------------------------------------------------------------------------------------ missing library


def test_a_missing_library_stops_the_trainer_before_it_writes_anything(tmp_path, no_logger_libraries):
    tr, va = data()
    out = tmp_path / "run"
    with pytest.raises(ImportError, match=r'tensorboard.*pip install "ckakd\[tensorboard\]"') as info:
        Trainer(model(), tr, va, settings(out, tensorboard=True))
    assert info.value.name == "tensorboard"
    s = settings(out)
    s.run.wandb = WandbConfig(mode="online")
    with pytest.raises(ImportError, match=r'wandb.*pip install "ckakd\[wandb\]"') as info:
        Trainer(model(), tr, va, s)
    assert info.value.name == "wandb"
    with pytest.raises(ImportError, match="wandb"):
        WandbLogger()
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_check_logger_packages_names_the_setting(no_logger_libraries):
    check_logger_packages(RunConfig())  # nothing asked for: nothing imported
    with pytest.raises(ImportError, match=r"run.tensorboard=true needs the `tensorboard` package .*run.tensorboard=f"):
        check_logger_packages(RunConfig(tensorboard=True))
    with pytest.raises(ImportError, match=r"run.wandb.mode=offline needs the `wandb` package .*mode=disabled"):
        check_logger_packages(RunConfig(wandb=WandbConfig(mode="offline")))
