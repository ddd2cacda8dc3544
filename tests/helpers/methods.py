"""Building a method's networks and stepping them in tests, in the words the tests use."""

from types import ModuleType

import torch

import ffsd_kernels
from ffsd_fast.method import registry
from ffsd_fast.method.base import LossTerms, Method
from ffsd_fast.step.train_step import TrainStep


def build(
    model: str,
    num_classes: int,
    num_students: int,
    image_size: int,
    probe_forward: bool = True,
    fused_blocks: bool = False,
    method: str = "ffsd",
    kernels: str | ModuleType = "torch",
    **settings,
) -> Method:
    """``registry.create`` with the run's settings by their test names: ``kernels`` as a name or as the ops module
    (``ffsd_kernels``: triton)."""
    if isinstance(kernels, ModuleType):
        kernels = "triton" if kernels is ffsd_kernels else "torch"
    return registry.create(
        method,
        model,
        num_classes,
        num_students,
        image_size,
        quirk_probe_forward=probe_forward,
        fusion_kernel="triton" if fused_blocks else "torch",
        kernels=kernels,
        **settings,
    )


def train_step(
    method: Method, optimizers: list, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor, **kwargs
) -> LossTerms:
    """One ``TrainStep`` of ``method`` (kwargs: ``amp_dtype``, ``scaler``, ``channels_last``)."""
    return TrainStep(method, optimizers, lambdas, **kwargs)(images, labels)


def max_relative_error(fast: torch.nn.Module, reference: torch.nn.Module) -> float:
    """The worst relative error over every floating parameter and buffer of ``reference`` (by name in ``fast``); the
    integer buffers (BatchNorm's step counts) must be equal."""
    state = lambda nets: {**dict(nets.named_parameters()), **dict(nets.named_buffers())}  # noqa: E731
    got, worst = state(fast), 0.0
    for name, ref in state(reference).items():
        if not ref.is_floating_point():
            assert torch.equal(got[name], ref), name
            continue
        worst = max(worst, (got[name] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30))
    return worst
