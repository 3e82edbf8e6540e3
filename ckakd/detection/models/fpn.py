"""The ResNet + FPN backbone of the dense detectors (:class:`ResNetFPN`), with one ``nn.Identity`` per output
level (``fpn_levels.{i}``) for feature hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckakd.train.models.imagenet import ImageNetBasicBlock, ImageNetBottleneck

__all__ = ["ResNetFPN"]


_RESNET_SPECS: dict[int, tuple[type[ImageNetBasicBlock] | type[ImageNetBottleneck], list[int]]] = {
    18: (ImageNetBasicBlock, [2, 2, 2, 2]),
    34: (ImageNetBasicBlock, [3, 4, 6, 3]),
    50: (ImageNetBottleneck, [3, 4, 6, 3]),
    101: (ImageNetBottleneck, [3, 4, 23, 3]),
}


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(lv) for lv in levels)
    if not levels or list(levels) != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"levels must be consecutive integers, got {levels}")
    if not 2 <= levels[0] <= 5 or levels[-1] < 5:
        raise ValueError(f"levels must start in 2..5 (C2..C5 exist) and reach at least 5, got {levels}")
    return levels


class ResNetFPN(nn.Module):
    """ResNet + FPN backbone.

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
        width: planes of the stem and of stage 1; stage ``i`` (0-based) has ``width·2^i`` planes
            (``x4`` output channels for Bottleneck). 64 is the standard ResNet.
        out_channels: channels of every FPN level.
        in_channels: image channels.
        levels: consecutive pyramid levels, starting in 2..5 and reaching at least 5; levels > 5 are the
            extra stride-2 convs (P6 from ``extra_from``, P7 = conv(ReLU(P6)), ...).
        extra_from: ``"c5"`` (RetinaNet paper) or ``"p5"`` (FCOS) as the input of the first extra level.

    Forward: images ``(B, in_channels, H, W)`` -> list of ``len(levels)`` tensors
    ``(B, out_channels, ceil(H / 2^l), ceil(W / 2^l))``. Each level passes through ``self.fpn_levels[i]``
    (an ``nn.Identity``) so that ``fpn_levels.i`` can be hooked.
    """

    def __init__(
        self,
        depth: int = 50,
        width: int = 64,
        out_channels: int = 256,
        in_channels: int = 3,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        extra_from: str = "c5",
    ) -> None:
        super().__init__()
        if depth not in _RESNET_SPECS:
            raise ValueError(f"depth must be one of {sorted(_RESNET_SPECS)}, got {depth}")
        if width < 1 or out_channels < 1 or in_channels < 1:
            raise ValueError(
                f"width, out_channels and in_channels must be positive, got {width}, {out_channels}, {in_channels}"
            )
        if extra_from not in ("c5", "p5"):
            raise ValueError(f"extra_from must be 'c5' or 'p5', got {extra_from!r}")
        self.levels = _check_levels(levels)
        self.strides = tuple(2**lv for lv in self.levels)
        self.depth, self.width, self.out_channels, self.in_channels = depth, width, out_channels, in_channels
        self.extra_from = extra_from
        block, layers = _RESNET_SPECS[depth]

        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        stage_channels: list[int] = []
        for i, n_blocks in enumerate(layers):
            planes = width * 2**i
            blocks = [block(inplanes, planes, 1 if i == 0 else 2)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes) for _ in range(1, n_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            stage_channels.append(inplanes)
        self.stage_names: list[str] = ["layer1", "layer2", "layer3", "layer4"]
        self.stage_channels = tuple(stage_channels)  # C2..C5

        self._backbone_levels = [lv for lv in self.levels if lv <= 5]
        n_extra = len(self.levels) - len(self._backbone_levels)
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(stage_channels[lv - 2], out_channels, 1) for lv in self._backbone_levels
        )
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, 1, 1) for _ in self._backbone_levels)
        first_in = stage_channels[-1] if extra_from == "c5" else out_channels
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(first_in if j == 0 else out_channels, out_channels, 3, 2, 1) for j in range(n_extra)
        )
        self.fpn_levels = nn.ModuleList(nn.Identity() for _ in self.levels)
        self.fpn_level_names: list[str] = [f"fpn_levels.{i}" for i in range(len(self.levels))]

        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                if name.startswith(("lateral_convs", "output_convs", "extra_convs")):
                    nn.init.kaiming_uniform_(m.weight, a=1)
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images`` (B, in_channels, H, W) -> list of (B, out_channels, H_l, W_l), finest level first."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != self.in_channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (B, {self.in_channels}, H, W), got {shape}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c_feats: list[torch.Tensor] = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            c_feats.append(x)
        laterals = [conv(c_feats[lv - 2]) for conv, lv in zip(self.lateral_convs, self._backbone_levels, strict=True)]
        outs: list[torch.Tensor] = [self.output_convs[-1](laterals[-1])]
        prev = laterals[-1]
        for i in range(len(laterals) - 2, -1, -1):
            prev = laterals[i] + F.interpolate(prev, size=laterals[i].shape[-2:], mode="nearest")
            outs.insert(0, self.output_convs[i](prev))
        src = c_feats[-1] if self.extra_from == "c5" else outs[-1]
        # torch's bf16 CPU convolution returns garbage weight gradients (uninitialized memory: huge or NaN, different
        # every call) for a stride-2 3x3 conv on a 1x1 map, which P6 -> P7 of small images is; these tiny levels
        # run in float32 under CPU autocast
        fp32 = src.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        for j, conv in enumerate(self.extra_convs):
            x = F.relu(src) if j > 0 else src
            if fp32:
                with torch.autocast("cpu", enabled=False):
                    src = conv(x.float())
            else:
                src = conv(x)
            outs.append(src)
        return [ident(o) for ident, o in zip(self.fpn_levels, outs, strict=True)]
