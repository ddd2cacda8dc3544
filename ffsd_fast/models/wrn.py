"""Wide ResNet WRN-d-k for small images, pre-activation blocks, returning the three stage outputs as taps."""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast.models.init import reference_conv_init_


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3×3, BN-ReLU-conv3×3 plus a shortcut; convs carry a bias.

    Where the shape changes, the shortcut is a 1×1 conv (with bias, no BN) on the *activated* input
    ``relu(bn1(x))``; otherwise it is the identity on ``x``. Returns the pre-activation sum.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        identity = x if self.shortcut is None else self.shortcut(activated)
        return identity + out


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        *[
            _PreActBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
            for i in range(blocks)
        ]
    )


class WideResNet(nn.Module):
    """WRN-d-k: stem conv 3→16, then (d−4)/6 pre-activation blocks per stage at 16k/32k/64k channels, strides 1/2/2.

    Taps: the stage-1 and stage-2 outputs (pre-activation sums) and the stage-3 output after the final BN+ReLU.
    **(quirk)** The final BN has ``momentum=0.9``, as in the reference. Dropout is 0, so there is none.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen factor must be at least 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1)
        self.block1 = _stage(16, widths[0], n, stride=1)
        self.block2 = _stage(widths[0], widths[1], n, stride=2)
        self.block3 = _stage(widths[1], widths[2], n, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[2], momentum=0.9)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[2], num_classes)

        reference_conv_init_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.conv1(x)
        f1 = self.block1(x)
        f2 = self.block2(f1)
        f3 = self.relu(self.bn1(self.block3(f2)))
        # Global average pooling as a whole-map avg_pool2d: at 32 px, bit for bit a fixed AvgPool2d(8) (as CIFAR
        # reference code usually pools), where adaptive pooling (a mean) can differ in the last bit.
        logits = self.fc(torch.flatten(F.avg_pool2d(f3, f3.shape[-2:]), 1))
        return logits, [f1, f2, f3]
