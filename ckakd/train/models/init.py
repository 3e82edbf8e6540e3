"""Weight initialization shared by the zoo models (one pass over the modules, in registration order)."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["init_weights"]


def init_weights(
    model: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = False, zero_conv_bias: bool = False
) -> None:
    """Kaiming-normal (fan_out, ReLU) convs and BatchNorm at (1, 0), as the papers' CIFAR/ImageNet code does.

    ``linear_std``: also draw Linear weights from N(0, std²) and zero their biases (VGG, MobileNetV2);
    ``zero_linear_bias``: only zero Linear biases (WRN); ``zero_conv_bias``: zero conv biases too (VGG).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if zero_conv_bias:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
                nn.init.zeros_(m.bias)
            elif zero_linear_bias:
                nn.init.zeros_(m.bias)
