"""What the branch methods share (ONE and the methods built like it): ``m`` branches on one trunk.

Student ``i`` is the trunk followed by branch ``i`` (``models.branching``); ``students[i]`` holds the branch, under
the stock backbone's module names, so that ``trunk.*`` and ``students.0.*`` together are the stock model's state
dict, which is what ``ffsd-export`` writes (``deployed_prefix``). The trunk runs once a step; the branches are the
``branches`` group of ``stack_groups``, run one by one or stacked like any other networks.
"""

import math

import torch
from torch import nn

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.method.base import Method, NetworkSpec, ParamGroup
from ffsd_fast.method.forms import Group
from ffsd_fast.models.branching import can_branch, split


class BranchedMethod(Method):
    """``trunk`` and ``students`` (the branches); a subclass adds its helper modules after ``super().__init__``,
    and its forward runs ``self.branches(images)``. Settings read: ``kernels``."""

    deployed, deployed_prefix, reported = "student0", ("trunk.", "students.0."), "student0"
    min_students = (2, "the branches teach each other: two at least")
    defaults = {"kernels": "torch"}

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        models.check_image_size(spec.model, spec.image_size)
        # m whole backbones, drawn as m students would be: trunk + branch 0 starts as the first one, exactly.
        backbones = [models.create(spec.model, spec.num_classes) for _ in range(spec.num_students)]
        if not can_branch(backbones[0]):
            raise UserError(
                f"--method {self.name}: {spec.model} has no trunk and branches; use a CIFAR ResNet, a WRN or an "
                "ImageNet ResNet"
            )
        parts = [split(backbone) for backbone in backbones]
        self.trunk = parts[0][0]
        self.students = nn.ModuleList(branch for _, branch in parts)

    def stack_groups(self) -> dict[str, list[nn.Module]]:
        return {"branches": list(self.students)}

    def helpers(self) -> list[nn.Module]:
        """The modules besides trunk and branches that its SGD trains with them (a gate)."""
        return []

    def parameter_groups(self) -> list[ParamGroup]:
        modules = [self.trunk, *self.students, *self.helpers()]
        return [ParamGroup("sgd", [p for module in modules for p in module.parameters()], "weight_decay")]

    def branches(self, images: torch.Tensor) -> tuple[torch.Tensor, Group, Group]:
        """The trunk once, then every branch on its output: ``(trunk output, logits, last maps)`` by branch."""
        shared, _ = self.trunk(images)
        to_branches = self.to_branches(shared)
        # A branch whose first layer is a BatchNorm cannot read the one shared tensor stacked: copies, side by side.
        count = len(self.stack_groups()["branches"])
        given = to_branches if self.students[0].shared_input else Group([to_branches] * count)
        logits, (last,) = self.form("branches", given)
        return shared, logits, last

    def to_branches(self, shared: torch.Tensor) -> torch.Tensor:
        """What the branches read of the trunk's output ``shared`` in training: itself, unless a method says."""
        return shared

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        shared, _ = self.trunk(images)
        return {f"student{i}": branch(shared)[0] for i, branch in enumerate(self.students)}


def stacked_logits(logits: Group) -> torch.Tensor:
    """The branches' logits as one ``[m, B, K]`` tensor: stacked, the stack's own (no copy)."""
    return logits.joined if logits.joined is not None else torch.stack(logits.parts)


def sigmoid_rampup(epoch: int, length: int) -> float:
    """``exp(−5 (1 − e/L)²)`` for the 0-based epoch ``e`` clipped to ``[0, L]``; 1 when ``L`` is 0: the KL weight's
    ramp of ONE's and OKDDip's code (Laine & Aila's, arXiv 1610.02242)."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0), length) / length
    return math.exp(-5.0 * phase * phase)
