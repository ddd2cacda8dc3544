"""One FFSD training step: forward every network, sum every loss, one backward, every optimiser steps once.

This function is the unit that gets compiled or captured in a CUDA graph, so it does no host synchronisation: no
``.item()``, no Python branching on tensor values; λ's and learning rates live in device tensors.
"""

from types import ModuleType

import torch
from torch import nn

from ffsd_fast.losses import LossOptions, LossTerms, step_losses
from ffsd_fast.method import FFSDNetworks


def _params(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for module in modules for p in module.parameters()]


def make_optimizers(
    nets: FFSDNetworks,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    fusion_weight_decay: float = 1e-5,
    decoder_lr: float = 1e-3,
    decoder_weight_decay: float = 1e-4,
) -> list[torch.optim.Optimizer]:
    """SGD (Nesterov) for students, leader and fusion module; Adam (L2, not AdamW) for the SD decoders.

    The reference has one optimiser per network; since every update is element-wise, parameter groups of one fused
    optimiser per kind are the same arithmetic in fewer launches. Learning rates are 0-dim device tensors, written in
    place by the schedule, which CUDA-graph replay requires.
    """
    device = next(nets.parameters()).device
    # The fused CUDA kernels read a tensor lr as float32; the CPU ones read it as a double, and float64 there keeps
    # the float64 parity runs exact (0.1 in float32 is off by 1.5e-8).
    lr_dtype = torch.float64 if device.type == "cpu" else torch.float32

    def lr_tensor(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=lr_dtype, device=device)

    groups = [{"params": _params(*nets.students, *filter(None, [nets.leader])), "weight_decay": weight_decay}]
    if nets.fusion is not None:
        groups.append({"params": _params(nets.fusion), "weight_decay": fusion_weight_decay})
    sgd = torch.optim.SGD(
        groups,
        lr=lr_tensor(lr),
        momentum=momentum,
        nesterov=True,
        fused=True,
    )
    for group in sgd.param_groups[1:]:
        group["lr"] = lr_tensor(lr)  # one tensor per group, so that loading a state dict keeps them independent
    decoders = _params(*nets.decoders, *filter(None, [nets.leader_decoder]))
    if not decoders:  # the baselines: students only
        return [sgd]
    adam = torch.optim.Adam(decoders, lr=lr_tensor(decoder_lr), weight_decay=decoder_weight_decay, fused=True)
    return [sgd, adam]


def set_learning_rates(optimizers: list[torch.optim.Optimizer], sgd_lr: float, decoder_lr: float) -> None:
    """Writes the schedule's values into the optimisers' lr tensors in place (no host sync, graph-safe)."""
    sgd, *decoder_optimizers = optimizers
    for group in sgd.param_groups:
        group["lr"].fill_(sgd_lr)
    for adam in decoder_optimizers:
        for group in adam.param_groups:
            group["lr"].fill_(decoder_lr)


def train_step(
    nets: FFSDNetworks,
    optimizers: list[torch.optim.Optimizer],
    images: torch.Tensor,
    labels: torch.Tensor,
    lambdas: torch.Tensor,
    options: LossOptions,
    ops: ModuleType,
) -> LossTerms:
    """One step of the run's method; returns the loss terms (device tensors, detached) for logging at the caller's
    pace."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    terms = step_losses(nets, images, labels, lambdas, options, ops)
    terms.total.backward()
    for optimizer in optimizers:
        optimizer.step()
    return terms.detach()
