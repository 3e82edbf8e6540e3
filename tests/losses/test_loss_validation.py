"""Argument validation of the public losses and their nn modules: every wrong argument gives one clear error
that names it (no raw tracebacks from deep inside torch, no silent acceptance of bools, NaN or negative
weights, mismatched batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ckakd
from ckakd import nn as cnn

C = 10


@pytest.fixture
def cost() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = torch.rand(C, C, generator=g)
    c = (c + c.T) / 2
    return c.fill_diagonal_(0)


def _logits(b: int = 6, k: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, k, generator=g), torch.randn(b, k, generator=g)


def _feats(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 4, 2, 2, generator=g), torch.randn(b, 5, 2, 2, generator=g)


# ------------------------------------------------------------------------------------------------ rcka_loss


def test_rcka_refuses_features_and_logits_of_different_batch_sizes():
    fs, ft = _feats(8)
    zs, zt = _logits(6)
    with pytest.raises(ValueError, match=r"logits_s must have shape \(B, K\) with B=8"):
        ckakd.rcka_loss(fs, ft, zs, zt)


def test_rcka_refuses_feature_levels_of_different_batch_sizes():
    fs, ft = _feats(6)
    fs2, ft2 = _feats(4)
    zs, zt = _logits(6)
    with pytest.raises(ValueError, match=r"feats_s\[1\] must have the batch size B=6"):
        ckakd.rcka_loss([fs, fs2], [ft, ft2], zs, zt)


@pytest.mark.parametrize("which", ["logits_s", "logits_t"])
def test_rcka_names_a_transposed_logit_tensor(which):
    fs, ft = _feats(6)
    zs, zt = _logits(6)
    args = {"logits_s": zs, "logits_t": zt}
    args[which] = args[which].T.contiguous()
    with pytest.raises(
        ValueError,
        match=rf"{which} must have shape \(B, K\).*got \(10, 6\) = \(K, B\), did you pass the "
        "transpose",
    ):
        ckakd.rcka_loss(fs, ft, args["logits_s"], args["logits_t"])


def test_rcka_logit_errors_name_the_logit_arguments():
    fs, ft = _feats(6)
    zs, zt = _logits(6, k=1)  # one class: the inter-class term has one sample
    with pytest.raises(ValueError, match=r"logits_s has shape \(6, 1\).*classes"):
        ckakd.rcka_loss(fs, ft, zs, zt)
    zs, zt = _logits(6)
    with pytest.raises(ValueError, match=r"logits_t must have shape \(B, K\)"):
        ckakd.rcka_loss(fs, ft, zs, zt[0])
    with pytest.raises(TypeError, match="logits_s must have a floating-point dtype"):
        ckakd.rcka_loss(fs, ft, zs.long(), zt)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
        ({"beta": float("inf")}, ValueError, "beta must be a finite number"),
        ({"alpha": -1.0}, ValueError, "alpha must be >= 0"),
        ({"alpha": True}, TypeError, "alpha must be a real number, got bool"),
        ({"beta": "5"}, TypeError, "beta must be a real number, got str"),
        ({"mode": "centred"}, ValueError, "mode must be one of"),
        ({"return_parts": 1}, TypeError, "return_parts must be a bool"),
        ({"with_l2_norm": "yes"}, TypeError, "with_l2_norm must be a bool"),
        ({"soften": True}, ValueError, "soften=True needs a temperature"),
        ({"soften": True, "temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"soften": True, "temperature": float("nan")}, ValueError, "temperature must be a finite number"),
        ({"temperature": 4.0}, ValueError, "only used with soften=True"),
        ({"with_l2_norm": True, "mode": "debiased"}, ValueError, "not defined for mode='debiased'"),
    ],
)
def test_rcka_refuses_bad_options(kwargs, exc, match):
    fs, ft = _feats(6)
    zs, zt = _logits(6)
    with pytest.raises(exc, match=match):
        ckakd.rcka_loss(fs, ft, zs, zt, **kwargs)


def test_rcka_empty_batch_is_a_clear_error():
    fs, ft = _feats(0)
    zs, zt = _logits(0)
    with pytest.raises(ValueError, match="empty batch"):
        ckakd.rcka_loss(fs, ft, zs, zt)


# ---------------------------------------------------------------------------------- CKA-family arguments


def test_cka_loss_none_is_a_clear_type_error():
    with pytest.raises(TypeError, match="x must be a tensor or a sequence of tensors, got NoneType"):
        ckakd.cka_loss(None, None)
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="y must be a tensor or a sequence of tensors, got NoneType"):
        ckakd.cka_loss(x, None)


@pytest.mark.parametrize("patch_size", [True, 4.0, (True, 2), (2, 2.0), "4", (0, 2), (2,)])
def test_patch_size_must_be_positive_ints(patch_size):
    f = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="patch_size must be a positive int or a pair of positive ints"):
        ckakd.patch_cka_loss(f, f.clone(), patch_size=patch_size)
    with pytest.raises(ValueError, match="patch_size must be a positive int or a pair of positive ints"):
        cnn.PatchCKALoss(patch_size=patch_size)


# ------------------------------------------------------------------------------------------- sinkhorn / WKD-L


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"iters": True}, TypeError, "iters must be an integer, got bool"),
        ({"iters": 2.0}, TypeError, "iters must be an integer, got float"),
        ({"iters": 0}, ValueError, "iters must be an integer >= 1"),
        ({"eps": True}, TypeError, "eps must be a real number, got bool"),
        ({"eps": float("nan")}, ValueError, "eps must be a finite number"),
        ({"tol": True}, TypeError, "tol must be a real number, got bool"),
        ({"max_iter": True}, TypeError, "max_iter must be an integer, got bool"),
        ({"validate": "no"}, TypeError, "validate must be a bool"),
    ],
)
def test_sinkhorn_refuses_bad_options(cost, kwargs, exc, match):
    zs, zt = _logits(4)
    with pytest.raises(exc, match=match):
        ckakd.sinkhorn(zs.softmax(1), zt.softmax(1), cost, **kwargs)


def test_sinkhorn_empty_batch_gives_an_empty_result(cost):
    p = torch.empty(0, C, requires_grad=True)
    out = ckakd.sinkhorn(p, torch.empty(0, C), cost)
    assert out.shape == (0,)
    out.sum().backward()
    assert p.grad.shape == (0, C)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"gamma": float("nan")}, ValueError, "gamma must be a finite number"),
        ({"gamma": -1.0}, ValueError, "gamma must be >= 0"),
        ({"gamma": True}, TypeError, "gamma must be a real number, got bool"),
        ({"temperature": float("inf")}, ValueError, "temperature must be a finite number"),
        ({"temperature": 0}, ValueError, "temperature must be > 0"),
        ({"iters": True}, TypeError, "iters must be an integer, got bool"),
    ],
)
def test_wkd_logit_loss_refuses_bad_options(cost, kwargs, exc, match):
    zs, zt = _logits(4)
    with pytest.raises(exc, match=match):
        ckakd.wkd_logit_loss(zs, zt, cost, **kwargs)


@pytest.mark.parametrize(
    "target, match",
    [
        (torch.zeros(4, dtype=torch.bool), "got dtype torch.bool"),
        (torch.zeros(4, dtype=torch.complex64), "got dtype torch.complex64"),
        (torch.zeros(4), "got dtype torch.float32"),
        ([0, 1, 2, 3], "got list"),
    ],
)
def test_wkd_logit_loss_target_must_be_integer_labels(cost, target, match):
    zs, zt = _logits(4)
    with pytest.raises(TypeError, match=f"target must be an integer tensor of class labels.*{match}"):
        ckakd.wkd_logit_loss(zs, zt, cost, target=target)


def test_wkd_logit_loss_checks_both_logits_and_empty_batches(cost):
    zs, zt = _logits(4)
    with pytest.raises(ValueError, match=r"logits_t must have shape \(B, C\), got \(10,\)"):
        ckakd.wkd_logit_loss(zs, zt[0], cost)
    with pytest.raises(ValueError, match="empty batch"):
        ckakd.wkd_logit_loss(zs[:0], zt[:0], cost)


# ------------------------------------------------------------------------------------------------------ WKD-F


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"mean_weight": float("nan")}, ValueError, "mean_weight must be a finite number"),
        ({"mean_weight": -2.0}, ValueError, "mean_weight must be >= 0"),
        ({"eps": True}, TypeError, "eps must be a real number, got bool"),
        ({"eps": float("inf")}, ValueError, "eps must be a finite number"),
        ({"grid": True}, ValueError, "grid must be a positive int"),
        ({"grid": 2.0}, ValueError, "grid must be a positive int"),
        ({"cov": "ful"}, ValueError, "cov must be one of"),
    ],
)
def test_wkd_feature_loss_refuses_bad_options(kwargs, exc, match):
    f = torch.randn(2, 3, 4, 4)
    with pytest.raises(exc, match=match):
        ckakd.wkd_feature_loss(f, f.clone(), **kwargs)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_wkd_feature_loss_empty_batch_is_a_clear_error(cov):
    f = torch.randn(0, 3, 4, 4)
    with pytest.raises(ValueError, match="empty batch"):
        ckakd.wkd_feature_loss(f, f.clone(), cov=cov)


# ------------------------------------------------------------------------------------------------ nn modules


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda: cnn.CKALoss(weight="abc"), TypeError, "weight must be a real number, got str"),
        (lambda: cnn.CKALoss(weight=float("nan")), ValueError, "weight must be a finite number"),
        (lambda: cnn.CKALoss(mode="bad"), ValueError, "mode must be one of"),
        (lambda: cnn.CKALoss(backend="cuda"), ValueError, "backend must be one of"),
        (lambda: cnn.PatchCKALoss(weight=-1.0), ValueError, "weight must be >= 0"),
        (lambda: cnn.PatchCKALoss(reduce="pixels"), ValueError, "reduce must be one of"),
        (lambda: cnn.RCKALoss(alpha=float("nan")), ValueError, "alpha must be a finite number"),
        (lambda: cnn.RCKALoss(beta=True), TypeError, "beta must be a real number, got bool"),
        (lambda: cnn.RCKALoss(soften=True), ValueError, "soften=True needs a temperature"),
        (lambda: cnn.RCKALoss(with_l2_norm=1), TypeError, "with_l2_norm must be a bool"),
        (lambda: cnn.MMDLoss(weight="1"), TypeError, "weight must be a real number"),
        (lambda: cnn.WKDFeatureLoss(weight=float("inf")), ValueError, "weight must be a finite number"),
        (lambda: cnn.WKDFeatureLoss(grid=0), ValueError, "grid must be a positive int"),
        (lambda: cnn.WKDFeatureLoss(cov="FULL"), ValueError, "cov must be one of"),
        (lambda: cnn.WKDFeatureLoss(eps=-1.0), ValueError, "eps must be >= 0"),
    ],
)
def test_modules_validate_in_the_constructor(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"gamma": "abc"}, TypeError, "gamma must be a real number, got str"),
        ({"gamma": float("nan")}, ValueError, "gamma must be a finite number"),
        ({"temperature": -2.0}, ValueError, "temperature must be > 0"),
        ({"iters": True}, TypeError, "iters must be an integer, got bool"),
        ({"eps": 0.0}, ValueError, "eps must be > 0"),
        ({"backend": "triton"}, ValueError, "backend must be one of"),
    ],
)
def test_wkd_logit_module_validates_in_the_constructor(cost, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cnn.WKDLogitLoss(cost, **kwargs)


@pytest.mark.parametrize("convert", [lambda c: c.numpy(), lambda c: c.tolist(), lambda c: c.numpy().astype(np.float64)])
def test_wkd_logit_module_accepts_array_like_costs(cost, convert):
    zs, zt = _logits(4)
    module = cnn.WKDLogitLoss(convert(cost), temperature=4.0)
    assert isinstance(module.cost, torch.Tensor) and module.cost.shape == (C, C)
    expected = ckakd.wkd_logit_loss(zs, zt, cost, temperature=4.0)
    torch.testing.assert_close(module(zs, zt), expected.to(module(zs, zt).dtype), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.ones((3, 4)), ValueError, r"cost must be a square \(C, C\) matrix"),
        (-np.ones((3, 3)), ValueError, "cost must be finite and nonnegative"),
        (np.ones((3, 3), dtype=np.complex64), TypeError, "cost must be real"),
        ([["a", "b"], ["c", "d"]], TypeError, "cost must be a tensor or an array-like of numbers"),
        (None, TypeError, "cost must be a tensor or an array-like of numbers"),
    ],
)
def test_wkd_logit_module_refuses_bad_costs_clearly(bad, exc, match):
    with pytest.raises(exc, match=match):
        cnn.WKDLogitLoss(bad)


def test_module_options_are_stored_validated():
    m = cnn.PatchCKALoss(weight=3, patch_size=4)
    assert m.weight == 3.0 and isinstance(m.weight, float) and m.patch_size == (4, 4)
    r = cnn.RCKALoss(alpha=1, beta=2, mode="uncentered", with_l2_norm=True, soften=True, temperature=4)
    assert (r.alpha, r.beta, r.temperature) == (1.0, 2.0, 4.0)
    assert "with_l2_norm=True" in repr(r) and "temperature=4.0" in repr(r)


def test_tensor_weights_are_checked_and_keep_their_gradient():
    fs, ft = _feats(6)
    zs, zt = _logits(6)
    alpha = torch.tensor(2.0, requires_grad=True)
    ckakd.rcka_loss(fs, ft, zs, zt, alpha=alpha).backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        ckakd.rcka_loss(fs, ft, zs, zt, alpha=torch.tensor(float("nan")))
    with pytest.raises(TypeError, match="beta must be a real number"):
        ckakd.rcka_loss(fs, ft, zs, zt, beta=torch.tensor(True))


def test_logits_without_classes_are_a_clear_error():
    with pytest.raises(ValueError, match="have no classes"):
        ckakd.wkd_logit_loss(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(0, 0))
