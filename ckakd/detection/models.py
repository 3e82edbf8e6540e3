"""Plain-PyTorch dense detectors for the PCKA detection experiments: ResNet+FPN, RetinaNet and FCOS.

Layout
------
* :class:`ResNetFPN` — ImageNet-style ResNet (BasicBlock for depth 18/34, Bottleneck for 50/101; ``width``
  scales every stage: ``width·2^i`` planes in stage ``i``) followed by an FPN (lateral 1x1 convs, top-down
  nearest upsampling, 3x3 output convs) and the RetinaNet extra levels (P6 = stride-2 3x3 conv on C5 or P5,
  P7 = stride-2 3x3 conv on ReLU(P6)).
* :class:`RetinaNet` (Lin et al. 2017) and :class:`FCOS` (Tian et al. 2019) — both with the protocol
  ``features`` / ``head_outputs`` / ``compute_losses`` / ``postprocess`` / ``forward`` described on
  :class:`DenseDetector`.

Hookable feature paths (for distillers)
---------------------------------------
Every FPN output level goes through its own ``nn.Identity`` in ``ResNetFPN.fpn_levels``. On a detector these
are the dotted module paths ``backbone.fpn_levels.0`` ... ``backbone.fpn_levels.{L-1}`` (P3..P7 for the default
``levels=(3, 4, 5, 6, 7)``), listed in ``detector.feature_names``; a forward hook on them sees the
``(B, out_channels, H_l, W_l)`` level tensor. Teacher and student may differ in ``depth`` and ``width``, but
feature distillation between their FPN levels needs the same ``out_channels`` (and the same ``levels``);
otherwise an adapter (e.g. the 1x1 "mimic" conv) has to bridge the channel counts.

Level sizes: stride-2 convs round up, so level ``l`` of an ``H x W`` image is ``ceil(H / 2^l) x ceil(W / 2^l)``
(exactly ``H/2^l x W/2^l`` when ``2^l`` divides the size).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckakd.train.models.imagenet import ImageNetBasicBlock, ImageNetBottleneck

from .boxes import BoxCoder, box_iou, clip_boxes, giou_loss, sigmoid_focal_loss
from .ops import batched_nms

__all__ = [
    "AnchorGenerator",
    "AnchorMatcher",
    "DenseDetector",
    "FCOS",
    "ResNetFPN",
    "RetinaNet",
    "fcos_assign",
    "fcos_centerness_targets",
    "fcos_points",
]

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


# ----------------------------------------------------------------------------------------------- backbone


def _full_precision(fn: Callable) -> Callable:
    """Run a ``(self, head_outputs, features, ...)`` loss / post-processing method in float32 with autocast off:
    under AMP the heads give bf16/fp16 outputs, whose box decoding, IoU logs and focal sums lose too much (bf16
    FCOS training reaches NaN within two steps without this)."""

    @functools.wraps(fn)
    def wrapper(self, head_outputs, features, *args, **kwargs):
        device_type = features[0].device.type if len(features) else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            outs = {k: [t.float() for t in v] for k, v in head_outputs.items()}
            return fn(self, outs, [f.float() for f in features], *args, **kwargs)

    return wrapper


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


# ------------------------------------------------------------------------------------------ anchors / points


class AnchorGenerator:
    """Anchors for a list of feature levels.

    Level ``i`` has ``A = len(sizes[i]) · len(aspect_ratios[i])`` cell anchors of area ``size²`` and ratio
    ``h / w = r``, ordered ratio-major (``[r0·s0, r0·s1, ..., r1·s0, ...]``); they are centered at
    ``((x + offset)·stride, (y + offset)·stride)`` for every feature cell (row-major), giving
    ``(H_l·W_l·A, 4)`` anchors per level in the same order as the flattened head outputs (location-major,
    anchor-minor). ``offset=0.0`` follows torchvision/Detectron2.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
    ) -> None:
        if not (len(sizes) == len(aspect_ratios) == len(strides)) or len(sizes) == 0:
            raise ValueError(
                f"sizes, aspect_ratios and strides need one entry per level, got {len(sizes)}, "
                f"{len(aspect_ratios)} and {len(strides)}"
            )
        if any(len(s) == 0 or min(s) <= 0 for s in sizes) or any(len(r) == 0 or min(r) <= 0 for r in aspect_ratios):
            raise ValueError("every level needs at least one positive size and one positive aspect ratio")
        self.sizes = [tuple(float(s) for s in lv) for lv in sizes]
        self.aspect_ratios = [tuple(float(r) for r in lv) for lv in aspect_ratios]
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)

    @classmethod
    def retinanet(
        cls,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> AnchorGenerator:
        """The paper's anchors: base size ``octave_base_scale · 2^l`` (32..512 for P3..P7) times
        ``2^(k/scales_per_octave)``, ``k = 0..scales_per_octave-1``, for each aspect ratio (9 per location)."""
        scales = [2 ** (k / scales_per_octave) for k in range(scales_per_octave)]
        sizes = [[octave_base_scale * 2**lv * s for s in scales] for lv in levels]
        return cls(sizes, [tuple(aspect_ratios)] * len(sizes), [2**lv for lv in levels])

    @property
    def num_anchors_per_location(self) -> list[int]:
        """``A`` per level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def cell_anchors(self, level: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Cell anchors (A, 4) of level index ``level``, centered at 0."""
        sizes = torch.tensor(self.sizes[level], dtype=dtype, device=device)
        ratios = torch.tensor(self.aspect_ratios[level], dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        ws = (sizes[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (sizes[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def grid_anchors(
        self, feature_sizes: Sequence[tuple[int, int]], dtype: torch.dtype = torch.float32, device=None
    ) -> list[torch.Tensor]:
        """Anchors per level: list of (H_l·W_l·A_l, 4) for ``feature_sizes = [(H_l, W_l), ...]``."""
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(feature_sizes)}")
        out = []
        for i, (h, w) in enumerate(feature_sizes):
            stride = self.strides[i]
            xs = (torch.arange(w, dtype=dtype, device=device) + self.offset) * stride
            ys = (torch.arange(h, dtype=dtype, device=device) + self.offset) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            out.append((shifts + self.cell_anchors(i, dtype, device)[None]).reshape(-1, 4))
        return out

    def __call__(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Anchors for FPN ``features`` (list of (B, C, H_l, W_l)) -> list of (H_l·W_l·A_l, 4)."""
        f0 = features[0]
        return self.grid_anchors([tuple(f.shape[-2:]) for f in features], f0.dtype, f0.device)


class AnchorMatcher:
    """IoU matcher of RetinaNet / Faster R-CNN.

    For an IoU matrix (M gt boxes, N anchors) returns (N,) int64: the matched gt index for IoU >= ``fg_iou``,
    ``BELOW_LOW_THRESHOLD = -1`` (background) for IoU < ``bg_iou`` and ``BETWEEN_THRESHOLDS = -2`` (ignored)
    in between. With ``allow_low_quality_matches`` every gt also claims the anchors that reach its highest IoU
    (ties included, only when that IoU is > 0); such an anchor gets its own best gt, as in torchvision.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, fg_iou: float = 0.5, bg_iou: float = 0.4, allow_low_quality_matches: bool = True) -> None:
        if bg_iou > fg_iou:
            raise ValueError(f"bg_iou ({bg_iou}) must not exceed fg_iou ({fg_iou})")
        self.fg_iou, self.bg_iou = float(fg_iou), float(bg_iou)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: torch.Tensor) -> torch.Tensor:
        """``iou`` (M, N) -> matches (N,) int64."""
        if iou.dim() != 2:
            raise ValueError(f"iou must have shape (M gt, N anchors), got {tuple(iou.shape)}")
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), self.BELOW_LOW_THRESHOLD, dtype=torch.long, device=iou.device)
        best, matches = iou.max(dim=0)
        all_matches = matches.clone()
        matches[best < self.fg_iou] = self.BETWEEN_THRESHOLDS
        matches[best < self.bg_iou] = self.BELOW_LOW_THRESHOLD
        if self.allow_low_quality_matches:
            highest = iou.max(dim=1, keepdim=True).values
            low_quality = ((iou == highest) & (highest > 0)).any(dim=0)
            matches[low_quality] = all_matches[low_quality]
        return matches


def fcos_points(
    feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], dtype: torch.dtype = torch.float32, device=None
) -> list[torch.Tensor]:
    """FCOS locations per level: list of (H_l·W_l, 2) ``(x, y)`` pixel centers ``((j + 0.5)·s, (i + 0.5)·s)``,
    row-major like the flattened head outputs."""
    out = []
    for (h, w), s in zip(feature_sizes, strides, strict=True):
        xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) * s
        ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return out


def fcos_assign(
    points: torch.Tensor,
    point_strides: torch.Tensor,
    point_ranges: torch.Tensor,
    gt_boxes: torch.Tensor,
    center_sampling_radius: float = 1.5,
) -> torch.Tensor:
    """FCOS target assignment.

    A point ``(x, y)`` (row of ``points`` (N, 2), level stride ``point_strides`` (N,), scale range
    ``point_ranges`` (N, 2) = ``(lo, hi)``) is a candidate for gt box ``g`` (row of ``gt_boxes`` (M, 4)) when
      * it lies strictly inside ``g``: ``min(l, t, r, b) > 0`` with ``(l, t, r, b) = (x-x1, y-y1, x2-x, y2-y)``;
      * with ``center_sampling_radius > 0``, also ``|x - cx| < radius·stride`` and ``|y - cy| < radius·stride``
        (the center-sampling region clipped to the box); ``radius <= 0`` disables center sampling;
      * ``lo <= max(l, t, r, b) <= hi`` (the level's scale range).
    Among several candidates the box with the smallest area wins. Returns (N,) int64 gt indices, -1 = background.
    """
    n = points.shape[0]
    if gt_boxes.shape[0] == 0:
        return torch.full((n,), -1, dtype=torch.long, device=points.device)
    x, y = points[:, 0:1], points[:, 1:2]
    ltrb = torch.stack(
        [x - gt_boxes[None, :, 0], y - gt_boxes[None, :, 1], gt_boxes[None, :, 2] - x, gt_boxes[None, :, 3] - y], dim=2
    )  # (N, M, 4)
    ok = ltrb.min(dim=2).values > 0
    if center_sampling_radius > 0:
        cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
        cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
        rad = center_sampling_radius * point_strides.to(points.dtype)[:, None]
        ok &= ((x - cx[None]).abs() < rad) & ((y - cy[None]).abs() < rad)
    max_dist = ltrb.max(dim=2).values
    ok &= (max_dist >= point_ranges[:, 0:1]) & (max_dist <= point_ranges[:, 1:2])
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    masked = torch.where(ok, areas[None, :].expand(n, -1), torch.full_like(max_dist, math.inf))
    min_area, idx = masked.min(dim=1)
    idx[torch.isinf(min_area)] = -1
    return idx


def fcos_centerness_targets(ltrb: torch.Tensor) -> torch.Tensor:
    """Centerness ``sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))`` of positive distances ``ltrb`` (N, 4) -> (N,)."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values.clamp(min=1e-12)) * (
        tb.min(dim=1).values / tb.max(dim=1).values.clamp(min=1e-12)
    )
    return torch.sqrt(ratio.clamp(min=0))


# ------------------------------------------------------------------------------------------------ heads


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


# ------------------------------------------------------------------------------------------------ detectors


class DenseDetector(nn.Module):
    """Common protocol of :class:`RetinaNet` and :class:`FCOS`.

    * ``features(images)`` -> FPN levels, list of (B, out_channels, H_l, W_l);
    * ``head_outputs(features)`` -> dict with ``"cls_logits"``: list of (B, H_l·W_l·A, K) and
      ``"box_regression"``: list of (B, H_l·W_l·A, 4) (FCOS: A = 1 and ``"centerness"``: list of (B, H_l·W_l, 1));
    * ``compute_losses(head_outputs, features, images, targets)`` -> dict of scalar losses;
    * ``postprocess(head_outputs, features, image_sizes)`` -> per image ``{"boxes": (D, 4), "scores": (D,),
      "labels": (D,)}``, scores decreasing, ``D <= detections_per_img``;
    * ``forward(images, targets=None, image_sizes=None)``: losses in training mode when ``targets`` is given,
      detections otherwise.

    ``targets``: list (one per image) of dicts with ``"boxes"`` (N, 4) float xyxy pixels and ``"labels"`` (N,)
    int64 in ``[0, num_classes)``; N = 0 means an all-background image. Images are used as given (no resizing
    or normalization: that is the data pipeline's job); ``image_sizes`` (default: the tensor's H, W) are the
    valid (unpadded) ``(h, w)`` used to clip boxes.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: ResNetFPN,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        topk_candidates: int,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.score_thresh, self.nms_thresh = float(score_thresh), float(nms_thresh)
        self.detections_per_img, self.topk_candidates = int(detections_per_img), int(topk_candidates)
        self.feature_names: list[str] = [f"backbone.{n}" for n in backbone.fpn_level_names]

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each FPN level."""
        return self.backbone.strides

    @property
    def num_levels(self) -> int:
        """Number of FPN levels that ``features`` returns."""
        return len(self.backbone.levels)

    @property
    def fpn_channels(self) -> int:
        """Channels of every FPN level."""
        return int(self.backbone.out_channels)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """FPN levels of ``images`` (B, C, H, W): list of (B, out_channels, H_l, W_l)."""
        return self.backbone(images)

    def head_outputs(self, features: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Flattened per-level head outputs (see the class docstring)."""
        return self.head(features)

    def _check_targets(self, targets: Sequence[dict[str, torch.Tensor]], batch: int) -> None:
        if not isinstance(targets, (list, tuple)) or len(targets) != batch:
            n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise ValueError(f"targets must be a list of {batch} dicts (one per image), got {n}")
        for i, t in enumerate(targets):
            if "boxes" not in t or "labels" not in t:
                raise ValueError(f"targets[{i}] needs 'boxes' and 'labels', got keys {sorted(t)}")
            boxes, labels = t["boxes"], t["labels"]
            if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(
                    f"targets[{i}]['boxes'] must be float (N, 4) xyxy, got {tuple(boxes.shape)} {boxes.dtype}"
                )
            if labels.shape != (boxes.shape[0],) or labels.dtype != torch.long:
                raise ValueError(
                    f"targets[{i}]['labels'] must be int64 ({boxes.shape[0]},), got "
                    f"{tuple(labels.shape)} {labels.dtype}"
                )
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"targets[{i}]['labels'] must lie in [0, {self.num_classes}), got "
                    f"{labels.min().item()}..{labels.max().item()}"
                )
            if boxes.numel() and bool(((boxes[:, 2:] - boxes[:, :2]) <= 0).any()):
                raise ValueError(f"targets[{i}]['boxes'] must have x2 > x1 and y2 > y1")

    def _image_sizes(
        self, image_sizes: Sequence[tuple[int, int]] | None, images: torch.Tensor
    ) -> list[tuple[int, int]]:
        if image_sizes is None:
            return [tuple(images.shape[-2:])] * images.shape[0]
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"image_sizes needs one (h, w) per image ({images.shape[0]}), got {len(image_sizes)}")
        return [(int(h), int(w)) for h, w in image_sizes]

    def _select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``scores`` (N, K) -> (kept scores, prior indices, labels): above ``score_thresh``, top-k."""
        k = scores.shape[1]
        flat = scores.flatten()
        idx = torch.nonzero(flat > self.score_thresh).flatten()
        vals = flat[idx]
        if idx.numel() > self.topk_candidates:
            vals, order = vals.topk(self.topk_candidates)
            idx = idx[order]
        return vals, idx // k, idx % k

    def _finalize(
        self, boxes: list[torch.Tensor], scores: list[torch.Tensor], labels: list[torch.Tensor], size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        boxes_t, scores_t, labels_t = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        boxes_t = clip_boxes(boxes_t, size)
        keep = batched_nms(boxes_t, scores_t, labels_t, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes_t[keep], "scores": scores_t[keep], "labels": labels_t[keep]}

    def forward(
        self,
        images: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training with ``targets``: dict of scalar losses. Otherwise: list of per-image detection dicts."""
        feats = self.features(images)
        outs = self.head_outputs(feats)
        if self.training and targets is not None:
            return self.compute_losses(outs, feats, images, targets)
        return self.postprocess(outs, feats, self._image_sizes(image_sizes, images))


class RetinaNet(DenseDetector):
    """RetinaNet (Lin et al. 2017) on a :class:`ResNetFPN` (P6 from C5).

    Losses (normalized by the batch's number of foreground anchors, at least 1): ``"cls"`` sigmoid focal loss
    (α = 0.25, γ = 2) over all non-ignored anchors, ``"box"`` L1 (or smooth-L1 with ``box_loss="smooth_l1"``,
    β = 1/9) on the :class:`BoxCoder` deltas of foreground anchors. Anchors: IoU >= ``fg_iou`` foreground,
    < ``bg_iou`` background, in between ignored, plus low-quality matches.

    ``head_norm=False`` is the paper's head (plain convs, N(0, 0.01) init); ``head_norm=True`` adds GroupNorm
    after each tower conv. Narrow heads need it: at 32 channels the paper's head shrinks the signal ~8x per conv
    and trains several times slower (R18 width-16 on 64-px synthetic digits, 768 steps at lr 0.05: val AP 12
    without, 45 with).
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 50,
        width: int = 64,
        out_channels: int = 256,
        in_channels: int = 3,
        num_convs: int = 4,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        fg_iou: float = 0.5,
        bg_iou: float = 0.4,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "l1",
        prior_prob: float = 0.01,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        head_norm: bool = False,
    ) -> None:
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        backbone = ResNetFPN(depth, width, out_channels, in_channels, levels, extra_from="c5")
        super().__init__(num_classes, backbone, score_thresh, nms_thresh, detections_per_img, topk_candidates)
        self.anchor_generator = AnchorGenerator.retinanet(
            backbone.levels, octave_base_scale, scales_per_octave, aspect_ratios
        )
        num_anchors = self.anchor_generator.num_anchors_per_location[0]
        self.head = RetinaNetHead(out_channels, num_anchors, num_classes, num_convs, prior_prob, norm=head_norm)
        self.matcher = AnchorMatcher(fg_iou, bg_iou, allow_low_quality_matches=True)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.focal_alpha, self.focal_gamma, self.box_loss = focal_alpha, focal_gamma, box_loss

    @_full_precision
    def compute_losses(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        features: Sequence[torch.Tensor],
        images: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``{"cls": focal loss, "box": L1 on deltas}``, each a scalar normalized by the foreground count."""
        self._check_targets(targets, images.shape[0])
        anchors = torch.cat(self.anchor_generator(features))
        logits = torch.cat(head_outputs["cls_logits"], dim=1)
        deltas = torch.cat(head_outputs["box_regression"], dim=1)
        cls_sum = logits.new_zeros(())
        box_sum = logits.new_zeros(())
        num_fg = 0
        for b, tgt in enumerate(targets):
            gt_boxes = tgt["boxes"].to(anchors.dtype)
            matches = self.matcher(box_iou(gt_boxes, anchors))
            fg = matches >= 0
            valid = matches != AnchorMatcher.BETWEEN_THRESHOLDS
            cls_target = torch.zeros_like(logits[b])
            cls_target[fg, tgt["labels"][matches[fg]]] = 1.0
            cls_sum = cls_sum + sigmoid_focal_loss(
                logits[b][valid], cls_target[valid], self.focal_alpha, self.focal_gamma, reduction="sum"
            )
            if bool(fg.any()):
                target_deltas = self.box_coder.encode(anchors[fg], gt_boxes[matches[fg]])
                if self.box_loss == "l1":
                    box_sum = box_sum + F.l1_loss(deltas[b][fg], target_deltas, reduction="sum")
                else:
                    box_sum = box_sum + F.smooth_l1_loss(deltas[b][fg], target_deltas, reduction="sum", beta=1 / 9)
            else:
                box_sum = box_sum + 0.0 * deltas[b].sum()  # keeps the graph connected
            num_fg += int(fg.sum())
        norm = max(1, num_fg)
        return {"cls": cls_sum / norm, "box": box_sum / norm}

    @torch.no_grad()
    @_full_precision
    def postprocess(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        features: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Per level: sigmoid scores > ``score_thresh``, top ``topk_candidates``, decode; then clip, class-wise
        NMS and the best ``detections_per_img``."""
        anchors = self.anchor_generator(features)
        results = []
        for b, size in enumerate(image_sizes):
            boxes, scores, labels = [], [], []
            for lv, anc in enumerate(anchors):
                vals, prior, lab = self._select(torch.sigmoid(head_outputs["cls_logits"][lv][b]))
                boxes.append(self.box_coder.decode(anc[prior], head_outputs["box_regression"][lv][b][prior]))
                scores.append(vals)
                labels.append(lab)
            results.append(self._finalize(boxes, scores, labels, size))
        return results


class FCOS(DenseDetector):
    """FCOS (Tian et al. 2019) on a :class:`ResNetFPN` (P6 from P5), with center sampling (radius 1.5),
    per-level scale ranges, centerness on the regression branch and GIoU box loss.

    Losses (normalized by the batch's number of foreground points, at least 1): ``"cls"`` sigmoid focal loss
    over all points, ``"box"`` GIoU loss of the decoded foreground boxes, ``"centerness"`` BCE on foreground
    points. Scores at inference: ``sqrt(sigmoid(cls) · sigmoid(centerness))``.
    ``scale_ranges`` default: ``(0, 64), (64, 128), (128, 256), (256, 512), (512, inf)`` (doubling for other
    level counts).
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 50,
        width: int = 64,
        out_channels: int = 256,
        in_channels: int = 3,
        num_convs: int = 4,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        scale_ranges: Sequence[tuple[float, float]] | None = None,
        center_sampling_radius: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
    ) -> None:
        backbone = ResNetFPN(depth, width, out_channels, in_channels, levels, extra_from="p5")
        super().__init__(num_classes, backbone, score_thresh, nms_thresh, detections_per_img, topk_candidates)
        n = len(backbone.levels)
        if scale_ranges is None:
            bounds = [0.0] + [64.0 * 2**i for i in range(n - 1)] + [math.inf]
            scale_ranges = [(bounds[i], bounds[i + 1]) for i in range(n)]
        if len(scale_ranges) != n:
            raise ValueError(f"scale_ranges needs one (lo, hi) per level ({n}), got {len(scale_ranges)}")
        self.scale_ranges = [(float(lo), float(hi)) for lo, hi in scale_ranges]
        self.center_sampling_radius = float(center_sampling_radius)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.head = FCOSHead(out_channels, num_classes, n, num_convs, prior_prob)

    def points(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """FCOS locations per level, list of (H_l·W_l, 2)."""
        f0 = features[0]
        return fcos_points([tuple(f.shape[-2:]) for f in features], self.strides, f0.dtype, f0.device)

    @staticmethod
    def _decode(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
        return torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], dim=1)

    @_full_precision
    def compute_losses(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        features: Sequence[torch.Tensor],
        images: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``{"cls": focal, "box": GIoU, "centerness": BCE}``, scalars normalized by the foreground count."""
        self._check_targets(targets, images.shape[0])
        pts_levels = self.points(features)
        points = torch.cat(pts_levels)
        counts = [p.shape[0] for p in pts_levels]
        dev, dt = points.device, points.dtype
        strides = torch.repeat_interleave(
            torch.tensor(self.strides, dtype=dt, device=dev), torch.tensor(counts, device=dev)
        )
        ranges = torch.repeat_interleave(
            torch.tensor(self.scale_ranges, dtype=dt, device=dev), torch.tensor(counts, device=dev), dim=0
        )
        logits = torch.cat(head_outputs["cls_logits"], dim=1)
        reg = torch.cat(head_outputs["box_regression"], dim=1)
        ctr = torch.cat(head_outputs["centerness"], dim=1)[..., 0]
        cls_sum, box_sum, ctr_sum = logits.new_zeros(()), logits.new_zeros(()), logits.new_zeros(())
        num_fg = 0
        for b, tgt in enumerate(targets):
            gt_boxes = tgt["boxes"].to(dt)
            matched = fcos_assign(points, strides, ranges, gt_boxes, self.center_sampling_radius)
            fg = matched >= 0
            cls_target = torch.zeros_like(logits[b])
            cls_target[fg, tgt["labels"][matched[fg]]] = 1.0
            cls_sum = cls_sum + sigmoid_focal_loss(
                logits[b], cls_target, self.focal_alpha, self.focal_gamma, reduction="sum"
            )
            if bool(fg.any()):
                p, g = points[fg], gt_boxes[matched[fg]]
                pred_boxes = self._decode(p, reg[b][fg] * strides[fg, None])
                box_sum = box_sum + giou_loss(pred_boxes, g, reduction="sum")
                target_ltrb = torch.cat([p - g[:, :2], g[:, 2:] - p], dim=1)
                ctr_sum = ctr_sum + F.binary_cross_entropy_with_logits(
                    ctr[b][fg], fcos_centerness_targets(target_ltrb), reduction="sum"
                )
            else:
                zero = 0.0 * (reg[b].sum() + ctr[b].sum())  # keeps the graph connected
                box_sum, ctr_sum = box_sum + zero, ctr_sum + zero
            num_fg += int(fg.sum())
        norm = max(1, num_fg)
        return {"cls": cls_sum / norm, "box": box_sum / norm, "centerness": ctr_sum / norm}

    @torch.no_grad()
    @_full_precision
    def postprocess(
        self,
        head_outputs: dict[str, list[torch.Tensor]],
        features: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Per level: ``sqrt(sigmoid(cls)·sigmoid(ctr))`` > ``score_thresh``, top ``topk_candidates``, decode;
        then clip, class-wise NMS and the best ``detections_per_img``."""
        pts = self.points(features)
        results = []
        for b, size in enumerate(image_sizes):
            boxes, scores, labels = [], [], []
            for lv, p in enumerate(pts):
                s = torch.sqrt(
                    torch.sigmoid(head_outputs["cls_logits"][lv][b]) * torch.sigmoid(head_outputs["centerness"][lv][b])
                )
                vals, prior, lab = self._select(s)
                ltrb = head_outputs["box_regression"][lv][b][prior] * self.strides[lv]
                boxes.append(self._decode(p[prior], ltrb))
                scores.append(vals)
                labels.append(lab)
            results.append(self._finalize(boxes, scores, labels, size))
        return results
