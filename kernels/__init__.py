"""ffsd_kernels: knowledge-distillation losses for any PyTorch code.

Each op has fused Triton forward and backward kernels, a functional API, an ``nn.Module`` and a plain PyTorch
reference (``*_reference``) that defines what it computes. The functions run the kernels on CUDA tensors (and on CPU
tensors under ``TRITON_INTERPRET=1``), their references elsewhere; ``ffsd_kernels.reference`` holds the references
under the public names. Install the project and ``from ffsd_kernels import kl_div_loss``.
"""

from ffsd_kernels.attention import (
    AttentionDistance,
    NormalizedDistance,
    attention_distance,
    attention_distance_reference,
    attention_map,
    attention_map_reference,
    normalized_distance,
    normalized_distance_reference,
)
from ffsd_kernels.diversity import (
    DiversityLoss,
    diversity_loss,
    diversity_loss_reference,
    diversity_shift,
    diversity_shift_reference,
)
from ffsd_kernels.fusion import FusionBlock, fusion_block, fusion_block_reference
from ffsd_kernels.kl_div import (
    CrossEntropyKLLoss,
    KLDivLoss,
    MutualKLLoss,
    cross_entropy_kl_loss,
    cross_entropy_kl_loss_reference,
    kl_div_loss,
    kl_div_loss_reference,
    mutual_kl_loss,
    mutual_kl_loss_reference,
)

__all__ = [
    "AttentionDistance",
    "CrossEntropyKLLoss",
    "DiversityLoss",
    "FusionBlock",
    "KLDivLoss",
    "MutualKLLoss",
    "NormalizedDistance",
    "attention_distance",
    "attention_distance_reference",
    "attention_map",
    "attention_map_reference",
    "cross_entropy_kl_loss",
    "cross_entropy_kl_loss_reference",
    "diversity_loss",
    "diversity_loss_reference",
    "diversity_shift",
    "diversity_shift_reference",
    "fusion_block",
    "fusion_block_reference",
    "kl_div_loss",
    "kl_div_loss_reference",
    "mutual_kl_loss",
    "mutual_kl_loss_reference",
    "normalized_distance",
    "normalized_distance_reference",
]
