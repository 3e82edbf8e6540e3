"""Ensemble KD with per-model augmentation (Guo et al.): multi-view loaders, EnsembleKD on views, vanilla vs
logit-standardized KD, the trainer on multi-view batches, and the runner building the views from a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ckakd.train import create_model, runner
from ckakd.train.config import apply_overrides, config_from_dict
from ckakd.train.data import Compose, MultiView, RandomCropFlip, load_digits_dataset, make_loader, strong_augment
from ckakd.train.distillers import KD, EnsembleKD, build_distiller, kd_loss, standardize_logits
from ckakd.train.engine import Trainer, TrainSettings, evaluate, save_checkpoint

C = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(width: int, seed: int, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


class Recorder(nn.Module):
    """Wraps a net and records every input it is called with."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


class Affine(nn.Module):
    """``a * net(x) + b`` with fixed per-sample (B, 1) or scalar ``a > 0`` and ``b``."""

    def __init__(self, net: nn.Module, a: torch.Tensor | float, b: torch.Tensor | float) -> None:
        super().__init__()
        self.net, self.a, self.b = net, a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * self.net(x) + self.b


def _views(n: int = 8, seed: int = 0, names=("student", "teacher0", "teacher1")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(n, 1, 8, 8, generator=g) for k in names}


def _labels(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed + 100))


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in module.parameters()]


# ------------------------------------------------------------------------------------------ multi-view loaders


def _digits(n: int = 96) -> TensorDataset:
    ds = load_digits_dataset("val")
    return TensorDataset(ds.tensors[0][:n], ds.tensors[1][:n])


def test_multiview_loader_yields_one_view_per_name_from_the_same_image():
    ds = _digits()
    mv = MultiView({"student": None, "teacher0": RandomCropFlip(8, padding=1, flip_p=0.0), "teacher1": None})
    (x, y), *_ = list(make_loader(ds, 32, False, 0, transform=mv))
    assert isinstance(x, dict) and list(x) == ["student", "teacher0", "teacher1"]
    assert all(v.shape == (32, 1, 8, 8) for v in x.values()) and y.shape == (32,)
    assert torch.equal(x["student"], ds.tensors[0][:32]) and torch.equal(x["teacher1"], ds.tensors[0][:32])
    assert torch.equal(y, ds.tensors[1][:32])
    assert not torch.equal(x["teacher0"], x["student"])
    # teacher0 is a (zero-filled) shift of the same image by at most one pixel
    padded = F.pad(ds.tensors[0][:32], (1, 1, 1, 1))
    for i in range(32):
        crops = [padded[i, :, a : a + 8, b : b + 8] for a in range(3) for b in range(3)]
        assert any(torch.equal(x["teacher0"][i], c) for c in crops), i


def test_multiview_loader_is_reproducible_and_views_are_independent():
    ds = _digits()
    strong = strong_augment(8, padding=1, flip_p=0.0)

    def batches(seed: int):
        mv = MultiView({"student": strong, "teacher0": strong})
        return [(dict(x), y) for x, y in make_loader(ds, 32, True, seed, transform=mv)]

    a, b, c = batches(3), batches(3), batches(4)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and all(torch.equal(xa[k], xb[k]) for k in xa)
    assert not all(torch.equal(xa["student"], xc["student"]) for (xa, _), (xc, _) in zip(a, c, strict=True))
    # the same transform drawn twice: two different views of every image
    assert not torch.equal(a[0][0]["student"], a[0][0]["teacher0"])


def test_trainer_reseeds_multiview_loaders_per_epoch(tmp_path):
    ds = _digits()
    mv = MultiView({"student": strong_augment(8, padding=1), "teacher0": strong_augment(8, padding=1)})
    trainer = Trainer(_net(4, 0, 10), make_loader(ds, 32, True, 0, transform=mv), None, _settings(tmp_path))

    def first(epoch: int):
        loader = make_loader(ds, 32, True, 0, transform=mv)
        trainer._reseed_loader(loader, epoch)
        return next(iter(loader))[0]

    e1, e1_again, e2 = first(1), first(1), first(2)
    assert all(torch.equal(e1[k], e1_again[k]) for k in e1)
    assert not torch.equal(e1["teacher0"], e2["teacher0"])


# ------------------------------------------------------------------------------------------ EnsembleKD


@pytest.mark.parametrize("reduce", ["mean_loss", "mean_target"])
@pytest.mark.parametrize("standardize", [False, True])
def test_single_teacher_ensemble_equals_kd_value_and_gradient(reduce, standardize):
    x, y = _views(names=("student",))["student"], _labels()
    results = []
    for make in (
        lambda s, t: KD(s, t, temperature=3.0, standardize=standardize, ce_weight=0.3, kd_weight=2.0),
        lambda s, t: EnsembleKD(
            s, [t], temperature=3.0, reduce=reduce, standardize=standardize, ce_weight=0.3, kd_weight=2.0
        ),
    ):
        s, t = _net(4, 1), _net(8, 2)
        d = make(s, t).train()
        logits, losses = d.forward_train(x, y)
        sum(losses.values()).backward()
        results.append((logits.detach(), {k: v.detach() for k, v in losses.items()}, _grads(s)))
    (la, a, ga), (lb, b, gb) = results
    torch.testing.assert_close(la, lb)
    assert a.keys() == b.keys() == {"ce", "kd"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    for g1, g2 in zip(ga, gb, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_multiview_input_feeds_each_teacher_its_view_and_the_student_its_own():
    s, t0, t1 = Recorder(_net(4, 1)), Recorder(_net(8, 2)), Recorder(_net(6, 3))
    d = EnsembleKD(s, [t0, t1], temperature=4.0, kd_weight=1.0, ce_weight=0.5).train()
    x, y = _views(), _labels()
    logits, losses = d.forward_train(x, y)
    assert len(s.inputs) == len(t0.inputs) == len(t1.inputs) == 1
    assert torch.equal(s.inputs[0], x["student"])
    assert torch.equal(t0.inputs[0], x["teacher0"]) and torch.equal(t1.inputs[0], x["teacher1"])
    with torch.no_grad():
        zs = s.net(x["student"])
        ref_kd = (kd_loss(zs, t0.net(x["teacher0"]), 4.0) + kd_loss(zs, t1.net(x["teacher1"]), 4.0)) / 2
    torch.testing.assert_close(logits.detach(), zs)
    torch.testing.assert_close(losses["ce"].detach(), 0.5 * F.cross_entropy(zs, y))  # CE on the student view
    torch.testing.assert_close(losses["kd"].detach(), ref_kd)
    # a plain tensor: every model sees it; forward (evaluation) takes a plain tensor
    plain = x["teacher1"]
    d.forward_train(plain, y)
    assert all(torch.equal(m.inputs[-1], plain) for m in (s, t0, t1))
    torch.testing.assert_close(d.eval()(plain), s.net(plain))


def test_teacher_views_option_and_missing_views():
    s, t0, t1 = Recorder(_net(4, 1)), Recorder(_net(8, 2)), Recorder(_net(6, 3))
    d = EnsembleKD(s, [t0, t1], teacher_views=["student", "teacher1"])
    assert d.view_names == ["student", "teacher1"]
    x, y = _views(names=("student", "teacher1")), _labels()
    d.forward_train(x, y)
    assert torch.equal(t0.inputs[-1], x["student"]) and torch.equal(t1.inputs[-1], x["teacher1"])
    default = EnsembleKD(s, [t0, t1])
    assert default.teacher_views == ("teacher0", "teacher1")
    n_calls = len(s.inputs)
    with pytest.raises(KeyError, match=r"no view 'teacher0' for teacher 0.*\['student', 'teacher1'\]"):
        default.forward_train(x, y)
    assert len(s.inputs) == n_calls  # checked before any forward
    with pytest.raises(KeyError, match="no view 'student' for the student"):
        default.forward_train({"teacher0": x["student"], "teacher1": x["teacher1"]}, y)
    with pytest.raises(ValueError, match="one view .* per teacher"):
        EnsembleKD(s, [t0, t1], teacher_views=["student"])
    with pytest.raises(ValueError, match="list of view names"):
        EnsembleKD(s, [t0, t1], teacher_views="student")
    # built by name through the registry, teacher_views included
    d = build_distiller("ensemble_kd", s, [t0, t1], teacher_views=["teacher1", "teacher1"])
    assert d.teacher_views == ("teacher1", "teacher1") and d.view_names == ["student", "teacher1"]


def test_single_teacher_distillers_refuse_multiview_batches():
    d = KD(_net(4, 1), _net(8, 2))
    with pytest.raises(TypeError, match=r"KD takes plain-tensor batches.*\['student', 'teacher0'\].*EnsembleKD"):
        d.forward_train(_views(names=("student", "teacher0")), _labels())


@pytest.mark.parametrize("views", [False, True])
def test_teachers_batchnorm_statistics_unchanged_by_a_step(views):
    s, t0, t1 = _net(4, 1), _net(8, 2), _net(6, 3)
    for t in (t0, t1):  # non-trivial statistics, so a change would show
        t.train()
        with torch.no_grad():
            t(torch.rand(16, 1, 8, 8) * 3)
    d = EnsembleKD(s, [t0, t1], reduce="mean_target", standardize=True)
    d.train()
    assert s.training and not t0.training and not t1.training
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in (t0, t1)]
    s_before = s[1].running_mean.clone()
    opt = torch.optim.SGD(list(d.learnable_parameters()), lr=0.1)
    x = _views(16) if views else _views(16)["student"]
    for _ in range(2):
        _, losses = d.forward_train(x, _labels(16))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    for t, ref in zip((t0, t1), before, strict=True):
        assert not t.training
        for k, v in t.state_dict().items():
            assert torch.equal(v, ref[k]), k
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert not torch.equal(s[1].running_mean, s_before)  # the student's statistics do move


# ------------------------------------------------------------------------------------------ logit standardization


def test_zscored_logits_have_zero_mean_and_unit_std_per_sample():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 11, generator=g, dtype=torch.float64) * torch.linspace(0.1, 30, 6, dtype=torch.float64)[:, None]
    z = z + torch.linspace(-50, 50, 6, dtype=torch.float64)[:, None]
    s = standardize_logits(z)
    torch.testing.assert_close(s.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(s.std(1), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_standardized_kd_is_invariant_to_per_sample_affine_maps():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, 10, generator=g, dtype=torch.float64), torch.randn(5, 10, generator=g, dtype=torch.float64)
    base = kd_loss(zs, zt, 2.0, standardize=True)
    a_s, b_s = torch.rand(5, 1, generator=g, dtype=torch.float64) * 4 + 0.25, torch.randn(5, 1, generator=g) * 10
    a_t, b_t = torch.rand(5, 1, generator=g, dtype=torch.float64) * 4 + 0.25, torch.randn(5, 1, generator=g) * 10
    for a1, b1, a2, b2 in [(3.0, -2.0, 0.5, 10.0), (a_s, b_s, a_t, b_t)]:
        got = kd_loss(a1 * zs + b1, a2 * zt + b2, 2.0, standardize=True)  # both nets transformed
        torch.testing.assert_close(got, base, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(kd_loss(a_s * zs + b_s, zt, 2.0), kd_loss(zs, zt, 2.0))  # vanilla KD is not


@pytest.mark.parametrize("reduce", ["mean_loss", "mean_target"])
def test_standardized_ensemble_kd_is_invariant_to_affine_maps_of_every_net(reduce):
    x, y = _views(names=("student",))["student"], _labels()
    g = torch.Generator().manual_seed(2)
    a = [torch.rand(8, 1, generator=g) * 3 + 0.5 for _ in range(3)]
    b = [torch.randn(8, 1, generator=g) * 5 for _ in range(3)]

    def kd(transformed: bool, standardize: bool) -> torch.Tensor:
        s, t0, t1 = _net(4, 1), _net(8, 2), _net(6, 3)
        if transformed:
            s, t0, t1 = (Affine(m, a[i], b[i]) for i, m in enumerate((s, t0, t1)))
        d = EnsembleKD(s, [t0, t1], temperature=2.0, reduce=reduce, standardize=standardize, kd_weight=9.0)
        return d.forward_train(x, y)[1]["kd"].detach()

    torch.testing.assert_close(kd(True, True), kd(False, True), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kd(True, False), kd(False, False))


# ------------------------------------------------------------------------------------------ trainer


def _settings(tmp_path: Path, **kw) -> TrainSettings:
    base = dict(epochs=1, out_dir=tmp_path, lr=0.05, schedule="constant", progress=False, seed=0, max_train_batches=2)
    base.update(kw)
    return TrainSettings.create(**base)


def test_trainer_on_multiview_batches(tmp_path):
    ds = _digits(128)
    views = MultiView({"student": None, "teacher0": RandomCropFlip(8, 1, 0.0), "teacher1": strong_augment(8, 1)})
    train = make_loader(ds, 32, True, 0, transform=views)
    val = make_loader(_digits(64), 64, False, 0)
    t0, t1 = Recorder(_net(8, 2, 10)), Recorder(_net(6, 3, 10))
    d = EnsembleKD(_net(4, 1, 10), [t0, t1])
    result = Trainer(d, train, val, _settings(tmp_path, epochs=2)).fit()
    assert result["epochs_completed"] == 2
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/ce", "train/kd", "train/top1", "val/top1"} <= set(row)
    assert 0.0 <= row["train/top1"] <= 100.0
    assert len(t0.inputs) == len(t1.inputs) == 4  # 2 epochs x 2 batches, no teacher forward in evaluation
    with pytest.raises(TypeError, match="plain classifier.*multi-view"):
        Trainer(_net(4, 1, 10), train, None, _settings(tmp_path / "plain")).fit()
    with pytest.raises(TypeError, match="evaluate needs plain-tensor batches"):
        evaluate(d, train)


def test_trainer_multiview_top1_uses_student_view(tmp_path):
    class Oracle(nn.Module):
        """Predicts the label encoded in the image's first pixel; any other view gives wrong answers."""

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            lab = x[:, 0, 0, 0].round().long()
            return F.one_hot(lab, 10).float() * 50 + self.w

    y = torch.arange(64) % 9  # labels 0..8: the teacher view's label + 1 is a valid, wrong class
    img = torch.zeros(64, 1, 8, 8)
    img[:, 0, 0, 0] = y.float()
    ds = TensorDataset(img, y)
    shift = Compose([lambda x: x + 1.0])  # the teacher's view decodes label + 1: always wrong
    train = make_loader(ds, 16, False, 0, transform=MultiView({"student": None, "teacher0": shift}))
    d = EnsembleKD(Oracle(), [_net(4, 1, 10)])
    Trainer(d, train, None, _settings(tmp_path, lr=1e-9, max_train_batches=None)).fit()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train/top1"] == 100.0


# ------------------------------------------------------------------------------------------ runner


@pytest.fixture(scope="module")
def teacher_ckpts(tmp_path_factory) -> list[Path]:
    """Two untrained resnet8 digits 'teachers' saved as trainer checkpoints (weights only matter for shape)."""
    out = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model("resnet8", num_classes=10, in_channels=1)
        paths.append(save_checkpoint(out / f"t{seed}.pt", {"student": m.state_dict()}))
    return paths


def _cfg(teacher_ckpts: list[Path], tmp_path: Path, *overrides: str):
    """A tiny two-teacher ensemble_kd digits config: student augment none, T1 weak, T2 strong."""
    data = {
        "run": {"name": "ens", "out_dir": str(tmp_path), "progress": False, "device": "cpu"},
        "data": {"name": "digits", "batch_size": 32, "augment": "none", "max_train_batches": 2},
        "model": {"name": "resnet8"},
        "teacher": {"name": "resnet8", "checkpoint": str(teacher_ckpts[0]), "augment": "weak"},
        "teachers": [{"name": "resnet8", "checkpoint": str(teacher_ckpts[1]), "augment": "strong"}],
        "distiller": {"name": "ensemble_kd", "kwargs": {"temperature": 4.0, "reduce": "mean_loss"}},
        "schedule": {"epochs": 1, "kind": "constant", "milestones": []},
    }
    return config_from_dict(apply_overrides(data, list(overrides)))


def test_runner_builds_multiview_loaders_from_the_config(teacher_ckpts, tmp_path):
    cfg = _cfg(teacher_ckpts, tmp_path)
    bundle = runner.build_data(cfg)
    views, teacher_views = runner.build_train_views(cfg, bundle)
    assert isinstance(views, MultiView) and views.names == ["student", "teacher0", "teacher1"]
    assert teacher_views == ["teacher0", "teacher1"]
    assert views.views["student"] is None  # data.augment: none
    weak, strong = views.views["teacher0"], views.views["teacher1"]
    crop = weak.transforms[0]
    assert isinstance(crop, RandomCropFlip) and (crop.padding, crop.flip_p) == (1, 0.0)  # digits: never flipped
    assert [type(t).__name__ for t in strong.transforms] == ["RandomCropFlip", "RandAugmentLite", "Cutout"]
    assert strong.transforms[0].flip_p == 0.0
    train, val = runner.build_loaders(cfg, bundle, views)
    x, y = next(iter(train))
    assert list(x) == ["student", "teacher0", "teacher1"] and all(v.shape == (32, 1, 8, 8) for v in x.values())
    assert not torch.equal(x["student"], x["teacher0"]) and not torch.equal(x["teacher0"], x["teacher1"])
    assert isinstance(next(iter(val))[0], torch.Tensor)  # evaluation stays plain
    # a teacher with augment null reads the student's view: no view of its own
    cfg2 = _cfg(teacher_ckpts, tmp_path, "teacher.augment=null")
    views2, tv2 = runner.build_train_views(cfg2, bundle)
    assert views2.names == ["student", "teacher1"] and tv2 == ["student", "teacher1"]
    # no teacher augment at all: a plain loader
    plain = _cfg(teacher_ckpts, tmp_path, "teacher.augment=null", "teachers.0.augment=null")
    assert runner.build_train_views(plain, bundle) == (None, None)


def test_runner_view_errors(teacher_ckpts, tmp_path):
    cfg = _cfg(teacher_ckpts, tmp_path)
    bundle = runner.build_data(cfg)
    kd = _cfg(teacher_ckpts, tmp_path, "distiller.name=kd", "distiller.kwargs={}", "teachers=[]")
    with pytest.raises(runner.ConfigError, match=r"teacher\.augment.*only used by distiller 'ensemble_kd'"):
        runner.build_train_views(kd, bundle)
    with pytest.raises(runner.ConfigError, match="teacher_views"):
        runner.build_train_views(_cfg(teacher_ckpts, tmp_path, "distiller.kwargs.teacher_views=[a,b]"), bundle)
    with pytest.raises(runner.ConfigError, match="only used by distiller"):
        runner.distill(kd)
    assert not any(tmp_path.rglob("*.pt"))


def test_runner_distills_on_multiview_batches(teacher_ckpts, tmp_path):
    class Probe:
        def __init__(self) -> None:
            self.kinds: list[str] = []

        def on_epoch_end(self, trainer, epoch):
            d = trainer.model
            self.kinds.append(type(d).__name__)
            return {"probe/teacher_views": float(len(set(d.teacher_views)))}

    cfg = _cfg(teacher_ckpts, tmp_path, "teachers.0.augment=null")
    probe = Probe()
    result = runner.distill(cfg, callbacks=[probe])
    assert result["epochs_completed"] == 1 and probe.kinds == ["EnsembleKD"]
    rows = [json.loads(line) for line in (tmp_path / "ens" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["probe/teacher_views"] == 2.0  # teacher0 and the student's view
    assert "train/kd" in rows[0] and (tmp_path / "ens" / "config.yaml").is_file()
