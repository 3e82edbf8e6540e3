"""CIFAR MobileNetV2 (Sandler et al. 2018) as in CRD / mdistiller (``mobile_half``: width 0.5, expansion 6)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .init import init_weights
from .registry import register_model

__all__ = ["MobileNetV2"]


def _conv_bn(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """Stem ``conv1``, seven inverted-residual groups ``blocks.0..6``, 1x1 ``conv2`` to 1280, pooling, classifier."""

    def __init__(
        self, num_classes: int = 100, in_channels: int = 3, width_mult: float = 0.5, expansion: int = 6
    ) -> None:
        super().__init__()
        t = expansion
        setting = [  # t, c, n, s
            [1, 16, 1, 1],
            [t, 24, 2, 1],
            [t, 32, 3, 2],
            [t, 64, 4, 2],
            [t, 96, 3, 1],
            [t, 160, 3, 2],
            [t, 320, 1, 1],
        ]
        c_in = int(32 * width_mult)
        self.conv1 = _conv_bn(in_channels, c_in, 3, 2)
        self.blocks = nn.ModuleList()
        for ti, c, n, s in setting:
            c_out = int(c * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, ti))
                c_in = c_out
            self.blocks.append(nn.Sequential(*group))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn(c_in, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.last_channel, num_classes)
        self.stage_names: list[str] = ["blocks.1", "blocks.2", "blocks.4", "blocks.6", "conv2"]
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 100, in_channels: int = 3, width_mult: float = 0.5) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)
