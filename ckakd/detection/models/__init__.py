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

Modules: ``fpn`` (the backbone), ``anchors`` (anchors, points and their targets), ``heads``, ``detector`` (the
protocol), ``retinanet``, ``fcos``; every name below is importable from here.
"""

from .anchors import AnchorGenerator, AnchorMatcher, fcos_assign, fcos_centerness_targets, fcos_points
from .detector import DenseDetector, full_precision
from .fcos import FCOS
from .fpn import ResNetFPN
from .heads import FCOSHead, RetinaNetHead
from .retinanet import RetinaNet

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
    "FCOSHead",
    "RetinaNetHead",
    "full_precision",
]
