"""DetectionDistiller, train_detector (loss decrease, resume, errors) and the detect-demo on tiny settings."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from ckakd.detection.data import SyntheticDigitsDetection, make_detection_loader  # noqa: E402
from ckakd.detection.models import FCOS, RetinaNet  # noqa: E402
from ckakd.detection.trainer import DetectionDistiller, train_detector  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs gain nothing from intra-op threads, and oversubscribed cores make them crawl."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(width: int = 8, out_channels: int = 32, levels=(3, 4, 5, 6, 7), seed: int = 0) -> RetinaNet:
    torch.manual_seed(seed)
    return RetinaNet(10, depth=18, width=width, out_channels=out_channels, num_convs=1, levels=levels)


def tiny_data(n: int = 8, split: str = "train") -> SyntheticDigitsDetection:
    return SyntheticDigitsDetection(n, image_size=64, max_objects=2, scales=(16, 32), split=split)


def one_batch(n: int = 4):
    return next(iter(make_detection_loader(tiny_data(n), n, False, 0)))


@pytest.mark.parametrize("method", ["pcka", "pcka_mimic", "kd_patch", "at_patch", "dist_patch", "mmd_patch", "wkd_f"])
def test_distiller_step_grads_and_frozen_teacher(method):
    teacher = tiny_model(width=16, out_channels=48, seed=1)
    teacher.train()  # the distiller must put it in eval mode and keep it there
    student = tiny_model()
    d = DetectionDistiller(student, teacher, method=method)
    d.train()
    assert not teacher.training and student.training
    assert d.extra is not None  # channels differ: projector
    bn_before = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k or "num_batches" in k}
    images, targets, sizes = one_batch()
    losses = d.forward_train(images, targets, sizes)
    assert "distill" in losses and {"cls", "box"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    assert d.extra.proj[0].weight.grad is not None and d.extra.proj[0].weight.grad.abs().sum() > 0
    for k, v in teacher.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k


def test_distiller_same_channels_and_none():
    teacher, student = tiny_model(seed=1), tiny_model()
    assert DetectionDistiller(student, teacher, method="pcka").extra is None
    d = DetectionDistiller(student, teacher, method="pcka_mimic")
    assert d.extra is not None and d.weight == 10.0
    images, targets, sizes = one_batch(2)
    losses = d.forward_train(images, targets, sizes)
    assert {"distill", "mimic"} <= set(losses)
    plain = DetectionDistiller(student, teacher, method="none").forward_train(images, targets, sizes)
    assert set(plain) == {"cls", "box"}


def test_level_count_mismatch():
    with pytest.raises(ValueError, match="same number of FPN levels"):
        DetectionDistiller(tiny_model(), tiny_model(levels=(3, 4, 5, 6)), method="pcka")
    with pytest.raises(ValueError, match="method"):
        DetectionDistiller(tiny_model(), tiny_model(), method="nope")


def test_training_loss_decreases(tmp_path):
    data = tiny_data(4)
    loader = make_detection_loader(data, 4, True, 0)
    result = train_detector(tiny_model(), loader, None, epochs=4, lr=0.01, out_dir=tmp_path, progress=False)
    losses = [row["train/loss"] for row in result["history"]]
    assert losses[-1] < losses[0]
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "latest.pt").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_continues_from_checkpoint(tmp_path):
    data, val = tiny_data(4), tiny_data(2, "val")
    teacher = tiny_model(width=16, out_channels=48, seed=1)

    def run(epochs: int, resume: bool) -> tuple[dict, DetectionDistiller]:
        d = DetectionDistiller(tiny_model(), teacher, method="pcka_mimic")
        loader = make_detection_loader(data, 4, True, 0)
        r = train_detector(d, loader, val, epochs=epochs, lr=0.01, out_dir=tmp_path, progress=False, resume=resume)
        return r, d

    r1, d1 = run(1, False)
    assert r1["epochs_run"] == 1 and set(r1["final"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    from ckakd.train.engine import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "latest.pt")
    assert ckpt["epoch"] == 1
    # resuming with epochs=1 trains nothing and restores the weights exactly
    r_same, d_same = run(1, True)
    assert r_same["epochs_run"] == 1
    for (k, a), b in zip(d1.student.state_dict().items(), d_same.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(d1.extra.state_dict().values(), d_same.extra.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    r2, _ = run(2, True)
    assert [row["epoch"] for row in r2["history"]] == [1, 2]
    assert load_checkpoint(tmp_path / "latest.pt")["epoch"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_non_finite_loss_raises(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(float("nan"))
    loader = make_detection_loader(tiny_data(4), 4, False, 0)
    with pytest.raises(RuntimeError, match="non-finite"):
        train_detector(model, loader, None, epochs=1, lr=0.01, out_dir=tmp_path, progress=False)


def tiny_fcos(width: int = 8, out_channels: int = 32, seed: int = 0) -> FCOS:
    torch.manual_seed(seed)
    return FCOS(10, depth=18, width=width, out_channels=out_channels, num_convs=1)


def test_fcos_training_loss_decreases(tmp_path):
    loader = make_detection_loader(tiny_data(4), 4, True, 0)
    result = train_detector(tiny_fcos(), loader, None, epochs=4, lr=0.01, out_dir=tmp_path, progress=False)
    history = result["history"]
    assert {"train/cls", "train/box", "train/centerness"} <= set(history[0])
    losses = [row["train/loss"] for row in history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_fcos_resume_and_single_image_eval_batch(tmp_path):
    # 3 val images in batches of 2: the last batch is one 64-px image, whose 1x1 P7 GroupNorm used to refuse
    data, val = tiny_data(4), tiny_data(3, "val")

    def run(epochs: int, resume: bool) -> tuple[dict, FCOS]:
        model = tiny_fcos()
        loader = make_detection_loader(data, 4, True, 0)
        r = train_detector(
            model,
            loader,
            val,
            epochs=epochs,
            lr=0.01,
            out_dir=tmp_path,
            progress=False,
            resume=resume,
            eval_batch_size=2,
        )
        return r, model

    r1, m1 = run(1, False)
    assert set(r1["final"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    r_same, m_same = run(1, True)  # nothing left to train: the checkpoint's weights, exactly
    assert r_same["epochs_run"] == 1
    for (k, a), b in zip(m1.state_dict().items(), m_same.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    r2, _ = run(2, True)
    assert [row["epoch"] for row in r2["history"]] == [1, 2]


def test_fcos_pcka_distiller_trains(tmp_path):
    teacher = tiny_fcos(width=16, seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = DetectionDistiller(tiny_fcos(), teacher, method="pcka")
    assert d.extra is None  # same FPN channels: PCKA on the raw student levels
    images, targets, sizes = one_batch()
    losses = d.forward_train(images, targets, sizes)
    assert {"cls", "box", "centerness", "distill"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    loader = make_detection_loader(tiny_data(4), 4, True, 0)
    result = train_detector(d, loader, tiny_data(2, "val"), epochs=3, lr=0.01, out_dir=tmp_path, progress=False)
    history = result["history"]
    assert all(torch.isfinite(torch.tensor(row["train/distill"])) for row in history)
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert set(result["final"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for k, v in teacher.state_dict().items():  # frozen, BN statistics included
        assert torch.equal(v, before[k]), k
