"""GoogLeNet for small images (no downsampling stem), returning the outputs of inception 3b, 4e and 5b as taps."""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast.models.channels import cat_channels
from ffsd_fast.models.init import reference_conv_init_


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class Inception(nn.Module):
    """Four branches concatenated: 1×1; 1×1→3×3; 1×1→3×3→3×3 (the "5×5" branch); 3×3 max-pool (stride 1)→1×1.

    Every conv carries a bias and is followed by BN+ReLU. Out channels: ``n1 + n3 + n5 + pool_proj``.
    """

    def __init__(
        self, in_channels: int, n1: int, n3_reduce: int, n3: int, n5_reduce: int, n5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.branch1x1 = nn.Sequential(*_conv_bn_relu(in_channels, n1, 1))
        self.branch3x3 = nn.Sequential(*_conv_bn_relu(in_channels, n3_reduce, 1), *_conv_bn_relu(n3_reduce, n3, 3))
        self.branch5x5 = nn.Sequential(
            *_conv_bn_relu(in_channels, n5_reduce, 1), *_conv_bn_relu(n5_reduce, n5, 3), *_conv_bn_relu(n5, n5, 3)
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu(in_channels, pool_proj, 1)
        )
        self.out_channels = n1 + n3 + n5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.cat over channels, kept network by network when stacked (models.channels)
        return cat_channels([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(x)])


# (in, 1×1, 3×3 reduce, 3×3, "5×5" reduce, "5×5", pool projection): the standard GoogLeNet numbers.
_CONFIG = {
    "a3": (192, 64, 96, 128, 16, 32, 32),
    "b3": (256, 128, 128, 192, 32, 96, 64),
    "a4": (480, 192, 96, 208, 16, 48, 64),
    "b4": (512, 160, 112, 224, 24, 64, 64),
    "c4": (512, 128, 128, 256, 24, 64, 64),
    "d4": (512, 112, 144, 288, 32, 64, 64),
    "e4": (528, 256, 160, 320, 32, 128, 128),
    "a5": (832, 256, 160, 320, 32, 128, 128),
    "b5": (832, 384, 192, 384, 48, 128, 128),
}

# Channels after inception 3b, 4e and 5b.
GOOGLENET_TAP_CHANNELS = [480, 832, 1024]


class GoogLeNet(nn.Module):
    """CIFAR GoogLeNet: stem conv3×3 3→192 + BN + ReLU at full resolution, inception 3a–3b, max-pool(3, 2, 1),
    4a–4e, max-pool(3, 2, 1), 5a–5b, global average pooling, Linear(1024, classes).
    Parameter names and order are the reference's: ``pre_layers``, ``inception_{a3,b3,a4,…,b5}`` (branches
    ``branch1x1``, ``branch3x3``, ``branch5x5``, ``branch_pool``), ``linear``.

    Taps: 480/832/1024 channels at 32/16/8 px (after 3b, 4e, 5b). The reference pools with ``AvgPool2d(8,
    stride=1)``; here the kernel is the whole last-stage map, which at 32 px is that very op (bit-identical, unlike
    adaptive pooling, which takes a mean and differs in the last bit) and at other multiples of 4 is still the
    global average.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.pre_layers = nn.Sequential(*_conv_bn_relu(3, 192, 3))
        self.inception_a3 = Inception(*_CONFIG["a3"])
        self.inception_b3 = Inception(*_CONFIG["b3"])
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception_a4 = Inception(*_CONFIG["a4"])
        self.inception_b4 = Inception(*_CONFIG["b4"])
        self.inception_c4 = Inception(*_CONFIG["c4"])
        self.inception_d4 = Inception(*_CONFIG["d4"])
        self.inception_e4 = Inception(*_CONFIG["e4"])
        self.inception_a5 = Inception(*_CONFIG["a5"])
        self.inception_b5 = Inception(*_CONFIG["b5"])
        self.linear = nn.Linear(1024, num_classes)

        reference_conv_init_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.pre_layers(x)
        f1 = self.inception_b3(self.inception_a3(x))
        x = self.maxpool1(f1)
        x = self.inception_a4(x)
        f2 = self.inception_e4(self.inception_d4(self.inception_c4(self.inception_b4(x))))
        x = self.maxpool2(f2)
        f3 = self.inception_b5(self.inception_a5(x))
        logits = self.linear(torch.flatten(F.avg_pool2d(f3, f3.shape[-2:]), 1))
        return logits, [f1, f2, f3]
