"""The training loop (ckakd.train.engine): learning, LR schedules, checkpoints and resume (in-process and after
SIGKILL), non-finite losses, AMP, gradient clipping, metrics files, CKA logging and plots."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import ckakd
from ckakd.train.config import load_config
from ckakd.train.data import load_digits_dataset, make_loader, weak_augment
from ckakd.train.distillers import KD
from ckakd.train.engine import (
    CHECKPOINT_FORMAT,
    NonFiniteLossError,
    Trainer,
    TrainSettings,
    check_resume,
    epoch_seed,
    evaluate,
    load_checkpoint,
    lr_at_epoch,
    save_checkpoint,
    seed_everything,
)
from ckakd.train.engine.metrics_log import TIMING_COLUMNS
from ckakd.train.runner import run_dir, run_settings
from tests.train._engine_worker import wait_for_progress

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_engine_worker.py")


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    if torch.are_deterministic_algorithms_enabled() != before:
        torch.use_deterministic_algorithms(before)


def digits(n_train: int = 128, n_val: int = 64) -> tuple[TensorDataset, TensorDataset]:
    tr, va = load_digits_dataset("train"), load_digits_dataset("val")
    return (
        TensorDataset(tr.tensors[0][:n_train], tr.tensors[1][:n_train]),
        TensorDataset(va.tensors[0][:n_val], va.tensors[1][:n_val]),
    )


def mlp(width: int = 16, dropout: float = 0.0, bn: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, width)]
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def settings(tmp_path: Path, **kw) -> TrainSettings:
    base = dict(epochs=2, out_dir=tmp_path, lr=0.1, schedule="constant", progress=False, seed=0)
    base.update(kw)
    return TrainSettings.create(**base)


def loaders(n_train: int = 128, n_val: int = 64, batch: int = 16, augment: bool = False, seed: int = 0):
    tr, va = digits(n_train, n_val)
    t = weak_augment(8, padding=1) if augment else None
    return make_loader(tr, batch, True, seed, transform=t), make_loader(va, 64, False, seed)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Interrupt(Exception):
    pass


class ScriptedKD(KD):
    """KD that records set_epoch calls and batch labels, and can fail at a chosen (epoch, step), 0-based."""

    def __init__(self, *args, fail_at: tuple[int, int] | None = None, fail_with: str = "nan", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at, self.fail_with = fail_at, fail_with
        self.calls: list[tuple[int, int]] = []
        self.labels: dict[int, list[torch.Tensor]] = {}
        self._pos = (0, 0)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        super().set_epoch(epoch, total_epochs)
        self.calls.append((epoch, total_epochs))
        self._pos = (epoch, 0)

    def forward_train(self, x, y):
        epoch, step = self._pos
        self._pos = (epoch, step + 1)
        self.labels.setdefault(epoch, []).append(y.clone())
        logits, losses = super().forward_train(x, y)
        if self.fail_at == (epoch, step):
            if self.fail_with == "interrupt":
                raise Interrupt(f"interrupted at {(epoch, step)}")
            losses["bad"] = torch.tensor(float("nan"))
        return logits, losses


def scripted_kd(**kw) -> ScriptedKD:
    torch.manual_seed(0)
    teacher = mlp(32)
    student = mlp(16, dropout=0.2, bn=True)
    return ScriptedKD(student, teacher, ce_weight=1.0, **kw)


# ------------------------------------------------------------------------------------------------ settings / seeds


def test_settings_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):  # rmsprop is a torch.optim class: a misspelling
        TrainSettings.create(epochs=1, out_dir=tmp_path, optimizer="rmsprob")
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings.create(epochs=1, out_dir=tmp_path, schedule="poly")
    with pytest.raises(ValueError, match="epochs"):
        TrainSettings.create(epochs=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="cka_pairs"):
        TrainSettings.create(epochs=1, out_dir=tmp_path, cka_pairs=["a"])
    s = TrainSettings.create(epochs=1, out_dir=tmp_path, cka_pairs=[["a", "b"]], milestones=[3])
    assert s.train.cka_pairs == [("a", "b")] and s.schedule.milestones == [3]
    assert s.to_dict()["out_dir"] == str(tmp_path)
    with pytest.raises(ValueError, match=r"TrainSettings\.lr: must be > 0"):
        TrainSettings.create(epochs=1, out_dir=tmp_path, lr=0)
    with pytest.raises(TypeError, match=r"unexpected keyword 'lrr' \(did you mean 'lr'\?\)"):
        TrainSettings.create(epochs=1, out_dir=tmp_path, lrr=0.1)
    # the spellings the keywords accepted before they were checked as config sections
    s = TrainSettings.create(epochs=1, out_dir=tmp_path, optimizer="SGD", amp_dtype="fp16", device=torch.device("cpu"))
    assert (s.optim.name, s.run.amp_dtype, s.run.device) == ("sgd", "float16", "cpu")


# The flat record a checkpoint stores as "settings", as TrainSettings.to_dict() wrote it when the settings were one
# flat dataclass (before they were the run/optim/schedule/train sections): the keys and their order are kept.
OLD_SETTINGS_RECORD = {
    "epochs": 2, "out_dir": "OUT", "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0005,
    "nesterov": False, "schedule": "constant", "milestones": [150, 180, 210], "gamma": 0.1, "warmup_epochs": 0,
    "warmup_steps": 0, "device": "auto", "amp": False, "amp_dtype": "bfloat16", "grad_clip": None, "seed": 0,
    "deterministic": False, "progress": False, "log_every": 50, "eval_every": 1, "save_every": 1,
    "tensorboard": False, "max_train_batches": None, "cka_pairs": [], "resume": False, "config": None,
    "find_unused_parameters": False,
}  # fmt: skip


def test_settings_record_is_the_old_flat_checkpoint_format(tmp_path):
    s = settings(tmp_path)
    record = s.to_dict()
    assert list(record) == list(OLD_SETTINGS_RECORD)
    assert record == {**OLD_SETTINGS_RECORD, "out_dir": str(tmp_path)}
    assert TrainSettings.create(**{**record, "out_dir": tmp_path}) == s  # the record's keys are the keywords


def test_old_checkpoint_settings_record_still_resumes(tmp_path):
    """A checkpoint written before the settings were sections (flat "settings", no "config") resumes; a change of
    a setting that shaped the epochs run is still refused by its old name."""
    torch.manual_seed(0)
    model = mlp()
    tr, va = loaders()
    Trainer(model, tr, va, settings(tmp_path, epochs=1)).fit()
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    ckpt["settings"] = {**OLD_SETTINGS_RECORD, "epochs": 1, "out_dir": str(tmp_path)}
    for key in ("metric", "best_value", "global_step"):  # newer keys an old checkpoint may lack
        ckpt.pop(key, None)
    save_checkpoint(tmp_path / "latest.pt", {k: v for k, v in ckpt.items() if k != "format"})
    assert check_resume(tmp_path / "latest.pt", settings(tmp_path, epochs=2, resume=True), model=model) is not None
    with pytest.raises(ValueError, match=r"cannot resume .*lr: checkpoint 0\.1, this run 0\.2"):
        check_resume(tmp_path / "latest.pt", settings(tmp_path, epochs=2, lr=0.2, resume=True), model=model)
    result = Trainer(model, tr, va, settings(tmp_path, epochs=2, resume=True)).fit()
    assert result["epochs_completed"] == 2


def test_run_settings_hold_the_configs_own_sections(tmp_path):
    """The runner hands the Trainer the config's section objects (no copy); the resolved CKA pairs replace only
    the train section, and the stored config is the resolved config."""
    cfg = load_config("digits/kd", [f"run.out_dir={tmp_path}", "data.max_train_batches=3"])
    s = run_settings(cfg, resume=False)
    assert s.run is cfg.run and s.optim is cfg.optim and s.schedule is cfg.schedule and s.train is cfg.train
    assert s.out_dir == run_dir(cfg) and s.max_train_batches == 3 and s.config == cfg.to_dict()
    paired = run_settings(cfg, resume=True, cka_pairs=[("layer3", "layer3")])
    assert paired.train.cka_pairs == [("layer3", "layer3")] and cfg.train.cka_pairs == [] and paired.resume
    assert paired.run is cfg.run and paired.train.log_every == cfg.train.log_every


def test_seed_everything_reproduces_and_sets_determinism():
    import random

    import numpy as np

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3)

    seed_everything(5, deterministic=True)
    a = draws()
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    seed_everything(5, deterministic=False)
    b = draws()
    assert not torch.are_deterministic_algorithms_enabled()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    seed_everything(6)
    assert draws()[0] != a[0]


def test_epoch_seed_depends_on_seed_and_epoch_only():
    assert epoch_seed(0, 3) == epoch_seed(0, 3)
    assert len({epoch_seed(0, 3), epoch_seed(0, 4), epoch_seed(1, 3), epoch_seed(0, 3, 1)}) == 4
    assert 0 <= epoch_seed(2**40, 10**6, 7) < 2**63


# ------------------------------------------------------------------------------------------------ LR schedule


def test_lr_schedule_values(tmp_path):
    step = settings(tmp_path, epochs=6, lr=0.5, schedule="step", milestones=(2, 4), gamma=0.1)
    assert [lr_at_epoch(step, e) for e in range(6)] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005, 0.005])
    warm = settings(tmp_path, epochs=6, lr=0.4, schedule="step", milestones=(3,), warmup_epochs=2)
    assert [lr_at_epoch(warm, e) for e in range(5)] == pytest.approx([0.2, 0.4, 0.4, 0.04, 0.04])
    cos = settings(tmp_path, epochs=6, lr=1.0, schedule="cosine", warmup_epochs=2)
    expect = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [lr_at_epoch(cos, e) for e in range(6)] == pytest.approx(expect)
    const = settings(tmp_path, epochs=3, lr=0.3, schedule="constant", warmup_epochs=3)
    assert [lr_at_epoch(const, e) for e in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_trainer_uses_the_schedule_per_epoch(tmp_path, schedule):
    s = settings(tmp_path, epochs=5, lr=0.2, schedule=schedule, milestones=(1, 3), warmup_epochs=1, max_train_batches=1)
    tr, va = loaders()
    trainer = Trainer(mlp(), tr, va, s)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    expect = [lr_at_epoch(s, e) for e in range(5)]
    assert seen == pytest.approx(expect)
    assert [float(r["lr"]) for r in read_csv(tmp_path / "metrics.csv")] == pytest.approx(expect)
    assert len(set(round(v, 12) for v in expect)) >= 3  # the schedule actually moves


# ------------------------------------------------------------------------------------------------ learning


def test_loss_decreases_on_a_tiny_problem(tmp_path):
    torch.manual_seed(0)
    tr, va = loaders(n_train=320, n_val=128, batch=32)
    model = mlp(32)
    result = Trainer(model, tr, va, settings(tmp_path, epochs=6, lr=0.1)).fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["train/loss"] < 0.5 * rows[0]["train/loss"]
    assert rows[0]["train/loss"] == rows[0]["train/ce"]  # a plain classifier trains with CE only
    assert result["final_top1"] > 75.0 and result["best_top1"] >= result["final_top1"]
    assert result["epochs_run"] == 6 and result["train_time_s"] > 0


def test_evaluate_is_weighted_by_samples():
    torch.manual_seed(0)
    x, y = torch.randn(23, 6), torch.randint(0, 10, (23,))
    model = nn.Linear(6, 10)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # last batch has 3 samples
    out = evaluate(model, loader, "cpu")
    logits = model(x)
    assert out["n"] == 23
    assert out["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert out["top5"] == pytest.approx(100 * top5)
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    three = evaluate(nn.Linear(6, 3), DataLoader(TensorDataset(x, y % 3), batch_size=8))
    assert "top5" not in three and three["n"] == 23
    model.train()
    evaluate(model, loader)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))


# ------------------------------------------------------------------------------------------------ epochs, data order


def test_set_epoch_and_loader_reseeding(tmp_path):
    tr, va = loaders(batch=32, augment=True)
    model = scripted_kd()
    trainer = Trainer(model, tr, va, settings(tmp_path, epochs=3, max_train_batches=2))
    trainer.fit()
    assert model.calls == [(0, 3), (1, 3), (2, 3)]
    orders = {e: torch.cat(v) for e, v in model.labels.items()}
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    # epoch 1's batches depend on (seed, 1) only: reseeding a fresh loader for epoch 1 reproduces them
    tr2, _ = loaders(batch=32, augment=True)
    trainer._reseed_loader(tr2, 1)
    first = [b for _, b in zip(range(2), tr2, strict=False)]
    assert torch.equal(torch.cat([y for _, y in first]), orders[1])
    tr3, _ = loaders(batch=32, augment=True)
    trainer._reseed_loader(tr3, 1)
    again = [b for _, b in zip(range(2), tr3, strict=False)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))  # same augmentations


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_contents_and_roundtrip(tmp_path):
    tr, va = loaders()
    model = scripted_kd()
    Trainer(model, tr, va, settings(tmp_path, epochs=2, config={"run": {"name": "x", "path": Path("/a")}})).fit()
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    for key in ("student", "extra", "optimizer", "scheduler", "best_top1", "rng", "settings", "config"):
        assert key in ckpt, key
    assert ckpt["config"] == {"run": {"name": "x", "path": "/a"}}
    assert ckpt["scheduler"]["last_epoch"] == 2
    assert {"python", "numpy", "torch", "cuda"} <= set(ckpt["rng"][0])
    assert all("momentum_buffer" in v for v in ckpt["optimizer"]["state"].values())
    assert not any(k.startswith("teachers") for k in ckpt["student"])
    fresh = scripted_kd()
    load_checkpoint(tmp_path / "latest.pt", fresh)
    assert_same_state(fresh.student.state_dict(), model.student.state_dict())
    plain = mlp(16, bn=True)
    load_checkpoint(tmp_path / "best.pt", plain)  # the student alone loads from a distillation checkpoint
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # save_checkpoint on its own
    p = save_checkpoint(tmp_path / "sub" / "c.pt", {"student": plain.state_dict(), "epoch": 7})
    assert load_checkpoint(p, mlp(16, bn=True))["epoch"] == 7


def test_load_checkpoint_mismatch_errors(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"student": mlp(16).state_dict()})
    with pytest.raises(ValueError, match=r"shape mismatches.*1\.weight: checkpoint \(16, 64\) vs model \(8, 64\)"):
        load_checkpoint(tmp_path / "c.pt", mlp(8))
    with pytest.raises(ValueError, match=r"missing keys: \['2\.weight'"):
        load_checkpoint(tmp_path / "c.pt", mlp(16, bn=True))  # BatchNorm inserted: keys shift
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ckakd checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
    def run(out: Path, **kw):
        tr, va = loaders(batch=32, augment=True)
        model = scripted_kd(fail_at=kw.pop("fail_at", None), fail_with="interrupt")
        s = settings(out, epochs=4, schedule="step", milestones=(2,), deterministic=True, max_train_batches=3, **kw)
        trainer = Trainer(model, tr, va, s, teacher_for_cka=model.teacher)
        return model, trainer

    model_a, trainer_a = run(tmp_path / "a", cka_pairs=[("4", "1")])
    trainer_a.fit()
    model_b, trainer_b = run(tmp_path / "b", cka_pairs=[("4", "1")], fail_at=(2, 1))
    with pytest.raises(Interrupt):
        trainer_b.fit()
    assert load_checkpoint(tmp_path / "b" / "latest.pt")["epoch"] == 2
    model_c, trainer_c = run(tmp_path / "b", cka_pairs=[("4", "1")], resume=True)
    result = trainer_c.fit()
    assert result["epochs_run"] == 2 and result["epochs_completed"] == 4
    assert model_c.calls == [(2, 4), (3, 4)]
    assert_same_state(model_a.student.state_dict(), model_c.student.state_dict())
    rows_a, rows_c = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in rows_c] == [1, 2, 3, 4]
    assert strip_times(rows_a) == strip_times(rows_c)
    assert [r["epoch"] for r in read_csv(tmp_path / "b" / "metrics.csv")] == ["1", "2", "3", "4"]
    # resuming a finished run does nothing
    model_d, trainer_d = run(tmp_path / "b", cka_pairs=[("4", "1")], resume=True)
    assert trainer_d.fit()["epochs_run"] == 0
    assert_same_state(model_d.student.state_dict(), model_a.student.state_dict())


def test_resume_messages(tmp_path, caplog):
    tr, va = loaders()
    with caplog.at_level(logging.WARNING, logger="ckakd.train"):
        result = Trainer(mlp(), tr, va, settings(tmp_path, epochs=1, resume=True)).fit()
    assert "no checkpoint" in caplog.text and result["epochs_run"] == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ckakd.train"):
        result = Trainer(mlp(), tr, va, settings(tmp_path, epochs=2, resume=True, log_every=7)).fit()
    assert "resumed from" in caplog.text
    assert result["epochs_run"] == 1 and result["epochs_completed"] == 2


# ------------------------------------------------------------------------------------------------ resume refusals


def _trained(tmp_path: Path, model_fn=mlp, **kw) -> Path:
    tr, va = loaders(batch=32)
    Trainer(model_fn(), tr, va, settings(tmp_path, epochs=1, max_train_batches=2, **kw)).fit()
    return tmp_path / "latest.pt"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": 1e9}, "lr: checkpoint 0.1, this run 1000000000.0"),
        ({"optimizer": "adamw"}, "optimizer: checkpoint 'sgd', this run 'adamw'"),  # was KeyError: 'step' in torch
        ({"seed": 5}, "seed: checkpoint 0, this run 5"),
        ({"schedule": "step", "milestones": (1,)}, "schedule: checkpoint 'constant', this run 'step'"),
    ],
)
def test_resume_refuses_changed_settings_and_lists_what_may_change(tmp_path, change, message):
    ckpt = _trained(tmp_path)
    before = ckpt.read_bytes()
    tr, va = loaders(batch=32)
    trainer = Trainer(mlp(), tr, va, settings(tmp_path, epochs=2, max_train_batches=2, resume=True, **change))
    with pytest.raises(ValueError, match="cannot resume") as info:
        trainer.fit()
    text = str(info.value)
    assert message in text and str(ckpt) in text
    assert "only these may change: epochs, out_dir, device, progress, log_every" in text
    assert ckpt.read_bytes() == before and len(read_jsonl(tmp_path / "metrics.jsonl")) == 1  # nothing trained


def test_resume_with_more_epochs_continues_the_step_schedule_exactly(tmp_path):
    def run(out: Path, epochs: int, resume: bool = False):
        tr, va = loaders(batch=32, augment=True)
        model = scripted_kd()
        s = settings(out, epochs=epochs, schedule="step", milestones=(2,), deterministic=True, max_train_batches=3)
        s.resume = resume
        Trainer(model, tr, va, s).fit()
        return model

    full = run(tmp_path / "full", 4)
    run(tmp_path / "ext", 2)
    extended = run(tmp_path / "ext", 4, resume=True)
    assert extended.calls == [(2, 4), (3, 4)]
    assert_same_state(full.student.state_dict(), extended.student.state_dict())
    rows = read_jsonl(tmp_path / "ext" / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert strip_times(rows) == strip_times(read_jsonl(tmp_path / "full" / "metrics.jsonl"))


def test_resume_refuses_epoch_changes_the_schedule_depends_on(tmp_path):
    _trained(tmp_path, schedule="cosine")
    tr, va = loaders(batch=32)
    trainer = Trainer(mlp(), tr, va, settings(tmp_path, epochs=3, schedule="cosine", max_train_batches=2, resume=True))
    with pytest.raises(ValueError, match=r"epochs 1 -> 3: the cosine schedule spreads over all epochs"):
        trainer.fit()  # it used to run the new epochs from lr 0 (the end of the 1-epoch cosine)
    tr, va = loaders(batch=32)
    s = settings(tmp_path / "c", epochs=3, max_train_batches=2)
    Trainer(mlp(), tr, va, s).fit()
    s = settings(tmp_path / "c", epochs=2, max_train_batches=2, resume=True)
    with pytest.raises(ValueError, match=r"epochs=2: the checkpoint has already completed 3 epochs"):
        Trainer(mlp(), *loaders(batch=32), s).fit()


def test_resume_refuses_epoch_changes_when_a_loss_weight_follows_them(tmp_path):
    from ckakd.train.distillers import WKDLogit

    def wkd(schedule: str) -> WKDLogit:
        torch.manual_seed(0)
        return WKDLogit(mlp(16), mlp(32), cost=1.0 - torch.eye(10), gamma_schedule=schedule, iters=2)

    for schedule in ("cosine", "constant"):
        out = tmp_path / schedule
        tr, va = loaders(batch=32)
        Trainer(wkd(schedule), tr, va, settings(out, epochs=1, max_train_batches=2)).fit()
        trainer = Trainer(wkd(schedule), tr, va, settings(out, epochs=2, max_train_batches=2, resume=True))
        if schedule == "cosine":
            with pytest.raises(ValueError, match=r"epochs 1 -> 2: WKDLogit schedules its loss weights over the total"):
                trainer.fit()
        else:  # gamma does not depend on the epochs: the run may grow
            assert trainer.fit()["epochs_completed"] == 2


def test_resume_refuses_another_model_or_distiller(tmp_path):
    from ckakd.train.distillers import DKD

    _trained(tmp_path, model_fn=scripted_kd)
    student = scripted_kd().student  # the same student architecture: its weights would load without complaint
    tr, va = loaders(batch=32)
    s = settings(tmp_path, epochs=2, max_train_batches=2, resume=True)
    with pytest.raises(
        ValueError,
        match=r"model: the checkpoint trained ScriptedKD \(student Sequential\), this run "
        r"Sequential \(no distiller\)",
    ):
        Trainer(student, tr, va, s).fit()
    dkd = DKD(scripted_kd().student, mlp(32))
    with pytest.raises(ValueError, match=r"trained ScriptedKD \(student Sequential\), this run DKD \(student"):
        Trainer(dkd, tr, va, s).fit()


def test_resume_refuses_another_world_size(tmp_path):
    ckpt = _trained(tmp_path)
    payload = load_checkpoint(ckpt)
    payload["world_size"], payload["rng"] = 2, payload["rng"] * 2  # as written by a 2-process torchrun run
    save_checkpoint(ckpt, {k: v for k, v in payload.items() if k != "format"})
    tr, va = loaders(batch=32)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1 .*torchrun --nproc_per_node 2"):
        Trainer(mlp(), tr, va, settings(tmp_path, epochs=2, max_train_batches=2, resume=True)).fit()


# ------------------------------------------------------------------------------------------------ outputs


def test_latest_pt_folder_fails_before_training(tmp_path):
    (tmp_path / "latest.pt").mkdir()
    model = scripted_kd()
    tr, va = loaders(batch=32)
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"latest\.pt is a folder"):
            Trainer(model, tr, va, settings(tmp_path, epochs=1, resume=resume)).fit()
    assert model.calls == []  # not a single epoch started


def test_outputs_are_written_with_the_umask_mode_not_0600(tmp_path):
    _trained(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("latest.pt", "best.pt", "metrics.csv", "metrics.jsonl", "curves.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from ckakd.train.fileio import OutputError

    _trained(tmp_path)
    before = (tmp_path / "latest.pt").read_bytes()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".latest.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tr, va = loaders(batch=32)
    with pytest.raises(OutputError, match=r"cannot write .*latest\.pt: No space left on device \[ENOSPC\]"):
        Trainer(mlp(), tr, va, settings(tmp_path, epochs=2, max_train_batches=2, resume=True)).fit()
    assert (tmp_path / "latest.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu_is_a_clear_error(tmp_path):
    tr, va = loaders()
    with pytest.raises(ValueError, match=r"device='cuda' but .*use device=auto or device=cpu"):
        Trainer(mlp(), tr, va, settings(tmp_path, device="cuda"))


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("CKAKD_WORKER_SLEEP", None)
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.Popen([sys.executable, str(WORKER), str(full)], env=env, cwd=REPO, stderr=subprocess.PIPE)
    slow = subprocess.Popen(
        [sys.executable, str(WORKER), str(killed)],
        env={**env, "CKAKD_WORKER_SLEEP": "0.1"},
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    try:
        position = wait_for_progress(killed, slow, 120)  # inside epoch 2 (0-based 1), two batches done
        assert slow.poll() is None, f"worker ended early: {slow.stderr.read().decode()[-2000:]}"
        os.kill(slow.pid, signal.SIGKILL)
    finally:
        slow.wait(timeout=30)
    assert slow.returncode == -signal.SIGKILL
    assert position is not None and position[0] == 1, position
    assert load_checkpoint(killed / "latest.pt")["epoch"] == 1  # only the unfinished epoch is lost
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == [1]
    assert not (killed / "final.pt").exists()
    resumed = subprocess.run(
        [sys.executable, str(WORKER), str(killed), "--resume"], env=env, cwd=REPO, capture_output=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err.decode()[-2000:]
    assert_same_state(torch.load(full / "final.pt"), torch.load(killed / "final.pt"))
    rows_full, rows_killed = read_jsonl(full / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
    assert [r["epoch"] for r in rows_killed] == [1, 2, 3, 4]
    assert strip_times(rows_full) == strip_times(rows_killed)
    assert [r["epoch"] for r in read_csv(killed / "metrics.csv")] == ["1", "2", "3", "4"]


# ------------------------------------------------------------------------------------------------ non-finite loss


def test_non_finite_loss_stops_and_keeps_last_good_epoch(tmp_path):
    tr, va = loaders(batch=32)
    model = scripted_kd(fail_at=(1, 2))
    trainer = Trainer(model, tr, va, settings(tmp_path, epochs=3))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3 .*bad=nan") as info:
        trainer.fit()
    assert isinstance(info.value, RuntimeError)
    assert "ce=" not in str(info.value)  # only the non-finite terms are named
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values() if v.is_floating_point())
    # the live model moved on during epoch 2 (two good steps), the checkpoint did not
    live = model.student.state_dict()
    assert not torch.equal(live["1.weight"], ckpt["student"]["1.weight"].to(live["1.weight"].device))
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_non_finite_loss_writes_unsaved_last_good_epoch(tmp_path):
    tr, va = loaders(batch=32)
    ref = scripted_kd()
    Trainer(ref, tr, va, settings(tmp_path / "ref", epochs=2, save_every=5)).fit()
    tr, va = loaders(batch=32)
    model = scripted_kd(fail_at=(2, 0))
    with pytest.raises(RuntimeError, match="epoch 3, step 1"):
        Trainer(model, tr, va, settings(tmp_path / "bad", epochs=4, save_every=5)).fit()
    ckpt = load_checkpoint(tmp_path / "bad" / "latest.pt")  # epoch 2 was not a save epoch: written on failure
    assert ckpt["epoch"] == 2
    assert_same_state(ckpt["student"], load_checkpoint(tmp_path / "ref" / "latest.pt")["student"])


# ------------------------------------------------------------------------------------------------ AMP, clipping


class DtypeProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(16)
        self.dtypes: set[torch.dtype] = set()

    def forward(self, x):
        out = self.net(x)
        self.dtypes.add(out.dtype)
        return out


def test_amp_bfloat16_on_cpu(tmp_path):
    tr, va = loaders()
    model = DtypeProbe()
    result = Trainer(model, tr, va, settings(tmp_path, epochs=1, amp=True, amp_dtype="bfloat16", device="cpu")).fit()
    assert model.dtypes == {torch.bfloat16}
    assert math.isfinite(result["final_train_loss"]) and math.isfinite(result["final_val_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_amp_float16_uses_a_grad_scaler(tmp_path):
    tr, va = loaders()
    model = DtypeProbe()
    trainer = Trainer(model, tr, va, settings(tmp_path, epochs=1, amp=True, amp_dtype="float16", device="cpu"))
    assert trainer.scaler.is_enabled()
    result = trainer.fit()
    assert model.dtypes == {torch.float16} and math.isfinite(result["final_train_loss"])
    assert load_checkpoint(tmp_path / "latest.pt")["scaler"]["scale"] > 0


def test_grad_clip_bounds_the_global_norm(tmp_path):
    def run(clip):
        torch.manual_seed(0)
        model = mlp(32)
        for p in model.parameters():
            p.data.mul_(4.0)  # large gradients
        tr, va = loaders(batch=32)
        trainer = Trainer(model, tr, va, settings(tmp_path / str(clip), epochs=1, lr=0.01, grad_clip=clip))
        norms = []

        def record(opt, *_):
            grads = [p.grad for p in trainer.params if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        trainer.optimizer.register_step_pre_hook(record)
        trainer.fit()
        return norms, read_jsonl(tmp_path / str(clip) / "metrics.jsonl")[0]

    clipped, row = run(0.5)
    unclipped, _ = run(None)
    assert max(unclipped) > 0.5  # the bound would bind
    assert max(clipped) <= 0.5 * (1 + 1e-5)
    assert row["train/grad_norm"] > 0.5  # the logged pre-clip norm


# ------------------------------------------------------------------------------------------------ logs, CKA, plots


def test_metrics_files_cka_and_plots(tmp_path):
    torch.manual_seed(0)
    tr, _ = loaders()
    val = TensorDataset(torch.rand(520, 1, 8, 8), torch.randint(0, 10, (520,)))
    va = make_loader(val, 100, False, 0)
    model = scripted_kd()
    pairs = [("4", "1"), ("5", "4")]
    result = Trainer(model, tr, va, settings(tmp_path, epochs=3, cka_pairs=pairs, max_train_batches=2)).fit()
    rows = read_csv(tmp_path / "metrics.csv")
    js = read_jsonl(tmp_path / "metrics.jsonl")
    keys = ["cka/4~1", "cka/5~4"]
    assert list(rows[0]) == [
        "epoch", "lr", "train/loss", "train/ce", "train/kd", "train/top1",
        "val/top1", "val/top5", "val/loss", "val/n", *keys, "images_per_s", "epoch_time_s",
    ]  # fmt: skip
    assert [r["epoch"] for r in js] == [1, 2, 3] and len(rows) == 3
    assert all(float(r["images_per_s"]) > 0 for r in rows)  # what `ckakd report` shows as images/s
    for r, j in zip(rows, js, strict=True):
        assert {k: float(v) for k, v in r.items()} == pytest.approx({k: float(v) for k, v in j.items()}, rel=1e-15)
        assert j["train/loss"] == pytest.approx(j["train/ce"] + j["train/kd"])
        assert j["val/n"] == 520 and 0.0 <= j["cka/4~1"] <= 1.0
    # the logged CKA is the final model's CKA on the first 512 validation images
    x = val.tensors[0][:512]
    with torch.no_grad():
        model.eval()
        fs = model.student[:5](x).flatten(1).double()
        ft = model.teacher[:2](x).flatten(1).double()
    assert js[-1]["cka/4~1"] == pytest.approx(float(ckakd.cka(fs, ft)), abs=1e-9)
    assert result["cka"] == {k: js[-1][k] for k in keys}
    for name in ("cka.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no teacher (plain classifier): no CKA columns, no cka.png
    plain_dir = tmp_path / "plain"
    Trainer(mlp(), tr, va, settings(plain_dir, epochs=1, max_train_batches=1)).fit()
    assert (plain_dir / "curves.png").exists() and not (plain_dir / "cka.png").exists()
    assert not any(k.startswith("cka/") for k in read_csv(plain_dir / "metrics.csv")[0])


def test_eval_every_and_save_every(tmp_path):
    tr, va = loaders()
    s = settings(tmp_path, epochs=3, eval_every=2, save_every=2, max_train_batches=1)
    Trainer(mlp(), tr, va, s).fit()
    js = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r.get("val/top1") is not None for r in js] == [False, True, True]  # the last epoch is always evaluated
    assert load_checkpoint(tmp_path / "latest.pt")["epoch"] == 3
    assert read_csv(tmp_path / "metrics.csv")[0]["val/top1"] == ""


def test_cka_pair_path_errors_early(tmp_path):
    tr, va = loaders()
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        Trainer(scripted_kd(), tr, va, settings(tmp_path, epochs=1, cka_pairs=[("nope", "1")]))


def test_tensorboard_optional(tmp_path):
    tr, va = loaders()
    s = settings(tmp_path, epochs=1, tensorboard=True, max_train_batches=1)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="tensorboard"):
            Trainer(mlp(), tr, va, s)
        return
    Trainer(mlp(), tr, va, s).fit()
    assert any((tmp_path / "tensorboard").iterdir())


# ------------------------------------------------------------------------------------------------ callbacks


class EveryOther:
    """Reports on every ``every``-th epoch only; records what it saw of the trainer."""

    def __init__(self, every: int = 2) -> None:
        self.every = every
        self.seen: list[tuple] = []
        self.fit_ends = 0

    def on_epoch_end(self, trainer, epoch):
        self.seen.append((epoch, trainer.epoch, trainer.device.type, trainer.out_dir, type(trainer.model).__name__))
        assert trainer.history == [] or trainer.history[-1]["epoch"] == epoch  # called before the row is added
        if (epoch + 1) % self.every:
            return None
        return {"diag/every": float(epoch), "diag/tensor": torch.tensor(epoch * 2.0)}

    def on_fit_end(self, trainer):
        self.fit_ends += 1


class FitEndOnly:
    def __init__(self) -> None:
        self.history_len = None

    def on_fit_end(self, trainer):
        self.history_len = len(trainer.history)


def test_callbacks_values_land_in_metrics_files_and_checkpoints(tmp_path):
    tr, va = loaders()
    cb, end = EveryOther(2), FitEndOnly()
    trainer = Trainer(mlp(), tr, va, settings(tmp_path, epochs=3, max_train_batches=1), callbacks=[cb, end])
    assert trainer.epoch is None
    trainer.fit()
    assert [s[:2] for s in cb.seen] == [(0, 0), (1, 1), (2, 2)]
    assert all(s[2] == "cpu" and s[3] == tmp_path and s[4] == "Sequential" for s in cb.seen)
    assert cb.fit_ends == 1 and end.history_len == 3
    js = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r.get("diag/every") for r in js] == [None, 1.0, None]
    assert js[1]["diag/tensor"] == 2.0
    with open(tmp_path / "metrics.csv", newline="") as f:
        lines = f.read().splitlines()
    header = lines[0].split(",")
    assert header[-4:] == [
        "diag/every",
        "diag/tensor",
        "images_per_s",
        "epoch_time_s",
    ]  # keys first seen in epoch 2: one header
    assert len(lines) == 4 and all(len(line.split(",")) == len(header) for line in lines)
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["diag/every"] for r in rows] == ["", "1.0", ""]
    assert load_checkpoint(tmp_path / "latest.pt")["history"][1]["diag/every"] == 1.0


def test_callback_values_survive_resume(tmp_path):
    tr, va = loaders()
    Trainer(mlp(), tr, va, settings(tmp_path, epochs=2, max_train_batches=1), callbacks=[EveryOther(2)]).fit()
    cb = EveryOther(3)
    tr, va = loaders()
    Trainer(mlp(), tr, va, settings(tmp_path, epochs=3, max_train_batches=1, resume=True), callbacks=[cb]).fit()
    assert [s[0] for s in cb.seen] == [2]  # only the new epoch
    js = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r.get("diag/every") for r in js] == [None, 1.0, 2.0]
    assert [r["diag/every"] for r in read_csv(tmp_path / "metrics.csv")] == ["", "1.0", "2.0"]


def test_callback_errors(tmp_path):
    tr, va = loaders()
    with pytest.raises(TypeError, match="neither on_epoch_end"):
        Trainer(mlp(), tr, va, settings(tmp_path), callbacks=[object()])

    class Clash:
        def on_epoch_end(self, trainer, epoch):
            return {"val/top1": 1.0}

    class NotAMapping:
        def on_epoch_end(self, trainer, epoch):
            return 3.0

    class NotANumber:
        def on_epoch_end(self, trainer, epoch):
            return {"diag/x": "high"}

    for cb, exc, message in [
        (Clash(), ValueError, r"Clash.on_epoch_end returned 'val/top1', which is already a column"),
        (NotAMapping(), TypeError, "must return a {name: number} mapping or None, got float"),
        (NotANumber(), TypeError, r"value 'diag/x' must be a number \(or None\), got str"),
    ]:
        s = settings(tmp_path / type(cb).__name__, epochs=1, max_train_batches=1)
        with pytest.raises(exc, match=message):
            Trainer(mlp(), tr, va, s, callbacks=[cb]).fit()
    # two callbacks reporting the same name
    s = settings(tmp_path / "twice", epochs=2, max_train_batches=1)
    with pytest.raises(ValueError, match="'diag/every'"):
        Trainer(mlp(), tr, va, s, callbacks=[EveryOther(1), EveryOther(1)]).fit()
