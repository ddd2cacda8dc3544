"""Trunk and branch are the backbone cut in two: the same logits, and between them exactly its state dict."""

import pytest
import torch

from ffsd_fast import models
from ffsd_fast.models.branching import can_branch, split


@pytest.mark.parametrize(
    "name,size,branch_first",
    [
        ("resnet20", 16, "layer3.0.conv1.weight"),
        ("wrn16_2", 16, "layer3.0.bn1.weight"),
        ("wrn16_2_clean", 16, "layer3.0.bn1.weight"),
        ("resnet18", 32, "layer4.0.conv1.weight"),
    ],
)
def test_trunk_then_branch_is_the_backbone(name, size, branch_first):
    torch.manual_seed(0)
    backbone = models.create(name, 10).eval()
    trunk, branch = split(backbone)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        shared, taps = trunk(x)
        logits, (last,) = branch(shared)
        expected, expected_taps = backbone(x)
    assert torch.equal(logits, expected)
    assert [t.shape for t in [*taps, last]] == [t.shape for t in expected_taps]
    keys = [*trunk.state_dict(), *branch.state_dict()]
    assert sorted(keys) == sorted(backbone.state_dict())  # disjoint, and together the stock keys
    assert next(iter(branch.state_dict())) == branch_first


def test_only_the_staged_backbones_branch():
    assert not can_branch(models.create("densenet40", 10))
    with pytest.raises(ValueError, match="no trunk and branches"):
        split(models.create("googlenet", 10))
