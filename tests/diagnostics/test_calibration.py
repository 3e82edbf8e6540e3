"""ckakd.diagnostics.calibration: Affinity, train-val gap and expected calibration error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ckakd import diagnostics as D
from ckakd.train.data import RandomCropFlip
from tests.diagnostics.helpers import (
    TinyCNN,
    all_logits,
    data,
    loader,
    tiny_models,
)


def test_affinity_identity_is_one_and_augmentations():
    torch.manual_seed(5)
    model = TinyCNN().eval()
    ds = data(60)
    labels = all_logits(model, ds).argmax(1)  # label the data with the model's predictions: clean accuracy 1
    ds = TensorDataset(ds.tensors[0], labels)
    assert D.affinity(model, loader(ds, 7), lambda im: im) == 1.0
    assert D.affinity(model, loader(ds, 7), lambda im, generator=None: im.clone()) == 1.0
    # a deterministic augmentation: the ratio of two accuracies computed by hand
    flip = lambda im: im.flip(-1)  # noqa: E731
    acc_flip = all_logits(model, TensorDataset(ds.tensors[0].flip(-1), labels)).argmax(1).eq(labels).double().mean()
    assert D.affinity(model, loader(ds, 64), flip) == pytest.approx(acc_flip.item(), abs=1e-15)
    assert acc_flip < 1.0
    # a seeded random augmentation from ckakd.train.data: reproducible, independent of the batch size
    crop = RandomCropFlip(8, padding=2)
    a1 = D.affinity(model, loader(ds, 7), crop, seed=3)
    assert a1 == D.affinity(model, loader(ds, 7), crop, seed=3)
    assert a1 == D.affinity(model, loader(ds, 64), crop, seed=3)
    assert 0.0 < a1 < 1.0
    wrong = TensorDataset(ds.tensors[0], (labels + 1) % 5)
    with pytest.raises(ValueError, match="clean accuracy"):
        D.affinity(model, loader(wrong, 8), lambda im: im)


def test_train_val_gap():
    torch.manual_seed(6)
    model = TinyCNN().eval()
    tr, va = data(40, seed=1), data(30, seed=2)
    pred_tr = all_logits(model, tr).argmax(1)
    tr = TensorDataset(tr.tensors[0], torch.where(torch.arange(40) < 30, pred_tr, (pred_tr + 1) % 5))  # acc 0.75
    r = D.train_val_gap(model, loader(tr, 8), loader(va, 8))
    acc_va = all_logits(model, va).argmax(1).eq(va.tensors[1]).double().mean().item()
    assert r["train_acc"] == pytest.approx(0.75, abs=1e-15)
    assert r["val_acc"] == pytest.approx(acc_va, abs=1e-15)
    assert r["gap"] == pytest.approx(0.75 - acc_va, abs=1e-15)


def _logits_with_confidence(conf: list[float], k: int, pred: list[int]) -> torch.Tensor:
    rows = []
    for c, p in zip(conf, pred, strict=True):
        probs = torch.full((k,), (1 - c) / (k - 1), dtype=torch.float64)
        probs[p] = c
        rows.append(probs.log())
    return torch.stack(rows)


def test_expected_calibration_error_hand_and_calibrated():
    # hand case (3 classes, 10 bins): conf 0.95 right, 0.95 wrong -> bin 9 (acc 0.5); 0.55 right -> bin 5;
    # 0.45 wrong -> bin 4. ECE = 2/5·|0.5 − 0.95| + 1/5·|1 − 0.55| + 1/5·|0 − 0.45| + 1/5·|1 − 0.72|
    logits = _logits_with_confidence([0.95, 0.95, 0.55, 0.45, 0.72], 3, [0, 1, 2, 0, 1])
    labels = torch.tensor([0, 0, 2, 1, 1])
    expected = 2 / 5 * 0.45 + 1 / 5 * 0.45 + 1 / 5 * 0.45 + 1 / 5 * 0.28
    assert D.expected_calibration_error(logits, labels) == pytest.approx(expected, rel=1e-12)
    # with one bin: |mean conf − accuracy|
    mean_conf = (0.95 + 0.95 + 0.55 + 0.45 + 0.72) / 5
    assert D.expected_calibration_error(logits, labels, n_bins=1) == pytest.approx(abs(mean_conf - 3 / 5), rel=1e-12)

    # exactly calibrated: in every bin the fraction correct equals the confidence
    conf, pred, lab = [], [], []
    for c in (0.55, 0.65, 0.75, 0.85, 0.95):
        for i in range(20):
            conf.append(c)
            pred.append(i % 2)
            lab.append(i % 2 if i < round(c * 20) else 1 - i % 2)
    ece = D.expected_calibration_error(_logits_with_confidence(conf, 2, pred), torch.tensor(lab))
    assert ece == pytest.approx(0.0, abs=1e-12)

    # sampled from a calibrated model: labels drawn from the predicted distribution
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(F.softmax(z, 1), 1, generator=g).squeeze(1)
    assert D.expected_calibration_error(z, y) < 0.02
    assert D.expected_calibration_error(z * 4, y) > 0.1  # over-confident logits

    acc = D.ECEAccumulator(10)
    for cz, cy in zip(z.split(999), y.split(999), strict=True):
        acc.update(cz, cy)
    assert acc.n == 20000 and acc.compute() == pytest.approx(D.expected_calibration_error(z, y), rel=1e-10)


def test_ece_over_loader_batch_size_invariance():
    models = tiny_models(2, dtype=torch.float64)
    ds = data(50, dtype=torch.float64)
    e7 = D.expected_calibration_error_over_loader(models["S"], loader(ds, 7))
    e64 = D.expected_calibration_error_over_loader(models["S"], loader(ds, 64))
    assert e7 == pytest.approx(e64, abs=1e-12)
    assert e7 == pytest.approx(D.expected_calibration_error(all_logits(models["S"], ds), ds.tensors[1]), abs=1e-12)


def test_affinity_and_ece_bad_inputs():
    torch.manual_seed(0)
    five = TinyCNN(num_classes=5)
    empty = loader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="no samples"):
        D.affinity(five, empty, lambda im: im)
    with pytest.raises(ValueError, match="no samples"):
        D.expected_calibration_error_over_loader(five, empty)
