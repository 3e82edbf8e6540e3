"""FeatureHooks: capture by dotted path, clearing per forward, detach, removal, error messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ckakd.train import FeatureHooks, create_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)
        self.skip_head = False

    def forward(self, x):
        h = self.body(x)
        return h if self.skip_head else self.head(h)


def test_captures_in_path_order_and_matches_manual():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 4)
    hooks = FeatureHooks(net, ["head", "body.0", "body"])
    out = net(x)
    feats = hooks.features
    assert list(feats) == ["head", "body.0", "body"]
    assert hooks["body"] is feats["body"]
    torch.testing.assert_close(feats["body.0"], net.body[0](x))
    torch.testing.assert_close(feats["body"], net.body(x))
    torch.testing.assert_close(feats["head"], out)
    assert feats["head"].grad_fn is not None  # not detached by default: usable in a loss
    hooks.remove()


def test_cleared_at_each_forward():
    net = Net()
    with FeatureHooks(net, ["body", "head"]) as hooks:
        net(torch.randn(2, 4))
        assert set(hooks.features) == {"body", "head"}
        first = hooks.features["body"]
        net.skip_head = True  # head does not run: its stale output must not survive
        net(torch.randn(2, 4))
        assert list(hooks.features) == ["body"]
        assert hooks.features["body"] is not first
        hooks.clear()
        assert hooks.features == {}


def test_detach():
    net = Net()
    with FeatureHooks(net, ["body.2", "head"], detach=True) as hooks:
        out = net(torch.randn(2, 4))
        assert out.grad_fn is not None
        for f in hooks.features.values():
            assert f.grad_fn is None and not f.requires_grad


def test_remove_and_context_manager():
    net = Net()
    hooks = FeatureHooks(net, ["body", "head"])
    assert net._forward_pre_hooks and net.head._forward_hooks
    hooks.remove()
    hooks.remove()  # idempotent
    assert not net._forward_pre_hooks and not net.head._forward_hooks and not net.body._forward_hooks
    net(torch.randn(2, 4))
    assert hooks.features == {}
    with FeatureHooks(net, ["head"]) as h2:
        net(torch.randn(2, 4))
        assert "head" in h2.features
    assert not net._forward_pre_hooks and not net.head._forward_hooks


def test_two_hook_sets_coexist():
    net = Net()
    with FeatureHooks(net, ["body"]) as a, FeatureHooks(net, ["head"], detach=True) as b:
        net(torch.randn(2, 4))
        assert list(a.features) == ["body"] and list(b.features) == ["head"]


def test_bad_path_message_lists_candidates():
    net = Net()
    with pytest.raises(ValueError, match="'bdy.0'") as info:
        FeatureHooks(net, ["body", "bdy.0"])
    assert "body.0" in str(info.value)
    assert not net._forward_pre_hooks and not net.body._forward_hooks  # nothing left behind
    model = create_model("resnet8")
    with pytest.raises(ValueError, match="layer1.0"):
        FeatureHooks(model, ["layer1.0x"])
    with pytest.raises(ValueError, match="duplicate"):
        FeatureHooks(net, ["body", "body"])


def test_string_path_and_root_path():
    net = Net()
    with FeatureHooks(net, "head") as hooks:
        net(torch.randn(2, 4))
        assert list(hooks.features) == ["head"]
    with FeatureHooks(net, [""]) as hooks:  # "" is the model itself
        out = net(torch.randn(2, 4))
        assert hooks.features[""] is out


def test_features_feed_a_loss():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    with FeatureHooks(model, model.stage_names) as hooks:
        model(torch.randn(2, 3, 16, 16))
        loss = sum(f.pow(2).mean() for f in hooks.features.values())
    loss.backward()
    assert model.layer1[0].conv1.weight.grad is not None
