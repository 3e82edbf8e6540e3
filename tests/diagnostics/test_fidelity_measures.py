"""ckakd.diagnostics.fidelity_measures: agreement, KL(p_T || p_S), ensembles and fidelity over a
loader (Guo et al., "Why does Knowledge Distillation Work?"). Tiny models and random tensors only."""

from __future__ import annotations

import copy
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
    loader,
    tiny_models,
)


def test_agreement_and_kl_on_logits():
    z = torch.randn(40, 7)
    assert D.agreement(z, z).item() == 1.0
    assert D.agreement(z, z + 3.0).item() == 1.0  # softmax-invariant shift
    a = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]])
    b = torch.tensor([[5.0, 0, 0], [0, 0, 5], [0, 0, 5], [0, 5, 0]])
    assert D.agreement(a, b).item() == 0.5

    assert D.predictive_kl(z, z).item() == pytest.approx(0.0, abs=1e-12)
    w = torch.randn(40, 7) * 3
    per = D.predictive_kl(z, w, reduction="none")
    assert per.shape == (40,) and bool((per >= 0).all()) and bool((per > 0).all())
    p, q = F.softmax(z.double(), 1), F.softmax(w.double(), 1)
    expected = (p * (p.log() - q.log())).sum(1)  # KL(p || q): the first argument is the reference
    torch.testing.assert_close(per, expected, rtol=1e-10, atol=1e-12)
    assert D.predictive_kl(z, w).item() == pytest.approx(expected.mean().item(), rel=1e-10)
    assert D.predictive_kl(z, w, reduction="sum").item() == pytest.approx(expected.sum().item(), rel=1e-10)
    assert D.predictive_kl(w, z).item() != pytest.approx(D.predictive_kl(z, w).item(), rel=1e-3)  # asymmetric
    pt, qt = F.softmax(z.double() / 4, 1), F.softmax(w.double() / 4, 1)
    assert D.predictive_kl(z, w, temperature=4.0).item() == pytest.approx(
        (pt * (pt.log() - qt.log())).sum(1).mean().item(), rel=1e-10
    )
    # a class with zero teacher probability contributes 0 (0 log 0 = 0), not NaN
    zp = torch.tensor([[0.0, -float("inf"), 1.0]])
    assert math.isfinite(D.predictive_kl(zp, torch.zeros(1, 3)).item())
    with pytest.raises(ValueError, match="class-count mismatch"):
        D.agreement(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="class-count mismatch"):
        D.predictive_kl(torch.randn(4, 3), torch.randn(4, 5))


def test_ensemble_logits_reducers():
    zs = [torch.randn(9, 4) for _ in range(3)]
    pm = D.ensemble_logits(zs, "prob_mean")
    torch.testing.assert_close(F.softmax(pm, 1), torch.stack([F.softmax(z.double(), 1) for z in zs]).mean(0))
    torch.testing.assert_close(D.ensemble_logits(zs, "logit_mean"), torch.stack(zs).double().mean(0))
    with pytest.raises(ValueError, match="reducer"):
        D.ensemble_logits(zs, "median")


def test_fidelity_accumulator_is_batching_invariant():
    za, zb = torch.randn(50, 6), torch.randn(50, 6)
    one = D.FidelityAccumulator([("a", "b")])
    one.update({"a": za, "b": zb})
    many = D.FidelityAccumulator([("a", "b")])
    for ca, cb in zip(za.split(7), zb.split(7), strict=True):
        many.update({"a": ca, "b": cb})
    assert_same_dict(one.compute(), many.compute(), 1e-12)
    r = one.compute()
    assert r["agree/a-b"] == pytest.approx(D.agreement(za, zb).item(), abs=1e-15)
    assert r["kl(a||b)"] == pytest.approx(D.predictive_kl(za, zb).item(), rel=1e-12)
    assert r["n"] == 50


def test_fidelity_over_loader_matches_direct_computation_and_batch_size():
    models = tiny_models(3, dtype=torch.float64)
    ds = data(80, dtype=torch.float64)
    r7 = D.fidelity(models, loader(ds, 7))
    r64 = D.fidelity(models, loader(ds, 64))
    assert_same_dict(r7, r64)
    z = {n: all_logits(m, ds) for n, m in models.items()}
    ens = D.ensemble_logits([z["T0"], z["T1"]], "prob_mean")
    expected_keys = {
        "agree/T0-S", "kl(T0||S)", "agree/T1-S", "kl(T1||S)", "agree/T0-T1", "kl(T0||T1)", "agree/ens-S", "kl(ens||S)",
        "acc/T0", "acc/T1", "acc/S", "acc/ens", "n",
    }  # fmt: skip
    assert set(r7) == expected_keys
    for a, b in [("T0", "S"), ("T1", "S"), ("T0", "T1")]:
        assert r7[f"agree/{a}-{b}"] == pytest.approx(D.agreement(z[a], z[b]).item(), abs=1e-12)
        assert r7[f"kl({a}||{b})"] == pytest.approx(D.predictive_kl(z[a], z[b]).item(), rel=1e-9)
    assert r7["kl(ens||S)"] == pytest.approx(D.predictive_kl(ens, z["S"]).item(), rel=1e-9)
    assert r7["acc/S"] == pytest.approx(z["S"].argmax(1).eq(ds.tensors[1]).double().mean().item(), abs=1e-12)
    assert 0.0 < r7["agree/T0-S"] < 1.0  # non-trivial models
    assert r7["n"] == 80
    # logit-mean ensemble, no ensemble, explicit roles
    r = D.fidelity(models, loader(ds, 64), ensemble="logit_mean")
    ens_l = D.ensemble_logits([z["T0"], z["T1"]], "logit_mean")
    assert r["agree/ens-S"] == pytest.approx(D.agreement(ens_l, z["S"]).item(), abs=1e-12)
    assert "agree/ens-S" not in D.fidelity(models, loader(ds, 64), ensemble=None)
    r = D.fidelity(models, loader(ds, 64), teachers=["S"], students=["T0"])
    assert set(r) == {"agree/S-T0", "kl(S||T0)", "acc/S", "acc/T0", "n"}
    # a sequence of models: named M0.. (last one is the student); a model equal to its teacher: full fidelity
    t = models["T0"]
    r = D.fidelity([t, copy.deepcopy(t)], loader(ds, 64))
    assert r["agree/M0-M1"] == 1.0 and r["kl(M0||M1)"] == pytest.approx(0.0, abs=1e-12)


def test_fidelity_bad_inputs():
    ds = data(20)
    torch.manual_seed(0)
    five, ten = TinyCNN(num_classes=5), TinyCNN(num_classes=10)
    with pytest.raises(ValueError, match="class-count mismatch"):
        D.fidelity({"T": ten, "S": five}, loader(ds, 8))
    empty = loader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="no samples"):
        D.fidelity({"T": five, "S": copy.deepcopy(five)}, empty)
    with pytest.raises(ValueError, match="at least 2 models"):
        D.fidelity({"S": five}, loader(ds, 8))
    with pytest.raises(ValueError, match="reserved"):
        D.fidelity({"ens": five, "S": five}, loader(ds, 8))
