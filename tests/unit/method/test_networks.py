"""FFSD's networks: shapes from the registry, the reference's parameter names and init, the probe quirk."""

import math

import pytest
import torch

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.method.ffsd import SelfDistillationDecoder
from tests.helpers.methods import build


@pytest.mark.parametrize("model,size", [("resnet20", 32), ("resnet32", 16), ("resnet18", 64), ("resnet50", 64)])
def test_decoders_reconstruct_every_shallower_tap(model, size):
    taps = models.tap_shapes(model, size)
    decoder = SelfDistillationDecoder([c for c, _, _ in taps])
    outputs = decoder(torch.randn(2, *taps[-1]))
    assert [tuple(g.shape[1:]) for g in outputs] == taps[:-1]


def test_decoder_parameter_names_are_the_references():
    keys = set(SelfDistillationDecoder([16, 32, 64]).state_dict())
    assert {"layer0.convtranpose.weight", "layer0.norm.running_mean", "layer1.convtranpose.weight"} <= keys
    assert not any(k.startswith("layer2") for k in keys)


@pytest.mark.parametrize("m", [2, 3])
def test_fusion_module_and_leader_head_shapes(m):
    nets = build("resnet20", num_classes=7, num_students=m, image_size=16)
    maps = [torch.randn(4, 64, 4, 4) for _ in range(m)]
    logits, fused = nets.fusion(maps)
    assert logits.shape == (4, 7) and fused.shape == (4, 64, 4, 4)
    z, taps, tau = nets.leader(torch.randn(4, 3, 16, 16))
    assert tau.shape == (4, 64 * m, 4, 4) and len(taps) == 3
    assert len(nets.decoders) == m - 1
    assert nets.fusion.block[0].groups == 64 * m  # depthwise


def test_fusion_and_head_use_the_reference_conv_init():
    nets = build("resnet20", num_classes=10, num_students=2, image_size=32)
    pointwise = nets.fusion.block[3].weight  # 1×1, 128 → 64
    assert pointwise.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    head = nets.leader.head[3].weight  # 1×1, 64 → 128
    assert head.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    assert torch.equal(nets.fusion.block[1].weight, torch.ones(128))


def test_probe_forward_quirk_moves_student_one_statistics_only():
    torch.manual_seed(3)
    quirky = build("resnet20", num_classes=10, num_students=2, image_size=32)
    torch.manual_seed(3)
    clean = build("resnet20", num_classes=10, num_students=2, image_size=32, probe_forward=False)
    assert quirky.students[0].bn1.num_batches_tracked.item() == 1
    assert clean.students[0].bn1.num_batches_tracked.item() == 0
    assert quirky.students[1].bn1.num_batches_tracked.item() == 0
    assert torch.equal(quirky.students[0].conv1.weight, clean.students[0].conv1.weight)
    # It consumes random numbers: what is built after it differs.
    assert not torch.equal(quirky.leader.backbone.conv1.weight, clean.leader.backbone.conv1.weight)


def test_one_student_is_refused():
    with pytest.raises(UserError, match="at least 2"):
        build("resnet20", num_classes=10, num_students=1, image_size=32)
