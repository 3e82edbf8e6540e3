"""ckakd.diagnostics: fidelity, prediction MI, CAM / Grad-CAM attention IoU, affinity, ECE, layer CKA heatmap and
the trainer callback (Guo et al., "Why does Knowledge Distillation Work?"). Tiny models and random tensors only."""

from __future__ import annotations

import copy
import inspect
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import ckakd
from ckakd import diagnostics as D
from ckakd.train import FeatureHooks, create_model
from ckakd.train.data import RandomCropFlip
from ckakd.train.engine import Trainer, TrainSettings

# ------------------------------------------------------------------------------------------------ helpers


class TinyCNN(nn.Module):
    """conv -> ReLU (the map f at ``features``) -> global average pooling -> linear ``classifier``."""

    def __init__(self, num_classes: int = 5, in_channels: int = 1, width: int = 6, bias: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes, bias=bias)
        self.stage_names = ["features"]
        with torch.no_grad():  # centre and scale the logits on random images: varied, input-dependent predictions
            g = torch.Generator().manual_seed(123)
            z = self(torch.randn(256, in_channels, 8, 8, generator=g))
            self.classifier.weight.div_(z.std(0, keepdim=True).T)
            if bias:
                self.classifier.bias.sub_(self(torch.randn(256, in_channels, 8, 8, generator=g)).mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class TinyBN(TinyCNN):
    """TinyCNN with a BatchNorm before the ReLU (running statistics to watch)."""

    def __init__(self, num_classes: int = 5, in_channels: int = 1, width: int = 6) -> None:
        super().__init__(num_classes, in_channels, width)
        conv = self.features[0]
        self.features = nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU())


class MLP(nn.Module):
    def __init__(self, num_classes: int = 5, d: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU())
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class ConvNoLinearHead(nn.Module):
    """A conv net whose head is a 1x1 conv (no nn.Linear ``classifier``): Grad-CAM works, CAM does not."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x))).mean(dim=(2, 3))


def data(n: int = 64, k: int = 5, size: int = 8, seed: int = 1, dtype=torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g, dtype=dtype)
    return TensorDataset(x, torch.randint(0, k, (n,), generator=g))


def loader(ds: TensorDataset, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def tiny_models(k: int = 3, seed: int = 0, dtype=torch.float32) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    names = [f"T{i}" for i in range(k - 1)] + ["S"]
    return {n: TinyCNN().to(dtype).eval() for n in names}


def zoo(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=10, in_channels=1).eval()


def all_logits(model: nn.Module, ds: TensorDataset) -> torch.Tensor:
    with torch.no_grad():
        return model(ds.tensors[0]).double()


def minmax(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo)).reshape(m.shape)


def up(m: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(m.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)


def entropy(labels: torch.Tensor) -> float:
    p = torch.bincount(labels).double()
    p = p[p > 0] / labels.numel()
    return float(-(p * p.log()).sum())


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def assert_same_dict(a: dict, b: dict, tol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=tol, rel=tol), k


# ------------------------------------------------------------------------------------------------ fidelity


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


# ------------------------------------------------------------------------------------------------ mutual information


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


# ------------------------------------------------------------------------------------------------ CAM / Grad-CAM


def test_cam_is_class_summed_linear_head_on_hooked_features():
    model = zoo(0)
    x = torch.randn(5, 1, 8, 8)
    with FeatureHooks(model, ["layer3"], detach=True) as hooks, torch.no_grad():
        logits = model(x)
        f = hooks["layer3"]  # (B, 64, 2, 2)
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    expected = torch.einsum("c,bchw->bhw", w.sum(0), f) + b.sum()  # (ΣW)·f + Σb
    raw = D.cam(model, x, upsample=False, normalize=False)  # default layer: stage_names[-1] = "layer3"
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw.mean(dim=(1, 2)), logits.sum(1), rtol=1e-4, atol=1e-4)  # GAP -> Σ_c logit_c
    torch.testing.assert_close(D.cam(model, x, "layer3", upsample=False, normalize=False), raw)

    maps = D.cam(model, x)
    assert maps.shape == (5, 8, 8)
    torch.testing.assert_close(maps, minmax(up(expected, 8)), rtol=1e-4, atol=1e-5)
    assert torch.allclose(maps.flatten(1).min(1).values, torch.zeros(5))
    assert torch.allclose(maps.flatten(1).max(1).values, torch.ones(5))
    # one class (class_sum=False): W_t · f + b_t, predicted class by default
    pred = logits.argmax(1)
    one = D.cam(model, x, class_sum=False, upsample=False, normalize=False)
    expected_one = torch.einsum("bc,bchw->bhw", w[pred], f) + b[pred].view(-1, 1, 1)
    torch.testing.assert_close(one, expected_one, rtol=1e-5, atol=1e-5)
    three = D.cam(model, x, class_sum=False, target=3, upsample=False, normalize=False)
    torch.testing.assert_close(three, torch.einsum("c,bchw->bhw", w[3], f) + b[3], rtol=1e-5, atol=1e-5)


def test_grad_cam_equals_relu_of_predicted_class_cam_for_linear_head_after_gap():
    torch.manual_seed(4)
    model = TinyCNN(num_classes=5, width=6).eval()
    x = torch.randn(6, 1, 8, 8)
    with FeatureHooks(model, ["features"], detach=True) as hooks, torch.no_grad():
        logits = model(x)
        f = hooks["features"]  # (B, 6, 8, 8)
    pred = logits.argmax(1)
    w_t = model.classifier.weight.detach()[pred]
    bias = model.classifier.bias.detach()[pred].view(-1, 1, 1)
    class_cam = D.cam(model, x, class_sum=False, upsample=False, normalize=False) - bias
    torch.testing.assert_close(class_cam, torch.einsum("bc,bchw->bhw", w_t, f), rtol=1e-5, atol=1e-5)  # W_t · f
    # ∂logit_t/∂f = W_t/(h w) everywhere, so Grad-CAM = ReLU(W_t · f)/(h w)
    raw = D.grad_cam(model, x, upsample=False, normalize=False)
    torch.testing.assert_close(raw, F.relu(class_cam) / 64, rtol=1e-5, atol=1e-6)
    assert bool((F.relu(class_cam).flatten(1).max(1).values > 0).all())
    torch.testing.assert_close(D.grad_cam(model, x), minmax(F.relu(class_cam)), rtol=1e-4, atol=1e-5)
    # a zoo model: 2x2 map upsampled to the input size
    z = zoo(1)
    xz = torch.randn(4, 1, 8, 8)
    with FeatureHooks(z, ["layer3"], detach=True) as hooks, torch.no_grad():
        lz = z(xz)
        fz = hooks["layer3"]
    wt = z.classifier.weight.detach()[lz.argmax(1)]
    expected = minmax(up(F.relu(torch.einsum("bc,bchw->bhw", wt, fz)), 8))
    torch.testing.assert_close(D.grad_cam(z, xz), expected, rtol=1e-4, atol=1e-5)
    # explicit target
    t = torch.tensor([1, 2, 3, 4])
    wt = z.classifier.weight.detach()[t]
    torch.testing.assert_close(
        D.grad_cam(z, xz, target=t, upsample=False, normalize=False),
        F.relu(torch.einsum("bc,bchw->bhw", wt, fz)) / 4,
        rtol=1e-5,
        atol=1e-6,
    )


def test_cam_and_grad_cam_leave_model_state_alone():
    model = TinyBN().train()
    model.features[0].weight.requires_grad_(False)  # frozen and trainable parameters mixed
    before = buffers(model)
    x = torch.randn(3, 1, 8, 8)
    D.grad_cam(model, x)
    D.cam(model, x)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k  # eval mode: no BatchNorm statistics updates
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
    with torch.no_grad():  # Grad-CAM works under an outer no_grad too, and leaves it in place
        m = D.grad_cam(model, x)
        assert not torch.is_grad_enabled()
    assert m.shape == (3, 8, 8) and torch.is_grad_enabled()
    # a head that is not nn.Linear: Grad-CAM works, CAM explains why not
    other = ConvNoLinearHead()
    assert D.grad_cam(other, x).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="classifier"):
        D.cam(other, x)


# ------------------------------------------------------------------------------------------------ IoU


def test_attention_masks_and_iou():
    maps = torch.tensor([[[0.0, 0.39], [0.4, 1.0]]])
    assert torch.equal(D.attention_masks(maps), torch.tensor([[[False, False], [True, True]]]))
    m = torch.rand(4, 6, 6) > 0.5
    r = D.attention_iou(m, m.clone())
    assert r["iou"] == 1.0 and torch.equal(r["per_image"], torch.ones(4, dtype=torch.float64))
    r = D.attention_iou(m, ~m)
    assert r["iou"] == 0.0 and r["intersection"] == 0 and r["union"] == 4 * 36

    a = torch.zeros(2, 2, 4, dtype=torch.bool)
    b, c = a.clone(), a.clone()
    a[0, 0, :3] = True  # image 0: a = {0,1,2}, b = {1,2,3}, c = {2,3}: ∩ = {2}, ∪ = {0,1,2,3}
    b[0, 0, 1:4] = True
    c[0, 0, 2:4] = True
    a[1, 1, :] = True  # image 1: a = b = c = 4 pixels of row 1, c also pixel (1, 0, 0): ∩ = 4, ∪ = 5
    b[1, 1, :] = True
    c[1, 1, :] = True
    c[1, 0, 0] = True
    r = D.attention_iou(a, b, c)
    assert r["intersection"] == 1 + 4 and r["union"] == 4 + 5
    assert r["iou"] == pytest.approx(5 / 9, abs=1e-15)  # pooled Σ∩/Σ∪, not the mean of per-image IoUs
    torch.testing.assert_close(r["per_image"], torch.tensor([1 / 4, 4 / 5], dtype=torch.float64))
    assert D.attention_iou([a, b, c])["iou"] == r["iou"]  # one sequence argument
    assert D.attention_iou(a[0], b[0])["iou"] == pytest.approx(2 / 4)  # (H, W) masks
    # empty union: identical (empty) masks
    e = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert D.attention_iou(e, e)["iou"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        D.attention_iou(a)
    with pytest.raises(ValueError, match="bool"):
        D.attention_iou(a.float(), b.float())
    with pytest.raises(ValueError, match="threshold"):
        D.attention_masks(maps, 1.5)


def test_iou_accumulator_and_loader_iou_batch_size_invariance():
    models = tiny_models(3, dtype=torch.float64)
    ds = data(40, dtype=torch.float64)
    for method in ("cam", "gradcam"):
        r7 = D.attention_iou_over_loader(models, loader(ds, 7), method=method)
        r64 = D.attention_iou_over_loader(models, loader(ds, 64), method=method)
        assert_same_dict(r7, r64)
        assert set(r7) == {f"{p}/{g}" for p in ("iou", "iou_img") for g in ("T0-T1", "T0-S", "T1-S", "T0-T1-S")} | {"n"}
        x = ds.tensors[0]
        maps = {n: D.attention_masks(D.cam(m, x) if method == "cam" else D.grad_cam(m, x)) for n, m in models.items()}
        assert r7["iou/T0-S"] == pytest.approx(D.attention_iou(maps["T0"], maps["S"])["iou"], abs=1e-12)
        assert r7["iou/T0-T1-S"] == pytest.approx(D.attention_iou(*maps.values())["iou"], abs=1e-12)
        assert r7["iou_img/T0-S"] == pytest.approx(
            D.attention_iou(maps["T0"], maps["S"])["per_image"].mean().item(), abs=1e-12
        )
        assert 0.0 < r7["iou/T0-T1-S"] < r7["iou/T0-S"] < 1.0
    same = D.attention_iou_over_loader([models["S"], models["S"]], loader(ds, 16))
    assert same["iou/M0-M1"] == 1.0
    # per-model layers: the zoo net at its last stage and a tiny net at its conv
    mixed = {"R": zoo(2), "C": TinyCNN()}
    r = D.attention_iou_over_loader(mixed, loader(data(10), 5), layer={"R": "layer3", "C": "features.0"})
    assert 0.0 <= r["iou/R-C"] <= 1.0


# ------------------------------------------------------------------------------------------------ affinity, gap, ECE


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


# ------------------------------------------------------------------------------------------------ layer CKA heatmap


def test_layer_cka_heatmap(tmp_path):
    s, t = zoo(0), zoo(1)
    ds = data(40)
    h = D.layer_cka_heatmap(s, s, loader(ds, 16), s.stage_names, s.stage_names)
    assert h.shape == (3, 3) and h.dtype == torch.float64
    torch.testing.assert_close(h.diagonal(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(h, h.T, rtol=0, atol=1e-10)

    m = D.layer_cka_heatmap(s, t, loader(ds, 16), ["layer1", "layer3"], ["layer2"], max_samples=30)
    assert m.shape == (2, 1)
    x = ds.tensors[0][:30]
    with FeatureHooks(s, ["layer3"], detach=True) as hs, FeatureHooks(t, ["layer2"], detach=True) as ht:
        with torch.no_grad():
            s(x)
            t(x)
        expected = ckakd.cka(hs["layer3"].flatten(1).double(), ht["layer2"].flatten(1).double())
    assert m[1, 0].item() == pytest.approx(expected.item(), rel=1e-10)
    assert 0.0 < m[1, 0].item() < 1.0

    path = D.plot_cka_heatmap(m, ["layer1", "layer3"], ["layer2"], tmp_path / "sub" / "cka.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="does not match"):
        D.plot_cka_heatmap(m, ["a"], ["b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="layer9"):
        D.layer_cka_heatmap(s, t, loader(ds, 16), ["layer9"], ["layer2"])


# ------------------------------------------------------------------------------------------------ callback


def _distiller(n_teachers: int = 2):
    from ckakd.train.distillers import Distiller

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
    settings = TrainSettings(epochs=1, out_dir=tmp_path, device="cpu", progress=False, lr=0.01)
    trainer = Trainer(model, loader(ds, 16), loader(ds, 16), settings, callbacks=[cb])
    trainer.fit()
    row = trainer.history[-1]
    assert CALLBACK_KEYS <= set(row)
    assert 0.0 <= row["diag/agree/T0-S"] <= 1.0 and 0.0 <= row["diag/iou/T0-T1-S"] <= 1.0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "diag/iou/T0-S" in header and "diag/nmi/T0-S" in header
    assert student.training


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    ds = data(20)
    torch.manual_seed(0)
    five, ten = TinyCNN(num_classes=5), TinyCNN(num_classes=10)
    with pytest.raises(ValueError, match="class-count mismatch"):
        D.fidelity({"T": ten, "S": five}, loader(ds, 8))
    with pytest.raises(ValueError, match="class-count mismatch"):
        D.prediction_mi(ten, five, loader(ds, 8))
    with pytest.raises(ValueError, match="class-count mismatch"):
        D.diagnose({"T0": ten}, five, loader(ds, 8))

    z = zoo(0)
    with pytest.raises(ValueError, match=r"no submodule 'layer9'.*layer1"):
        D.cam(z, torch.randn(2, 1, 8, 8), layer="layer9")
    with pytest.raises(ValueError, match=r"'layr3'.*did you mean"):
        D.grad_cam(z, torch.randn(2, 1, 8, 8), layer="layr3")
    with pytest.raises(ValueError, match="'layer9'"):
        D.DiagnosticsCallback({"T0": z}, loader(ds, 8), cam_layer_teacher="layer9")

    empty = loader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), 4)
    for call in (
        lambda: D.fidelity({"T": five, "S": copy.deepcopy(five)}, empty),
        lambda: D.prediction_mi(five, five, empty),
        lambda: D.attention_iou_over_loader([five, five], empty),
        lambda: D.affinity(five, empty, lambda im: im),
        lambda: D.expected_calibration_error_over_loader(five, empty),
        lambda: D.layer_cka_heatmap(five, five, empty, ["features"], ["features"]),
        lambda: D.diagnose({"T0": five}, copy.deepcopy(five), empty),
    ):
        with pytest.raises(ValueError, match="no samples"):
            call()

    mlp = MLP()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        D.cam(mlp, x)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        D.grad_cam(mlp, x)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) feature map"):
        D.cam(mlp, x, layer="body")
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        D.attention_iou_over_loader([mlp, five], loader(ds, 8))
    with pytest.raises(ValueError, match="takes 6 features but layer 'conv' has 4 channels"):
        D.cam(ConvWide(), x, layer="conv")

    with pytest.raises(ValueError, match="method"):
        D.attention_iou_over_loader([five, five], loader(ds, 8), method="saliency")
    with pytest.raises(ValueError, match="every"):
        D.DiagnosticsCallback({}, loader(ds, 8), every=0)
    with pytest.raises(ValueError, match="at least 2 models"):
        D.fidelity({"S": five}, loader(ds, 8))
    with pytest.raises(ValueError, match="reserved"):
        D.fidelity({"ens": five, "S": five}, loader(ds, 8))


class ConvWide(nn.Module):
    """A 4-channel conv map but a 6-feature classifier: CAM at ``conv`` cannot pair channels with weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.proj = nn.Conv2d(4, 6, 1)
        self.classifier = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.proj(self.conv(x)).mean(dim=(2, 3)))
