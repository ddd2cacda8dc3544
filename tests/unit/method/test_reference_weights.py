"""Weights in the reference implementation's layout load into ours and compute the same function."""

import json
import pathlib

import pytest
import torch
from torch import nn

from ffsd_fast.method.reference_weights import (
    fusion_from_reference,
    leader_from_reference,
    student_from_reference,
    unwrap,
)
from tests.helpers.methods import build


class ReferenceLayoutBlock(nn.Module):
    """The attribute layout of the reference's FusionModule / TransFusionModule, written from its description."""

    def __init__(self, in_channels, out_channels, num_classes=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1_1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn1_1 = nn.BatchNorm2d(out_channels)
        if num_classes:
            self.fc2 = nn.Linear(out_channels, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1_1(self.conv1_1(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc2(x.mean((2, 3))) if hasattr(self, "fc2") else x


def _randomise(module):
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)


def test_reference_fusion_module_loads():
    nets = build("resnet20", num_classes=10, num_students=2, image_size=16)
    theirs = ReferenceLayoutBlock(128, 64, num_classes=10).eval()
    _randomise(theirs)
    nets.fusion.load_state_dict(fusion_from_reference(unwrap({"weight": theirs.state_dict()})), strict=True)
    nets.eval()
    maps = [torch.randn(3, 64, 4, 4), torch.randn(3, 64, 4, 4)]
    assert torch.allclose(nets.fusion(maps)[0], theirs(torch.cat(maps, 1)), atol=1e-5)


def test_reference_leader_loads():
    nets = build("resnet20", num_classes=10, num_students=2, image_size=16)
    donor = build("resnet20", num_classes=10, num_students=2, image_size=16)
    head = ReferenceLayoutBlock(64, 128)
    _randomise(head)
    state = {f"module.{k}": v for k, v in donor.leader.backbone.state_dict().items()}
    state.update({f"module.trans_fusion_module.{k}": v for k, v in head.state_dict().items()})
    nets.leader.load_state_dict(leader_from_reference(unwrap(state)), strict=True)
    nets.eval()
    donor.eval()
    head.eval()
    x = torch.randn(2, 3, 16, 16)
    logits, taps, tau = nets.leader(x)
    assert torch.equal(logits, donor.leader.backbone(x)[0])
    assert torch.allclose(tau, head(taps[-1]), atol=1e-5)


# The reference's state-dict keys and shapes of every CIFAR backbone, written from its definitions
# (tests/unit/models/make_reference_layout.py).
_LAYOUT = json.loads((pathlib.Path(__file__).parents[1] / "models" / "reference_layout.json").read_text())["models"]


def _reference_backbone_state(name: str, num_classes: int) -> dict[str, torch.Tensor]:
    state = {}
    for key, shape in _LAYOUT[name.removesuffix("_clean")]["state_dict"]:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        else:
            if key.startswith(("fc.", "linear.")):  # the fixture's classifier is for 100 classes
                shape = [num_classes, *shape[1:]]
            state[key] = torch.rand(shape) + 0.5  # positive: a valid running_var
    return state


# The deeper variants of one family take the same path, at 5-8 s each on a CPU: slow.
_SLOW = ("resnet56", "resnet110", "wrn40_2")


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in _LAYOUT if "state_dict" in _LAYOUT[n]],
)
def test_reference_checkpoint_of_every_backbone_loads(name):
    nets = build(name, num_classes=10, num_students=2, image_size=16)
    backbone = _reference_backbone_state(name, 10)
    channels = nets.leader.head[0].in_channels
    head = ReferenceLayoutBlock(channels, 2 * channels)
    _randomise(head)
    student = nets.students[1]
    student.load_state_dict(student_from_reference(unwrap({"weight": backbone})), strict=True)
    leader = {**backbone, **{f"trans_fusion_module.{k}": v for k, v in head.state_dict().items()}}
    nets.leader.load_state_dict(leader_from_reference(unwrap({"weight": leader})), strict=True)
    for key, value in student.state_dict().items():
        assert torch.equal(value, backbone[key]), key
    nets.eval()
    head.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, taps, tau = nets.leader(x)
        assert torch.equal(logits, student(x)[0])
        assert torch.allclose(tau, head(taps[-1]), atol=1e-5)
