"""Model zoo: every registered model builds, runs forward/backward at 32x32 and 8x8, exposes its stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ckakd.train import FeatureHooks, create_model, list_models, register_model, unregister_model

EXPECTED = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
    "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
    "vgg19", "mobilenetv2", "shufflenetv1", "shufflenetv2",
]  # fmt: skip


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_the_zoo():
    names = list_models()
    assert names == sorted(names)
    assert set(EXPECTED) <= set(names)


@pytest.mark.parametrize("name", EXPECTED)
def test_model_forward_backward_and_stages(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == 7
    assert isinstance(model.stage_names, list) and model.stage_names
    for path in model.stage_names:
        model.get_submodule(path)  # resolves
    model.train()
    for size in (32, 8):
        x = torch.randn(2, 3, size, size)
        model.zero_grad(set_to_none=True)
        with FeatureHooks(model, model.stage_names) as hooks:
            logits = model(x)
            feats = hooks.features
        assert logits.shape == (2, 7)
        assert torch.isfinite(logits).all()
        assert list(feats) == model.stage_names
        for path, f in feats.items():
            assert isinstance(f, torch.Tensor) and f.dim() == 4 and f.shape[0] == 2, path
        # the last stage feeds the pooled classifier: its channels are the classifier's inputs
        assert feats[model.stage_names[-1]].shape[1] == model.classifier.in_features
        logits.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert model.classifier.weight.grad.abs().sum() > 0
    # hooks were removed by the context manager
    assert not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"])
def test_in_channels(name):
    model = create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize(
    "name, millions",
    [("resnet56", 0.86), ("resnet8x4", 1.23), ("wrn_40_2", 2.25), ("resnet32x4", 7.43), ("vgg8", 3.96),
     ("mobilenetv2", 0.81), ("shufflenetv1", 0.95), ("shufflenetv2", 1.36)],
)  # fmt: skip
def test_parameter_counts(name, millions):
    n = _nparams(create_model(name)) / 1e6
    assert millions * 0.85 < n < millions * 1.15, (name, n)


def test_resnet_stage_widths_and_strides():
    model = create_model("resnet8x4").eval()
    with FeatureHooks(model, model.stage_names) as hooks, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        shapes = [tuple(f.shape) for f in hooks.features.values()]
    assert shapes == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8)]


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as info:
        create_model("resnet9000")
    assert "resnet8x4" in str(info.value) and "wrn_40_2" in str(info.value)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet8")(lambda **kw: nn.Linear(1, 1))


def test_custom_model_registration():
    class Tiny(nn.Module):
        def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(4, num_classes)
            self.stage_names = ["features"]

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    register_model("_test_tiny")(Tiny)
    try:
        assert "_test_tiny" in list_models()
        model = create_model("_test_tiny", num_classes=5)
        assert isinstance(model, Tiny)
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)
        register_model("_test_tiny", overwrite=True)(Tiny)  # explicit replacement is allowed
    finally:
        unregister_model("_test_tiny")
    assert "_test_tiny" not in list_models()
    with pytest.raises(ValueError, match="unknown model"):
        unregister_model("_test_tiny")


# ------------------------------------------------------------------------------ ImageNet ResNets, MobileNetV1

IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50", "mobilenetv1"]
# stage channels (layer1..layer4); spatial strides 4 / 8 / 16 / 32 for all of them
IMAGENET_CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "mobilenetv1": [128, 256, 512, 1024],
}


def test_imagenet_models_registered():
    assert set(IMAGENET_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", IMAGENET_MODELS)
@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_model_small_inputs(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).train()
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 7
    assert model.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(2, 3, size, size)
    with FeatureHooks(model, model.stage_names) as hooks:
        logits = model(x)
        shapes = [tuple(f.shape) for f in hooks.features.values()]
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    sides = [max(size // s, 1) for s in (4, 8, 16, 32)]
    expected = [(2, c, h, h) for c, h in zip(IMAGENET_CHANNELS[name], sides, strict=True)]
    assert shapes == expected
    assert shapes[-1][1] == model.classifier.in_features
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name, millions", [("resnet18", 11.69), ("resnet34", 21.80), ("resnet50", 25.56), ("mobilenetv1", 4.23)]
)
def test_imagenet_parameter_counts(name, millions):
    n = _nparams(create_model(name, num_classes=1000)) / 1e6  # torchvision / the MobileNetV1 paper
    assert abs(n - millions) < 0.01, (name, n)


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_in_channels_and_default_classes(name):
    assert create_model(name).classifier.out_features == 1000
    model = create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)
