"""The reference's initialisation, shared by its backbones and FFSD's own blocks."""

import math

from torch import nn


def reference_conv_init_(module: nn.Module) -> None:
    """Conv weights ~ N(0, 2 / (k·k·out_channels)) (He, fan-out), BN weight 1 and bias 0, in module order; conv
    biases and Linear layers keep PyTorch's defaults."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
