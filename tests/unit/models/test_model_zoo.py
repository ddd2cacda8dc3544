"""The CIFAR backbones besides ResNet: WRN-16-2, WRN-40-2, DenseNet-40 (k = 12) and CIFAR GoogLeNet."""

import math

import pytest
import torch
from torch import nn

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.step.optimizers import make_optimizers
from tests.helpers.methods import build, train_step

ZOO = ["wrn16_2", "wrn40_2", "densenet40", "googlenet"]
CLEAN = ["wrn16_2_clean", "wrn40_2_clean"]  # the WRNs' clean block layout: the same parameters

TAPS_AT_32 = {
    "wrn16_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "wrn40_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "densenet40": [(168, 32, 32), (312, 16, 16), (456, 8, 8)],
    "googlenet": [(480, 32, 32), (832, 16, 16), (1024, 8, 8)],
}

# Exact counts of this implementation with 100 and 10 classes.
PARAMS = {
    "wrn16_2": (704_420, 692_810),
    "wrn40_2": (2_258_084, 2_246_474),
    "densenet40": (1_100_428, 1_059_298),
    "googlenet": (6_258_500, 6_166_250),
}

# Published sizes in millions (WRN paper, DenseNet paper's 1.0 M is 1.06 M with 10 classes, CIFAR GoogLeNet ~6.2 M).
PUBLISHED = {"wrn16_2": (0.70, 100), "wrn40_2": (2.2, 100), "densenet40": (1.06, 10), "googlenet": (6.2, 10)}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_as_cifar_models():
    assert models.names()[-6:] == ZOO + CLEAN
    for name in ZOO + CLEAN:
        assert models.family(name) == "cifar"
        assert models.tap_shapes(name, 32) == TAPS_AT_32[name.removesuffix("_clean")]


def _classifier(model: nn.Module) -> nn.Linear:
    return model.fc if hasattr(model, "fc") else model.linear  # the reference's names: fc (DenseNet), linear


@pytest.mark.parametrize("name", ZOO + CLEAN)
def test_forward_at_32(name):
    model = models.create(name, num_classes=100).eval()
    with torch.no_grad():
        logits, taps = model(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 100)
        assert [tuple(t.shape) for t in taps] == [(2, *s) for s in models.tap_shapes(name, 32)]
        # The whole-map pool is bit for bit the fixed AvgPool2d(8, stride=1) at 32 px.
        pooled = nn.AvgPool2d(8, stride=1)(taps[-1])
        assert torch.equal(logits, _classifier(model)(torch.flatten(pooled, 1)))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "name,size",
    [(n, s) for n in ZOO + CLEAN for s in (16, 8)] + [("wrn16_2", 12), ("wrn16_2_clean", 12), ("densenet40", 20)],
)
def test_forward_shapes_match_tap_shapes(name, size):
    model = models.create(name, num_classes=10)
    logits, taps = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    assert [tuple(t.shape) for t in taps] == [(2, *s) for s in models.tap_shapes(name, size)]


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(
    "size,ok",
    [
        (32, True),
        (64, True),
        (16, True),
        (8, True),
        (4, True),
        (30, False),
        (7, False),
        (6, False),
        (2, False),
        (0, False),
    ],
)
def test_check_image_size(name, size, ok):
    if ok:
        models.check_image_size(name, size)
    else:
        with pytest.raises(UserError, match=str(size)):
            models.check_image_size(name, size)


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts(name):
    for classes, expected in zip((100, 10), PARAMS[name], strict=True):
        assert _count(models.create(name, classes)) == expected
    published, classes = PUBLISHED[name]
    assert _count(models.create(name, classes)) / 1e6 == pytest.approx(published, rel=0.03)


@pytest.mark.parametrize("name", ["wrn16_2", "wrn40_2", *CLEAN])
def test_wrn_layout(name):
    model = models.create(name, 10)
    final_momentum = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.bn1.momentum == 0.9 and final_momentum[-1] == 0.9
    assert all(m == 0.1 for m in final_momentum[:-1])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is not None for c in convs)
    n = (int(name[3:5]) - 4) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    # A 1x1 projection shortcut (bias, no BN) wherever the shape changes: 16 -> 32, 32 -> 64 (stride 2), 64 -> 128.
    for stage, stride in ((model.layer1, 1), (model.layer2, 2), (model.layer3, 2)):
        (shortcut,) = stage[0].shortcut
        assert isinstance(shortcut, nn.Conv2d) and shortcut.kernel_size == (1, 1) and shortcut.stride == (stride,) * 2
        assert all(len(block.shortcut) == 0 for block in stage[1:])
    assert next(model.parameters()) is model.conv1.weight


@pytest.mark.parametrize("name", ["wrn16_2", "wrn16_2_clean"])
def test_wrn_taps_are_pre_activation_sums(name):
    model = models.create(name, 10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, (f1, f2, f3) = model(x)
        assert torch.equal(f1, model.layer1(model.conv1(x)))
        assert (f1 < 0).any() and (f2 < 0).any() and (f3 >= 0).all()
        assert torch.equal(f3, torch.relu(model.bn1(model.layer3(f2))))


def test_conv_biases():
    googlenet = models.create("googlenet", 10)
    assert all(m.bias is not None for m in googlenet.modules() if isinstance(m, nn.Conv2d))
    densenet = models.create("densenet40", 10)
    assert all(m.bias is None for m in densenet.modules() if isinstance(m, nn.Conv2d))


def test_densenet_layout():
    model = models.create("densenet40", 10)
    assert [len(model.dense1), len(model.dense2), len(model.dense3)] == [12, 12, 12]
    assert model.conv1.out_channels == 24
    assert model.trans1.conv1.in_channels == model.trans1.conv1.out_channels == 168
    assert model.trans2.conv1.in_channels == model.trans2.conv1.out_channels == 312
    assert model.fc.in_features == 456


def test_googlenet_inception_channels():
    model = models.create("googlenet", 10)
    outs = {
        k: getattr(model, f"inception_{k}").out_channels for k in ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5")
    }
    assert outs == {"a3": 256, "b3": 480, "a4": 512, "b4": 512, "c4": 512, "d4": 528, "e4": 832, "a5": 832, "b5": 1024}
    # The "5x5" branch is 1x1 -> 3x3 -> 3x3.
    branch = model.inception_a3.branch5x5
    assert [m.kernel_size for m in branch if isinstance(m, nn.Conv2d)] == [(1, 1), (3, 3), (3, 3)]
    assert model.pre_layers[0].out_channels == 192 and model.pre_layers[0].stride == (1, 1)


@pytest.mark.parametrize("name", ZOO)
def test_init(name):
    model = models.create(name, 100)
    big = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 10_000]
    assert big
    for conv in big[-3:]:
        k, out = conv.kernel_size[0], conv.out_channels
        expected = math.sqrt(2.0 / (k * k * out))
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        assert not m._forward_hooks and not m._forward_pre_hooks


# GoogLeNet's step takes ~3 s on a CPU: slow.
@pytest.mark.parametrize("name", [*ZOO[:-1], "wrn16_2_clean", pytest.param("googlenet", marks=pytest.mark.slow)])
def test_ffsd_step(name):
    nets = build(name, num_classes=10, num_students=2, image_size=32)
    optimizers = make_optimizers(nets)
    before = [p.detach().clone() for p in nets.leader.backbone.parameters()]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    terms = train_step(nets, optimizers, x, y, torch.tensor([1e-5, 1000.0, 10.0]))
    assert torch.isfinite(terms.total)
    assert all(torch.isfinite(v).all() for v in terms.values.values())
    after = list(nets.leader.backbone.parameters())
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert changed > len(before) // 2
