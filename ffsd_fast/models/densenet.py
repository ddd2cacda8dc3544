"""DenseNet for small images (no bottleneck, no compression), returning the three dense blocks' outputs as taps."""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast.models.channels import cat_channels
from ffsd_fast.models.init import reference_conv_init_


class _DenseLayer(nn.Module):
    """BN-ReLU-conv3×3 producing ``growth`` channels, concatenated after its input (``cat_channels``: the same
    ``torch.cat``, kept network by network when stacked)."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cat_channels([x, self.conv1(self.relu(self.bn1(x)))])


class _Transition(nn.Module):
    """BN-ReLU-conv1×1 (same channel count: no compression), then 2×2 average pooling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


def _dense_block(in_channels: int, layers: int, growth: int) -> nn.Sequential:
    return nn.Sequential(*[_DenseLayer(in_channels + i * growth, growth) for i in range(layers)])


def densenet_tap_channels(depth: int, growth: int) -> list[int]:
    """Channels after dense blocks 1, 2 and 3: stem 2·growth, each block adds (depth − 4) / 3 · growth."""
    per_block = (depth - 4) // 3 * growth
    return [2 * growth + per_block, 2 * growth + 2 * per_block, 2 * growth + 3 * per_block]


class DenseNet(nn.Module):
    """DenseNet-d with growth k: stem conv3×3 3→2k, three dense blocks of (d−4)/3 layers, two transitions.

    Taps: dense block 1's and 2's outputs (before their transitions), and dense block 3's output after the final
    BN+ReLU; then global average pooling and a Linear. DenseNet-40, k = 12: 168/312/456 channels at 32/16/8 px.
    Parameter names and order are the reference's: ``conv1``, ``dense{1,2,3}.{i}.{bn1,conv1}``,
    ``trans{1,2}.{bn1,conv1}``, ``bn``, ``fc``.
    """

    def __init__(self, depth: int, growth: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 3 != 0 or depth < 7:
            raise ValueError(f"DenseNet depth must be 3n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 3
        c1, c2, c3 = densenet_tap_channels(depth, growth)
        self.conv1 = nn.Conv2d(3, 2 * growth, kernel_size=3, padding=1, bias=False)
        self.dense1 = _dense_block(2 * growth, n, growth)
        self.trans1 = _Transition(c1)
        self.dense2 = _dense_block(c1, n, growth)
        self.trans2 = _Transition(c2)
        self.dense3 = _dense_block(c2, n, growth)
        self.bn = nn.BatchNorm2d(c3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c3, num_classes)

        reference_conv_init_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.conv1(x)
        f1 = self.dense1(x)
        f2 = self.dense2(self.trans1(f1))
        f3 = self.relu(self.bn(self.dense3(self.trans2(f2))))
        # Global average pooling as a whole-map avg_pool2d: at 32 px, bit for bit a fixed AvgPool2d(8) (as CIFAR
        # reference code usually pools), where adaptive pooling (a mean) can differ in the last bit.
        logits = self.fc(torch.flatten(F.avg_pool2d(f3, f3.shape[-2:]), 1))
        return logits, [f1, f2, f3]
