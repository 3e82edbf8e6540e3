"""Open optimizer and scheduler choices (ckakd.train.engine.optim / schedule), parameter groups, gradient
accumulation, channels-last, pinned memory and torch.compile in the trainer."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from ckakd.train.config import config_from_dict, load_config
from ckakd.train.data import load_digits_dataset
from ckakd.train.distillers import FitNet
from ckakd.train.engine import Trainer, TrainSettings, check_resume, load_checkpoint, save_checkpoint, speed
from ckakd.train.engine.loaders import pin_for
from ckakd.train.engine.optim import assign_param_groups, optimizer_class, scheduler_class, trainable_names
from ckakd.train.engine.schedule import build_optimizer
from ckakd.train.engine.settings import OptimConfig, ScheduleConfig
from ckakd.train.engine.speed import CompileError, channels_last
from tests.train._ddp_accumulate_worker import dataset as ddp_dataset
from tests.train._ddp_accumulate_worker import mlp as ddp_mlp

# ------------------------------------------------------------------------------------------------ helpers


def data(n: int = 64) -> TensorDataset:
    tr = load_digits_dataset("train")
    return TensorDataset(tr.tensors[0][:n], tr.tensors[1][:n])


def loader(n: int, batch: int) -> DataLoader:
    return DataLoader(data(n), batch_size=batch, shuffle=False)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )


def settings(out: Path, **kw) -> TrainSettings:
    base = dict(epochs=1, out_dir=out, lr=0.1, schedule="constant", progress=False, seed=0, momentum=0.0)
    base.update(kw)
    return TrainSettings.create(**base)


def fit(model: nn.Module, out: Path, train: DataLoader, **kw) -> Trainer:
    trainer = Trainer(model, train, loader(32, 32), settings(out, **kw))
    trainer.fit()
    return trainer


def assert_close_params(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("n, grad_clip", [(64, None), (40, None), (64, 0.05)])
def test_accumulate_equals_one_big_batch(tmp_path, n, grad_clip):
    """accumulate 4 × batch 8 = batch 32 (SGD without momentum, no BatchNorm); 40 samples: the last, partial
    window (1 batch of 8) is stepped as a batch of 8; gradient clipping applies to the accumulated gradient."""
    small, big = mlp(), mlp()
    a = fit(small, tmp_path / "a", loader(n, 8), accumulate=4, weight_decay=0.0, grad_clip=grad_clip, epochs=2)
    b = fit(big, tmp_path / "b", loader(n, 32), weight_decay=0.0, grad_clip=grad_clip, epochs=2)
    assert_close_params(small, big)
    steps = 2 * -(-n // 32)
    assert load_checkpoint(tmp_path / "a" / "latest.pt")["global_step"] == steps  # optimizer steps, not batches
    assert a.history[-1]["train/loss"] == pytest.approx(b.history[-1]["train/loss"], rel=1e-4)
    if grad_clip is not None:
        assert a.history[-1]["train/grad_norm"] == pytest.approx(b.history[-1]["train/grad_norm"], rel=1e-4)
    untouched = mlp()
    with pytest.raises(AssertionError):  # the comparison can tell the runs apart
        assert_close_params(small, untouched)


def test_accumulate_steps_a_per_step_scheduler_per_optimizer_step(tmp_path):
    model = mlp()
    trainer = fit(
        model, tmp_path, loader(64, 8), accumulate=3, schedule="StepLR", schedule_kwargs={"step_size": 1, "gamma": 0.5},
        schedule_interval="step",
    )  # fmt: skip
    # 8 batches: windows of 3, 3, 2 -> 3 optimizer steps, 3 scheduler steps
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


# ------------------------------------------------------------------------------------------------ optimizers


def test_builtin_optimizers_keep_their_recipe(tmp_path):
    p = [nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(p, TrainSettings.create(epochs=1, out_dir=tmp_path))
    assert type(sgd) is torch.optim.SGD
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.05, 0.9, 5e-4, False)
    adamw = build_optimizer(p, TrainSettings.create(epochs=1, out_dir=tmp_path, optimizer="adamw"))
    g = adamw.param_groups[0]
    assert type(adamw) is torch.optim.AdamW and (g["lr"], g["weight_decay"], g["betas"]) == (0.05, 5e-4, (0.9, 0.999))


@pytest.mark.parametrize("name", ["Adam", "rmsprop", "torch.optim.NAdam", "RMSprop"])
def test_any_torch_optimizer_by_name_or_path_with_kwargs(tmp_path, name):
    cls = optimizer_class(name)
    kwargs = {"eps": 1e-6}
    s = TrainSettings.create(epochs=1, out_dir=tmp_path, optimizer=name, optimizer_kwargs=kwargs, lr=0.01)
    opt = build_optimizer([nn.Parameter(torch.zeros(2))], s)
    assert type(opt) is cls and opt.param_groups[0]["eps"] == 1e-6 and opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[0]["weight_decay"] == 5e-4  # optim.weight_decay goes to every class that takes it
    if "momentum" in opt.param_groups[0]:
        assert opt.param_groups[0]["momentum"] == 0.9
    assert s.to_dict()["optimizer_kwargs"] == kwargs  # a non-default newer setting is in the checkpoint record


def test_custom_optimizer_by_dotted_path_only_gets_what_it_takes(tmp_path):
    s = TrainSettings.create(epochs=1, out_dir=tmp_path, optimizer="torch.optim.Adadelta", lr=0.5)
    opt = build_optimizer([nn.Parameter(torch.zeros(2))], s)
    assert type(opt) is torch.optim.Adadelta and "momentum" not in opt.param_groups[0]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"name": "rmsprob"}, r"optim\.name: unknown optimizer 'rmsprob' \(did you mean 'RMSprop'\?\); expected sgd"),
        ({"name": "nosuchpkg.Opt"}, r"optim\.name: cannot import 'nosuchpkg' for the optimizer"),
        ({"name": "torch.nn.Linear"}, r"optim\.name: 'torch\.nn\.Linear' is .*not a torch\.optim\.Optimizer subclass"),
        ({"name": "torch.optim.Adamz"}, r"module 'torch\.optim' has no 'Adamz' \(did you mean 'Adam'\?\)"),
        (
            {"name": "Adam", "kwargs": {"betaz": [0.9, 0.99]}},
            r"unknown config key 'optim\.kwargs\.betaz' \(did you mean 'betas'\?\); valid keys under 'optim\.kwargs' "
            r"\(Adam\): betas, eps",
        ),
        ({"name": "Adam", "kwargs": {"lr": 0.1}}, r"optim\.kwargs\.lr: set optim\.lr instead"),
        ({"kwargs": {"momentum": 0.5}}, r"optim\.kwargs\.momentum: set optim\.momentum instead"),
        ({"param_groups": [{"params": "x", "lrr": 1}]}, r"unknown config key 'optim\.param_groups\[0\]\.lrr'"),
        (
            {"name": "Adam", "param_groups": [{"params": "x", "kwargs": {"momentum": 0.1}}]},
            r"unknown config key 'optim\.param_groups\[0\]\.kwargs\.momentum'",
        ),
    ],
)
def test_bad_optimizer_settings_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"optim": section})


def test_optimizer_overrides_from_the_command_line_syntax():
    cfg = load_config("digits/teacher", ["optim.name=Adam", "optim.kwargs.betas=[0.8,0.99]", "schedule.name=StepLR",
                                         "schedule.kwargs.step_size=2"])  # fmt: skip
    assert (cfg.optim.name, cfg.optim.kwargs, cfg.schedule.kind) == ("Adam", {"betas": [0.8, 0.99]}, "StepLR")
    assert config_from_dict(cfg.to_dict()) == cfg  # the resolved config reads back unchanged
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr' \(did you mean 'lr'\?\)"):
        load_config("digits/teacher", ["optim.lrr=0.1"])


# ------------------------------------------------------------------------------------------------ parameter groups


def fitnet(seed: int = 0) -> FitNet:
    torch.manual_seed(seed)
    student, teacher = convnet(seed), convnet(seed + 1)
    teacher[0] = nn.Conv2d(1, 6, 3, padding=1)
    teacher[4] = nn.Linear(6, 10)
    return FitNet(student, teacher, "1", "1", input_shape=(1, 8, 8))


def test_param_groups_land_with_their_lr_and_the_schedule_scales_all(tmp_path):
    model = fitnet()
    names = trainable_names(model, list(model.learnable_parameters()))
    assert "extra.proj.0.weight" in names and "student.0.weight" in names
    groups = [{"params": "extra.*", "lr": 0.5, "weight_decay": 0.0}, {"params": "student.4.*", "lr": 0.2}]
    s = settings(tmp_path, epochs=3, param_groups=groups, schedule="step", milestones=[1, 2], gamma=0.1)
    trainer = Trainer(model, loader(32, 16), loader(32, 32), s)
    pg = trainer.optimizer.param_groups
    ids = [{id(p) for p in g["params"]} for g in pg]
    assert ids[1] == {id(p) for p in model.extra.parameters()}
    assert ids[2] == {id(p) for p in model.student[4].parameters()}
    assert ids[0] == {id(p) for p in model.student.parameters()} - ids[2]  # the rest: the default group
    assert [g["lr"] for g in pg] == [0.1, 0.5, 0.2] and [g["weight_decay"] for g in pg] == [5e-4, 0.0, 5e-4]
    trainer.fit()
    assert [g["lr"] for g in pg] == pytest.approx([0.1 * 0.01, 0.5 * 0.01, 0.2 * 0.01])


def test_param_group_errors():
    names = ["student.fc.weight", "student.fc.bias", "extra.proj.0.weight"]
    assert assign_param_groups(names, ["extra.*", "student.fc.bias"]) == [-1, 1, 0]
    assert assign_param_groups(names, ["*.bias, extra.*"]) == [-1, 0, 0]
    with pytest.raises(ValueError, match=r"optim\.param_groups\[1\]\.params='projector\*' matches no trainable par"):
        assign_param_groups(names, ["extra.*", "projector*"])
    with pytest.raises(ValueError, match=r"'student\.fc\.bias' is matched by optim\.param_groups\[0\].*and optim"):
        assign_param_groups(names, ["student.*", "*.bias"])


# ------------------------------------------------------------------------------------------------ schedulers


def reference_lrs(factory, epochs: int, steps: int, interval: str) -> list[float]:
    """The lr torch's own scheduler gives at the start of each epoch, stepped per epoch or per optimizer step."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = factory(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        for _ in range(steps):
            opt.step()
            if interval == "step":
                sched.step()
        if interval == "epoch":
            sched.step()
    return out


@pytest.mark.parametrize(
    "name, kwargs, interval, factory",
    [
        ("StepLR", {"step_size": 2, "gamma": 0.5}, "epoch", lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)),
        ("cosineannealinglr", {"T_max": 4}, "epoch", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 4)),
        (
            "torch.optim.lr_scheduler.OneCycleLR", {"max_lr": 0.3, "total_steps": 16}, "step",
            lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=16),
        ),
    ],
)  # fmt: skip
def test_lr_scheduler_class_steps_as_torch_does(tmp_path, name, kwargs, interval, factory):
    trainer = fit(mlp(), tmp_path, loader(64, 16), epochs=4, schedule=name, schedule_kwargs=kwargs,
                  schedule_interval=interval)  # fmt: skip
    assert [r["lr"] for r in trainer.history] == pytest.approx(reference_lrs(factory, 4, 4, interval))


def test_reduce_on_plateau_steps_on_the_validation_metric(tmp_path):
    trainer = fit(mlp(), tmp_path, loader(64, 16), epochs=3, lr=1e-9, schedule="ReduceLROnPlateau",
                  schedule_kwargs={"patience": 0, "factor": 0.5, "eps": 0.0})  # fmt: skip
    assert trainer.scheduler.mode == "max"  # top-1: higher is better
    # lr 1e-9 leaves top-1 flat: the first epoch sets the best, the second does not improve on it: lr halves
    assert [r["lr"] for r in trainer.history] == pytest.approx([1e-9, 1e-9, 5e-10], rel=1e-9, abs=0)


def test_resume_restores_the_scheduler(tmp_path):
    kw = dict(schedule="StepLR", schedule_kwargs={"step_size": 1, "gamma": 0.5}, deterministic=True)
    whole = mlp()
    full = fit(whole, tmp_path / "full", loader(64, 16), epochs=4, **kw)
    part = mlp()
    fit(part, tmp_path / "part", loader(64, 16), epochs=2, **kw)
    assert load_checkpoint(tmp_path / "part" / "latest.pt")["scheduler"]["last_epoch"] == 2
    resumed_model = mlp(seed=5)  # weights come from the checkpoint
    resumed = fit(resumed_model, tmp_path / "part", loader(64, 16), epochs=4, resume=True, **kw)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history] == [0.1, 0.05, 0.025, 0.0125]
    assert resumed.scheduler.last_epoch == 4
    assert_close_params(resumed_model, whole, atol=0)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"kind": "linear"}, r"schedule\.kind: expected one of 'step', 'cosine', 'constant', a torch\.optim\.lr_sch"),
        ({"name": "OneCycleLR"}, r"schedule\.kwargs: OneCycleLR needs 'max_lr' \(set schedule\.kwargs\.max_lr\)"),
        ({"name": "StepLR", "kwargs": {"step_size": 1, "gama": 0.5}}, r"'schedule\.kwargs\.gama' \(did you mean 'gam"),
        ({"kind": "cosine", "kwargs": {"T_max": 3}}, r"schedule\.kwargs: the built-in 'cosine' schedule takes none"),
        ({"kind": "step", "interval": "step"}, r"schedule\.interval='step': the built-in 'step' schedule is per epoch"),
        ({"name": "StepLR", "kwargs": {"step_size": 1}, "warmup_epochs": 2}, r"schedule\.warmup_epochs=2: the epoch"),
        ({"name": "ReduceLROnPlateau", "interval": "step"}, r"ReduceLROnPlateau steps on the validation metric"),
        ({"interval": "batch"}, r"schedule\.interval: expected one of 'epoch', 'step'"),
    ],
)
def test_bad_schedule_settings_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"schedule": {"milestones": [], **section}})


def test_schedule_name_is_another_spelling_of_kind():
    assert ScheduleConfig(name="cosine").kind == "cosine" and ScheduleConfig(kind="cosine").kind == "cosine"
    cfg = load_config("digits/teacher", ["schedule.name=constant"])  # replaces the inherited kind: cosine
    assert cfg.schedule.kind == "constant" and cfg.schedule.name is None
    assert scheduler_class("cosine") is None and scheduler_class("steplr") is torch.optim.lr_scheduler.StepLR


# ------------------------------------------------------------------------------------------------ resume records


def test_newer_settings_are_in_the_record_only_when_set_and_refused_when_changed(tmp_path):
    assert "accumulate" not in settings(tmp_path).to_dict()
    s = settings(tmp_path, accumulate=2, channels_last=True)
    record = s.to_dict()
    assert record["accumulate"] == 2 and record["channels_last"] is True
    assert TrainSettings.create(**{**record, "out_dir": tmp_path}) == s
    model = mlp()
    Trainer(model, loader(64, 16), loader(32, 32), settings(tmp_path, accumulate=2)).fit()
    with pytest.raises(ValueError, match=r"accumulate: checkpoint 2, this run 1"):
        check_resume(tmp_path / "latest.pt", settings(tmp_path, epochs=2, resume=True), model=model)
    ok = settings(tmp_path, epochs=2, accumulate=2, channels_last=True, compile=False, resume=True)  # may change
    assert check_resume(tmp_path / "latest.pt", ok, model=model) is not None


def test_config_checkpoint_without_the_newer_keys_resumes(tmp_path):
    """A checkpoint whose stored config predates optim.kwargs / param_groups, schedule.name / kwargs / interval and
    train.accumulate / channels_last / compile resumes with a config that leaves them at their defaults."""
    cfg = load_config("digits/teacher", [f"run.out_dir={tmp_path}"])
    model = mlp()
    s = settings(tmp_path, config=cfg.to_dict())
    Trainer(model, loader(64, 16), loader(32, 32), s).fit()
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    old = copy.deepcopy(ckpt["config"])
    for section, keys in {"optim": ("kwargs", "param_groups"), "schedule": ("name", "kwargs", "interval"),
                          "train": ("accumulate", "channels_last", "compile")}.items():  # fmt: skip
        for key in keys:
            del old[section][key]
    save_checkpoint(tmp_path / "latest.pt", {**{k: v for k, v in ckpt.items() if k != "format"}, "config": old})
    again = settings(tmp_path, epochs=2, config=cfg.to_dict(), resume=True)
    assert check_resume(tmp_path / "latest.pt", again, model=model) is not None
    changed = load_config("digits/teacher", [f"run.out_dir={tmp_path}", "train.accumulate=2"])
    with pytest.raises(ValueError, match=r"train\.accumulate: checkpoint 1, this run 2"):
        check_resume(tmp_path / "latest.pt", settings(tmp_path, epochs=2, config=changed.to_dict()), model=model)


# ------------------------------------------------------------------------------------------------ speed options


def test_channels_last_model_and_inputs(tmp_path):
    x = torch.zeros(2, 3, 4, 5)
    batch = channels_last(({"a": x, "b": torch.zeros(2, 3)}, [x.long(), x]))
    assert batch[0]["a"].is_contiguous(memory_format=torch.channels_last) and batch[0]["b"].dim() == 2
    assert not batch[1][0].is_contiguous(memory_format=torch.channels_last)  # integer tensors stay as they are
    assert batch[1][1].is_contiguous(memory_format=torch.channels_last)
    a, b = convnet(), convnet()
    fit(a, tmp_path / "a", loader(32, 16), channels_last=True)
    fit(b, tmp_path / "b", loader(32, 16))
    assert a[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_close_params(a, b, atol=1e-5)


def test_pin_memory_only_for_cuda():
    ld = loader(16, 8)
    assert pin_for(ld, torch.device("cpu")) is ld and not ld.pin_memory
    assert pin_for(ld, torch.device("cuda")).pin_memory
    assert pin_for([1, 2], torch.device("cuda")) == [1, 2]  # not a DataLoader: left alone


def test_compile_trains_the_same_as_eager(tmp_path):
    a, b = mlp(), mlp()
    trainer = fit(a, tmp_path / "a", loader(32, 16), compile=True)
    fit(b, tmp_path / "b", loader(32, 16))
    assert trainer.compiler is not None and trainer.compiler.graphs >= 1  # compiled, not run eagerly
    assert list(load_checkpoint(tmp_path / "a" / "latest.pt")["student"]) == list(b.state_dict())  # same keys
    assert_close_params(a, b, atol=1e-5)
    assert trainer.history[0]["train/loss"] == pytest.approx(
        load_checkpoint(tmp_path / "b" / "latest.pt")["history"][0]["train/loss"], rel=1e-5
    )


def test_compile_failure_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    def failing_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(speed, "COMPILE_BACKEND", failing_backend)
    torch._dynamo.reset()
    with pytest.raises(CompileError, match=r"train\.compile=true: torch\.compile failed .*exploded.*compile=false"):
        fit(mlp(), tmp_path / "a", loader(32, 16), compile=True)

    class Opaque(nn.Module):  # nothing dynamo can trace: every frame falls back to eager
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        @torch.compiler.disable
        def forward(self, x):
            return self.fc(x.flatten(1))

    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")
    with pytest.raises(CompileError, match=r"compiled no graph of the student's forward \(Opaque\)"):
        fit(Opaque(), tmp_path / "b", loader(32, 16), compile=True)
    torch._dynamo.reset()


def test_optim_config_defaults_unchanged():
    o = OptimConfig()
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.nesterov, o.kwargs, o.param_groups) == (
        "sgd", 0.05, 0.9, 5e-4, False, {}, []
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ README


def readme_block(start: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:python|bash)\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if b.startswith(start)]
    return block


def test_readme_optimizers_example_runs(tmp_path):
    code = readme_block("# optimizers and schedules from Python").replace("runs/optim_example", str(tmp_path))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert type(trainer.optimizer) is torch.optim.NAdam and len(trainer.optimizer.param_groups) == 2
    assert trainer.scheduler.last_epoch == 8 and load_checkpoint(tmp_path / "latest.pt")["global_step"] == 8
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_readme_optimizers_command_is_a_valid_config():
    line = " ".join(readme_block("# FitNet's projector").replace("\\\n", " ").splitlines()[1:])
    overrides = [a.strip("'") for a in shlex.split(line)[3:]]
    cfg = load_config("digits/fitnet", overrides)
    assert (cfg.optim.name, cfg.schedule.kind, cfg.train.accumulate) == ("AdamW", "OneCycleLR", 2)
    assert cfg.optim.param_groups[0].params == "extra.*" and cfg.optim.param_groups[0].lr == 1e-2
    assert -(-(1347 // cfg.data.batch_size) // 2) * cfg.schedule.epochs == cfg.schedule.kwargs["total_steps"]


def test_ddp_accumulate_equals_the_global_batch(tmp_path):
    """2 gloo ranks × accumulate 2 × batch 4 = one batch of 16 in one process (the ranks' gradients all-reduced
    once per window)."""
    worker = Path(__file__).with_name("_ddp_accumulate_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(worker.parents[2]), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in range(2))
    ref = ddp_mlp()
    train = DataLoader(ddp_dataset(), batch_size=16)
    Trainer(ref, train, DataLoader(ddp_dataset(), batch_size=8), settings(tmp_path / "ref", epochs=2, weight_decay=0.0,
            device="cpu")).fit()  # fmt: skip
    for k, v in ref.state_dict().items():
        assert torch.equal(w0[k], w1[k]), k
        torch.testing.assert_close(w0[k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert not torch.allclose(w0["3.weight"], ddp_mlp().state_dict()["3.weight"])  # it trained
