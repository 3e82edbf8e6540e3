"""The prediction heads: :class:`RetinaNetHead` (class + box towers per anchor) and :class:`FCOSHead` (class + box
towers, centerness on the box branch), shared over the FPN levels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["RetinaNetHead", "FCOSHead"]


_MAX_LOG_DIST = math.log(1e4)


class _GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also takes one image whose groups hold a single value (a 1x1 level, e.g. P7 of a
    64-px image, with one channel per group): torch refuses that batch of one although GroupNorm is per-sample;
    the result is computed on the image doubled, i.e. exactly what the image gives inside any larger batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and x.shape[0] == 1 and (x.shape[1] // self.num_groups) * x[0, 0].numel() == 1:
            return super().forward(x.expand(2, *x.shape[1:]))[:1]
        return super().forward(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``gcd(32, channels)`` groups (GN(32) as in the papers; one channel per group at <= 32)."""
    return _GroupNorm(math.gcd(32, channels), channels)


def _tower(channels: int, num_convs: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, 1, 1, bias=not norm))
        if norm:
            layers.append(_group_norm(channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _flatten_level(x: torch.Tensor, num_anchors: int, k: int) -> torch.Tensor:
    """(B, A·K, H, W) -> (B, H·W·A, K), location-major, anchor-minor."""
    b, _, h, w = x.shape
    return x.view(b, num_anchors, k, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * num_anchors, k)


def _init_head(module: nn.Module, cls_logits: nn.Conv2d, prior_prob: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.constant_(cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))


class RetinaNetHead(nn.Module):
    """Shared classification and box subnets: ``num_convs`` (3x3 conv + ReLU, with ``norm`` 3x3 conv + GroupNorm
    + ReLU as in torchvision's RetinaNet v2 and FCOS) then a 3x3 conv to ``A·K`` logits / ``A·4`` deltas. The
    classification bias starts at ``-log((1 - π) / π)``."""

    def __init__(
        self,
        channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        prior_prob: float = 0.01,
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.cls_tower = _tower(channels, num_convs, norm=norm)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, 1, 1)
        self.box_tower = _tower(channels, num_convs, norm=norm)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 3, 1, 1)
        _init_head(self, self.cls_logits, prior_prob)

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        a, k = self.num_anchors, self.num_classes
        return {
            "cls_logits": [_flatten_level(self.cls_logits(self.cls_tower(f)), a, k) for f in features],
            "box_regression": [_flatten_level(self.bbox_pred(self.box_tower(f)), a, 4) for f in features],
        }


class FCOSHead(nn.Module):
    """FCOS head: GroupNorm towers, ``K`` class logits, ``(l, t, r, b)`` distances in units of the level stride
    (``exp(scale_l · conv)`` as in the FCOS paper, exponent clamped at ``log(1e4)``, one learnable scale per
    level; positive and about one stride at init) and centerness on the regression branch."""

    def __init__(
        self, channels: int, num_classes: int, num_levels: int, num_convs: int = 4, prior_prob: float = 0.01
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_tower = _tower(channels, num_convs, norm=True)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, 1, 1)
        self.box_tower = _tower(channels, num_convs, norm=True)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, 1, 1)
        self.centerness = nn.Conv2d(channels, 1, 3, 1, 1)
        _init_head(self, self.cls_logits, prior_prob)
        self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        if len(features) != self.scales.shape[0]:
            raise ValueError(f"expected {self.scales.shape[0]} feature levels, got {len(features)}")
        cls, box, ctr = [], [], []
        for i, f in enumerate(features):
            cls.append(_flatten_level(self.cls_logits(self.cls_tower(f)), 1, self.num_classes))
            t = self.box_tower(f)
            box.append(_flatten_level(torch.exp((self.scales[i] * self.bbox_pred(t)).clamp(max=_MAX_LOG_DIST)), 1, 4))
            ctr.append(_flatten_level(self.centerness(t), 1, 1))
        return {"cls_logits": cls, "box_regression": box, "centerness": ctr}
