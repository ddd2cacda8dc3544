"""Attention-transfer losses: the attention map ``A`` and the normalised distance ``d`` (Zagoruyko & Komodakis).

``A(x) = mean_c(x²)``, ``[B, C, H, W] → [B, 1, H, W]``; ``n(v) = v / max(‖v‖₂, 1e-12)`` per sample over its
flattened entries; ``d(x, y) = mean((n(x) − n(y))²)`` over all ``B·N`` entries.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_kernels._dtypes import compute_dtype


def attention_map_reference(x: torch.Tensor) -> torch.Tensor:
    """``A(x) = mean over channels of x²``: ``[B, C, H, W] → [B, 1, H, W]``, in the input's dtype."""
    return x.to(compute_dtype(x.dtype)).pow(2).mean(dim=1, keepdim=True).to(x.dtype)


def normalized_distance_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d(x, y) = mean((n(x) − n(y))²)`` with ``n`` the per-sample L2 normalisation (eps 1e-12)."""
    dtype = compute_dtype(x.dtype)
    nx = F.normalize(x.to(dtype).reshape(x.shape[0], -1), dim=1, eps=1e-12)
    ny = F.normalize(y.to(dtype).reshape(y.shape[0], -1), dim=1, eps=1e-12)
    return (nx - ny).pow(2).mean().to(x.dtype)


def attention_distance_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d(A(x), A(y))``."""
    return normalized_distance_reference(attention_map_reference(x), attention_map_reference(y))


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """Attention map ``A(x) = mean_c(x²)``.

    Args:
        x: ``[B, C, H, W]``, NCHW or channels-last, fp32/fp16/bf16/fp64.

    Returns:
        ``[B, 1, H, W]`` in ``x``'s dtype (squares summed in at least fp32).
    """
    if x.dim() != 4:
        raise ValueError(f"attention_map expects [B, C, H, W], got shape {tuple(x.shape)}")
    return attention_map_reference(x)


def normalized_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Normalised distance ``d(x, y) = mean((n(x) − n(y))²)``, ``n(v) = v / max(‖v‖₂, 1e-12)`` per sample.

    Args:
        x, y: tensors of one shape ``[B, ...]`` (any layout); each sample is flattened.

    Returns:
        A scalar in ``x``'s dtype. The gradient reaches both arguments unless the caller detaches one.
    """
    if x.shape != y.shape:
        raise ValueError(f"normalized_distance expects two tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    return normalized_distance_reference(x, y)


def attention_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Attention-transfer loss ``d(A(x), A(y))``.

    Args:
        x: ``[B, C1, H, W]``; y: ``[B, C2, H, W]`` (channel counts may differ), NCHW or channels-last.

    Returns:
        A scalar in ``x``'s dtype. The gradient reaches both arguments unless the caller detaches one.
    """
    if x.dim() != 4 or y.dim() != 4 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
        raise ValueError(f"attention_distance expects [B, C, H, W] maps of one batch and size, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return attention_distance_reference(x, y)


class AttentionDistance(nn.Module):
    """``nn.Module`` form of :func:`attention_distance`."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return attention_distance(x, y)
