"""PCL, peer collaborative learning (Wu & Gong, AAAI 2021): ``m`` peers, branches of one trunk, each fed its own
augmentation of the same images; a peer ensemble teacher (a classifier over the peers' concatenated features) and
a peer mean teacher (a temporal mean, an exponential moving average, of the whole network: trunk and branches).
Each peer learns from the labels, from the ensemble and from the other peers' temporal means. The temporal mean of
peer 1 (with the trunk's temporal mean) is kept. Terms, defaults and where the unofficial public code departs from
the paper: ``docs/methods/pcl.md``.
"""

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.method.base import LossTerms, Method, NetworkSpec, TermTable, option
from ffsd_fast.method.branched import BranchedMethod, sigmoid_rampup, stacked_logits
from ffsd_fast.method.forms import Group
from ffsd_fast.method.registry import register
from ffsd_fast.models.branching import split


def pcl_rampup(epoch: int, length: int, code_divisor: bool) -> float:
    """The KL weights' ramp for the 0-based epoch ``epoch``: 1 after ``length`` epochs, before it
    ``exp(−5(1 − e/L)²)`` (Laine & Aila's), or with the code's divisor (``code_divisor``: its ``loss_wrapper.py``
    line 22 divides by the weight, 1, where it means ``L``) ``exp(−5(1 − e)²)``: e^−5 at epoch 0, 1 at epoch 1, then
    ~0 until ``L``."""
    if epoch > length:
        return 1.0
    if not code_divisor:
        return sigmoid_rampup(epoch, length)
    return math.exp(-5.0 * (1.0 - epoch) ** 2)


def share_classifiers(branches: list[nn.Module]) -> None:
    """Every branch's classifier (its linear layers) set to branch 1's, as in the code, which deep-copies branch 1
    and then draws every convolution again, leaving the copied linear layers alike (``models/resnet.py`` lines
    157-171)."""
    first = dict(branches[0].named_modules())
    for branch in branches[1:]:
        for name, module in branch.named_modules():
            if isinstance(module, nn.Linear):
                module.load_state_dict(first[name].state_dict())


@register
class PCL(BranchedMethod):
    """``trunk`` and ``students`` (the peers' branches), ``ensemble`` (the peer ensemble's classifier), and their
    temporal means ``mean_trunk`` and ``mean_students`` (no gradient, no optimiser: ``after_step`` moves them).
    Settings read: ``pcl_temperature``, ``pcl_rampup_epochs``, ``pcl_ema_decay``, ``pcl_ensemble_consistency``,
    ``pcl_mean_consistency`` (the λ's), the quirks ``quirk_pcl_rampup_divisor``, ``quirk_pcl_shared_classifier_init``,
    ``quirk_pcl_mean_init``, ``kernels``."""

    name = "pcl"
    summary = "PCL: peers on a shared trunk, own views, taught by a peer ensemble and peer temporal means; mean 1 kept"
    min_students = (2, "each peer learns from the other peers' temporal means: two at least")
    lambdas = ("pcl_ensemble_consistency", "pcl_mean_consistency")
    # Evaluated besides the peers: their temporal means (mean1 … added per run, in __init__) and the ensemble teacher
    # ("peer_ensemble": "ensemble" is the evaluation's mean of the peers' logits).
    labels = {"mean0": "mean-peer-1", "peer_ensemble": "peer-ensemble teacher"}
    deployed, deployed_prefix, reported = "mean0", ("mean_trunk.", "mean_students.0."), "mean0"
    # The code's CIFAR run (configs/20220223_cifar100.yml, src/schemes/scheme_config.yml): 300 epochs, lr 0.1 ×0.1
    # after epochs 150 and 225 (MultiStepLR stepped at each epoch's end, src/trainer.py line 147), batch 128; its
    # Nesterov SGD (the default here) and weight decay 5e-4 (src/optimizer/optimizer_config.yml):
    # configs/cifar100-resnet32-pcl.yaml.
    recipe = {
        "cifar10": {"epochs": 300, "lr_milestones": [150, 225]},
        "cifar100": {"epochs": 300, "lr_milestones": [150, 225]},
    }
    # The paper's CIFAR-100 ResNet-32 top-1, 74.14 ± 0.16, the mean as the range (as the issue quotes it and the public
    # code's README.md line 47 reproduces the paper's table; docs/methods/pcl.md, "Published numbers").
    published = {("cifar100", "resnet32"): (74.14, 74.14)}
    options = {
        "pcl_temperature": option(float, 3.0, "PCL: temperature of the peers' KL to both teachers", above=0),
        "pcl_ensemble_consistency": option(
            float, 1.0, "PCL: weight of each peer's KL to the peer ensemble teacher (ramped up)", at_least=0
        ),
        "pcl_mean_consistency": option(
            float, 1.0, "PCL: weight of each peer's mean KL to the other peers' temporal means (ramped up)", at_least=0
        ),
        "pcl_rampup_epochs": option(
            int,
            80,
            "PCL: the KL weights reach 1 after this many epochs (the ramp: --quirk-pcl-rampup-divisor)",
            at_least=0,
        ),
        "pcl_ema_decay": option(
            float, 0.999, "PCL: the temporal mean's decay, min(1 − 1/(t + 1), decay) at step t", at_least=0, below=1
        ),
        "quirk_pcl_rampup_divisor": option(
            bool, True, "PCL: the code's ramp exp(−5(1 − e)²) until the last ramp-up epoch, not exp(−5(1 − e/L)²)"
        ),
        "quirk_pcl_shared_classifier_init": option(
            bool, True, "PCL: every branch's classifier starts as branch 1's (the code copies it; convolutions redrawn)"
        ),
        "quirk_pcl_mean_init": option(
            bool, True, "PCL: the temporal mean starts from its own random draw (the code's), not a copy"
        ),
    }
    defaults = {**Method.defaults}

    @classmethod
    def view_count(cls, config: Mapping[str, Any]) -> int:
        return config["num_students"]  # one augmentation per peer (src/datasets/cifar.py lines 124-129)

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        shared = self.settings["quirk_pcl_shared_classifier_init"]
        if shared:
            share_classifiers(list(self.students))
        channels = models.tap_shapes(spec.model, spec.image_size)[-1][0]  # a branch's pooled last map
        # Drawn after the branches, as the code's en_fc (models/resnet.py line 161).
        self.ensemble = nn.Linear(spec.num_students * channels, spec.num_classes)
        # The temporal mean: the code builds a second model (main.py line 52), overwritten by the first update.
        if self.settings["quirk_pcl_mean_init"]:
            parts = [split(models.create(spec.model, spec.num_classes)) for _ in range(spec.num_students)]
            mean_trunk, mean_branches = parts[0][0], [branch for _, branch in parts]
            if shared:
                share_classifiers(mean_branches)
        else:
            mean_trunk, mean_branches = copy.deepcopy(self.trunk), copy.deepcopy(list(self.students))
        self.mean_trunk, self.mean_students = mean_trunk, nn.ModuleList(mean_branches)
        for p in [*self.mean_trunk.parameters(), *self.mean_students.parameters()]:
            p.requires_grad_(False)
        # Optimiser steps so far: the decay's warm-up, on the device (no host sync), saved with the checkpoint.
        self.register_buffer("mean_steps", torch.zeros((), dtype=torch.long))
        means = {f"mean{i}": f"mean-peer-{i + 1}" for i in range(spec.num_students)}
        self.labels = {**means, "peer_ensemble": "peer-ensemble teacher"}

    def stack_groups(self) -> dict[str, list[nn.Module]]:
        return {"branches": list(self.students), "means": list(self.mean_students)}

    def helpers(self) -> list[nn.Module]:
        return [self.ensemble]

    def epoch_lambdas(self, epoch: int) -> dict[str, float]:
        # By the 0-based epoch (main.py line 97), one ramp for both KLs (loss_wrapper.py lines 42-47).
        s = self.settings
        ramp = pcl_rampup(epoch - 1, s["pcl_rampup_epochs"], s["quirk_pcl_rampup_divisor"])
        return {name: s[name] * ramp for name in self.lambdas}

    def after_step(self) -> None:
        """θ' ← α θ' + (1 − α) θ over trunk and branches, ``α = min(1 − 1/(t + 1), decay)`` at step ``t`` (0-based;
        ``src/utils/ema.py`` lines 3-7, called after every optimiser step, ``src/trainer.py`` line 111): three
        multi-tensor ops and the step count, all on the device."""
        means = [*self.mean_trunk.parameters(), *self.mean_students.parameters()]
        online = [*self.trunk.parameters(), *self.students.parameters()]
        steps = self.mean_steps.to(means[0].dtype)
        alpha = torch.clamp(steps / (steps + 1.0), max=self.settings["pcl_ema_decay"])  # 1 − 1/(t + 1), in 3 kernels
        with torch.no_grad():
            torch._foreach_mul_(means, alpha)
            torch._foreach_add_(means, torch._foreach_mul(online, 1.0 - alpha))
            self.mean_steps.add_(1)

    def run_peers(self, trunk: nn.Module, group: str, views: list[torch.Tensor]) -> tuple[Group, Group]:
        """``trunk`` on each view apart (its BatchNorms see each view's statistics, as the code's ``extract`` per
        input, models/resnet.py lines 207-210), then branch ``i`` of ``group`` on view ``i``: logits, last maps."""
        shared = [trunk(view)[0] for view in views]
        logits, (last,) = self.form(group, Group(shared))
        return logits, last

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        shared, _ = self.trunk(images)
        outputs = [branch(shared) for branch in self.students]
        logits = {f"student{i}": z for i, (z, _) in enumerate(outputs)}
        mean_shared, _ = self.mean_trunk(images)
        logits |= {f"mean{i}": branch(mean_shared)[0] for i, branch in enumerate(self.mean_students)}
        logits["peer_ensemble"] = self.ensemble(torch.cat([f.mean((2, 3)) for _, (f,) in outputs], dim=1))
        return logits

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor) -> LossTerms:
        m, batch = len(self.students), labels.shape[0]
        if images.shape[0] != m * batch:
            raise UserError(f"pcl: {batch} labels need {m} views of their images, got {images.shape[0]} rows")
        views = list(images.unflatten(0, (m, batch)).unbind(0))  # view i is peer i's
        logits, last = self.run_peers(self.trunk, "branches", views)
        z = stacked_logits(logits)  # [m, B, K]
        # The peers' pooled features side by side (stacked, one pool of the stack's map), not detached: the
        # ensemble's CE trains the branches and the trunk too (models/resnet.py lines 217-219).
        if last.joined is not None:
            pooled = last.joined.mean((2, 3))
        else:
            pooled = torch.cat([f.mean((2, 3)) for f in last.parts], dim=1)
        ensemble = self.ensemble(pooled)
        with torch.no_grad():  # the temporal means, in train mode as the code runs them (src/trainer.py line 87)
            means = stacked_logits(self.run_peers(self.mean_trunk, "means", views)[0])
        return self.terms(z, ensemble, means, labels, lambdas)

    def terms(
        self, z: torch.Tensor, ensemble: torch.Tensor, means: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor
    ) -> LossTerms:
        """Peer ``i``'s CE, its KL to the detached ensemble and to each other peer's temporal mean, from one grouped
        op over ``m²`` lanes: lane ``i·m`` is ``z_i`` against the ensemble, lanes ``i·m + k`` (``k ≥ 1``) ``z_i``
        against the ``k``-th other mean (those lanes' CE is unused)."""
        m = z.shape[0]
        others = [[j for j in range(m) if j != i] for i in range(m)]
        lanes = torch.cat([z.unsqueeze(1), z.unsqueeze(1).expand(-1, m - 1, -1, -1)], dim=1).flatten(0, 1)
        target = ensemble.detach()
        teachers = torch.stack([t for i in range(m) for t in (target, *(means[j] for j in others[i]))])
        losses = self.ops.branch_distillation_losses(lanes, teachers, labels, self.settings["pcl_temperature"], 0.0)
        parts = losses.unbind()  # views; the backward stacks their gradients in one op
        mean_weight = lambdas[1] / (m - 1)  # the code averages the KLs to the m − 1 other means (kd_loss.py line 41)
        table, kl = TermTable(self.form.distances()), m * m
        for i in range(m):
            table.add(f"student{i}.ce", parts[i * m])
            table.add(f"student{i}.pe", parts[kl + i * m], lambdas[0])
            for k, j in enumerate(others[i], start=1):
                table.add(f"student{i}.pm{j}", parts[kl + i * m + k], mean_weight)
        table.add("peer_ensemble.ce", F.cross_entropy(ensemble, labels))
        return table.total(lambdas)
