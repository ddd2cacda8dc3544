"""The step's optimisers: one multi-tensor SGD and one Adam over the parameter groups a method declares, and the
schedule's learning rates written into them in place."""

from dataclasses import dataclass

import torch

from ffsd_fast.errors import UserError
from ffsd_fast.method.base import Method


def _apex_optimizers():
    try:
        from apex.optimizers import FusedAdam, FusedSGD
    except ImportError:
        raise UserError(
            "--optimizer-impl apex: NVIDIA apex is not installed here (it is not on PyPI: build it from "
            "github.com/NVIDIA/apex); use --optimizer-impl fused or foreach"
        ) from None
    return FusedSGD, FusedAdam


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimisers' hyper-parameters (the reference's by default): the optimiser slice of a run's configuration."""

    lr: float = 0.1  # SGD: students, leader, fusion module
    momentum: float = 0.9
    weight_decay: float = 1e-4  # students and leader
    fusion_weight_decay: float = 1e-5
    decoder_lr: float = 1e-3  # Adam: the SD decoders
    decoder_weight_decay: float = 1e-4
    impl: str = "fused"  # fused | foreach | apex


def make_optimizers(method: Method, spec: OptimizerSpec = OptimizerSpec()) -> list[torch.optim.Optimizer]:
    """One SGD (Nesterov, unless the method says otherwise) over the method's ``sgd`` parameter groups, then one
    Adam (L2, not AdamW) over its ``adam`` groups when it has any (FFSD's decoders).

    The reference has one optimiser per network; since every update is element-wise, parameter groups of one
    multi-tensor optimiser per kind are the same arithmetic in fewer launches. ``impl``: PyTorch's ``fused`` (the
    default) or ``foreach`` kernels, whose learning rates are 0-dim device tensors written in place by the schedule
    (CUDA-graph replay requires it; foreach on a CPU takes floats), or NVIDIA apex's ``FusedSGD``/``FusedAdam``
    (Python-float learning rates).
    """
    device = next(method.parameters()).device
    # The fused CUDA kernels read a tensor lr as float32; the CPU ones read it as a double, and float64 there keeps
    # the float64 parity runs exact (0.1 in float32 is off by 1.5e-8).
    lr_dtype = torch.float64 if device.type == "cpu" else torch.float32
    # foreach Adam takes a tensor lr only when capturable, which needs a GPU: on a CPU foreach gets Python floats.
    tensor_lr = spec.impl == "fused" or (spec.impl == "foreach" and device.type == "cuda")

    def groups(kind: str, lr: float) -> list[dict]:
        # One lr tensor per group, so that loading a state dict keeps them independent.
        value = (lambda: torch.tensor(lr, dtype=lr_dtype, device=device)) if tensor_lr else (lambda: lr)
        return [
            {"params": g.params, "weight_decay": getattr(spec, g.weight_decay), "lr": value()}
            for g in method.parameter_groups()
            if g.optimizer == kind
        ]

    if spec.impl == "apex":
        (sgd_class, adam_class), sgd_kind, adam_kind = _apex_optimizers(), {}, {"adam_w_mode": False}
    else:
        sgd_class, adam_class = torch.optim.SGD, torch.optim.Adam
        sgd_kind = {"fused": True} if spec.impl == "fused" else {"foreach": True}
        # On CUDA, Adam keeps its step counts on the device (capturable): graph capture refuses Adam without it,
        # fused included (measured on an H100), and foreach Adam takes a tensor lr only then.
        adam_kind = {**sgd_kind, "capturable": True} if device.type == "cuda" else sgd_kind
    sgd_groups, adam_groups = groups("sgd", spec.lr), groups("adam", spec.decoder_lr)
    nesterov = method.nesterov
    sgd = sgd_class(sgd_groups, lr=sgd_groups[0]["lr"], momentum=spec.momentum, nesterov=nesterov, **sgd_kind)
    if not adam_groups:
        return [sgd]
    return [sgd, adam_class(adam_groups, lr=adam_groups[0]["lr"], **adam_kind)]


def set_learning_rates(optimizers: list[torch.optim.Optimizer], sgd_lr: float, decoder_lr: float) -> None:
    """Writes the schedule's values into the optimisers' lr tensors in place (no host sync, graph-safe)."""
    sgd, *decoder_optimizers = optimizers
    for optimizer, value in [(sgd, sgd_lr), *((adam, decoder_lr) for adam in decoder_optimizers)]:
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(value)
            else:  # apex: Python floats
                group["lr"] = value
