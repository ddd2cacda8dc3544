"""torchdistill's loss registry, filled with ``ffsd_kernels``' losses: ``import ffsd_kernels.integrations.torchdistill``
(or call :func:`register`) before building a torchdistill ``DistillationBox`` from its YAML.

Registered keys (torchdistill 1.1.5, ``torchdistill.losses.registry``):

* mid-level ``FusedKDLoss``: torchdistill's ``KDLoss`` (same constructor, same call on the ``io_dict``s), the CE and
  the KL in one pass over the logits;
* low-level ``DistillationKLLoss``, ``JSDLoss``, ``FusedLinearDistillationLoss``, and ``FusedKLDivLoss`` (torch's
  ``KLDivLoss`` on the kernels; torchdistill resolves the key ``KLDivLoss`` to torch's own first).

In a config: ``criterion: {key: 'FusedKDLoss', kwargs: {student_module_path: '.', student_module_io: 'output',
teacher_module_path: '.', teacher_module_io: 'output', temperature: 4.0, alpha: 0.5}}`` where ``KDLoss`` stood.
"""

import torch
from torch import nn
from torchdistill.losses.registry import register_low_level_loss, register_mid_level_loss

import ffsd_kernels


class FusedKDLoss(nn.Module):
    """torchdistill's ``KDLoss`` on the fused kernels: ``α · CE + β · T² · KL`` (``β = 1 − α`` unless given), the
    KL alone (without ``T²``, as ``KDLoss`` returns it) when ``alpha`` is None or 0 or there are no targets.

    ``reduction``: ``batchmean`` (CE ``mean``) or ``sum``; ``KDLoss``'s ``mean`` (over every element) is not a
    distillation loss and is refused. Of ``KDLoss``'s CE keyword arguments, ``ignore_index`` is supported.
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
        ignore_index: int = -100,
        **kwargs,
    ) -> None:
        super().__init__()
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"FusedKDLoss expects reduction 'batchmean' or 'sum', got {reduction!r}")
        if kwargs:
            raise ValueError(f"FusedKDLoss does not support the CE options {sorted(kwargs)}")
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io
        self.temperature, self.alpha, self.reduction, self.ignore_index = temperature, alpha, reduction, ignore_index
        self.beta = (1 - alpha if alpha is not None else None) if beta is None else beta

    def forward(
        self, student_io_dict: dict, teacher_io_dict: dict, targets: torch.Tensor | None = None, *args, **kwargs
    ):
        student = student_io_dict[self.student_module_path][self.student_module_io]
        teacher = teacher_io_dict[self.teacher_module_path][self.teacher_module_io]
        temperature = self.temperature
        if self.alpha is None or self.alpha == 0 or targets is None:
            kl = ffsd_kernels.kl_div_loss(student, teacher, temperature, reduction=self.reduction)
            return kl / temperature**2  # KDLoss's soft loss alone carries no T²
        ce, kl = ffsd_kernels.cross_entropy_kl_loss(
            student, teacher, targets, temperature, ignore_index=self.ignore_index, reduction=self.reduction
        )
        return self.alpha * ce + self.beta * kl


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
