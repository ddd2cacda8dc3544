"""ONE, on-the-fly native ensemble (Lan, Zhu & Gong, NeurIPS 2018): ``m`` branches on a shared trunk, a gate that
weighs them, and the gated ensemble of their logits as the teacher of every branch. Branch 1 (with the trunk) is
kept. The loss terms, their defaults and where the public code departs from the paper: ``docs/methods/one.md``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast import models
from ffsd_fast.method.base import LossTerms, Method, NetworkSpec, TermTable, option
from ffsd_fast.method.branched import (
    BranchedMethod,
    sigmoid_rampup,
    stacked_logits,
)
from ffsd_fast.method.registry import register


class Gate(nn.Module):
    """``softmax(relu(bn(fc(avgpool(trunk output)))))`` over the branches: one weight per branch and image.

    The ReLU between the BN and the softmax is the paper's and the code's; ``quirk_one_gate_relu`` off drops it."""

    def __init__(self, channels: int, num_branches: int, relu: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A whole-map average pool, as the code's fixed AvgPool2d(16) is at 32 px.
        scores = self.bn(self.fc(torch.flatten(F.avg_pool2d(x, x.shape[-2:]), 1)))
        return F.softmax(F.relu(scores) if self.relu else scores, dim=1)


@register
class ONE(BranchedMethod):
    """Settings read: ``one_temperature``, ``one_rampup_epochs``, the quirks ``quirk_one_gate_relu`` and
    ``quirk_one_target_epsilon``, ``kernels``."""

    name = "one"
    summary = "ONE: branches on a shared trunk taught by their gated ensemble; branch 1 is kept"
    min_students = (2, "the ensemble needs two branches")
    lambdas = ("one_consistency",)
    labels = {"gated_ensemble": "gated ensemble"}
    nesterov = False  # the code's plain momentum SGD (cifar_one.py line 209)
    # Its CIFAR run (scripts/ONE_ResNet32.sh): 300 epochs, lr 0.1 ×0.1 after epochs 151 and 225, batch 128, wd 1e-4.
    recipe = {
        "cifar10": {"epochs": 300, "lr_milestones": [151, 225]},
        "cifar100": {"epochs": 300, "lr_milestones": [151, 225]},
    }
    # The paper's top-1 of the target branch, 100 − its top-1 error: ImageNet ResNet-18 29.45 % error, one number (Lan
    # et al., NeurIPS 2018, ImageNet table, as the paper's benchmark listings give it: docs/methods/one.md, "Published
    # numbers"). Its CIFAR ResNet-110 is a Bottleneck network, not ffsd-fast's resnet110, and its ResNet-32 number
    # could not be read here: neither is set.
    published = {("imagenet", "resnet18"): (70.55, 70.55)}
    options = {
        "one_temperature": option(float, 3.0, "ONE: temperature of the branches' KL to the ensemble", above=0),
        "one_consistency": option(float, 1.0, "ONE: weight of the branches' KL to the ensemble", at_least=0),
        "one_rampup_epochs": option(
            int, 80, "ONE: the KL weight ramps up as exp(−5(1 − e/L)²) over the 0-based epochs e ≤ L", at_least=0
        ),
        "quirk_one_gate_relu": option(
            bool, True, "ONE: a ReLU between the gate's BN and softmax, as the paper and the code have"
        ),
        "quirk_one_target_epsilon": option(
            bool, True, "ONE: add 1e-7 to the ensemble's softened probabilities in the KL, as the code does"
        ),
    }
    defaults = {**Method.defaults}

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        channels = models.tap_shapes(spec.model, spec.image_size)[-2][0]  # the trunk's output: the second-last stage
        self.gate = Gate(channels, spec.num_students, self.settings["quirk_one_gate_relu"])

    def helpers(self) -> list[nn.Module]:
        return [self.gate]

    def epoch_lambdas(self, epoch: int) -> dict[str, float]:
        # The code ramps by the 0-based epoch (cifar_one.py line 284, utils/ramps.py lines 4-11).
        ramp = sigmoid_rampup(epoch - 1, self.settings["one_rampup_epochs"])
        return {"one_consistency": self.settings["one_consistency"] * ramp}

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        shared, _ = self.trunk(images)
        logits = {f"student{i}": branch(shared)[0] for i, branch in enumerate(self.students)}
        gate = self.gate(shared)
        logits["gated_ensemble"] = torch.einsum("bm,mbk->bk", gate, torch.stack(list(logits.values())))
        return logits

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor) -> LossTerms:
        shared, logits, _ = self.branches(images)
        z = stacked_logits(logits)  # [m, B, K]
        gate = self.gate(shared)  # [B, m]
        # The teacher is not detached where it is trained: its CE reaches the branches, the gate and the trunk.
        ensemble = torch.einsum("bm,mbk->bk", gate, z)
        epsilon = 1e-7 if self.settings["quirk_one_target_epsilon"] else 0.0
        # [2m]: every branch's CE, then its KL to the detached ensemble (one grouped op: ffsd_kernels.branch_group).
        losses = self.ops.branch_distillation_losses(
            z, ensemble.detach(), labels, self.settings["one_temperature"], epsilon
        )
        m, parts = len(logits), losses.unbind()  # views; the backward stacks their gradients in one op
        terms = TermTable(self.form.distances())
        for i in range(m):
            terms.add(f"student{i}.ce", parts[i])
            terms.add(f"student{i}.kl", parts[m + i], lambdas[0])
        terms.add("ensemble.ce", F.cross_entropy(ensemble, labels))
        return terms.total(lambdas)
