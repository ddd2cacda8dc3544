"""Temperature-scaled KL divergence, the distillation loss of Hinton et al. and of every online-KD method."""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_kernels._dtypes import compute_dtype


def kl_div_loss_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · (1/B) · Σ_b Σ_c p_t · (log p_t − log p_s)`` with ``p = softmax(z / T)`` over dim 1.

    The same as ``T**2 * F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction='batchmean')``.
    """
    dtype = compute_dtype(student_logits.dtype)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    # xlogy-free form: p_t = exp(log p_t) is never 0 where it matters, since log_softmax is finite.
    loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / student_logits.shape[0]
    return (loss * temperature**2).to(student_logits.dtype)


def kl_div_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss ``T² · batchmean KL(p_t ‖ p_s)``, ``p = softmax(z / T)``.

    Args:
        student_logits: ``[B, C]``, fp32/fp16/bf16/fp64. Receives the gradient.
        teacher_logits: ``[B, C]``, same dtype. Receives a gradient too when it requires one: detach it (as
            online KD does) to stop that.
        temperature: ``T > 0``.

    Returns:
        A scalar of the student's dtype, accumulated in at least fp32.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"kl_div_loss expects two [B, C] tensors of one shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    return kl_div_loss_reference(student_logits, teacher_logits, temperature)


class KLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`kl_div_loss`: ``KLDivLoss(temperature=4)(student_logits, teacher_logits)``."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kl_div_loss(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
