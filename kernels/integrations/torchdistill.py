"""torchdistill's loss registry, filled with ``ffsd_kernels``' losses: ``import ffsd_kernels.integrations.torchdistill``
(or call :func:`register`) before building a torchdistill ``DistillationBox`` from its YAML.

Registered keys (torchdistill 1.1.5, ``torchdistill.losses.registry``):

* mid-level ``FusedKDLoss``: torchdistill's ``KDLoss`` (same constructor, same call on the ``io_dict``s, same
  values), its KL on the fused kernels;
* low-level ``DistillationKLLoss``, ``JSDLoss``, ``FusedLinearDistillationLoss``, and ``FusedKLDivLoss`` (torch's
  ``KLDivLoss`` on the kernels; torchdistill resolves the key ``KLDivLoss`` to torch's own first).

In a config: ``criterion: {key: 'FusedKDLoss', kwargs: {student_module_path: '.', student_module_io: 'output',
teacher_module_path: '.', teacher_module_io: 'output', temperature: 4.0, alpha: 0.5}}`` where ``KDLoss`` stood.
"""

import torch
from torch import nn
from torchdistill.losses.registry import register_low_level_loss, register_mid_level_loss

import ffsd_kernels
from ffsd_kernels._rows import check_temperature

KL_REDUCTIONS = ("batchmean", "sum", "mean", "none")  # nn.KLDivLoss's, as KDLoss passes its reduction there


class FusedKDLoss(nn.Module):
    """torchdistill's ``KDLoss`` with its KL on the fused kernels: ``α · CE + β · T² · KL`` (``β = 1 − α`` unless
    given), the KL alone (without ``T²``, as ``KDLoss`` returns it) when ``alpha`` is None or 0 or there are no
    targets.

    The same constructor and semantics as ``KDLoss``: ``reduction`` is ``nn.KLDivLoss``'s for the KL (``batchmean``,
    ``sum``, ``mean`` over every element, ``none``) and the CE's (``mean`` for ``batchmean``); every other keyword
    argument goes to ``nn.CrossEntropyLoss`` (``ignore_index``, ``label_smoothing``, ``weight``), as in ``KDLoss``.
    The KL covers every row, a target of ``ignore_index`` included (only the CE leaves it out), and a teacher's
    ``−inf`` logit contributes 0, as in ``KDLoss``.

    How it differs: the KL of ``[B, C]`` logits under ``batchmean``, ``sum`` or ``mean`` is
    :func:`ffsd_kernels.kl_div_loss` (one fused pass, no ``[B, C]`` probability tensors); any other shape or
    ``none`` takes ``KDLoss``'s own ``kl_div(log_softmax, softmax)`` over dim 1, on :func:`ffsd_kernels.kl_div`. The
    CE is torch's ``nn.CrossEntropyLoss``, a second pass over the logits: the one-pass ``cross_entropy_kl_loss``
    leaves ignored rows out of the KL too, which ``KDLoss`` does not. ``alpha=None`` gives the KL alone, where
    ``KDLoss`` fails on ``1 − None``.
    """

    def __init__(
        self,
        student_module_path: str,
        student_module_io: str,
        teacher_module_path: str,
        teacher_module_io: str,
        temperature: float,
        alpha: float | None = None,
        beta: float | None = None,
        reduction: str = "batchmean",
        **kwargs,
    ) -> None:
        super().__init__()
        op = type(self).__name__
        # Checked here, at construction (ValueError), where KDLoss would fail at its first call.
        if reduction not in KL_REDUCTIONS:
            raise ValueError(f"{op} expects reduction in {KL_REDUCTIONS}, got {reduction!r}")
        self.temperature = check_temperature(op, temperature)
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io
        self.alpha, self.reduction = alpha, reduction
        self.beta = (1 - alpha if alpha is not None else None) if beta is None else beta
        # KDLoss's CE, with KDLoss's keyword arguments (an unknown one is a TypeError here, as there).
        self.cross_entropy_loss = nn.CrossEntropyLoss(
            reduction="mean" if reduction == "batchmean" else reduction, **kwargs
        )

    def _soft_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``KDLoss``'s soft loss, ``nn.KLDivLoss(reduction)(log_softmax(s / T, 1), softmax(t / T, 1))``."""
        temperature = self.temperature
        if student.dim() == 2 and self.reduction != "none":
            reduction = "sum" if self.reduction == "mean" else self.reduction
            kl = ffsd_kernels.kl_div_loss(student, teacher, temperature, reduction=reduction) / temperature**2
            return kl / student.numel() if self.reduction == "mean" else kl
        log_p_s = torch.log_softmax(student / temperature, dim=1)
        return ffsd_kernels.kl_div(log_p_s, torch.softmax(teacher / temperature, dim=1), reduction=self.reduction)

    def forward(
        self, student_io_dict: dict, teacher_io_dict: dict, targets: torch.Tensor | None = None, *args, **kwargs
    ) -> torch.Tensor:
        student = student_io_dict[self.student_module_path][self.student_module_io]
        teacher = teacher_io_dict[self.teacher_module_path][self.teacher_module_io]
        soft_loss = self._soft_loss(student, teacher)
        if self.alpha is None or self.alpha == 0 or targets is None:
            return soft_loss
        hard_loss = self.cross_entropy_loss(student, targets)
        return self.alpha * hard_loss + self.beta * self.temperature**2 * soft_loss


LOW_LEVEL = {
    "DistillationKLLoss": ffsd_kernels.DistillationKLLoss,
    "JSDLoss": ffsd_kernels.JSDLoss,
    "FusedLinearDistillationLoss": ffsd_kernels.FusedLinearDistillationLoss,
    "FusedKLDivLoss": ffsd_kernels.KLDivLoss,
}
MID_LEVEL = {"FusedKDLoss": FusedKDLoss}


def register() -> None:
    """Put the losses in torchdistill's registry under the keys above (again, harmlessly, if already there)."""
    for key, cls in LOW_LEVEL.items():
        register_low_level_loss(key=key)(cls)
    for key, cls in MID_LEVEL.items():
        register_mid_level_loss(key=key)(cls)


register()
