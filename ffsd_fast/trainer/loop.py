"""One epoch of training steps, and what the loop around them needs: the schedule's learning rates and λ's for each
step, and the running means of the loss terms, read back from the device only every ``--log-every`` steps."""

import time

import torch
from tqdm import tqdm

from ffsd_fast.errors import UserError
from ffsd_fast.method.losses import LAMBDA_DIV, LAMBDA_F, LAMBDA_SD, LossTerms
from ffsd_fast.step.cuda_graph import CapturedStep
from ffsd_fast.step.distributed import World, all_reduce_sum
from ffsd_fast.step.optimizers import set_learning_rates
from ffsd_fast.step.schedules import imagenet_sgd_lr, multistep_lr, warmed_up_lambda
from ffsd_fast.step.train_step import Stepper
from ffsd_fast.trainer.config import Config
from ffsd_fast.trainer.runlog import NullLog, RunLog

IMAGENET_DECODER_MILESTONES = [30, 60, 80]


class NonFiniteLoss(UserError):
    pass


def learning_rates(cfg: Config, epoch: int, step: int, steps_per_epoch: int) -> tuple[float, float]:
    """(SGD lr, decoder Adam lr) for a 1-based epoch and the step within it."""
    if cfg.lr_schedule == "imagenet":
        return (
            imagenet_sgd_lr(cfg.lr, epoch, step, steps_per_epoch, quirk=cfg.quirk_imagenet_lr_epoch),
            multistep_lr(cfg.decoder_lr, epoch, IMAGENET_DECODER_MILESTONES),
        )
    return multistep_lr(cfg.lr, epoch, cfg.lr_milestones), multistep_lr(cfg.decoder_lr, epoch, cfg.lr_milestones)


def lambdas_for(cfg: Config, epoch: int) -> list[float]:
    values = [0.0] * 3
    values[LAMBDA_DIV], values[LAMBDA_SD], values[LAMBDA_F] = cfg.lambda_div, cfg.lambda_sd, cfg.lambda_f
    return [warmed_up_lambda(v, epoch, cfg.lambda_warmup_epochs) for v in values]


class LossMeter:
    """Running means of the loss terms, summed on the device and read back (one host sync) only when asked."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.count = 0

    def add(self, terms: LossTerms) -> None:
        stacked = torch.stack([terms.total, *terms.values.values(), *terms.weighted.values()]).double()
        if self.names is None:
            self.names = ["total", *terms.values, *(f"weighted/{k}" for k in terms.weighted)]
            self.sums = torch.zeros_like(stacked)
            self.bad = torch.zeros((), dtype=torch.bool, device=stacked.device)
        self.sums += stacked
        self.bad |= ~torch.isfinite(terms.total)
        self.count += 1

    def read(self, world: World) -> tuple[dict[str, float], bool]:
        """(means since the last read over all ranks, whether any rank's total was non-finite); resets the means.

        Every rank reads at the same step, so the all-reduce lines up, and all ranks stop together on a NaN."""
        summed = all_reduce_sum(torch.cat([self.sums / self.count, self.bad.double()[None]]), world)
        values = (summed / world.world_size).tolist()  # host sync
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.names, values[:-1], strict=True)), values[-1] > 0


def train_epoch(
    cfg: Config,
    epoch: int,
    step_fn: Stepper | CapturedStep,
    loader,
    run_log: RunLog | NullLog,
    last_good: str,
    world: World,
) -> tuple[float, int]:
    """One epoch of steps; losses are read back every ``--log-every`` steps. Returns (seconds, images)."""
    loader.set_epoch(epoch)
    step_fn.nets.train()
    meter, images_seen, steps = LossMeter(), 0, len(loader)
    started = time.perf_counter()
    bar = tqdm(
        loader,
        total=steps,
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=None if cfg.progress and world.is_main else True,  # None: off when stderr is not a terminal
        leave=False,
        dynamic_ncols=True,
    )
    for step, (images, labels) in enumerate(bar):
        set_learning_rates(step_fn.optimizers, *learning_rates(cfg, epoch, step, steps))
        meter.add(step_fn(images, labels))
        images_seen += labels.shape[0] * world.world_size
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            means, non_finite = meter.read(world)
            if non_finite:
                raise NonFiniteLoss(
                    f"non-finite loss in epoch {epoch} by step {step + 1}: stopped; {last_good}; try a lower --lr"
                )
            run_log.log({"kind": "train", "epoch": epoch, "step": step + 1, **means}, (epoch - 1) * steps + step + 1)
            bar.set_postfix(loss=f"{means['total']:.3f}", ce=f"{means.get('leader.ce', means['student0.ce']):.3f}")
    bar.close()
    if step_fn.lambdas.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, images_seen
