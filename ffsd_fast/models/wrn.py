"""Wide ResNet WRN-d-k for small images, pre-activation blocks, returning the three stage outputs as taps.

Two block layouts (the same parameters, names and shapes, so one checkpoint loads into either):

- ``"reference"`` (default) **(quirk)**, the authors' ``wide_basic``: ``out = conv1(relu(bn1(x)))`` with ``conv1``
  at stride 1, ``out = conv2(relu(bn2(out)))`` with the block's stride on ``conv2``, then ``out += shortcut(x)``;
  the 1×1 projection shortcut (where the shape changes) takes the block's **raw input** ``x``. The first 3×3 conv
  of each downsampling block therefore runs at the input resolution (WRN-16-2: 1.28× the multiply-adds of the
  clean layout).
- ``"clean"``, the common pre-activation form: the stride on ``conv1``, and the projection on ``relu(bn1(x))``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast.models.init import reference_conv_init_

LAYOUTS = ("reference", "clean")


class WideBasic(nn.Module):
    """BN-ReLU-conv3×3, BN-ReLU-conv3×3 plus a shortcut; convs carry a bias; returns the pre-activation sum.

    Where the shape changes, ``shortcut`` is ``Sequential(1×1 conv with bias, no BN)`` at the block's stride,
    otherwise an empty ``Sequential`` (the identity), as the reference names them. ``layout`` decides where the
    stride and the projection's input are (see the module's docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, layout: str = "reference") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"WRN block layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        reference = layout == "reference"
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1 if reference else stride, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=stride if reference else 1, padding=1)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        identity = x if self.layout == "reference" or len(self.shortcut) == 0 else activated
        return out + self.shortcut(identity)


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, layout: str) -> nn.Sequential:
    return nn.Sequential(
        *[
            WideBasic(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, layout)
            for i in range(blocks)
        ]
    )


class WideResNet(nn.Module):
    """WRN-d-k: stem conv 3→16, then (d−4)/6 pre-activation blocks per stage at 16k/32k/64k channels, strides 1/2/2.

    Parameter names and order are the reference's: ``conv1``, ``layer1``–``layer3`` (blocks ``bn1``, ``conv1``,
    ``bn2``, ``conv2``, ``shortcut.0``), final ``bn1``, classifier ``linear``.
    Taps: the stage-1 and stage-2 outputs (pre-activation sums) and the stage-3 output after the final BN+ReLU.
    **(quirk)** The final BN has ``momentum=0.9``, as in the reference. Dropout is 0, so there is none.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, layout: str = "reference") -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen factor must be at least 1, got {widen_factor}")
        if layout not in LAYOUTS:
            raise ValueError(f"WRN block layout must be one of {LAYOUTS}, got {layout!r}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1)
        self.layer1 = _stage(16, widths[0], n, 1, layout)
        self.layer2 = _stage(widths[0], widths[1], n, 2, layout)
        self.layer3 = _stage(widths[1], widths[2], n, 2, layout)
        self.bn1 = nn.BatchNorm2d(widths[2], momentum=0.9)
        self.relu1 = nn.ReLU(inplace=True)
        self.linear = nn.Linear(widths[2], num_classes)

        reference_conv_init_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.conv1(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.relu1(self.bn1(self.layer3(f2)))
        # Global average pooling as a whole-map avg_pool2d: at 32 px, bit for bit a fixed AvgPool2d(8) (as CIFAR
        # reference code usually pools), where adaptive pooling (a mean) can differ in the last bit.
        logits = self.linear(torch.flatten(F.avg_pool2d(f3, f3.shape[-2:]), 1))
        return logits, [f1, f2, f3]
