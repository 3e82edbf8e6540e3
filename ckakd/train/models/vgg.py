"""CIFAR VGG with batch norm (5 conv blocks, 512-d classifier), as used by CRD / mdistiller."""

from __future__ import annotations

import torch
import torch.nn as nn

from .init import init_weights
from .registry import register_model

__all__ = ["VGG"]

_CFG: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(nn.Module):
    """``block0..block4`` separated by 2x2 max pools (``ceil_mode`` so 8x8 inputs survive), then global pooling."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        blocks = []
        c = in_channels
        for widths in cfg:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            blocks.append(nn.Sequential(*layers))
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        # Identical to MaxPool2d(2, 2) on even sizes; ceil_mode keeps a 1x1 map at 1x1 instead of failing.
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2, ceil_mode=True) for _ in range(4))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        self.stage_names: list[str] = ["block0", "block1", "block2", "block3", "block4"]
        init_weights(self, linear_std=0.01, zero_conv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        x = self.block4(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _factory(name: str):
    def make(num_classes: int = 100, in_channels: int = 3) -> VGG:
        return VGG(_CFG[name], num_classes=num_classes, in_channels=in_channels)

    return make


for _name in _CFG:
    register_model(_name)(_factory(_name))
