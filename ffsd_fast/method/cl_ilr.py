"""CL-ILR, collaborative learning with intermediate-level representation sharing (Song & Chai, NeurIPS 2018):
``m`` heads (branches) share a trunk, whose gradient is rescaled by ``1/m`` (backpropagation rescaling), and each
head is taught by the mean of the other heads' logits. No official code; the transcription in
DefangChen/OKDDip-AAAI2020 (``train_one.py --avg --bpscale``) is the public code followed. Head 1 (with the trunk)
is kept. Terms, defaults and where that code departs from the paper: ``docs/methods/cl_ilr.md``.
"""

import torch

from ffsd_fast.method.base import LossTerms, Method, TermTable, option
from ffsd_fast.method.branched import (
    BranchedMethod,
    sigmoid_rampup,
    stacked_logits,
)
from ffsd_fast.method.registry import register


class _RescaleGradient(torch.autograd.Function):
    """The identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


@register
class CLILR(BranchedMethod):
    """Settings read: ``clilr_temperature``, ``clilr_consistency``, ``clilr_rampup_epochs``, the quirks
    ``quirk_clilr_teacher_gradient`` and ``quirk_clilr_target_epsilon``, ``kernels``."""

    name = "cl-ilr"
    summary = "CL-ILR: heads on a shared trunk (gradient ×1/m), each taught by the others' mean; head 1 is kept"
    min_students = (2, "each head's teacher is the others' mean: two heads at least")
    lambdas = ("clilr_consistency",)
    # The code's CIFAR run (train_one.py defaults): 300 epochs, lr 0.1 ×0.1 at epochs 150 and 225 (MultiStepLR stepped
    # at each epoch's start, PyTorch 1.0), batch 128; its weight decay 5e-4 is in configs/cifar100-resnet32-cl_ilr.yaml.
    recipe = {
        "cifar10": {"epochs": 300, "lr_milestones": [150, 225]},
        "cifar100": {"epochs": 300, "lr_milestones": [150, 225]},
    }
    options = {
        "clilr_temperature": option(float, 3.0, "CL-ILR: temperature of each head's KL to the others", above=0),
        "clilr_consistency": option(float, 1.0, "CL-ILR: weight of each head's KL to the others", at_least=0),
        "clilr_rampup_epochs": option(
            int, 80, "CL-ILR: the KL weight ramps up as exp(−5(1 − e/L)²) over the 0-based epochs e ≤ L", at_least=0
        ),
        "quirk_clilr_teacher_gradient": option(
            bool, True, "CL-ILR: the others' mean is not detached: the KL trains the teachers too, as the code does"
        ),
        "quirk_clilr_target_epsilon": option(
            bool, True, "CL-ILR: add 1e-7 to the target's softened probabilities in the KL, as the code does"
        ),
    }
    defaults = {**Method.defaults}

    def epoch_lambdas(self, epoch: int) -> dict[str, float]:
        # By the 0-based epoch, from the first (train_one.py lines 307-312, start_consistency 0).
        ramp = sigmoid_rampup(epoch - 1, self.settings["clilr_rampup_epochs"])
        return {"clilr_consistency": self.settings["clilr_consistency"] * ramp}

    def to_branches(self, shared: torch.Tensor) -> torch.Tensor:
        # Backpropagation rescaling: the trunk's gradient, the sum of the m heads', divided by m (resnet_one.py lines
        # 111-121 and 217-218).
        return _RescaleGradient.apply(shared, 1.0 / len(self.students))

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor) -> LossTerms:
        _, logits, _ = self.branches(images)
        z = stacked_logits(logits)  # [m, B, K]
        m = z.shape[0]
        others = (z.sum(0, keepdim=True) - z) / (m - 1)  # head i's teacher: the mean of the other heads' logits
        if not self.settings["quirk_clilr_teacher_gradient"]:
            others = others.detach()
        epsilon = 1e-7 if self.settings["quirk_clilr_target_epsilon"] else 0.0
        # [2m]: every head's CE, then its KL to its teacher (one grouped op, the teacher's gradient when it has one).
        losses = self.ops.branch_distillation_losses(z, others, labels, self.settings["clilr_temperature"], epsilon)
        parts = losses.unbind()  # views; the backward stacks their gradients in one op
        terms = TermTable(self.form.distances())
        for i in range(m):
            terms.add(f"student{i}.ce", parts[i])
            terms.add(f"student{i}.kl", parts[m + i], lambdas[0])
        return terms.total(lambdas)
