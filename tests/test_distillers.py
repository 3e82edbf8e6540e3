"""Distillers (ckakd.train.distillers): frozen eval-mode teachers, named finite losses, KD-loss oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ckakd.train.distillers import (
    DIST,
    DKD,
    KD,
    RCKA,
    CEOnly,
    Distiller,
    EnsembleKD,
    WKDLogit,
    dist_loss,
    dkd_loss,
    kd_loss,
    standardize_logits,
)

C = 5


def _net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, C),
    )


def _batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, C, (n,), generator=g)


def _cost() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    a = torch.rand(C, C, generator=g)
    cost = (a + a.T) / 2
    cost.fill_diagonal_(0.0)
    return cost


def _make(name: str) -> Distiller:
    s, t = _net(4, 1), _net(8, 2)
    if name == "ce":
        return CEOnly(s, t)
    if name == "kd":
        return KD(s, t)
    if name == "kd_std":
        return KD(s, t, T=2.0, kd_weight=9.0, ce_weight=1.0, standardize=True)
    if name == "dkd":
        return DKD(s, t)
    if name == "dist":
        return DIST(s, t)
    if name == "rcka":
        return RCKA(s, t, ["2", "4"], ["2", "4"], alpha=1.0, beta=1.0)
    if name == "wkd":
        return WKDLogit(s, t, _cost(), T=2.0, gamma=1.0)
    if name == "ens_loss":
        return EnsembleKD(s, [t, _net(6, 3)], reduce="mean_loss")
    if name == "ens_target":
        return EnsembleKD(s, [t, _net(6, 3)], reduce="mean_target", standardize=True)
    raise KeyError(name)


NAMES = ["ce", "kd", "kd_std", "dkd", "dist", "rcka", "wkd", "ens_loss", "ens_target"]


@pytest.mark.parametrize("name", NAMES)
def test_step_finite_teacher_frozen(name):
    d = _make(name)
    d.train()
    assert d.student.training
    for t in d.teachers:
        assert not t.training
        assert all(not p.requires_grad for p in t.parameters())
    bn_before = [
        (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        for t in d.teachers
        for m in t.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    t_params_before = [p.clone() for t in d.teachers for p in t.parameters()]
    opt = torch.optim.SGD(list(d.learnable_parameters()), lr=0.1, momentum=0.9)
    x, y = _batch()
    logits, losses = d.forward_train(x, y)
    assert logits.shape == (8, C)
    assert losses and all(isinstance(k, str) for k in losses)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    opt.zero_grad()
    sum(losses.values()).backward()
    assert all(p.grad is None for t in d.teachers for p in t.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    opt.step()
    bn_after = [
        (m.running_mean, m.running_var, int(m.num_batches_tracked))
        for t in d.teachers
        for m in t.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    for (m0, v0, n0), (m1, v1, n1) in zip(bn_before, bn_after, strict=True):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and n0 == n1
    for p0, p1 in zip(t_params_before, [p for t in d.teachers for p in t.parameters()], strict=True):
        assert torch.equal(p0, p1)
    _, losses2 = d.forward_train(x, y)
    assert all(torch.isfinite(v) for v in losses2.values())
    assert torch.equal(d(x), d.student(x))
    assert d.num_extra_parameters() == 0 and d.extra_parameters() == []
    d.eval()
    assert not d.student.training and all(not t.training for t in d.teachers)
    d.train()
    assert all(not t.training for t in d.teachers)


def test_loss_names():
    x, y = _batch()
    assert set(_make("kd").forward_train(x, y)[1]) == {"ce", "kd"}
    assert set(_make("rcka").forward_train(x, y)[1]) == {"ce", "fcka", "lcka"}
    assert set(_make("ce").forward_train(x, y)[1]) == {"ce"}


def test_rcka_matches_functional():
    import ckakd

    d = _make("rcka")
    x, y = _batch()
    logits, losses = d.forward_train(x, y)
    with torch.no_grad():
        s, t = d.student, d.teacher
        fs, ft = [s[:3](x), s[:5](x)], [t[:3](x), t[:5](x)]
        ref = ckakd.rcka_loss(fs, ft, s(x), t(x), alpha=1.0, beta=1.0)
    torch.testing.assert_close((losses["fcka"] + losses["lcka"]).detach(), ref, atol=1e-5, rtol=1e-5)
    d.remove_hooks()


def test_extra_parameters_reported():
    d = _make("kd")
    d.extra["proj"] = nn.Linear(3, 4)
    assert d.num_extra_parameters() == 16
    assert len(list(d.learnable_parameters())) == len(list(d.student.parameters())) + 2


def test_kd_self_zero_and_positive():
    z = torch.randn(6, 7)
    assert kd_loss(z, z, 4.0).abs().item() < 1e-6
    assert kd_loss(z, z.clone(), 2.0, standardize=True).abs().item() < 1e-6
    assert kd_loss(torch.randn(6, 7), z, 4.0).item() > 0


def test_kd_matches_definition():
    torch.manual_seed(0)
    zs, zt, T = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), 3.0
    pt, ps = F.softmax(zt / T, 1), F.softmax(zs / T, 1)
    ref = (pt * (pt.log() - ps.log())).sum(1).mean() * T**2
    torch.testing.assert_close(kd_loss(zs, zt, T), ref)


def test_standardize_rows():
    z = torch.randn(5, 9, dtype=torch.float64) * 7 + 3
    s = standardize_logits(z)
    torch.testing.assert_close(s.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(s.std(1), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)


def test_standardized_kd_affine_invariant():
    torch.manual_seed(1)
    zs, zt = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    base = kd_loss(zs, zt, 2.0, standardize=True)
    for a, b in [(3.0, -2.0), (0.5, 10.0)]:
        torch.testing.assert_close(kd_loss(a * zs + b, zt, 2.0, standardize=True), base, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(kd_loss(zs, a * zt + b, 2.0, standardize=True), base, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(kd_loss(3.0 * zs, zt, 2.0), kd_loss(zs, zt, 2.0))


@pytest.mark.parametrize("reduce", ["mean_loss", "mean_target"])
@pytest.mark.parametrize("standardize", [False, True])
def test_single_teacher_ensemble_equals_kd(reduce, standardize):
    s, t = _net(4, 1), _net(8, 2)
    x, y = _batch()
    kd = KD(s, t, T=3.0, standardize=standardize)
    ens = EnsembleKD(s, [t], T=3.0, reduce=reduce, standardize=standardize)
    _, a = kd.forward_train(x, y)
    _, b = ens.forward_train(x, y)
    torch.testing.assert_close(a["kd"], b["kd"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a["ce"], b["ce"])


def test_ensemble_mean_loss_is_mean_of_kd():
    s, t1, t2 = _net(4, 1), _net(8, 2), _net(6, 3)
    x, y = _batch()
    _, e = EnsembleKD(s, [t1, t2], T=4.0, kd_weight=1.0).forward_train(x, y)
    with torch.no_grad():
        zs = s(x)
        ref = (kd_loss(zs, t1(x), 4.0) + kd_loss(zs, t2(x), 4.0)) / 2
    torch.testing.assert_close(e["kd"].detach(), ref)


def _dkd_by_hand(zs, zt, y, alpha, beta, T):
    """Scalar-loop DKD (Zhao et al. 2022) in plain Python floats."""
    B, K = len(zs), len(zs[0])
    tckd = nckd = 0.0
    for b in range(B):

        def sm(z, drop=None):
            e = [math.exp(v / T) if i != drop else 0.0 for i, v in enumerate(z)]
            s = sum(e)
            return [v / s for v in e]

        ps, pt = sm(zs[b]), sm(zt[b])
        g = y[b]
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd += sum(q * math.log(q / p) for q, p in zip(bt, bs, strict=True))
        ps2, pt2 = sm(zs[b], g), sm(zt[b], g)
        nckd += sum(pt2[i] * math.log(pt2[i] / ps2[i]) for i in range(K) if i != g)
    return (alpha * tckd + beta * nckd) / B * T**2


def test_dkd_hand_computed():
    zs = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5], [-2.0, 0.0, 0.5, 0.7]]
    zt = [[2.0, 0.5, -1.0, 0.0], [1.0, 1.0, 0.0, -0.5], [0.3, -0.3, 1.2, 2.2]]
    y = [0, 3, 2]
    got = dkd_loss(
        torch.tensor(zs, dtype=torch.float64),
        torch.tensor(zt, dtype=torch.float64),
        torch.tensor(y),
        alpha=1.5,
        beta=8.0,
        T=2.0,
    )
    assert got.item() == pytest.approx(_dkd_by_hand(zs, zt, y, 1.5, 8.0, 2.0), rel=1e-10)
    # fp32 agrees, identical logits give 0
    got32 = dkd_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(y), alpha=1.5, beta=8.0, T=2.0)
    assert got32.item() == pytest.approx(got.item(), rel=1e-5)
    assert dkd_loss(torch.tensor(zs), torch.tensor(zs), torch.tensor(y)).abs().item() < 1e-6


def test_dkd_mdistiller_form():
    """Matches mdistiller's implementation (log of binary probs, -1000 masking) on random inputs."""
    torch.manual_seed(2)
    zs, zt = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (6,))
    T, alpha, beta = 4.0, 1.0, 8.0
    gt = F.one_hot(y, 7).double()
    other = 1 - gt
    ps, pt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="sum") * T**2 / 6
    nckd = F.kl_div(F.log_softmax(zs / T - 1000 * gt, 1), F.softmax(zt / T - 1000 * gt, 1), reduction="sum") * T**2 / 6
    torch.testing.assert_close(dkd_loss(zs, zt, y, alpha, beta, T), alpha * tckd + beta * nckd)


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((u - ma) * (v - mb) for u, v in zip(a, b, strict=True))
    den = math.sqrt(sum((u - ma) ** 2 for u in a)) * math.sqrt(sum((v - mb) ** 2 for v in b))
    return num / (den + 1e-8)  # DIST's eps, as in the authors' code


def test_dist_hand_computed():
    zs = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    zt = [[2.0, 0.5, 0.0], [0.0, 1.0, 1.5]]
    T, beta, gamma = 2.0, 1.5, 0.5

    def sm(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    ps, pt = [sm(r) for r in zs], [sm(r) for r in zt]
    inter = 1 - sum(_pearson(ps[b], pt[b]) for b in range(2)) / 2
    intra = 1 - sum(_pearson([ps[b][c] for b in range(2)], [pt[b][c] for b in range(2)]) for c in range(3)) / 3
    ref = T**2 * (beta * inter + gamma * intra)
    got = dist_loss(torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64), beta, gamma, T)
    assert got.item() == pytest.approx(ref, rel=1e-7)
    z = torch.randn(4, 6)
    assert dist_loss(z, z).abs().item() < 1e-5


def test_input_checks():
    s, t = _net(4, 1), _net(8, 2)
    with pytest.raises(ValueError):
        EnsembleKD(s, [t], reduce="median")
    with pytest.raises(ValueError):
        EnsembleKD(s, [])
    with pytest.raises(ValueError):
        RCKA(s, t, ["2"], ["2", "4"])
    with pytest.raises(ValueError):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError):
        Distiller(s, s)
