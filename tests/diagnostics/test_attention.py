"""ckakd.diagnostics.attention: CAM, Grad-CAM, attention masks and IoU (pooled and per image) over a loader."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ckakd import diagnostics as D
from ckakd.train import FeatureHooks
from tests.diagnostics.helpers import (
    TinyBN,
    TinyCNN,
    assert_same_dict,
    buffers,
    data,
    loader,
    minmax,
    tiny_models,
    up,
    zoo,
)


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


class ConvWide(nn.Module):
    """A 4-channel conv map but a 6-feature classifier: CAM at ``conv`` cannot pair channels with weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.proj = nn.Conv2d(4, 6, 1)
        self.classifier = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.proj(self.conv(x)).mean(dim=(2, 3)))


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


def test_attention_bad_inputs():
    ds = data(20)
    torch.manual_seed(0)
    five = TinyCNN(num_classes=5)
    z = zoo(0)
    with pytest.raises(ValueError, match=r"no submodule 'layer9'.*layer1"):
        D.cam(z, torch.randn(2, 1, 8, 8), layer="layer9")
    with pytest.raises(ValueError, match=r"'layr3'.*did you mean"):
        D.grad_cam(z, torch.randn(2, 1, 8, 8), layer="layr3")
    empty = loader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="no samples"):
        D.attention_iou_over_loader([five, five], empty)

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
