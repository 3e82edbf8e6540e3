"""CIFAR-style model zoo used by the KD literature (CRD / mdistiller architectures), plus the ImageNet
ResNet18/34/50 and MobileNetV1 (``imagenet.py``).

Every model takes ``(num_classes=100, in_channels=3)``, accepts inputs down to 8x8, returns logits,
and exposes ``stage_names`` (dotted paths of its distillable feature stages) and ``classifier``.
"""

from __future__ import annotations

from . import imagenet, mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401  (registers the models)
from .imagenet import ImageNetResNet, MobileNetV1
from .mobilenetv2 import MobileNetV2
from .registry import create_model, list_models, register_model, unregister_model
from .resnet import CifarResNet
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import VGG
from .wrn import WideResNet

__all__ = [
    "CifarResNet",
    "ImageNetResNet",
    "MobileNetV1",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "VGG",
    "WideResNet",
    "create_model",
    "list_models",
    "register_model",
    "unregister_model",
]
