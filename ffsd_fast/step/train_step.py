"""One training step: forward every network, sum every loss, one backward, every optimiser steps once, then the
method's ``after_step`` (a temporal mean of the weights, where a method keeps one).

``TrainStep`` is the unit that gets captured in a CUDA graph (``cuda_graph.CapturedStep``) or compiled, so it does no
host synchronisation: no ``.item()``, no Python branching on tensor values; λ's and learning rates live in device
tensors that the trainer writes in place.
"""

import torch
from torch import nn

from ffsd_fast.method.base import LossTerms, Method


class TrainStep:
    """``step(images, labels)`` runs one step of ``method`` and returns its loss terms (device tensors, detached) for
    logging at the caller's pace.

    ``module``: what computes the terms, ``method`` itself or a DDP around it (``distributed.data_parallel``: its
    backward averages every gradient over the ranks; under fp16 the scaled ones, so every rank sees the same inf/NaN
    and skips the same steps). ``amp_dtype`` (bf16 or fp16) runs the forward under autocast; ``scaler`` scales the
    fp16 loss (with the fused optimisers it unscales and skips steps on the device, no host sync). Without one, a
    disabled ``GradScaler`` passes everything through: one path either way.
    """

    def __init__(
        self,
        method: Method,
        optimizers: list[torch.optim.Optimizer],
        lambdas: torch.Tensor,
        amp_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        channels_last: bool = False,
        module: nn.Module | None = None,
    ) -> None:
        self.method, self.optimizers, self.lambdas = method, optimizers, lambdas
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(lambdas.device.type, enabled=False)
        self.module = module if module is not None else method

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> LossTerms:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.method.form.zero_grad()
        with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            terms = self.module(images, labels, self.lambdas)
        self.scaler.scale(terms.total).backward()
        self.method.form.share_grads()  # stacked, the networks' gradients are views into the stacks'
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        self.method.after_step()  # e.g. a temporal mean of the weights just stepped (PCL's)
        return terms.detach()
