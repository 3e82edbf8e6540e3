"""CIFAR ResNets (He et al. 2016, option B shortcuts) as used by CRD / mdistiller."""

from __future__ import annotations

import torch
import torch.nn as nn

from .init import init_weights
from .registry import register_model

__all__ = ["BasicBlock", "CifarResNet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """3-stage CIFAR ResNet: ``depth = 6n + 2``, widths ``num_filters = [stem, s1, s2, s3]``."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, 1)
        self.layer2 = self._make_layer(num_filters[2], n, 2)
        self.layer3 = self._make_layer(num_filters[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(num_filters[3], num_classes)
        self.stage_names: list[str] = ["layer1", "layer2", "layer3"]
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


_BASE = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]


def _factory(depth: int, filters: list[int]):
    def make(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, filters, num_classes=num_classes, in_channels=in_channels)

    return make


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(_factory(_depth, _BASE))
register_model("resnet8x4")(_factory(8, _X4))
register_model("resnet32x4")(_factory(32, _X4))
