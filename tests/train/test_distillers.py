"""Distillers (ckakd.train.distillers): frozen eval-mode teachers, named finite losses, KD-loss oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ckakd
from ckakd.train import create_model
from ckakd.train.distillers import (
    AT,
    DIST,
    DISTILLERS,
    DKD,
    FCKA,
    KD,
    LCKA,
    LSKD,
    MMD,
    RCKA,
    CEOnly,
    Distiller,
    EnsembleKD,
    FitNet,
    PatchCKA,
    WKDFeature,
    WKDLogit,
    WKDLogitFeature,
    at_loss,
    build_distiller,
    cosine_decay_weight,
    dist_loss,
    dkd_loss,
    kd_loss,
    standardize_logits,
)

C = 5


pytestmark = pytest.mark.usefixtures("one_thread")


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
        return KD(s, t, temperature=2.0, kd_weight=9.0, ce_weight=1.0, standardize=True)
    if name == "dkd":
        return DKD(s, t)
    if name == "dist":
        return DIST(s, t)
    if name == "rcka":
        return RCKA(s, t, ["2", "4"], ["2", "4"], alpha=1.0, beta=1.0)
    if name == "wkd":
        return WKDLogit(s, t, _cost(), temperature=2.0, gamma=1.0)
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
    kd = KD(s, t, temperature=3.0, standardize=standardize)
    ens = EnsembleKD(s, [t], temperature=3.0, reduce=reduce, standardize=standardize)
    _, a = kd.forward_train(x, y)
    _, b = ens.forward_train(x, y)
    torch.testing.assert_close(a["kd"], b["kd"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a["ce"], b["ce"])


def test_ensemble_mean_loss_is_mean_of_kd():
    s, t1, t2 = _net(4, 1), _net(8, 2), _net(6, 3)
    x, y = _batch()
    _, e = EnsembleKD(s, [t1, t2], temperature=4.0, kd_weight=1.0).forward_train(x, y)
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
        temperature=2.0,
    )
    assert got.item() == pytest.approx(_dkd_by_hand(zs, zt, y, 1.5, 8.0, 2.0), rel=1e-10)
    # fp32 agrees, identical logits give 0
    got32 = dkd_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(y), alpha=1.5, beta=8.0, temperature=2.0)
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


# ----------------------------------------------------------------------------------------------------------------
# Feature distillers, schedules, class-count checks and the registry (tiny zoo ResNets on 8x8 / 16x16 inputs)
# ----------------------------------------------------------------------------------------------------------------

K = 10  # classes of the zoo models below
IN8 = (3, 8, 8)


def _zoo(name: str = "resnet8", num_classes: int = K, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes)


def _pair(teacher: str = "resnet8x4") -> tuple[nn.Module, nn.Module]:
    """resnet8 student (stage channels 16/32/64) and a teacher (resnet8x4: 64/128/256; resnet14: 16/32/64)."""
    return _zoo("resnet8", seed=1), _zoo(teacher, seed=2).eval()


def _xy(n: int = 8, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, K, (n,), generator=g)


def _stages(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """CIFAR ResNet stage outputs [layer1, layer2, layer3] and logits, computed without hooks."""
    h = model.relu(model.bn1(model.conv1(x)))
    f1 = model.layer1(h)
    f2 = model.layer2(f1)
    f3 = model.layer3(f2)
    return [f1, f2, f3], model.classifier(torch.flatten(model.avgpool(f3), 1))


def _cost_k(c: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    a = torch.rand(c, c, generator=g)
    cost = (a + a.T) / 2
    cost.fill_diagonal_(0.0)
    return cost


NEW = {
    "lskd": ({"ce", "kd"}, lambda s, t: LSKD(s, t)),
    "fitnet": ({"ce", "fitnet"}, lambda s, t: FitNet(s, t, input_shape=IN8)),
    "at": ({"ce", "at"}, lambda s, t: AT(s, t)),
    "fcka": ({"ce", "fcka"}, lambda s, t: FCKA(s, t, ["layer2", "layer3"], ["layer2", "layer3"])),
    "lcka": ({"ce", "lcka"}, lambda s, t: LCKA(s, t)),
    "rcka": ({"ce", "fcka", "lcka"}, lambda s, t: RCKA(s, t, global_batch=True)),
    "patch_cka": (
        {"ce", "patch_cka"},
        lambda s, t: PatchCKA(s, t, ["layer2", "layer3"], ["layer2", "layer3"], input_shape=IN8),
    ),
    "mmd": ({"ce", "mmd"}, lambda s, t: MMD(s, t)),
    "wkd_f": ({"ce", "wkd_f"}, lambda s, t: WKDFeature(s, t, input_shape=IN8)),
    "wkd_lf": (
        {"ce", "wkd_l", "wkd_f"},
        lambda s, t: WKDLogitFeature(s, t, _cost_k(), temperature=4.0, input_shape=IN8),
    ),
}
WITH_PROJECTOR = {"fitnet", "patch_cka", "wkd_f", "wkd_lf"}


@pytest.mark.parametrize("name", sorted(NEW))
def test_new_distillers_step(name):
    keys, make = NEW[name]
    s, t = _pair()
    d = make(s, t)
    d.train()
    assert all(not m.training for m in t.modules())
    t_bn = [(m.running_mean.clone(), m.running_var.clone()) for m in t.modules() if isinstance(m, nn.BatchNorm2d)]
    x, y = _xy()
    logits, losses = d.forward_train(x, y)
    assert logits.shape == (8, K) and set(losses) == keys
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    distill = sum(v for k, v in losses.items() if k != "ce")
    assert distill.item() > 0
    distill.backward()  # distillation terms alone must reach the student (and the projector)
    assert all(p.grad is None for p in t.parameters())
    assert sum(p.grad.abs().sum() for p in s.parameters() if p.grad is not None) > 0
    extra = [p for m in d.extra_parameters() for p in m.parameters()]
    assert (len(extra) > 0) == (name in WITH_PROJECTOR)
    for p in extra:
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    learnable = list(d.learnable_parameters())
    assert len(learnable) == len(list(s.parameters())) + len(extra)
    assert {id(p) for p in extra} <= {id(p) for p in learnable}
    assert d.num_extra_parameters() == sum(p.numel() for p in extra)
    t_bn_after = [(m.running_mean, m.running_var) for m in t.modules() if isinstance(m, nn.BatchNorm2d)]
    for (m0, v0), (m1, v1) in zip(t_bn, t_bn_after, strict=True):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)


def _eval_run(d: Distiller, x, y) -> dict[str, torch.Tensor]:
    d.eval()  # BatchNorm on running statistics: the by-hand forward sees the same features
    with torch.no_grad():
        return d.forward_train(x, y)[1]


def test_fcka_lcka_mmd_match_functional():
    s, t = _pair()
    x, y = _xy()
    with torch.no_grad():
        (f_s, z_s), (f_t, z_t) = _stages(s.eval(), x), _stages(t, x)
    fcka = _eval_run(FCKA(s, t, ["layer2", "layer3"], ["layer2", "layer3"], alpha=2.0, mode="debiased"), x, y)
    ref = sum(1 - ckakd.cka(a.flatten(1), b.flatten(1), mode="debiased") for a, b in zip(f_s[1:], f_t[1:], strict=True))
    torch.testing.assert_close(fcka["fcka"], 2.0 * ref, atol=1e-5, rtol=1e-5)
    lcka = _eval_run(LCKA(s, t, beta=3.0), x, y)
    ref = (1 - ckakd.cka(z_s, z_t)) + (1 - ckakd.cka(z_s.T, z_t.T))
    torch.testing.assert_close(lcka["lcka"], 3.0 * ref, atol=1e-5, rtol=1e-5)
    mmd = _eval_run(MMD(s, t, weight=7.0), x, y)
    torch.testing.assert_close(mmd["mmd"], 7.0 * ckakd.mmd_loss(f_s[2], f_t[2]), atol=1e-6, rtol=1e-5)
    rcka = _eval_run(RCKA(s, t, alpha=2.0, beta=3.0), x, y)
    parts = ckakd.rcka_loss(f_s[2], f_t[2], z_s, z_t, return_parts=True)
    torch.testing.assert_close(rcka["fcka"], 2.0 * parts["fcka"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rcka["lcka"], lcka["lcka"], atol=1e-5, rtol=1e-5)


def test_global_batch_is_identity_on_one_process():
    s, t = _pair()
    x, y = _xy()
    for cls in (FCKA, LCKA, MMD, RCKA):
        a = _eval_run(cls(s, t, global_batch=False), x, y)
        b = _eval_run(cls(s, t, global_batch=True), x, y)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_at_matches_formula_with_pooling():
    s, t = _pair()
    x, y = _xy()
    d = AT(s, t, ["layer1", "layer3"], ["layer2", "layer3"], at_weight=10.0, p=2.0)
    got = _eval_run(d, x, y)["at"]
    with torch.no_grad():
        (f_s, _), (f_t, _) = _stages(s, x), _stages(t, x)

    def at(f):
        a = f.pow(2).mean(1).reshape(f.shape[0], -1)
        return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # layer1 (8x8) is average-pooled 2x2 to layer2's 4x4
    ref = (at(F.avg_pool2d(f_s[0], 2)) - at(f_t[1])).pow(2).mean() + (at(f_s[2]) - at(f_t[2])).pow(2).mean()
    torch.testing.assert_close(got, 10.0 * ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(at_loss(f_s[2], f_t[2]), (at(f_s[2]) - at(f_t[2])).pow(2).mean())
    with pytest.raises(ValueError, match="p must be"):
        AT(s, t, p=0.0)


def test_fitnet_and_wkd_f_match_functional():
    s, t = _pair()
    x, y = _xy(size=16)  # layer3 maps are 4x4: room for a 2x2 WKD-F grid
    in16 = (3, 16, 16)
    with torch.no_grad():
        (f_s, _), (f_t, z_t) = _stages(s.eval(), x), _stages(t, x)
        fit = FitNet(s, t, hint_weight=3.0, input_shape=in16)
        got = _eval_run(fit, x, y)["fitnet"]
        torch.testing.assert_close(got, 3.0 * F.mse_loss(fit.extra["proj"](f_s[2]), f_t[2]), atol=1e-6, rtol=1e-5)
        assert fit.extra["proj"][0].weight.shape == (256, 64, 1, 1)  # student 64 -> teacher 256 channels
        wf = WKDFeature(s, t, weight=0.5, mean_weight=3.0, grid=2, input_shape=in16)
        got = _eval_run(wf, x, y)["wkd_f"]
        ref = ckakd.wkd_feature_loss(wf.extra["proj"](f_s[2]), f_t[2], grid=2, mean_weight=3.0)
        torch.testing.assert_close(got, 0.5 * ref, atol=1e-6, rtol=1e-5)
        cost = _cost_k()
        lf = WKDLogitFeature(s, t, cost, temperature=4.0, gamma=2.0, feature_weight=0.25, input_shape=in16)
        got = _eval_run(lf, x, y)
        ref_f = ckakd.wkd_feature_loss(lf.extra["proj"](f_s[2]), f_t[2], mean_weight=4.0)
        ref_l = ckakd.wkd_logit_loss(s(x), z_t, cost, temperature=4.0, target=y, gamma=2.0)
        torch.testing.assert_close(got["wkd_f"], 0.25 * ref_f, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["wkd_l"], ref_l, atol=1e-6, rtol=1e-5)


def test_patch_cka_matches_functional():
    s, t = _pair("resnet14")  # same stage channels: no projector
    x, y = _xy(size=16)  # layer2 8x8, layer3 4x4
    d = PatchCKA(s, t, ["layer2", "layer3"], ["layer2", "layer3"], weight=4.0, patch_size=2)
    assert d.num_extra_parameters() == 0
    got = _eval_run(d, x, y)["patch_cka"]
    with torch.no_grad():
        (f_s, _), (f_t, _) = _stages(s, x), _stages(t, x)
    ref = ckakd.patch_cka_loss(f_s[1:], f_t[1:], patch_size=(2, 2), reduce="mix")
    torch.testing.assert_close(got, 4.0 * ref, atol=1e-5, rtol=1e-5)
    # the default (4, 4) patch is shrunk on the 4x4 layer3 map to (2, 2): 4 patches
    d = PatchCKA(s, t, ["layer3"], ["layer3"], reduce="channel")
    ref = ckakd.patch_cka_loss(f_s[2], f_t[2], patch_size=(2, 2), reduce="channel")
    torch.testing.assert_close(_eval_run(d, x, y)["patch_cka"], 10.0 * ref, atol=1e-5, rtol=1e-5)


def test_patch_cka_resize_rule_is_the_functional_one():
    """The trainer's PatchCKA fits patches with ckakd.functional.fit_patch_size (one rule for every caller) and
    resizes like patch_cka_loss: "ceil" by default in uncentered mode. A 4x4 map with an 8x8 patch would be
    upsampled to one patch; uncentered CKA needs 2, so the patch halves (larger side, height on ties) to 2x4.
    A rule counting patches with floor on the unresized map (the trainer's old one) gives another patch."""
    s, t = _pair("resnet14")
    x, y = _xy(size=16)  # layer3 4x4
    with torch.no_grad():
        (f_s, _), (f_t, _) = _stages(s.eval(), x), _stages(t.eval(), x)
    d = PatchCKA(s, t, ["layer3"], ["layer3"], reduce="channel", mode="uncentered", patch_size=8)
    assert d.resize == "ceil"
    patch = ckakd.functional.fit_patch_size((4, 4), 8, mode="uncentered", resize="ceil")
    assert patch == (2, 4)
    ref = ckakd.patch_cka_loss(f_s[2], f_t[2], patch_size=patch, reduce="channel", mode="uncentered", resize="ceil")
    torch.testing.assert_close(_eval_run(d, x, y)["patch_cka"], 10.0 * ref, atol=1e-5, rtol=1e-5)
    d = PatchCKA(s, t, ["layer3"], ["layer3"], reduce="channel", mode="uncentered", resize="nearest")
    ref = ckakd.patch_cka_loss(f_s[2], f_t[2], patch_size=(2, 4), reduce="channel", mode="uncentered")
    torch.testing.assert_close(_eval_run(d, x, y)["patch_cka"], 10.0 * ref, atol=1e-5, rtol=1e-5)
    assert PatchCKA(s, t, ["layer3"], ["layer3"]).resize == "nearest"
    with pytest.raises(ValueError, match="resize must be one of"):
        PatchCKA(s, t, resize="floor")
    m = ckakd.nn.PatchCKALoss(mode="uncentered")
    assert m.resize == "ceil" and "resize='ceil'" in repr(m)
    torch.testing.assert_close(
        ckakd.nn.PatchCKALoss(patch_size=8, mode="uncentered", reduce="channel")(f_s[2], f_t[2]),
        10.0 * ckakd.patch_cka_loss(f_s[2], f_t[2], patch_size=8, reduce="channel", mode="uncentered", resize="ceil"),
    )
    with pytest.raises(ValueError, match="resize"):
        ckakd.nn.PatchCKALoss(resize="floor")


def test_patch_cka_projector_needs_input_shape():
    s, t = _pair()  # stage channels differ
    x, y = _xy()
    d = PatchCKA(s, t)
    with pytest.raises(ValueError, match="input_shape"):
        d.forward_train(x, y)
    d = PatchCKA(s, t, input_shape=IN8)
    assert d.extra["proj0"][0].weight.shape == (256, 64, 1, 1)
    assert torch.isfinite(d.forward_train(x, y)[1]["patch_cka"])
    with pytest.raises(ValueError, match="reduce"):
        PatchCKA(s, t, reduce="pixel")
    with pytest.raises(ValueError, match="patch_size"):
        PatchCKA(s, t, patch_size=(0, 2))
    with pytest.raises(ValueError, match="patch_size"):
        PatchCKA(s, t, patch_size=4.0)


@pytest.mark.parametrize("cls", [FitNet, WKDFeature])
def test_projector_distillers_need_input_shape(cls):
    s, t = _pair()
    with pytest.raises(ValueError, match="input_shape"):
        cls(s, t)
    with pytest.raises(ValueError, match="input_shape"):
        WKDLogitFeature(s, t, _cost_k())
    # a failed construction leaves no feature hooks behind
    assert not s._forward_pre_hooks and not s.layer3._forward_hooks and not t.layer3._forward_hooks
    d = cls(s, t, input_shape=IN8)
    assert s._forward_pre_hooks and s.layer3._forward_hooks and t.layer3._forward_hooks
    d.remove_hooks()
    assert not s._forward_pre_hooks and not s.layer3._forward_hooks and not t.layer3._forward_hooks


def test_default_feature_paths():
    s, t = _pair()
    assert FCKA(s, t)._hooks_s.paths == ["layer3"] and FCKA(s, t)._hooks_t.paths == ["layer3"]
    assert AT(s, t)._hooks_s.paths == ["layer1", "layer2", "layer3"]
    assert MMD(s, t, "layer2")._hooks_t.paths == ["layer3"]  # explicit student path, default teacher path
    assert WKDFeature(s, t, input_shape=IN8)._hooks_s.paths == ["layer3"]
    plain = _net(4, 1)  # no stage_names
    with pytest.raises(ValueError, match="stage_names") as err:
        FCKA(plain, t)
    assert "feature_paths_s" in str(err.value) and "explicit" in str(err.value)
    with pytest.raises(ValueError, match="feature_path_t is required"):
        FitNet(s, plain)


def test_at_default_paths_need_equal_stage_counts():
    s = _zoo("resnet8")
    t = _zoo("vgg8")  # 5 stages vs 3
    with pytest.raises(ValueError, match="same number"):
        AT(s, t)
    assert AT(s, t, feature_paths_t=["block1", "block2", "block3"])._hooks_t.paths == ["block1", "block2", "block3"]


def test_bad_feature_paths():
    s, t = _pair()
    with pytest.raises(ValueError, match="feature_paths_s") as err:
        FCKA(s, t, ["layer9"], ["layer3"])
    msg = str(err.value)
    assert "'layer9'" in msg and "student" in msg and "layer1" in msg
    with pytest.raises(ValueError, match="teacher") as err:
        RCKA(s, t, ["layer3"], ["layer3.7"])
    assert "'layer3.7'" in str(err.value) and "feature_paths_t" in str(err.value)
    with pytest.raises(ValueError, match="feature_path_s must be one dotted module path"):
        FitNet(s, t, ["layer2", "layer3"], input_shape=IN8)
    with pytest.raises(ValueError, match="empty"):
        MMD(s, t, [], [])
    with pytest.raises(ValueError, match="same number"):
        FCKA(s, t, ["layer2", "layer3"], ["layer3"])


def test_class_count_mismatch():
    s, t_bad = _zoo("resnet8", num_classes=10), _zoo("resnet8", num_classes=5, seed=3)
    for make in (
        lambda: KD(s, t_bad, input_shape=IN8),
        lambda: FCKA(s, t_bad, input_shape=IN8),
        lambda: build_distiller("wkd_l", s, t_bad, cost=_cost_k(), input_shape=IN8),
    ):
        with pytest.raises(ValueError, match="class-count mismatch") as err:
            make()
        assert "5 classes" in str(err.value) and "predicts 10" in str(err.value)
    with pytest.raises(ValueError, match="teacher 1"):
        EnsembleKD(s, [_zoo("resnet8", seed=4), t_bad], input_shape=IN8)
    d = KD(s, _zoo("resnet14", seed=5), input_shape=IN8)
    assert d.num_classes == K and d.input_shape == IN8
    with pytest.raises(ValueError, match="input_shape must be"):
        KD(s, t_bad, input_shape=(8, 8))


def test_dry_forward_restores_student_modes():
    s, t = _pair()
    s.train()
    s.layer1.eval()  # a mixed state must survive too
    bn = [(m.running_mean.clone(), int(m.num_batches_tracked)) for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    before = {n: m.training for n, m in s.named_modules()}
    KD(s, t, input_shape=IN8)
    assert {n: m.training for n, m in s.named_modules()} == before
    after = [(m.running_mean, int(m.num_batches_tracked)) for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) and n0 == n1 for (a, n0), (b, n1) in zip(bn, after, strict=True))
    s.eval()
    KD(s, t, input_shape=IN8)
    assert not any(m.training for m in s.modules())


def test_wkd_logit_cosine_schedule():
    s, t = _pair()
    d = WKDLogit(s, t, _cost_k(), gamma=600.0, gamma_schedule="cosine", decay_start=150)
    assert d.current_gamma == 600.0  # no epoch given yet
    expected = {0: 600.0, 149: 600.0, 150: 300.0 * (1 + math.cos(math.pi / 90)), 194: 300.0, 239: 0.0}
    for epoch, value in expected.items():
        d.set_epoch(epoch, 240)
        assert d.current_gamma == pytest.approx(value, abs=1e-9), epoch
    # the public code's formula, with its 1-based epoch E = epoch + 1
    for epoch in range(240):
        e1 = epoch + 1
        ref = 600.0 if e1 <= 150 else 0.5 * 600.0 * (1 + math.cos((e1 - 150) / (240 - 150) * math.pi))
        assert cosine_decay_weight(600.0, epoch, 240, 150) == pytest.approx(ref, abs=1e-9)
    assert d.epoch == 239 and d.total_epochs == 240
    # the loss follows gamma (no target separation: the loss is gamma · WD)
    d = WKDLogit(
        s, t, _cost_k(), temperature=4.0, gamma=600.0, use_target=False, gamma_schedule="cosine", decay_start=150
    )
    x, y = _xy()
    d.set_epoch(0, 240)
    full = _eval_run(d, x, y)["wkd_l"]
    d.set_epoch(194, 240)
    torch.testing.assert_close(_eval_run(d, x, y)["wkd_l"], full / 2)
    d.set_epoch(239, 240)
    assert _eval_run(d, x, y)["wkd_l"].abs().item() < 1e-9 * full.item()
    const = WKDLogit(s, t, _cost_k(), gamma=600.0)
    const.set_epoch(239, 240)
    assert const.current_gamma == 600.0
    lf = WKDLogitFeature(
        s, t, _cost_k(), feature_weight=0.08, gamma_schedule="cosine", decay_start=150, input_shape=IN8
    )
    lf.set_epoch(194, 240)
    assert lf.current_gamma == pytest.approx(15.0) and lf.current_feature_weight == pytest.approx(0.04)
    with pytest.raises(ValueError, match="gamma_schedule"):
        WKDLogit(s, t, _cost_k(), gamma_schedule="linear")
    with pytest.raises(ValueError, match="decay_start"):
        WKDLogit(s, t, _cost_k(), decay_start=-1)


def test_wkd_cost_from_interrelation_file(tmp_path):
    s, t = _pair()
    g = torch.Generator().manual_seed(7)
    ir = ckakd.interrelation(torch.randn(K, 4, 6, generator=g))
    path = tmp_path / "ir.pt"
    ckakd.save_interrelation(path, ir, kernel="cka", teacher="resnet8x4")
    for p in (path, str(path)):
        d = WKDLogit(s, t, p, sharpen=2.0, input_shape=IN8)
        assert torch.equal(d.cost, ckakd.cost_from_interrelation(ir, sharpen=2.0))
    d = WKDLogitFeature(s, t, path, input_shape=IN8)
    assert torch.equal(d.cost, ckakd.cost_from_interrelation(ir))
    x, y = _xy()
    assert torch.isfinite(d.forward_train(x, y)[1]["wkd_l"])
    with pytest.raises(ValueError, match="sharpen"):
        WKDLogit(s, t, _cost_k(), sharpen=2.0)
    with pytest.raises(ValueError, match="square"):
        WKDLogit(s, t, torch.rand(K, K - 1))
    small = tmp_path / "ir7.pt"
    ckakd.save_interrelation(small, ckakd.interrelation(torch.randn(7, 4, 6, generator=g)))
    with pytest.raises(ValueError, match=r"cost is \(7, 7\).*C=10"):
        WKDLogit(s, t, small, input_shape=IN8)
    d = WKDLogit(s, t, small)  # no input_shape: checked at first use
    with pytest.raises(ValueError, match=r"cost is \(7, 7\).*C=10"):
        d.forward_train(x, y)


def test_dkd_warmup_via_set_epoch():
    s, t = _pair()
    x, y = _xy()
    d = DKD(s, t, warmup=4)
    full = _eval_run(d, x, y)["dkd"]  # no epoch information: no warmup
    with torch.no_grad():
        ref = dkd_loss(s(x), t(x), y, 1.0, 8.0, 4.0)
    torch.testing.assert_close(full, ref)
    for epoch, scale in [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (9, 1.0)]:
        d.set_epoch(epoch, 10)
        assert d.warmup_scale == scale
        torch.testing.assert_close(_eval_run(d, x, y)["dkd"], scale * ref)
    d.set_epoch(0, 10)
    d.eval()
    with torch.no_grad():
        legacy = d.forward_train(x, y, epoch=2)[1]["dkd"]  # mdistiller's 1-based epoch 2 == set_epoch(1)
    torch.testing.assert_close(legacy, 0.5 * ref)
    torch.testing.assert_close(_eval_run(d, x, y)["dkd"], 0.25 * ref)  # back to the set_epoch value
    d = DKD(s, t)
    d.set_epoch(0, 10)
    assert d.warmup_scale == 1.0
    for bad in [(10, 10), (-1, 10), (0, 0), (True, 3), (1.0, 3)]:
        with pytest.raises(ValueError, match="epoch"):
            d.set_epoch(*bad)


def test_lskd_preset():
    s, t = _pair()
    d = LSKD(s, t)
    assert (d.temperature, d.kd_weight, d.ce_weight, d.standardize) == (2.0, 9.0, 0.1, True)
    x, y = _xy()
    ref = _eval_run(KD(s, t, temperature=2.0, kd_weight=9.0, ce_weight=0.1, standardize=True), x, y)
    got = _eval_run(d, x, y)
    assert all(torch.equal(got[k], ref[k]) for k in ("ce", "kd"))


EXPECTED_NAMES = {
    "ce", "kd", "lskd", "dkd", "dist", "fitnet", "at", "fcka", "lcka", "rcka", "patch_cka", "mmd",
    "wkd_l", "wkd_f", "wkd_lf", "ensemble_kd",
}  # fmt: skip


def test_registry_builds_everything_with_input_shape():
    assert set(DISTILLERS) == EXPECTED_NAMES
    x, y = _xy()
    for name, cls in DISTILLERS.items():
        s, t = _pair("resnet14")
        teachers = [t, _zoo("resnet8", seed=6)] if name == "ensemble_kd" else t
        kwargs = {"cost": _cost_k()} if name in ("wkd_l", "wkd_lf") else {}
        d = build_distiller(name, s, teachers, input_shape=IN8, **kwargs)
        assert type(d) is cls and d.num_classes == K
        assert len(d.teachers) == (2 if name == "ensemble_kd" else 1)
        _, losses = d.forward_train(x, y)
        assert "ce" in losses and all(torch.isfinite(v) for v in losses.values()), name


def test_registry_errors():
    s, t = _pair()
    with pytest.raises(ValueError, match="unknown distiller 'crd'") as err:
        build_distiller("crd", s, t)
    assert "fcka" in str(err.value) and "ensemble_kd" in str(err.value)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['tau'\]") as err:
        build_distiller("kd", s, t, tau=4.0)
    assert "'temperature'" in str(err.value) and "'kd_weight'" in str(err.value)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_distiller("fcka", s, None)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_distiller("ensemble_kd", s, [])
    with pytest.raises(ValueError, match="ensemble_kd"):
        build_distiller("kd", s, [t, _zoo("resnet8", seed=6)])
    with pytest.raises(ValueError, match=r"requires the argument\(s\) \['cost'\]"):
        build_distiller("wkd_l", s, t)
    assert isinstance(build_distiller("ce", s, None), CEOnly)
    assert isinstance(build_distiller("kd", s, [t]), KD)  # a one-element list is one teacher
    d = build_distiller("ensemble_kd", s, nn.ModuleList([t, _zoo("resnet8", seed=6)]))
    assert len(d.teachers) == 2
    assert len(EnsembleKD(s, (m for m in [t])).teachers) == 1  # a generator is consumed once
    d = build_distiller("fcka", s, t, alpha=2.0, feature_paths_s=["layer2"], feature_paths_t="layer2")
    assert d.alpha == 2.0 and d._hooks_s.paths == ["layer2"]
    with pytest.raises(ValueError, match="mode must be"):
        build_distiller("lcka", s, t, mode="cosine")
