"""Run by tests/integration/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): one rank's part
of the checks.

Writes ``<out>/rank<r>.pt`` with, the step's losses going through DDP (``distributed.data_parallel``):

- ``grads``: the averaged gradients of one FFSD loss on this rank's half of a fixed global batch, BatchNorm in eval
  mode; ``bf16_grads``: the same with ``--grad-compression bf16``;
- ``params``: every parameter after three data-parallel training steps on different data per rank;
  ``bf16_params``: the same with bf16 compression;
- ``undone_params``: the same three steps, after ``DDP_WARMUP_STEPS`` steps that ``CapturedStep.undo`` undid (the
  warm-up of a captured step under DDP, without the capture, which needs CUDA).
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)

from ffsd_fast.models.stacking import StackedBatchNorm2d  # noqa: E402
from ffsd_fast.step.cuda_graph import DDP_WARMUP_STEPS, CapturedStep  # noqa: E402
from ffsd_fast.step.distributed import close_world, data_parallel, init_world  # noqa: E402
from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates  # noqa: E402
from ffsd_fast.step.train_step import TrainStep  # noqa: E402
from tests.helpers.methods import build  # noqa: E402

LAMBDAS = (1e-5, 1000.0, 10.0)


def global_batch(seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)


def networks(stacked: bool = False):
    torch.manual_seed(0)
    nets = build("resnet20", num_classes=10, num_students=2, image_size=16)
    if stacked:
        nets.stack()
    return nets


def eval_mode_batchnorm(nets: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm on running statistics for good: the method switches its decoders back to train mode
    inside the loss, and a batch-statistics BN couples the samples of a batch (so no two half batches could
    give the whole batch's gradient)."""
    stacks = getattr(nets.form, "stacks", {}).values()
    for module in [*nets.modules(), *(m for stack in stacks for m in stack.modules())]:
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm | StackedBatchNorm2d):
            module.eval()
            module.train = lambda mode=True, module=module: module
    return nets


def averaged_grads(rank: int, world_size: int, compression: str, stacked: bool = False) -> dict[str, torch.Tensor]:
    nets = eval_mode_batchnorm(networks(stacked))
    losses = data_parallel(nets, compression=compression)
    x, y = global_batch()
    half = len(x) // world_size
    mine = slice(rank * half, (rank + 1) * half)
    losses(x[mine], y[mine], torch.tensor(LAMBDAS)).total.backward()
    nets.form.share_grads()  # stacked, the networks' gradients are views into the stacks' (reduced) ones
    return {name: p.grad.clone() for name, p in nets.named_parameters() if p.grad is not None}


def trained_params(
    rank: int, compression: str = "none", undone_steps: int = 0, stacked: bool = False
) -> dict[str, torch.Tensor]:
    """Every parameter after three steps on this rank's data; first ``undone_steps`` steps on other data, undone."""
    nets = networks(stacked).train()
    optimizers = make_optimizers(nets)
    set_learning_rates(optimizers, 0.05, 1e-3)
    ddp = data_parallel(nets, compression=compression)
    stepper = TrainStep(nets, optimizers, torch.tensor(LAMBDAS), module=ddp)
    if undone_steps:
        captured = CapturedStep(stepper, undone_steps)
        saved = captured.snapshot()
        for step in range(undone_steps):
            stepper(*global_batch(seed=500 + 10 * step + rank, size=4))
        captured.undo(saved)
    for step in range(3):
        stepper(*global_batch(seed=100 + 10 * step + rank, size=4))
    return {name: p.detach().clone() for name, p in nets.named_parameters()}


def main() -> None:
    out = sys.argv[1]
    world = init_world("cpu")
    torch.set_num_threads(1)
    rank, size = world.rank, world.world_size
    result = {
        "grads": averaged_grads(rank, size, "none"),
        "bf16_grads": averaged_grads(rank, size, "bf16"),
        "params": trained_params(rank),
        "bf16_params": trained_params(rank, "bf16"),
        "undone_params": trained_params(rank, undone_steps=DDP_WARMUP_STEPS),
        "stacked_grads": averaged_grads(rank, size, "none", stacked=True),
        "stacked_params": trained_params(rank, stacked=True),
    }
    torch.save(result, os.path.join(out, f"rank{world.rank}.pt"))
    close_world(world)


if __name__ == "__main__":
    main()
