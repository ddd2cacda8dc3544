"""Branch networks: a trunk (a backbone's first stages) shared by ``m`` branches (its last stage and classifier).

The split is the public code's: every branch is the last stage plus the classifier, the trunk everything before it
(ONE's ``ONE_ResNet``, Lan1991Xu/ONE_NeurIPS2018 ``models/cifar/resnet.py`` lines 180-188: ``layer1``, ``layer2``
shared, ``layer3_1 … layer3_3`` one per branch; the same in DefangChen/OKDDip-AAAI2020
``models/model_cifar/resnet_one.py`` lines 153-158, whose WRN ``wide_resnet20_8`` is that class too). The ImageNet
ResNets, four stages, branch the same way: ``layer4`` and ``fc`` per branch.

Trunk and branch keep the stock backbone's module names, so that their state-dict keys, joined, are the stock
model's: ``trunk.conv1.weight`` and ``branch.layer3.0.conv1.weight`` are ``conv1.weight`` and
``layer3.0.conv1.weight`` of the backbone. ``trunk + branch i`` exports as the stock network.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast.models.cifar_resnet import CifarResNet
from ffsd_fast.models.imagenet_resnet import ImageNetResNet
from ffsd_fast.models.wrn import WideResNet


class _Part(nn.Module):
    """Some of a backbone's top-level modules, under their own names (so their keys are the backbone's)."""

    def __init__(self, backbone: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, getattr(backbone, name))


class ResNetTrunk(_Part):
    """CIFAR ResNet: stem, ``layer1``, ``layer2``; ImageNet ResNet: stem, max-pool, ``layer1 … layer3``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.relu(self.bn1(self.conv1(x)))
        if hasattr(self, "maxpool"):
            x = self.maxpool(x)
        taps = []
        for name in ("layer1", "layer2", "layer3"):  # those it holds: the last stage is the branches'
            if hasattr(self, name):
                x = getattr(self, name)(x)
                taps.append(x)
        return x, taps


class ResNetBranch(_Part):
    """A ResNet's last stage (``layer3`` or ``layer4``), average pool and ``fc``."""

    # Its first block reads the trunk's output with convolutions only (``conv1`` and the projection shortcut): stacked,
    # the branches take that one tensor as it is (``StackedConv2d``'s dense path), no copies.
    shared_input = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stage = self.layer4 if hasattr(self, "layer4") else self.layer3
        f = stage(x)
        return self.fc(torch.flatten(self.avgpool(f), 1)), [f]


class WideTrunk(_Part):
    """WRN: stem conv, ``layer1``, ``layer2``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f1 = self.layer1(self.conv1(x))
        f2 = self.layer2(f1)
        return f2, [f1, f2]


class WideBranch(_Part):
    """WRN: ``layer3``, the final BN + ReLU, ``linear``."""

    # Its first block starts with a BatchNorm of the trunk's output: stacked, each branch needs its own copy.
    shared_input = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.relu1(self.bn1(self.layer3(x)))
        return self.linear(torch.flatten(F.avg_pool2d(f, f.shape[-2:]), 1)), [f]


def _parts(backbone: nn.Module) -> tuple[type[_Part], tuple[str, ...], type[_Part], tuple[str, ...]]:
    if isinstance(backbone, CifarResNet):
        return ResNetTrunk, ("conv1", "bn1", "relu", "layer1", "layer2"), ResNetBranch, ("layer3", "avgpool", "fc")
    if isinstance(backbone, ImageNetResNet):
        trunk = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
        return ResNetTrunk, trunk, ResNetBranch, ("layer4", "avgpool", "fc")
    if isinstance(backbone, WideResNet):
        return WideTrunk, ("conv1", "layer1", "layer2"), WideBranch, ("layer3", "bn1", "relu1", "linear")
    raise ValueError(f"{type(backbone).__name__} has no trunk and branches (CIFAR ResNets, WRNs, ImageNet ResNets)")


def can_branch(backbone: nn.Module) -> bool:
    """Whether ``split`` takes this backbone."""
    return isinstance(backbone, CifarResNet | ImageNetResNet | WideResNet)


def split(backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(trunk, branch)`` of one backbone, sharing its modules: ``branch(trunk(x)[0])[0]`` is its logits, with
    the same arithmetic. ``trunk(x)``: ``(output, taps of its stages)``; ``branch(x)``: ``(logits, [last map])``."""
    trunk_class, trunk_names, branch_class, branch_names = _parts(backbone)
    return trunk_class(backbone, trunk_names), branch_class(backbone, branch_names)
