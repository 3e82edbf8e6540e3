"""ckakd.functional.lcka_loss: the logit terms of rcka_loss, bit for bit, and the LCKA distiller built on it."""

from __future__ import annotations

import itertools

import pytest
import torch

import ckakd
import ckakd.functional as Fn
from ckakd.functional import lcka_loss

OPTIONS = [
    {"mode": "centered"},
    {"mode": "debiased"},
    {"mode": "uncentered"},
    {"mode": "centered", "with_l2_norm": True},
    {"mode": "uncentered", "with_l2_norm": True},
    {"mode": "centered", "soften": True, "temperature": 4.0},
    {"mode": "uncentered", "with_l2_norm": True, "soften": True, "temperature": 2.0},
]


def _logits(dtype: torch.dtype, b: int = 12, k: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = (3.0 * torch.randn(b, k, generator=g)).to(dtype).requires_grad_(True)
    zt = (3.0 * torch.randn(b, k, generator=g)).to(dtype)
    return zs, zt


@pytest.mark.parametrize(("options", "dtype"), list(itertools.product(OPTIONS, [torch.float32, torch.float64])))
def test_lcka_loss_is_the_rcka_logit_terms_bit_for_bit(options, dtype):
    zs, zt = _logits(dtype)
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(12, 5, generator=g, dtype=dtype), torch.randn(12, 9, generator=g, dtype=dtype)
    ref = ckakd.rcka_loss(fs, ft, zs, zt, alpha=0.0, beta=1.0, return_parts=True, **options)
    parts = lcka_loss(zs, zt, return_parts=True, **options)
    assert set(parts) == {"loss", "intra_lcka", "inter_lcka"}
    assert torch.equal(parts["intra_lcka"], ref["intra_lcka"]) and torch.equal(parts["inter_lcka"], ref["inter_lcka"])
    assert parts["loss"].dtype == dtype
    (grad,) = torch.autograd.grad(parts["loss"], zs)
    (grad_ref,) = torch.autograd.grad(ref["intra_lcka"] + ref["inter_lcka"], zs)
    assert torch.equal(grad, grad_ref)


def test_lcka_loss_weight_and_parts():
    zs, zt = _logits(torch.float32)
    parts = lcka_loss(zs, zt, return_parts=True)
    assert torch.equal(lcka_loss(zs, zt), parts["intra_lcka"] + parts["inter_lcka"])
    assert torch.equal(lcka_loss(zs, zt, beta=5.0), 5.0 * (parts["intra_lcka"] + parts["inter_lcka"]))
    assert torch.equal(lcka_loss(zs.detach(), zs.detach()), torch.zeros(()))  # identical logits: CKA 1
    assert "lcka_loss" in Fn.__all__


def test_lcka_loss_validates_like_rcka_loss():
    zs, zt = _logits(torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        lcka_loss(zs, zt[:, :5])
    with pytest.raises(ValueError, match="needs a temperature"):
        lcka_loss(zs, zt, soften=True)
    with pytest.raises(ValueError, match="not defined for mode='debiased'"):
        lcka_loss(zs, zt, mode="debiased", with_l2_norm=True)
    with pytest.raises(ValueError, match="beta"):
        lcka_loss(zs, zt, beta=-1.0)
    with pytest.raises(ValueError, match="classes"):
        lcka_loss(zs[:, :1], zt[:, :1])


def test_the_lcka_distiller_uses_the_logit_terms():
    from ckakd.train import create_model
    from ckakd.train.distillers import LCKA

    torch.manual_seed(1)
    s = create_model("resnet8", num_classes=10)
    torch.manual_seed(2)
    t = create_model("resnet8x4", num_classes=10).eval()
    d = LCKA(s, t, beta=3.0, mode="uncentered", with_l2_norm=True, soften=True, temperature=4.0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    logits, losses = d.forward_train(x, y)
    with torch.no_grad():
        z_t = t(x)
    ref = ckakd.rcka_loss(
        logits, z_t, logits, z_t, alpha=0.0, mode="uncentered", with_l2_norm=True, soften=True, temperature=4.0,
        return_parts=True,
    )  # fmt: skip
    assert torch.equal(losses["lcka"], 3.0 * (ref["intra_lcka"] + ref["inter_lcka"]))
