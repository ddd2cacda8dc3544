"""OKDDip, online knowledge distillation with diverse peers (Chen, Mei, Wang, Feng & Chen, AAAI 2020): ``m``
auxiliary peers and a group leader, all branches of one trunk. Each peer is taught by its own attention-weighted
mix of the peers' logits (first level); the leader by the peers' mean (second level). Only the leader (with the
trunk) is kept. Terms, defaults and where the public code departs from the paper: ``docs/methods/okddip.md``.
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
from ffsd_fast.models.branching import split


@register
class OKDDip(BranchedMethod):
    """``students``: the ``m`` peers; ``leader``: the group leader's branch; ``query`` and ``key``: the peers'
    shared projections ``C → C/8`` (no bias) of their pooled last maps. Settings read: ``okddip_temperature``,
    ``okddip_consistency``, ``okddip_rampup_epochs``, ``okddip_projection_factor``, the quirks
    ``quirk_okddip_target_gradient``, ``quirk_okddip_self_attention`` and ``quirk_okddip_target_epsilon``,
    ``kernels``."""

    name = "okddip"
    summary = "OKDDip: peers taught by attention-weighted peer targets, a group leader by their mean; leader kept"
    min_students = (2, "the attention mixes the peers: two at least")
    lambdas = ("okddip_consistency",)
    labels = {"leader": "group leader"}
    deployed, deployed_prefix, reported = "leader", ("trunk.", "leader."), "leader"
    # train_GL.py's defaults: 300 epochs, lr 0.1 ×0.1 at 150 and 225 (MultiStepLR stepped at each epoch's start,
    # PyTorch 1.0), batch 128; its weight decay 5e-4 is in configs/cifar100-resnet32-okddip.yaml.
    recipe = {
        "cifar10": {"epochs": 300, "lr_milestones": [150, 225]},
        "cifar100": {"epochs": 300, "lr_milestones": [150, 225]},
    }
    # The paper's group leader, branch-based, CIFAR-100 ResNet-32: 25.65 ± 0.15 % top-1 error, the mean as the range
    # (Chen et al., AAAI 2020, Table 2, as quoted in DefangChen/OKDDip issue #1; docs/methods/okddip.md, "Published
    # numbers").
    published = {("cifar100", "resnet32"): (74.35, 74.35)}
    options = {
        "okddip_temperature": option(float, 3.0, "OKDDip: temperature of both levels' KL", above=0),
        "okddip_consistency": option(float, 1.0, "OKDDip: weight of both levels' KL", at_least=0),
        "okddip_rampup_epochs": option(
            int, 80, "OKDDip: the KL weight ramps up as exp(−5(1 − e/L)²) over the 0-based epochs e ≤ L", at_least=0
        ),
        "okddip_projection_factor": option(
            int, 8, "OKDDip: the query and key project the C-channel pooled map to C / factor", at_least=1
        ),
        "quirk_okddip_self_attention": option(
            bool, True, "OKDDip: a peer's attention weighs every peer, itself included, as the code does"
        ),
        "quirk_okddip_target_epsilon": option(
            bool, True, "OKDDip: add 1e-7 to the targets' softened probabilities in the KLs, as the code does"
        ),
        "quirk_okddip_target_gradient": option(
            bool, True, "OKDDip: the targets are not detached: the KLs train the peers that make them, as the code"
        ),
    }
    defaults = {**Method.defaults}

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        # The leader is drawn after the peers, as the code builds its last branch last.
        _, self.leader = split(models.create(spec.model, spec.num_classes))
        channels = models.tap_shapes(spec.model, spec.image_size)[-1][0]
        projected = channels // self.settings["okddip_projection_factor"]
        self.query = nn.Linear(channels, projected, bias=False)
        self.key = nn.Linear(channels, projected, bias=False)

    def stack_groups(self) -> dict[str, list[nn.Module]]:
        return {"branches": [*self.students, self.leader]}

    def helpers(self) -> list[nn.Module]:
        return [self.leader, self.query, self.key]

    def epoch_lambdas(self, epoch: int) -> dict[str, float]:
        # By the 0-based epoch, from the first (train_GL.py lines 308-312, start_consistency 0).
        ramp = sigmoid_rampup(epoch - 1, self.settings["okddip_rampup_epochs"])
        return {"okddip_consistency": self.settings["okddip_consistency"] * ramp}

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        shared, _ = self.trunk(images)
        logits = {f"student{i}": branch(shared)[0] for i, branch in enumerate(self.students)}
        logits["leader"] = self.leader(shared)[0]
        return logits

    def peer_targets(self, z: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Each peer's target ``Σ_j a_ij z_j``, ``a_i = softmax_j(q_i · k_j)`` over every peer (the quirk: itself too):
        ``z`` the peers' ``[m, B, K]`` logits, ``pooled`` their ``[m, B, C]`` average-pooled last maps."""
        energy = torch.einsum("ibd,jbd->bij", self.query(pooled), self.key(pooled))
        if not self.settings["quirk_okddip_self_attention"]:  # the other peers only, as the README describes it
            eye = torch.eye(energy.shape[-1], dtype=torch.bool, device=energy.device)
            energy = energy.masked_fill(eye, float("-inf"))
        attention = F.softmax(energy, dim=-1)  # [B, m, m]
        return torch.einsum("bij,jbk->ibk", attention, z)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor) -> LossTerms:
        _, logits, last = self.branches(images)
        m = len(self.students)
        z = stacked_logits(logits)  # [m + 1, B, K]: the peers, then the leader
        if last.joined is not None:  # stacked: one pool of the stack's map, the peers' channels as [m, B, C]
            batch, channels = z.shape[1], last[0].shape[1]
            pooled = last.joined.mean((2, 3)).view(batch, m + 1, channels)[:, :m].transpose(0, 1)
        else:
            pooled = torch.stack([f.mean((2, 3)) for f in last.parts[:m]])
        peers = z[:m]  # the leader, z[m], is the last branch
        sources = peers if self.settings["quirk_okddip_target_gradient"] else peers.detach()
        temperature = self.settings["okddip_temperature"]
        epsilon = 1e-7 if self.settings["quirk_okddip_target_epsilon"] else 0.0
        # Each branch's teacher: a peer's its attention mix (first level), the leader's the peers' mean (second).
        targets = torch.cat([self.peer_targets(sources, pooled), sources.mean(0, keepdim=True)])
        # [2(m + 1)]: every branch's CE, then its KL (one grouped op; the targets' gradient reaches the attention).
        losses = self.ops.branch_distillation_losses(z, targets, labels, temperature, epsilon)
        parts = losses.unbind()  # views; the backward stacks their gradients in one op
        terms = TermTable(self.form.distances())
        for i in range(m):
            terms.add(f"student{i}.ce", parts[i])
            terms.add(f"student{i}.kl", parts[m + 1 + i], lambdas[0])
        terms.add("leader.ce", parts[m])
        terms.add("leader.kl", parts[2 * m + 1], lambdas[0])
        return terms.total(lambdas)
