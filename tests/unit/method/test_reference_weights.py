"""Weights in the reference implementation's layout load into ours and compute the same function."""

import torch
from torch import nn

from ffsd_fast.method.networks import build_networks
from ffsd_fast.method.reference_weights import fusion_from_reference, leader_from_reference, unwrap


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
    nets = build_networks("resnet20", num_classes=10, num_students=2, image_size=16)
    theirs = ReferenceLayoutBlock(128, 64, num_classes=10).eval()
    _randomise(theirs)
    nets.fusion.load_state_dict(fusion_from_reference(unwrap({"weight": theirs.state_dict()})), strict=True)
    nets.eval()
    maps = [torch.randn(3, 64, 4, 4), torch.randn(3, 64, 4, 4)]
    assert torch.allclose(nets.fusion(maps)[0], theirs(torch.cat(maps, 1)), atol=1e-5)


def test_reference_leader_loads():
    nets = build_networks("resnet20", num_classes=10, num_students=2, image_size=16)
    donor = build_networks("resnet20", num_classes=10, num_students=2, image_size=16)
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
