"""FFSD's diversity target: push a student to attend where the previous student did not.

With ``N = H·W``, per sample: ``ν = ‖y‖₂``, ``ŷ = n(y)``, ``θ`` = the ``⌊N/3⌋``-th smallest entry of ``ŷ``
(the smallest when ``N < 3``, where the reference fails), and the reflected target
``ỹ = ν/2 + (ν/2 − ŷ)·sign(ŷ − θ)``: entries below ``θ`` keep ``ŷ``, entries above get ``ν − ŷ``, ties get ``ν/2``.
``sign`` rather than a comparison is the reference's choice, and it matters on maps with many equal entries.
"""

import torch
import torch.nn.functional as F

from ffsd_kernels._dtypes import compute_dtype
from ffsd_kernels.attention import attention_map


def _reflected_target(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``y`` of shape ``[B, N]``: ``(ỹ, ŷ, ν)`` as in the module docstring."""
    norm = y.norm(dim=1, keepdim=True)
    unit = F.normalize(y, dim=1, eps=1e-12)
    k = max(y.shape[1] // 3, 1)
    threshold = unit.kthvalue(k, dim=1, keepdim=True).values
    target = norm / 2 + (norm / 2 - unit) * torch.sign(unit - threshold)
    return target, unit, norm


def diversity_loss_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean((n(x) − ỹ)²)`` over all ``B·N`` entries, ``ỹ`` the reflected target of ``y``.

    ``n(x)`` has unit norm while ``ỹ`` keeps the scale of ``ν``: this is the reference's formula.
    """
    dtype = compute_dtype(x.dtype)
    x = x.to(dtype).reshape(x.shape[0], -1)
    y = y.to(dtype).reshape(y.shape[0], -1)
    target, _, _ = _reflected_target(y)
    return (F.normalize(x, dim=1, eps=1e-12) - target).pow(2).mean()


def diversity_shift_reference(y: torch.Tensor) -> torch.Tensor:
    """``y + (t − â)·ν / C``: the feature map ``y`` moved so that its attention map points at the reflected target.

    ``a = A(y)``, ``â = n(a)``, ``ν = ‖a‖₂``, ``t`` = the reflected target of ``a``; the ``[B, 1, H, W]`` shift is
    broadcast over the ``C`` channels.
    """
    batch, channels = y.shape[:2]
    a = attention_map(y.to(compute_dtype(y.dtype)))
    target, unit, norm = _reflected_target(a.reshape(batch, -1))
    shift = ((target - unit) * norm / channels).reshape(a.shape)
    return (y + shift).to(y.dtype)


def diversity_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FFSD's diversity loss ``div(x, y)`` on two attention maps.

    Args:
        x: ``[B, 1, H, W]`` (or any ``[B, ...]``): the student's attention map; receives the gradient.
        y: the previous student's attention map, same shape; detach it (FFSD does).

    Returns:
        A scalar, accumulated in at least fp32, in ``x``'s dtype.
    """
    if x.shape != y.shape:
        raise ValueError(f"diversity_loss expects two maps of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return diversity_loss_reference(x, y).to(x.dtype)


def diversity_shift(y: torch.Tensor) -> torch.Tensor:
    """FFSD's ``shift(y)``: the diversity target for a feature map.

    Args:
        y: ``[B, C, H, W]``, NCHW or channels-last.

    Returns:
        ``[B, C, H, W]`` in ``y``'s dtype.
    """
    if y.dim() != 4:
        raise ValueError(f"diversity_shift expects [B, C, H, W], got shape {tuple(y.shape)}")
    return diversity_shift_reference(y)
