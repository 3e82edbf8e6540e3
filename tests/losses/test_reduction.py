"""``reduction="mean"|"sum"|"none"`` of the per-sample losses (KD, LSKD, DKD, DIST, AT, FitNets, WKD-L, WKD-F):
"none" against the float64 per-sample references, the mean of "none" is "mean", "sum" is B × mean, "mean" keeps
the values the losses had before the option existed, and the temperature's old spelling ``T=`` still works."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import ckakd
import ckakd.functional as CF
from ckakd import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-12, "rtol": 1e-10}}


def _logits(seed: int, dtype: torch.dtype, b: int = 6, k: int = 7):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(b, k, generator=g, dtype=torch.float64) * 3).to(dtype)
    zt = (torch.randn(b, k, generator=g, dtype=torch.float64) * 3).to(dtype)
    return zs, zt, torch.randint(0, k, (b,), generator=g)


def _maps(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(3, 4, 9, 6, generator=g, dtype=torch.float64).to(dtype)
    ft = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64).to(dtype)
    return fs, ft


def _cost(k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    c = torch.rand(k, k, generator=g, dtype=torch.float64)
    c = (c + c.T) / 2
    c.fill_diagonal_(0)
    return c.to(dtype)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    return {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.mean()}[reduction]


def _cases(dtype: torch.dtype):
    """name -> (loss(reduction) with ckakd, the float64 reference(reduction), batch size)."""
    zs, zt, y = _logits(0, dtype)
    fs, ft = _maps(1, dtype)
    f6 = fs[:, :, :6]
    c = _cost(7, dtype)
    c64 = c.double()
    wkd = dict(temperature=2.0, gamma=3.0)
    return {
        "kd": (lambda r: CF.kd_loss(zs, zt, 3.0, reduction=r), lambda r: R.kd_loss(zs, zt, 3.0, reduction=r)),
        "kd_std": (
            lambda r: CF.kd_loss(zs, zt, 3.0, standardize=True, reduction=r),
            lambda r: R.kd_loss(zs, zt, 3.0, standardize=True, reduction=r),
        ),
        "lskd": (lambda r: CF.lskd_loss(zs, zt, 2.0, reduction=r), lambda r: R.lskd_loss(zs, zt, 2.0, reduction=r)),
        "dkd": (
            lambda r: CF.dkd_loss(zs, zt, y, 1.5, 8.0, 3.0, reduction=r),
            lambda r: R.dkd_loss(zs, zt, y, 1.5, 8.0, 3.0, reduction=r),
        ),
        "dist": (
            lambda r: CF.dist_loss(zs, zt, 1.5, 0.5, 2.0, reduction=r),
            lambda r: R.dist_loss(zs, zt, 1.5, 0.5, 2.0, reduction=r),
        ),
        "at": (lambda r: CF.at_loss(fs, ft, 2.0, reduction=r), lambda r: R.at_loss(fs, ft, 2.0, reduction=r)),
        "fitnet": (lambda r: CF.fitnet_loss(fs, ft, reduction=r), lambda r: R.fitnet_loss(fs, ft, reduction=r)),
        "wkd_l_target": (
            lambda r: ckakd.wkd_logit_loss(zs, zt, c, target=y, reduction=r, **wkd),
            lambda r: R.wkd_logit_loss_reduced(zs.double(), zt.double(), y, c64, reduction=r, **wkd),
        ),
        "wkd_l": (
            lambda r: ckakd.wkd_logit_loss(zs, zt, c, reduction=r, **wkd),
            lambda r: _reduce(
                3.0 * R.sinkhorn_fixed(F.softmax(zs.double() / 2, 1), F.softmax(zt.double() / 2, 1), c64), r
            ),
        ),
        "wkd_f": (
            lambda r: ckakd.wkd_feature_loss(f6, ft, grid=2, reduction=r),
            lambda r: R.wkd_feature_loss(f6, ft, grid=2, reduction=r),
        ),
        "wkd_f_full": (
            lambda r: ckakd.wkd_feature_loss(f6, ft, cov="full", reduction=r),
            lambda r: R.wkd_feature_loss(f6, ft, cov="full", reduction=r),
        ),
    }


NAMES = list(_cases(torch.float64))
BATCH = {"at": 3, "fitnet": 3, "wkd_f": 3, "wkd_f_full": 3}

# The "mean" values before ``reduction`` existed (computed with the previous implementation on these inputs).
BEFORE = {
    torch.float32: {
        "kd": "0x1.819ab20000000p+2",
        "lskd": "0x1.8323780000000p-1",
        "dkd": "0x1.b56cac0000000p+5",
        "dist": "0x1.15d1420000000p+3",
        "at": "0x1.120a7c0000000p-6",
        "fitnet": "0x1.89c8980000000p+0",
        "wkd_l": "0x1.94b7940000000p-1",
        "wkd_l_target": "0x1.bb59940000000p+0",
        "wkd_f": "0x1.2d4ccc0000000p+1",
        "wkd_f_full": "0x1.adfe480000000p-1",
    },
    torch.float64: {
        "kd": "0x1.819ab60713951p+2",
        "lskd": "0x1.83237e1fc4dc4p-1",
        "dkd": "0x1.b56cb0f44d009p+5",
        "dist": "0x1.15d1428fe936ep+3",
        "at": "0x1.120a7c017247bp-6",
        "fitnet": "0x1.89c89a551ff92p+0",
        "wkd_l": "0x1.94b7941f10cc2p-1",
        "wkd_l_target": "0x1.bb5994b487e4dp+0",
        "wkd_f": "0x1.2d4ccba4a6113p+1",
        "wkd_f_full": "0x1.adfe3099546c3p-1",
    },
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_none_is_per_sample_and_matches_the_reference(name, dtype):
    loss, ref = _cases(dtype)[name]
    b = BATCH.get(name, 6)
    none = loss("none")
    assert none.shape == (b,)
    torch.testing.assert_close(none.double(), ref("none").double(), **TOL[dtype])
    mean, total = loss("mean"), loss("sum")
    assert mean.shape == total.shape == ()
    torch.testing.assert_close(none.mean(), mean, **TOL[dtype])
    torch.testing.assert_close(total, b * mean, **TOL[dtype])
    torch.testing.assert_close(total.double(), ref("sum").double(), **TOL[dtype])
    torch.testing.assert_close(mean.double(), ref("mean").double(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(BEFORE[torch.float64]))
def test_mean_keeps_the_values_from_before(name, dtype):
    loss, _ = _cases(dtype)[name]
    before = float.fromhex(BEFORE[dtype][name])
    got = loss("mean")
    # bit for bit on the machine they were recorded on; a few ulps elsewhere (other BLAS / vector paths)
    assert got.item() == pytest.approx(before, rel=8 * torch.finfo(dtype).eps)


def test_mean_is_the_torch_definition_bit_for_bit():
    zs, zt, _ = _logits(3, torch.float32)
    kl = F.kl_div(F.log_softmax(zs / 4, 1), F.log_softmax(zt / 4, 1), reduction="batchmean", log_target=True) * 16
    assert torch.equal(CF.kd_loss(zs, zt), kl)
    fs, ft = _maps(2, torch.float32)
    pooled = F.adaptive_avg_pool2d(fs, (6, 6))
    assert torch.equal(CF.fitnet_loss(fs, ft), F.mse_loss(pooled, ft))


def test_dist_none_shares_the_batch_level_term():
    """DIST's intra-class term is over the batch: each sample's value carries it once; with gamma=0 the values
    are the per-sample inter-class terms alone, which depend on that sample only."""
    zs, zt, _ = _logits(1, torch.float64)
    both = CF.dist_loss(zs, zt, 1.0, 2.0, 3.0, reduction="none")
    inter = CF.dist_loss(zs, zt, 1.0, 0.0, 3.0, reduction="none")
    intra = CF.dist_loss(zs, zt, 0.0, 1.0, 3.0, reduction="none")
    torch.testing.assert_close(both, inter + 2 * intra)
    assert torch.allclose(intra, intra[0].expand_as(intra))  # one batch-level value, shared
    zs2 = zs.clone()
    zs2[0] += torch.linspace(-2, 2, zs.shape[1], dtype=torch.float64)
    changed = CF.dist_loss(zs2, zt, 1.0, 0.0, 3.0, reduction="none")
    assert not torch.allclose(changed[0], inter[0]) and torch.equal(changed[1:], inter[1:])


@pytest.mark.parametrize("name", NAMES)
def test_none_gradients_are_per_sample(name):
    """The gradient of sample i's loss reaches only sample i's student input (DIST: with gamma=0), and the
    gradient of the summed "none" values is that of "sum"."""
    zs, zt, y = _logits(2, torch.float64)
    fs, ft = _maps(3, torch.float64)
    f6 = fs[:, :, :6].contiguous()
    c = _cost(7)
    logit = name in ("kd", "kd_std", "lskd", "dkd", "dist", "wkd_l", "wkd_l_target")
    x = (zs if logit else (f6 if name.startswith("wkd_f") else fs)).clone().requires_grad_()
    fn = {
        "kd": lambda a, r: CF.kd_loss(a, zt, reduction=r),
        "kd_std": lambda a, r: CF.kd_loss(a, zt, standardize=True, reduction=r),
        "lskd": lambda a, r: CF.lskd_loss(a, zt, reduction=r),
        "dkd": lambda a, r: CF.dkd_loss(a, zt, y, reduction=r),
        "dist": lambda a, r: CF.dist_loss(a, zt, 1.0, 0.0, 2.0, reduction=r),
        "at": lambda a, r: CF.at_loss(a, ft, reduction=r),
        "fitnet": lambda a, r: CF.fitnet_loss(a, ft, reduction=r),
        "wkd_l": lambda a, r: ckakd.wkd_logit_loss(a, zt, c, reduction=r),
        "wkd_l_target": lambda a, r: ckakd.wkd_logit_loss(a, zt, c, target=y, reduction=r),
        "wkd_f": lambda a, r: ckakd.wkd_feature_loss(a, ft, grid=2, reduction=r),
        "wkd_f_full": lambda a, r: ckakd.wkd_feature_loss(a, ft, cov="full", reduction=r),
    }[name]
    values = fn(x, "none")
    (grad,) = torch.autograd.grad(values[1], x)
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2:].abs().sum() == 0
    (of_none,) = torch.autograd.grad(fn(x, "none").sum(), x)
    (of_sum,) = torch.autograd.grad(fn(x, "sum"), x)
    torch.testing.assert_close(of_none, of_sum)


@pytest.mark.parametrize("bad", ["avg", "batchmean", None, 1])
def test_bad_reduction_is_refused_naming_the_argument(bad):
    zs, zt, y = _logits(0, torch.float32)
    fs, ft = _maps(0, torch.float32)
    calls = [
        lambda: CF.kd_loss(zs, zt, reduction=bad),
        lambda: CF.lskd_loss(zs, zt, reduction=bad),
        lambda: CF.dkd_loss(zs, zt, y, reduction=bad),
        lambda: CF.dist_loss(zs, zt, reduction=bad),
        lambda: CF.at_loss(fs, ft, reduction=bad),
        lambda: CF.fitnet_loss(fs, ft, reduction=bad),
        lambda: ckakd.wkd_logit_loss(zs, zt, _cost(7, torch.float32), reduction=bad),
        lambda: ckakd.wkd_feature_loss(fs[:, :, :6], ft, reduction=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'"):
            call()


@pytest.mark.parametrize(
    "call",
    [
        lambda zs, zt, y, **kw: CF.kd_loss(zs, zt, **kw),
        lambda zs, zt, y, **kw: CF.lskd_loss(zs, zt, **kw),
        lambda zs, zt, y, **kw: CF.dkd_loss(zs, zt, y, **kw),
        lambda zs, zt, y, **kw: CF.dist_loss(zs, zt, **kw),
        lambda zs, zt, y, **kw: R.kd_loss(zs, zt, **kw),
        lambda zs, zt, y, **kw: R.dkd_loss(zs, zt, y, **kw),
    ],
    ids=["kd", "lskd", "dkd", "dist", "reference_kd", "reference_dkd"],
)
def test_temperature_old_spelling_warns_and_means_the_same(call):
    zs, zt, y = _logits(4, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = call(zs, zt, y, temperature=3.0)
    with pytest.warns(DeprecationWarning, match="'T' is deprecated, use 'temperature'"):
        old = call(zs, zt, y, T=3.0)
    assert torch.equal(old, new)
    assert not torch.equal(new, call(zs, zt, y, temperature=2.0))
    with pytest.raises(TypeError, match="both 'temperature' and its deprecated spelling 'T'"):
        call(zs, zt, y, T=3.0, temperature=3.0)


def test_temperature_is_validated_under_its_name():
    zs, zt, y = _logits(0, torch.float32)
    for call in (
        lambda: CF.kd_loss(zs, zt, temperature=0.0),
        lambda: CF.dkd_loss(zs, zt, y, temperature=-1.0),
        lambda: CF.dist_loss(zs, zt, temperature=float("nan")),
    ):
        with pytest.raises(ValueError, match="temperature must be"):
            call()


def test_defaults_are_mean():
    zs, zt, y = _logits(5, torch.float32)
    fs, ft = _maps(5, torch.float32)
    assert torch.equal(CF.kd_loss(zs, zt), CF.kd_loss(zs, zt, reduction="mean"))
    assert torch.equal(CF.dkd_loss(zs, zt, y), CF.dkd_loss(zs, zt, y, reduction="mean"))
    assert torch.equal(CF.dist_loss(zs, zt), CF.dist_loss(zs, zt, reduction="mean"))
    assert torch.equal(CF.at_loss(fs, ft), CF.at_loss(fs, ft, reduction="mean"))
    c = _cost(7, torch.float32)
    assert torch.equal(ckakd.wkd_logit_loss(zs, zt, c), ckakd.wkd_logit_loss(zs, zt, c, reduction="mean"))
