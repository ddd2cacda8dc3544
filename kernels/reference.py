"""The plain PyTorch references under the public names of ``ffsd_kernels``: one switch between implementations.

``import ffsd_kernels.reference as ops`` gives the same functions as ``import ffsd_kernels as ops``, computed by the
``*_reference`` definitions (the trainer's ``--kernels torch``; a baseline for anyone comparing).
"""

from ffsd_kernels.attention import attention_distance_reference as attention_distance
from ffsd_kernels.attention import attention_map_reference as attention_map
from ffsd_kernels.attention import normalized_distance_reference as normalized_distance
from ffsd_kernels.attention_group import attention_maps_reference as attention_maps
from ffsd_kernels.branch_group import branch_distillation_losses_reference as branch_distillation_losses
from ffsd_kernels.distance_group import normalized_distances_reference as normalized_distances
from ffsd_kernels.diversity import diversity_loss_reference as diversity_loss
from ffsd_kernels.diversity import diversity_shift_reference as diversity_shift
from ffsd_kernels.fused_linear import fused_linear_distillation_loss_reference as fused_linear_distillation_loss
from ffsd_kernels.fused_linear_sparse_kl import (
    fused_linear_sparse_kl_div_loss_reference as fused_linear_sparse_kl_div_loss,
)
from ffsd_kernels.fusion import fusion_block_reference as fusion_block
from ffsd_kernels.jsd import jsd_loss_reference as jsd_loss
from ffsd_kernels.kl_div import cross_entropy_kl_loss_reference as cross_entropy_kl_loss
from ffsd_kernels.kl_div import kl_div_loss_reference as kl_div_loss
from ffsd_kernels.logit_group import online_distillation_losses_reference as online_distillation_losses
from ffsd_kernels.mutual_kl import mutual_kl_loss_reference as mutual_kl_loss
from ffsd_kernels.sparse_kl import sparse_kl_div_loss_reference as sparse_kl_div_loss
from ffsd_kernels.torch_kl_div import kl_div_reference as kl_div

__all__ = [
    "attention_distance",
    "attention_map",
    "attention_maps",
    "branch_distillation_losses",
    "cross_entropy_kl_loss",
    "diversity_loss",
    "diversity_shift",
    "fused_linear_distillation_loss",
    "fused_linear_sparse_kl_div_loss",
    "fusion_block",
    "jsd_loss",
    "kl_div",
    "kl_div_loss",
    "mutual_kl_loss",
    "normalized_distance",
    "normalized_distances",
    "online_distillation_losses",
    "sparse_kl_div_loss",
]
