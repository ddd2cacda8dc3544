"""Model registry: build a network by name and work out its tap shapes without running it."""

import itertools

from torch import nn

from ffsd_fast.errors import UserError
from ffsd_fast.models.cifar_resnet import CifarResNet
from ffsd_fast.models.densenet import DenseNet, densenet_tap_channels
from ffsd_fast.models.googlenet import GOOGLENET_TAP_CHANNELS, GoogLeNet
from ffsd_fast.models.imagenet_resnet import ImageNetResNet
from ffsd_fast.models.wrn import WideResNet

# name -> (family, architecture, depth, width); the family decides the input size, the architecture the layout.
# width: WRN's widen factor k, DenseNet's growth rate k, unused (0) elsewhere.
_MODELS = {
    "resnet20": ("cifar", "resnet", 20, 0),
    "resnet32": ("cifar", "resnet", 32, 0),
    "resnet56": ("cifar", "resnet", 56, 0),
    "resnet110": ("cifar", "resnet", 110, 0),
    "resnet18": ("imagenet", "resnet", 18, 0),
    "resnet34": ("imagenet", "resnet", 34, 0),
    "resnet50": ("imagenet", "resnet", 50, 0),
    "wrn16_2": ("cifar", "wrn", 16, 2),
    "wrn40_2": ("cifar", "wrn", 40, 2),
    "densenet40": ("cifar", "densenet", 40, 12),
    "googlenet": ("cifar", "googlenet", 22, 0),
    # The WRNs in the common pre-activation layout (stride on the first conv, projection on relu(bn1(x))); the
    # names above build the reference's layout (quirk; docs/quirks.md). Same parameters, so the same checkpoints.
    "wrn16_2_clean": ("cifar", "wrn_clean", 16, 2),
    "wrn40_2_clean": ("cifar", "wrn_clean", 40, 2),
}

# Input size is divided by this before the first tap, then halved per later tap; a size that is a multiple of
# stem reduction * 2**(taps - 1) therefore halves exactly at every stage.
_SIZE_MULTIPLE = {"cifar": 4, "imagenet": 32}


def names() -> list[str]:
    """All model names that `create` accepts."""
    return list(_MODELS)


def _lookup(name: str) -> tuple[str, str, int, int]:
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return _MODELS[name]


def family(name: str) -> str:
    """'cifar' (small images, 32 px; no downsampling stem) or 'imagenet' (224 px; stride-4 stem)."""
    return _lookup(name)[0]


def create(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model whose forward returns (logits, list of tap feature maps)."""
    fam, arch, depth, width = _lookup(name)
    if num_classes < 1:
        raise UserError(f"number of classes must be at least 1, got {num_classes}")
    if arch in ("wrn", "wrn_clean"):
        return WideResNet(depth, width, num_classes, layout="clean" if arch == "wrn_clean" else "reference")
    if arch == "densenet":
        return DenseNet(depth, width, num_classes)
    if arch == "googlenet":
        return GoogLeNet(num_classes)
    if fam == "cifar":
        return CifarResNet(depth, num_classes)
    return ImageNetResNet(depth, num_classes)


# Why an architecture cannot run as stacked networks (``models.stacking``), by architecture: e.g. a forward that
# concatenates channels with a plain torch.cat rather than ``models.channels.cat_channels``. None in the zoo today.
_STACK_BLOCKERS: dict[str, str] = {}


def stack_blocker(name: str) -> str | None:
    """Why ``name`` cannot be stacked (``models.stacking``), or None when it can: a plain concatenation over
    channels, say, would interleave the stacked networks' channels, which a grouped convolution needs network by
    network."""
    return _STACK_BLOCKERS.get(_lookup(name)[1])


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def tap_shapes(name: str, image_size: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of each tap for a square input of side `image_size`, by conv arithmetic (no forward pass)."""
    fam, arch, depth, width = _lookup(name)
    s = image_size
    if arch == "densenet":
        # Stem and dense layers keep the size; each transition's AvgPool2d(2) floors it to half.
        sizes = [s, s // 2, s // 4]
        return [(c, h, h) for c, h in zip(densenet_tap_channels(depth, width), sizes, strict=True)]
    if arch == "googlenet":
        # Stem and inception modules keep the size; max-pool(3, stride 2, pad 1) after 3b and 4e.
        sizes = [s, _conv_out(s, 3, 2, 1), _conv_out(_conv_out(s, 3, 2, 1), 3, 2, 1)]
        return [(c, h, h) for c, h in zip(GOOGLENET_TAP_CHANNELS, sizes, strict=True)]
    if fam == "cifar":  # CIFAR ResNet and WRN (either layout): the same strides, WRN k times wider
        channels = [16 * width, 32 * width, 64 * width] if arch in ("wrn", "wrn_clean") else [16, 32, 64]
        strides = [1, 2, 2]
        s = _conv_out(s, 3, 1, 1)
    else:
        channels = [256, 512, 1024, 2048] if depth == 50 else [64, 128, 256, 512]
        strides = [1, 2, 2, 2]
        s = _conv_out(s, 7, 2, 3)
        s = _conv_out(s, 3, 2, 1)
    shapes = []
    for c, stride in zip(channels, strides, strict=True):
        # The 3x3/pad-1 conv and the 1x1/pad-0 shortcut give the same size at any stride (in the reference's WRN
        # layout the stride sits on the block's second 3x3 conv, the first keeping the size: the same result).
        s = _conv_out(s, 3, stride, 1)
        shapes.append((c, s, s))
    return shapes


def check_image_size(name: str, image_size: int) -> None:
    """Raise UserError unless every tap is exactly twice the size of the next, as the 2x upsampling decoders need."""
    multiple = _SIZE_MULTIPLE[family(name)]
    # The multiples on either side of the size asked for (the two smallest below the multiple itself): every
    # multiple halves exactly, so either suits.
    below = max(multiple, image_size // multiple * multiple)
    suggestion = f"use a multiple of {multiple} (e.g. {below} or {below + multiple})"
    if image_size < 1:
        raise UserError(f"image size {image_size} does not suit model {name}: it must be at least 1; {suggestion}")
    sizes = [h for _, h, _ in tap_shapes(name, image_size)]
    ok = all(s >= 1 for s in sizes) and all(a == 2 * b for a, b in itertools.pairwise(sizes))
    if not ok:
        raise UserError(
            f"image size {image_size} does not suit model {name}: its tap sizes would be "
            f"({', '.join(map(str, sizes))}), but each must be exactly twice the next (the decoders upsample 2x "
            f"per stage); {suggestion}"
        )
