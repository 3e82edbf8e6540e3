"""Tiny models, random data and comparisons shared by the ckakd.diagnostics tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ckakd.train import create_model


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
