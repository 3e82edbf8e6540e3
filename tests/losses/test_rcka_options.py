"""RCKA's ``with_l2_norm`` and ``soften`` options against an independent naive transcription of the authors'
classification code (Zhou et al., IJCAI 2024: ``CenterKernelAlignment`` / ``CenterKernelAlignmentRKD``), and
the CIFAR-100 configs that use them."""

from __future__ import annotations

import math

import pytest
import torch

import ckakd
from ckakd import nn as cnn
from ckakd.train.config import load_config
from ckakd.train.distillers import build_distiller
from ckakd.train.models import create_model


def _naive_alignment(x: list[list[float]], y: list[list[float]], with_l2_norm: bool) -> float:
    """The authors' CKA, loop by loop in Python floats: K = X Xᵀ (no centering); with_l2_norm divides row i
    of K by sqrt(K_ii); value tr(K Lᵀ) / sqrt(tr(K Kᵀ) tr(L Lᵀ))."""
    n = len(x)

    def gram(f):
        k = [[sum(a * b for a, b in zip(f[i], f[j], strict=True)) for j in range(n)] for i in range(n)]
        if with_l2_norm:
            k = [[k[i][j] / math.sqrt(k[i][i]) for j in range(n)] for i in range(n)]
        return k

    k, l = gram(x), gram(y)
    kl = sum(k[i][j] * l[i][j] for i in range(n) for j in range(n))
    kk = sum(k[i][j] ** 2 for i in range(n) for j in range(n))
    ll = sum(l[i][j] ** 2 for i in range(n) for j in range(n))
    return kl / math.sqrt(kk * ll)


def _rows(t: torch.Tensor) -> list[list[float]]:
    return t.double().tolist()


def _softmax_rows(t: torch.Tensor, temperature: float) -> list[list[float]]:
    out = []
    for row in _rows(t):
        e = [math.exp(v / temperature - max(row) / temperature) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def _center_columns(rows: list[list[float]]) -> list[list[float]]:
    n = len(rows)
    means = [sum(r[j] for r in rows) / n for j in range(len(rows[0]))]
    return [[v - m for v, m in zip(r, means, strict=True)] for r in rows]


def _logits(b: int = 7, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g, dtype=torch.float64) * 3, torch.randn(b, k, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("soften", [False, True])
@pytest.mark.parametrize("with_l2_norm", [False, True])
def test_uncentered_logit_terms_match_the_authors_formula(with_l2_norm, soften):
    zs, zt = _logits()
    kwargs = {"soften": soften, "temperature": 4.0} if soften else {}
    parts = ckakd.rcka_loss(
        zs, zt, zs, zt, alpha=0.0, beta=1.0, mode="uncentered", with_l2_norm=with_l2_norm, return_parts=True, **kwargs
    )
    # the authors soften only the term over the batch (samples as rows); the transposed term keeps raw logits
    intra_s, intra_t = (_softmax_rows(zs, 4.0), _softmax_rows(zt, 4.0)) if soften else (_rows(zs), _rows(zt))
    intra = _naive_alignment(intra_t, intra_s, with_l2_norm)
    inter = _naive_alignment(_rows(zt.T), _rows(zs.T), with_l2_norm)
    assert parts["intra_lcka"].item() == pytest.approx(1.0 - intra, abs=1e-12)
    assert parts["inter_lcka"].item() == pytest.approx(1.0 - inter, abs=1e-12)
    # the loss is the authors' -(intra + inter) shifted by the constant 2 (their weights set to beta)
    assert parts["loss"].item() == pytest.approx(2.0 - (intra + inter), abs=1e-12)


def test_centered_l2_norm_is_the_authors_formula_on_centered_logits():
    zs, zt = _logits(seed=3)
    parts = ckakd.rcka_loss(zs, zt, zs, zt, alpha=0.0, mode="centered", with_l2_norm=True, return_parts=True)
    intra = _naive_alignment(_center_columns(_rows(zs)), _center_columns(_rows(zt)), True)
    inter = _naive_alignment(_center_columns(_rows(zs.T)), _center_columns(_rows(zt.T)), True)
    assert parts["intra_lcka"].item() == pytest.approx(1.0 - intra, abs=1e-12)
    assert parts["inter_lcka"].item() == pytest.approx(1.0 - inter, abs=1e-12)


def test_l2_norm_changes_the_value_and_leaves_the_feature_term_alone():
    zs, zt = _logits(seed=4)
    g = torch.Generator().manual_seed(5)
    fs, ft = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    plain = ckakd.rcka_loss(fs, ft, zs, zt, mode="uncentered", return_parts=True)
    normed = ckakd.rcka_loss(fs, ft, zs, zt, mode="uncentered", with_l2_norm=True, return_parts=True)
    assert normed["fcka"].item() == plain["fcka"].item()
    assert abs(normed["intra_lcka"].item() - plain["intra_lcka"].item()) > 1e-3


def test_l2_norm_gradient_is_exact_and_zero_rows_stay_finite():
    zs, zt = _logits(b=5, k=4, seed=6)
    zs.requires_grad_(True)

    def f(a):
        return ckakd.rcka_loss(a, zt, a, zt, alpha=0.5, mode="uncentered", with_l2_norm=True)

    assert torch.autograd.gradcheck(f, (zs,))
    # a zero logit row has K_ii = 0: the authors' code divides by 0 (NaN); here that row is zero
    z0 = zs.detach().clone()
    z0[0] = 0
    z0.requires_grad_(True)
    loss = ckakd.rcka_loss(z0, zt, z0, zt, mode="uncentered", with_l2_norm=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z0.grad).all()


def test_soften_uses_the_temperature():
    zs, zt = _logits(seed=7)
    a = ckakd.rcka_loss(zs, zt, zs, zt, soften=True, temperature=1.0, return_parts=True)
    b = ckakd.rcka_loss(zs, zt, zs, zt, soften=True, temperature=8.0, return_parts=True)
    assert abs(a["intra_lcka"].item() - b["intra_lcka"].item()) > 1e-4
    assert a["inter_lcka"].item() == b["inter_lcka"].item()  # the inter-class term is not softened


def test_module_forwards_the_options():
    zs, zt = _logits(seed=8)
    m = cnn.RCKALoss(alpha=1.0, beta=2.0, mode="uncentered", with_l2_norm=True, soften=True, temperature=4.0)
    expected = ckakd.rcka_loss(
        zs, zt, zs, zt, alpha=1.0, beta=2.0, mode="uncentered", with_l2_norm=True, soften=True, temperature=4.0
    )
    assert m(zs, zt, zs, zt).item() == expected.item()


@pytest.mark.parametrize("name", ["cifar100/rcka", "cifar100/lcka"])
def test_cifar100_configs_use_the_authors_logit_options(name):
    cfg = load_config(name)
    kwargs = dict(cfg.distiller.kwargs)
    assert kwargs["with_l2_norm"] is True and kwargs["soften"] is False and kwargs["mode"] == "uncentered"
    student = create_model("resnet8", num_classes=10)
    teacher = create_model("resnet8", num_classes=10).eval()
    distiller = build_distiller(cfg.distiller.name, student, teacher, input_shape=(3, 8, 8), **kwargs)
    assert distiller.logit_options == {"with_l2_norm": True, "soften": False, "temperature": None}
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    losses = distiller.losses(x, y, student(x))
    assert all(torch.isfinite(v) for v in losses.values())


def test_distillers_validate_the_options():
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)
    with pytest.raises(ValueError, match="soften=True needs a temperature"):
        build_distiller("rcka", student, teacher, soften=True)
    with pytest.raises(TypeError, match="with_l2_norm must be a bool"):
        build_distiller("lcka", student, teacher, with_l2_norm="true")
