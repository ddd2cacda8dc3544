"""The ResNets of the registry: names, shapes, parameter counts, init, torchvision compatibility, image sizes."""

import math

import pytest
import torch
import torchvision
from torch import nn

from ffsd_fast import models
from ffsd_fast.errors import UserError

CIFAR = ["resnet20", "resnet32", "resnet56", "resnet110"]
IMAGENET = ["resnet18", "resnet34", "resnet50"]

# Exact counts of this implementation (projection shortcuts) with 100 and 1000 classes.
PARAMS = {
    "resnet20": (278_324, 336_824),
    "resnet32": (472_756, 531_256),
    "resnet56": (861_620, 920_120),
    "resnet110": (1_736_564, 1_795_064),
    "resnet18": (11_227_812, 11_689_512),
    "resnet34": (21_335_972, 21_797_672),
    "resnet50": (23_712_932, 25_557_032),
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_and_families():
    assert models.names() == CIFAR + IMAGENET + [
        "wrn16_2",
        "wrn40_2",
        "densenet40",
        "googlenet",
        "wrn16_2_clean",
        "wrn40_2_clean",
    ]
    assert all(models.family(n) == "cifar" for n in CIFAR)
    assert all(models.family(n) == "imagenet" for n in IMAGENET)


@pytest.mark.parametrize(
    "name,size",
    [(n, s) for n in CIFAR for s in (32, 16, 8, 7, 33)] + [(n, s) for n in IMAGENET for s in (64, 32, 97)],
)
def test_forward_shapes_match_tap_shapes(name, size):
    model = models.create(name, num_classes=10)
    logits, taps = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    assert [tuple(t.shape) for t in taps] == [(2, *s) for s in models.tap_shapes(name, size)]


def test_resnet18_at_224():
    model = models.create("resnet18", num_classes=1000)
    logits, taps = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    assert [tuple(t.shape[1:]) for t in taps] == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    assert models.tap_shapes("resnet18", 224) == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


def test_resnet50_tap_channels():
    assert [c for c, _, _ in models.tap_shapes("resnet50", 224)] == [256, 512, 1024, 2048]


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_parameter_counts(name):
    for classes, expected in zip((100, 1000), PARAMS[name], strict=True):
        assert _count(models.create(name, classes)) == expected


def test_parameter_counts_near_published():
    millions = {n: _count(models.create(n, 100)) / 1e6 for n in CIFAR}
    assert 0.27 < millions["resnet20"] < 0.28
    assert 0.47 < millions["resnet32"] < 0.48
    assert 0.86 < millions["resnet56"] < 0.87
    assert 1.73 < millions["resnet110"] < 1.74


def test_cifar_registration_order_and_projection_shortcut():
    model = models.create("resnet20", 10)
    with_params = [name for name, child in model.named_children() if list(child.parameters())]
    assert with_params == ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"]
    assert next(model.parameters()) is model.conv1.weight
    assert model.layer1[0].downsample is None
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], nn.Conv2d) and shortcut[0].kernel_size == (1, 1) and shortcut[0].stride == (2, 2)
    assert shortcut[0].bias is None and isinstance(shortcut[1], nn.BatchNorm2d)


def test_cifar_init():
    model = models.create("resnet56", 100)
    for conv in (model.layer3[5].conv2, model.layer1[0].conv1, model.conv1, model.layer3[0].downsample[0]):
        k, out = conv.kernel_size[0], conv.out_channels
        expected = math.sqrt(2.0 / (k * k * out))
        tolerance = 0.03 if conv.weight.numel() > 10_000 else 0.15
        assert conv.weight.std().item() == pytest.approx(expected, rel=tolerance)
        assert abs(conv.weight.mean().item()) < 0.1 * expected
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("name", IMAGENET)
def test_torchvision_state_dict_compatible(name):
    ours = models.create(name, 7).eval()
    theirs = getattr(torchvision.models, name)(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)

    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x), rtol=0, atol=0)

    fresh = getattr(torchvision.models, name)(num_classes=7).eval()
    other = models.create(name, 7).eval()
    fresh.load_state_dict(other.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), other(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,size,ok",
    [
        ("resnet18", 224, True),
        ("resnet18", 32, True),
        ("resnet18", 16, False),
        ("resnet50", 64, True),
        ("resnet20", 32, True),
        ("resnet20", 16, True),
        ("resnet20", 8, True),
        ("resnet20", 6, False),
        ("resnet20", 7, False),
        ("resnet20", 0, False),
        ("resnet18", -3, False),
    ],
)
def test_check_image_size(name, size, ok):
    if ok:
        models.check_image_size(name, size)
    else:
        with pytest.raises(UserError, match=str(size)):
            models.check_image_size(name, size)


def test_check_image_size_message():
    with pytest.raises(UserError) as info:
        models.check_image_size("resnet18", 16)
    message = str(info.value)
    assert "resnet18" in message and "16" in message and "4, 2, 1, 1" in message
    assert "use a multiple of 32 (e.g. 32 or 64)" in message
    with pytest.raises(UserError, match=r"use a multiple of 4 \(e\.g\. 28 or 32\)"):
        models.check_image_size("resnet20", 30)


@pytest.mark.parametrize(
    "call",
    [models.create, lambda n, _: models.family(n), lambda n, _: models.tap_shapes(n, 32)],
    ids=["create", "family", "tap_shapes"],
)
def test_unknown_name(call):
    with pytest.raises(UserError) as info:
        call("resnet99", 10)
    message = str(info.value)
    assert "'resnet99'" in message
    assert "known models: " + ", ".join(models.names()) in message


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_no_forward_hooks(name):
    model = models.create(name, 10)
    model(torch.randn(2, 3, 32, 32))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_channels_last_matches_nchw(name):
    model = models.create(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, _ = model(x)
        got, _ = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_float64():
    model = models.create("resnet20", 10).double()
    logits, taps = model(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert logits.dtype == torch.float64 and all(t.dtype == torch.float64 for t in taps)
    logits.sum().backward()
    assert model.conv1.weight.grad.dtype == torch.float64
