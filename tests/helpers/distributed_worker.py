"""Run by tests/integration/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): one rank's part
of the checks.

Writes ``<out>/rank<r>.pt`` with (1) the averaged gradients of one FFSD loss on this rank's half of a fixed global
batch, BatchNorm in eval mode, and (2) every parameter after three data-parallel training steps on different data
per rank.
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)

import ffsd_kernels.reference as ops  # noqa: E402
from ffsd_fast.method.losses import LossOptions, ffsd_losses  # noqa: E402
from ffsd_fast.method.networks import build_networks  # noqa: E402
from ffsd_fast.step.distributed import GradientAverager, close_world, init_world  # noqa: E402
from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates  # noqa: E402
from ffsd_fast.step.train_step import Stepper  # noqa: E402

LAMBDAS = (1e-5, 1000.0, 10.0)


def global_batch(seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)


def networks():
    torch.manual_seed(0)
    return build_networks("resnet20", num_classes=10, num_students=2, image_size=16)


def eval_mode_batchnorm(nets: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm on running statistics for good: the method switches its decoders back to train mode
    inside the loss, and a batch-statistics BN couples the samples of a batch (so no two half batches could
    give the whole batch's gradient)."""
    for module in nets.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.train = lambda mode=True, module=module: module
    return nets


def main() -> None:
    out = sys.argv[1]
    world = init_world("cpu")
    torch.set_num_threads(1)
    lambdas = torch.tensor(LAMBDAS)

    nets = eval_mode_batchnorm(networks())
    x, y = global_batch()
    half = len(x) // world.world_size
    mine = slice(world.rank * half, (world.rank + 1) * half)
    ffsd_losses(nets, x[mine], y[mine], lambdas, LossOptions(), ops).total.backward()
    GradientAverager(list(nets.parameters()), world)()
    grads = {name: p.grad.clone() for name, p in nets.named_parameters() if p.grad is not None}

    nets = networks().train()
    optimizers = make_optimizers(nets)
    set_learning_rates(optimizers, 0.05, 1e-3)
    stepper = Stepper(
        nets, optimizers, lambdas, LossOptions(), ops, grad_sync=GradientAverager(list(nets.parameters()), world)
    )
    for step in range(3):
        stepper(*global_batch(seed=100 + 10 * step + world.rank, size=4))
    params = {name: p.detach().clone() for name, p in nets.named_parameters()}
    torch.save({"grads": grads, "params": params}, os.path.join(out, f"rank{world.rank}.pt"))
    close_world(world)


if __name__ == "__main__":
    main()
