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
from ffsd_kernels.attention_group import AttentionMaps, attention_maps, attention_maps_reference
from ffsd_kernels.branch_group import (
    BranchDistillationLosses,
    branch_distillation_losses,
    branch_distillation_losses_reference,
)
from ffsd_kernels.distance_group import NormalizedDistances, normalized_distances, normalized_distances_reference
from ffsd_kernels.diversity import (
    DiversityLoss,
    diversity_loss,
    diversity_loss_reference,
    diversity_shift,
    diversity_shift_reference,
)
from ffsd_kernels.fused_linear import (
    FusedLinearDistillationLoss,
    fused_linear_distillation_loss,
    fused_linear_distillation_loss_reference,
)
from ffsd_kernels.fused_linear_sparse_kl import (
    FusedLinearSparseKLDivLoss,
    fused_linear_sparse_kl_div_loss,
    fused_linear_sparse_kl_div_loss_reference,
)
from ffsd_kernels.fusion import FusionBlock, fusion_block, fusion_block_reference
from ffsd_kernels.jsd import JSDLoss, jsd_loss, jsd_loss_reference
from ffsd_kernels.kl_div import (
    CrossEntropyKLLoss,
    DistillationKLLoss,
    cross_entropy_kl_loss,
    cross_entropy_kl_loss_reference,
    kl_div_loss,
    kl_div_loss_reference,
)
from ffsd_kernels.logit_group import (
    OnlineDistillationLosses,
    online_distillation_losses,
    online_distillation_losses_reference,
)
from ffsd_kernels.mutual_kl import MutualKLLoss, mutual_kl_loss, mutual_kl_loss_reference
from ffsd_kernels.sparse_kl import SparseKLDivLoss, sparse_kl_div_loss, sparse_kl_div_loss_reference
from ffsd_kernels.torch_kl_div import KLDivLoss, kl_div, kl_div_reference

__all__ = [
    "AttentionDistance",
    "AttentionMaps",
    "BranchDistillationLosses",
    "CrossEntropyKLLoss",
    "DistillationKLLoss",
    "DiversityLoss",
    "FusedLinearDistillationLoss",
    "FusedLinearSparseKLDivLoss",
    "FusionBlock",
    "JSDLoss",
    "KLDivLoss",
    "MutualKLLoss",
    "NormalizedDistance",
    "NormalizedDistances",
    "OnlineDistillationLosses",
    "SparseKLDivLoss",
    "attention_distance",
    "attention_distance_reference",
    "attention_map",
    "attention_map_reference",
    "attention_maps",
    "attention_maps_reference",
    "branch_distillation_losses",
    "branch_distillation_losses_reference",
    "cross_entropy_kl_loss",
    "cross_entropy_kl_loss_reference",
    "diversity_loss",
    "diversity_loss_reference",
    "diversity_shift",
    "diversity_shift_reference",
    "fused_linear_distillation_loss",
    "fused_linear_distillation_loss_reference",
    "fused_linear_sparse_kl_div_loss",
    "fused_linear_sparse_kl_div_loss_reference",
    "fusion_block",
    "fusion_block_reference",
    "jsd_loss",
    "jsd_loss_reference",
    "kl_div",
    "kl_div_loss",
    "kl_div_loss_reference",
    "kl_div_reference",
    "mutual_kl_loss",
    "mutual_kl_loss_reference",
    "normalized_distance",
    "normalized_distance_reference",
    "normalized_distances",
    "normalized_distances_reference",
    "online_distillation_losses",
    "online_distillation_losses_reference",
    "sparse_kl_div_loss",
    "sparse_kl_div_loss_reference",
]
