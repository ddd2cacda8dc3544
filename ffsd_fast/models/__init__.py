"""Model registry: build a network by name and work out its tap shapes without running it."""

import itertools

from torch import nn

from ffsd_fast.errors import UserError
from ffsd_fast.models.cifar_resnet import CifarResNet
from ffsd_fast.models.imagenet_resnet import ImageNetResNet

# name -> (family, depth)
_MODELS = {
    "resnet20": ("cifar", 20),
    "resnet32": ("cifar", 32),
    "resnet56": ("cifar", 56),
    "resnet110": ("cifar", 110),
    "resnet18": ("imagenet", 18),
    "resnet34": ("imagenet", 34),
    "resnet50": ("imagenet", 50),
}

# Input size is divided by this before the first tap, then halved per later tap; a size that is a multiple of
# stem reduction * 2**(taps - 1) therefore halves exactly at every stage.
_SIZE_MULTIPLE = {"cifar": 4, "imagenet": 32}


def names() -> list[str]:
    """All model names that `create` accepts."""
    return list(_MODELS)


def _lookup(name: str) -> tuple[str, int]:
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return _MODELS[name]


def family(name: str) -> str:
    """'cifar' or 'imagenet': which stem and stage layout the model uses."""
    return _lookup(name)[0]


def create(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model whose forward returns (logits, list of tap feature maps)."""
    fam, depth = _lookup(name)
    if num_classes < 1:
        raise UserError(f"number of classes must be at least 1, got {num_classes}")
    if fam == "cifar":
        return CifarResNet(depth, num_classes)
    return ImageNetResNet(depth, num_classes)


def default_image_size(name: str) -> int:
    """The input side length the model family is usually trained at."""
    return 32 if family(name) == "cifar" else 224


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def tap_shapes(name: str, image_size: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of each tap for a square input of side `image_size`, by conv arithmetic (no forward pass)."""
    fam, depth = _lookup(name)
    s = image_size
    if fam == "cifar":
        channels = [16, 32, 64]
        strides = [1, 2, 2]
        s = _conv_out(s, 3, 1, 1)
    else:
        channels = [256, 512, 1024, 2048] if depth == 50 else [64, 128, 256, 512]
        strides = [1, 2, 2, 2]
        s = _conv_out(s, 7, 2, 3)
        s = _conv_out(s, 3, 2, 1)
    shapes = []
    for c, stride in zip(channels, strides, strict=True):
        # The 3x3/pad-1 conv and the 1x1/pad-0 shortcut give the same size at any stride.
        s = _conv_out(s, 3, stride, 1)
        shapes.append((c, s, s))
    return shapes


def check_image_size(name: str, image_size: int) -> None:
    """Raise UserError unless every tap is exactly twice the size of the next, as the 2x upsampling decoders need."""
    fam = family(name)
    suggestion = f"use a multiple of {_SIZE_MULTIPLE[fam]} (e.g. {default_image_size(name)})"
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
