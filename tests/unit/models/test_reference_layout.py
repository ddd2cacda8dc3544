"""Every CIFAR backbone against the reference's definitions: state-dict keys and shapes in order, parameter
counts, tap shapes and the multiply-adds of one forward.

``reference_layout.json`` is written by ``make_reference_layout.py`` from the reference's definitions by plain
arithmetic (not from ``ffsd_fast.models``). Multiply-adds: conv ``C_in/groups · C_out · k² · H_out · W_out`` and
Linear ``in · out`` weight products, per 32 px image, 100 classes.
"""

import json
import pathlib

import pytest
import torch
from torch import nn

from ffsd_fast import models

LAYOUT = json.loads(pathlib.Path(__file__).with_name("reference_layout.json").read_text())
REFERENCE = [name for name, entry in LAYOUT["models"].items() if "state_dict" in entry]
ALL = list(LAYOUT["models"])
SIZE, CLASSES = LAYOUT["image_size"], LAYOUT["num_classes"]

# The numbers of the fixture, written out (a regenerated fixture must still agree with them).
MACS = {
    "resnet20": 40_818_944,
    "resnet32": 69_130_496,
    "resnet56": 125_753_600,
    "resnet110": 253_155_584,
    "wrn16_2": 129_430_016,  # the reference's layout: the stride on conv2, so conv1 runs at the input size
    "wrn40_2": 355_922_432,
    "densenet40": 282_958_368,
    "googlenet": 1_521_848_320,
    "wrn16_2_clean": 101_118_464,  # the stride on conv1
    "wrn40_2_clean": 327_610_880,
}
PARAMS = {
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "wrn16_2": 704_420,
    "wrn40_2": 2_258_084,
    "densenet40": 1_100_428,
    "googlenet": 6_258_500,
    "wrn16_2_clean": 704_420,
    "wrn40_2_clean": 2_258_084,
}
# Tap shapes at 32 px as the reference's forward comments and channel lists give them.
TAPS = {
    **{f"resnet{d}": [(16, 32, 32), (32, 16, 16), (64, 8, 8)] for d in (20, 32, 56, 110)},
    **{n: [(32, 32, 32), (64, 16, 16), (128, 8, 8)] for n in ("wrn16_2", "wrn40_2", "wrn16_2_clean", "wrn40_2_clean")},
    "densenet40": [(168, 32, 32), (312, 16, 16), (456, 8, 8)],
    "googlenet": [(480, 32, 32), (832, 16, 16), (1024, 8, 8)],
}


def test_fixture_numbers():
    assert {n: e["macs"] for n, e in LAYOUT["models"].items()} == MACS
    assert {n: e["params"] for n, e in LAYOUT["models"].items()} == PARAMS
    assert set(TAPS) == set(ALL) and set(ALL) <= set(models.names())
    # The reference's WRN layout costs 1.28x (WRN-16-2) and 1.09x (WRN-40-2) the clean one's multiply-adds.
    assert MACS["wrn16_2"] / MACS["wrn16_2_clean"] == pytest.approx(1.28, abs=0.005)
    assert MACS["wrn40_2"] / MACS["wrn40_2_clean"] == pytest.approx(1.086, abs=0.005)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_keys_and_shapes_equal_the_reference(name):
    reference = LAYOUT["models"][name.removesuffix("_clean")]["state_dict"]
    ours = [[key, list(value.shape)] for key, value in models.create(name, CLASSES).state_dict().items()]
    assert [k for k, _ in ours] == [k for k, _ in reference]
    assert ours == reference


@pytest.mark.parametrize("name", ALL)
def test_parameter_count(name):
    assert sum(p.numel() for p in models.create(name, CLASSES).parameters()) == PARAMS[name]


def _forward_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Multiply-adds per image of the convs and Linear layers, counted with forward hooks on one forward."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += module.in_channels // module.groups * k * output[0].numel()
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            logits, taps = model(x)
    finally:
        for h in handles:
            h.remove()
    assert logits.shape == (x.shape[0], CLASSES)
    return total, taps


@pytest.mark.parametrize("name", ALL)
def test_tap_shapes_and_multiply_adds_equal_the_reference_arithmetic(name):
    model = models.create(name, CLASSES).eval()
    macs, taps = _forward_macs(model, torch.randn(1, 3, SIZE, SIZE))
    assert [tuple(t.shape[1:]) for t in taps] == TAPS[name] == models.tap_shapes(name, SIZE)
    assert macs == MACS[name]


@pytest.mark.parametrize("depth", [16, 40])
def test_wrn_layouts_share_weights_but_not_outputs(depth):
    reference = models.create(f"wrn{depth}_2", CLASSES).eval()
    clean = models.create(f"wrn{depth}_2_clean", CLASSES).eval()
    clean.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        (z_ref, taps_ref), (z_clean, taps_clean) = reference(x), clean(x)
    assert [t.shape for t in taps_ref] == [t.shape for t in taps_clean]
    # The stem and stage 1 (stride 1, projection on 16 -> 32 channels) differ by the shortcut's input only.
    assert not torch.allclose(taps_ref[0], taps_clean[0])
    assert not torch.allclose(z_ref, z_clean)


def test_wrn_reference_block():
    model = models.create("wrn16_2", CLASSES).eval()
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.shortcut[0].stride == (2, 2) and len(model.layer2[1].shortcut) == 0
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        expected = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x)))))) + block.shortcut(x)
        assert torch.equal(block(x), expected)
    clean = models.create("wrn16_2_clean", CLASSES).eval().layer2[0]
    assert clean.conv1.stride == (2, 2) and clean.conv2.stride == (1, 1)
    with torch.no_grad():
        activated = torch.relu(clean.bn1(x))
        expected = clean.conv2(torch.relu(clean.bn2(clean.conv1(activated)))) + clean.shortcut(activated)
        assert torch.equal(clean(x), expected)
