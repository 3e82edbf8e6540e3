"""ImageNet-style ResNet18/34/50 (He et al. 2016) and MobileNetV1 (Howard et al. 2017).

The torchvision layouts (7x7 stride-2 stem + 3x3 max-pool, four stages ``layer1..layer4`` at strides
4/8/16/32) with the zoo's conventions: ``classifier`` (the final ``nn.Linear``), ``stage_names`` (the
dotted paths of the distillable stages, the last one feeding the pooled classifier) and
``(num_classes, in_channels)`` factories. MobileNetV1 is the student of the ResNet50 -> MobileNetV1
ImageNet setting (mdistiller / WKD); its stages are grouped at the same strides as the ResNets'.
Adaptive pooling makes every model run on small inputs too (32x32 gives a 1x1 last stage).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .init import init_weights
from .registry import register_model
from .resnet import BasicBlock

__all__ = ["ImageNetBasicBlock", "ImageNetBottleneck", "ImageNetResNet", "MobileNetV1"]


# The ImageNet BasicBlock is the CIFAR one (two 3x3 convs, stride on the first, projection shortcut).
ImageNetBasicBlock = BasicBlock


class ImageNetBottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, the "ResNet v1.5" placement), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """ResNet with the ImageNet stem; ``layers`` blocks per stage, widths 64/128/256/512 (x4 for bottlenecks)."""

    def __init__(
        self,
        block: type[ImageNetBasicBlock] | type[ImageNetBottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512 * block.expansion, num_classes)
        self.stage_names: list[str] = ["layer1", "layer2", "layer3", "layer4"]
        init_weights(self)

    def _make_layer(
        self, block: type[ImageNetBasicBlock] | type[ImageNetBottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        layers = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 (width 1.0): stem ``conv1`` (32, stride 2) and 13 depthwise-separable blocks grouped as
    ``layer1`` (128 ch, stride 4), ``layer2`` (256, 8), ``layer3`` (512, 16), ``layer4`` (1024, 32)."""

    # (out channels, stride) of the depthwise-separable blocks, per stage
    _STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
        ((64, 1), (128, 2), (128, 1)),
        ((256, 2), (256, 1)),
        ((512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1)),
        ((1024, 2), (1024, 1)),
    )

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_channels, 32, 2)
        c_in = 32
        for i, stage in enumerate(self._STAGES, start=1):
            blocks = []
            for c_out, stride in stage:
                blocks.append(_conv_dw(c_in, c_out, stride))
                c_in = c_out
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        self.stage_names: list[str] = ["layer1", "layer2", "layer3", "layer4"]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _resnet_factory(block: type[ImageNetBasicBlock] | type[ImageNetBottleneck], layers: list[int]):
    def make(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
        return ImageNetResNet(block, layers, num_classes=num_classes, in_channels=in_channels)

    return make


register_model("resnet18")(_resnet_factory(ImageNetBasicBlock, [2, 2, 2, 2]))
register_model("resnet34")(_resnet_factory(ImageNetBasicBlock, [3, 4, 6, 3]))
register_model("resnet50")(_resnet_factory(ImageNetBottleneck, [3, 4, 6, 3]))


@register_model("mobilenetv1")
def _mobilenetv1(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels)
