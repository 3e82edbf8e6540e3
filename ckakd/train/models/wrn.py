"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR, as used by CRD / mdistiller."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_weights
from .registry import register_model

__all__ = ["WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-(dropout)-conv + shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        out = self.conv1(o)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen: ``depth = 6n + 4``; stages ``block1..block3``, then BN-ReLU, pooling, classifier."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = self._stage(ch[0], ch[1], n, 1, drop_rate)
        self.block2 = self._stage(ch[1], ch[2], n, 2, drop_rate)
        self.block3 = self._stage(ch[2], ch[3], n, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch[3], num_classes)
        self.stage_names: list[str] = ["block1", "block2", "block3"]
        init_weights(self, zero_linear_bias=True)

    @staticmethod
    def _stage(in_planes: int, out_planes: int, n: int, stride: int, drop_rate: float) -> nn.Sequential:
        return nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _factory(depth: int, widen: int):
    def make(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen, num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate)

    return make


for _d, _w in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_d}_{_w}")(_factory(_d, _w))
