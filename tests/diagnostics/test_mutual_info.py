"""ckakd.diagnostics.mutual_info: mutual information of top-1 predictions (plug-in and Miller-Madow),
the confusion accumulator and prediction MI over a loader."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ckakd import diagnostics as D
from tests.diagnostics.helpers import (
    TinyCNN,
    all_logits,
    assert_same_dict,
    data,
    entropy,
    loader,
    tiny_models,
)


def test_mutual_information_plugin_entropy_relabeling_and_sklearn():
    from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 6, (300,), generator=g)
    r = D.mutual_information(y, y)
    assert r["mi"] == pytest.approx(entropy(y), rel=1e-12)  # MI(y, y) = H(y)
    assert r["nmi_sqrt"] == pytest.approx(1.0, rel=1e-12)

    a = torch.randint(0, 5, (300,), generator=g)
    b = torch.where(torch.rand(300, generator=g) < 0.6, a, torch.randint(0, 5, (300,), generator=g))
    r = D.mutual_information(a, b)
    assert r["mi"] == pytest.approx(mutual_info_score(a.numpy(), b.numpy()), rel=1e-10)
    assert r["nmi_sqrt"] == pytest.approx(
        normalized_mutual_info_score(a.numpy(), b.numpy(), average_method="geometric"), rel=1e-10
    )
    perm_a, perm_b = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1, 4, 2, 0, 3])
    for aa, bb in [(perm_a[a], b), (a, perm_b[b]), (perm_a[a], perm_b[b]), (b, a)]:
        rr = D.mutual_information(aa, bb)
        for key in ("mi", "mi_miller_madow", "nmi_sqrt"):
            assert rr[key] == pytest.approx(r[key], rel=1e-12), key
    # (N, K) logits are reduced to their argmax; None turns the correction off
    logits_a = F.one_hot(a, 5).double() * 3 + 0.1 * torch.randn(300, 5, generator=g, dtype=torch.float64)
    assert D.mutual_information(logits_a, b)["mi"] == pytest.approx(r["mi"], rel=1e-12)
    assert "mi_miller_madow" not in D.mutual_information(a, b, correction=None)


def test_mutual_information_miller_madow_hand_computation():
    a = torch.tensor([0, 0, 1, 1, 2])
    b = torch.tensor([0, 0, 1, 1, 1])  # b is a function of a: MI = H(b)
    h_b = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    h_a = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    r = D.mutual_information(a, b)
    assert r["mi"] == pytest.approx(h_b, rel=1e-12)
    assert r["h_a"] == pytest.approx(h_a, rel=1e-12) and r["h_ab"] == pytest.approx(h_a, rel=1e-12)
    # K_a = 3 non-empty rows, K_b = 2 columns, K_ab = 3 cells, N = 5: + (3 + 2 - 3 - 1) / (2 * 5)
    assert r["mi_miller_madow"] == pytest.approx(h_b + 0.1, rel=1e-12)
    assert r["nmi_sqrt"] == pytest.approx(h_b / math.sqrt(h_a * h_b), rel=1e-12)
    # independent-looking joint: the correction is negative (MI's plug-in bias is upward)
    a2, b2 = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    r2 = D.mutual_information(a2, b2)
    assert r2["mi"] == pytest.approx(0.0, abs=1e-15)
    assert r2["mi_miller_madow"] == pytest.approx((2 + 2 - 4 - 1) / 8, rel=1e-12)
    # constant predictions: no information
    r3 = D.mutual_information(torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert r3["mi"] == 0.0 and r3["nmi_sqrt"] == 0.0
    assert D.mutual_information(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))["nmi_sqrt"] == 1.0


def test_confusion_accumulator_and_prediction_mi_over_loader():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 4, (90,), generator=g), torch.randint(0, 4, (90,), generator=g)
    acc = D.ConfusionAccumulator(4)
    for ca, cb in zip(a.split(11), b.split(11), strict=True):
        acc.update(ca, cb)
    assert torch.equal(acc.matrix, D.confusion_matrix(a, b, 4))
    assert acc.n == 90 and int(acc.matrix[1, 2]) == int(((a == 1) & (b == 2)).sum())
    assert_same_dict(acc.compute(), D.mutual_information(a, b), 1e-14)

    models = tiny_models(2, dtype=torch.float64)
    ds = data(70, dtype=torch.float64)
    r7 = D.prediction_mi(models["T0"], models["S"], loader(ds, 7))
    r64 = D.prediction_mi(models["T0"], models["S"], loader(ds, 64))
    assert_same_dict(r7, r64)
    direct = D.mutual_information(all_logits(models["T0"], ds), all_logits(models["S"], ds))
    assert_same_dict(r7, direct)
    self_mi = D.prediction_mi(models["S"], models["S"], loader(ds, 16))
    assert self_mi["mi"] == pytest.approx(entropy(all_logits(models["S"], ds).argmax(1)), rel=1e-12)
    assert self_mi["mi"] > 0.5


def test_prediction_mi_bad_inputs():
    ds = data(20)
    torch.manual_seed(0)
    five, ten = TinyCNN(num_classes=5), TinyCNN(num_classes=10)
    with pytest.raises(ValueError, match="class-count mismatch"):
        D.prediction_mi(ten, five, loader(ds, 8))
    empty = loader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="no samples"):
        D.prediction_mi(five, five, empty)
