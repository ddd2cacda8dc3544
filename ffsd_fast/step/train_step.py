"""One FFSD training step: forward every network, sum every loss, one backward, every optimiser steps once.

This function is the unit that gets compiled or captured in a CUDA graph, so it does no host synchronisation: no
``.item()``, no Python branching on tensor values; λ's and learning rates live in device tensors.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from ffsd_fast.method.losses import LossOptions, LossTerms, step_losses
from ffsd_fast.method.networks import FFSDNetworks


def train_step(
    nets: FFSDNetworks,
    optimizers: list[torch.optim.Optimizer],
    images: torch.Tensor,
    labels: torch.Tensor,
    lambdas: torch.Tensor,
    options: LossOptions,
    ops: ModuleType,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    losses: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], LossTerms] | None = None,
) -> LossTerms:
    """One step of the run's method; returns the loss terms (device tensors, detached) for logging at the caller's
    pace.

    ``amp_dtype`` (bf16 or fp16) runs the forward passes under autocast; ``scaler`` scales the fp16 loss (with the
    fused optimisers it unscales and skips steps on the device, no host sync). ``losses(images, labels, lambdas)``
    replaces ``step_losses`` over ``nets`` (data parallelism: ``distributed.data_parallel``, the same losses through
    DDP, whose backward averages every gradient over the ranks; under fp16 the scaled ones, so every rank sees the
    same inf/NaN and skips the same steps).
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    for stack in nets.stacks:
        stack.zero_grad(set_to_none=True)
    autocast = (
        torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    with autocast:
        if losses is None:
            terms = step_losses(nets, images, labels, lambdas, options, ops)
        else:
            terms = losses(images, labels, lambdas)
    if scaler is None:
        terms.total.backward()
        for stack in nets.stacks:
            stack.share_grads()  # the networks' gradients: views into the stack's
        for optimizer in optimizers:
            optimizer.step()
    else:
        scaler.scale(terms.total).backward()
        for stack in nets.stacks:
            stack.share_grads()
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
    return terms.detach()


@dataclass
class Stepper:
    """Everything a training step needs besides the batch: ``stepper(images, labels)`` runs one (``train_step``)."""

    nets: FFSDNetworks
    optimizers: list[torch.optim.Optimizer]
    lambdas: torch.Tensor
    options: LossOptions
    ops: ModuleType
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    losses: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], LossTerms] | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> LossTerms:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return train_step(
            self.nets,
            self.optimizers,
            images,
            labels,
            self.lambdas,
            self.options,
            self.ops,
            self.amp_dtype,
            self.scaler,
            self.losses,
        )
