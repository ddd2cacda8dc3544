"""CIFAR ResNet-(6n+2) with a projection shortcut, returning the three stage outputs as taps."""

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from ffsd_fast.models.init import reference_conv_init_


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = []
    for i in range(blocks):
        block_in = in_channels if i == 0 else out_channels
        block_stride = stride if i == 0 else 1
        downsample = None
        if block_stride != 1 or block_in != out_channels:
            # Projection (1x1 conv + BN) rather than zero padding, as in the reference implementation.
            downsample = nn.Sequential(
                nn.Conv2d(block_in, out_channels, kernel_size=1, stride=block_stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers.append(BasicBlock(block_in, out_channels, stride=block_stride, downsample=downsample))
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet for small images: 16/32/64 channels, n BasicBlocks per stage, depth = 6n + 2."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, n, stride=1)
        self.layer2 = _stage(16, 32, n, stride=2)
        self.layer3 = _stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

        reference_conv_init_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        logits = self.fc(torch.flatten(self.avgpool(f3), 1))
        return logits, [f1, f2, f3]
