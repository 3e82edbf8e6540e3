"""ckakd.diagnostics.callback: diagnose() and the trainer's DiagnosticsCallback."""

from __future__ import annotations

import copy
import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from ckakd import diagnostics as D
from ckakd.train.distillers import Distiller
from ckakd.train.engine import Trainer, TrainSettings
from tests.diagnostics.helpers import (
    TinyBN,
    TinyCNN,
    assert_same_dict,
    buffers,
    data,
    loader,
    tiny_models,
    zoo,
)


def _distiller(n_teachers: int = 2):
    torch.manual_seed(7)
    teachers = [TinyBN() for _ in range(n_teachers)]
    student = TinyBN()
    return Distiller(student, teachers), student, teachers


CALLBACK_KEYS = {
    "diag/agree/T0-S", "diag/kl(T0||S)", "diag/agree/T1-S", "diag/kl(T1||S)", "diag/agree/T0-T1", "diag/kl(T0||T1)",
    "diag/agree/ens-S", "diag/kl(ens||S)", "diag/acc/T0", "diag/acc/T1", "diag/acc/S", "diag/acc/ens",
    "diag/mi/T0-S", "diag/mi_mm/T0-S", "diag/nmi/T0-S", "diag/mi/T1-S", "diag/mi_mm/T1-S", "diag/nmi/T1-S",
    "diag/mi/T0-T1", "diag/mi_mm/T0-T1", "diag/nmi/T0-T1", "diag/mi/ens-S", "diag/mi_mm/ens-S", "diag/nmi/ens-S",
    "diag/iou/T0-T1", "diag/iou/T0-S", "diag/iou/T1-S", "diag/iou/T0-T1-S",
    "diag/ece/T0", "diag/ece/T1", "diag/ece/S",
}  # fmt: skip


def test_callback_keys_modes_and_batchnorm_statistics():
    model, student, teachers = _distiller(2)
    for t in teachers:
        t.train()  # even teachers left in train mode must not update their BatchNorm statistics
    model.student.train()
    t_before = [buffers(t) for t in teachers]
    s_before = buffers(student)
    ds = data(30)
    cb = D.DiagnosticsCallback({"T0": teachers[0], "T1": teachers[1]}, loader(ds, 8))
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"))
    out = cb.on_epoch_end(trainer, 0)
    assert set(out) == CALLBACK_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert student.training and all(m.training for m in student.modules())
    for t, before in zip(teachers, t_before, strict=True):
        assert t.training  # modes restored
        for k, v in t.named_buffers():
            assert torch.equal(v, before[k]), k
    for k, v in student.named_buffers():
        assert torch.equal(v, s_before[k]), k
    assert all(p.grad is None for p in student.parameters())
    # the values are those of the standalone functions on the same models
    fid = D.fidelity({"T0": teachers[0], "T1": teachers[1], "S": student}, loader(ds, 8))
    for k, v in fid.items():
        if k != "n":
            assert out[f"diag/{k}"] == pytest.approx(v, abs=1e-12), k
    mi = D.prediction_mi(teachers[0], student, loader(ds, 8))
    assert out["diag/mi/T0-S"] == pytest.approx(mi["mi"], abs=1e-12)
    assert out["diag/nmi/T0-S"] == pytest.approx(mi["nmi_sqrt"], abs=1e-12)
    assert out["diag/mi_mm/T0-S"] == pytest.approx(mi["mi_miller_madow"], abs=1e-12)
    iou = D.attention_iou_over_loader({"T0": teachers[0], "T1": teachers[1], "S": student}, loader(ds, 8))
    assert out["diag/iou/T0-T1-S"] == pytest.approx(iou["iou/T0-T1-S"], abs=1e-12)
    ece_s = D.expected_calibration_error_over_loader(student, loader(ds, 8))
    assert out["diag/ece/S"] == pytest.approx(ece_s, abs=1e-12)

    # every=2: epochs 0, 2 are skipped (0-based), epoch 1 runs; teachers=None takes the Distiller's
    cb2 = D.DiagnosticsCallback(None, loader(ds, 8), every=2, iou=False, mi=False, method="gradcam")
    assert cb2.on_epoch_end(trainer, 0) == {}
    r = cb2.on_epoch_end(trainer, 1)
    assert r["diag/agree/T0-S"] == out["diag/agree/T0-S"] and "diag/iou/T0-S" not in r and "diag/mi/T0-S" not in r
    # a plain classifier (no .student, no teachers): only the student's own metrics
    plain = SimpleNamespace(model=student, device=torch.device("cpu"))
    r = D.DiagnosticsCallback({}, loader(ds, 8), max_batches=2).on_epoch_end(plain, 0)
    assert set(r) == {"diag/acc/S", "diag/ece/S"}
    # Grad-CAM IoU through the callback
    r = D.DiagnosticsCallback([teachers[0]], loader(ds, 8), method="gradcam", fidelity=False).on_epoch_end(trainer, 0)
    assert set(r) == {"diag/mi/T0-S", "diag/mi_mm/T0-S", "diag/nmi/T0-S", "diag/iou/T0-S", "diag/ece/T0", "diag/ece/S"}
    assert student.training


def test_diagnose_batch_size_invariance():
    models = tiny_models(3, dtype=torch.float64)
    teachers = {"T0": models["T0"], "T1": models["T1"]}
    ds = data(45, dtype=torch.float64)
    r7 = D.diagnose(teachers, models["S"], loader(ds, 7))
    r64 = D.diagnose(teachers, models["S"], loader(ds, 64))
    assert_same_dict(r7, r64)
    assert r7["mi/T0-S"] > 0 and 0 < r7["iou/T0-S"] < 1


@pytest.mark.skipif(
    "callbacks" not in inspect.signature(Trainer).parameters, reason="this Trainer has no callbacks= argument yet"
)
def test_callback_in_trainer(tmp_path):
    model, student, teachers = _distiller(2)
    ds = data(32)
    cb = D.DiagnosticsCallback({"T0": teachers[0], "T1": teachers[1]}, loader(ds, 16), max_batches=1)
    settings = TrainSettings.create(epochs=1, out_dir=tmp_path, device="cpu", progress=False, lr=0.01)
    trainer = Trainer(model, loader(ds, 16), loader(ds, 16), settings, callbacks=[cb])
    trainer.fit()
    row = trainer.history[-1]
    assert CALLBACK_KEYS <= set(row)
    assert 0.0 <= row["diag/agree/T0-S"] <= 1.0 and 0.0 <= row["diag/iou/T0-T1-S"] <= 1.0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "diag/iou/T0-S" in header and "diag/nmi/T0-S" in header
    assert student.training


def test_diagnose_and_callback_bad_inputs():
    ds = data(20)
    torch.manual_seed(0)
    five, ten = TinyCNN(num_classes=5), TinyCNN(num_classes=10)
    with pytest.raises(ValueError, match="class-count mismatch"):
        D.diagnose({"T0": ten}, five, loader(ds, 8))
    with pytest.raises(ValueError, match="'layer9'"):
        D.DiagnosticsCallback({"T0": zoo(0)}, loader(ds, 8), cam_layer_teacher="layer9")
    empty = loader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="no samples"):
        D.diagnose({"T0": five}, copy.deepcopy(five), empty)
    with pytest.raises(ValueError, match="every"):
        D.DiagnosticsCallback({}, loader(ds, 8), every=0)
