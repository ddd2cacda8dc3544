"""One epoch of training steps, and what the loop around them needs: the schedule's learning rates and λ's for each
step, the running means of the loss terms, read back from the device only every ``--log-every`` steps, and the
method's work between epochs."""

import os
import time

import torch
from tqdm import tqdm

from ffsd_fast.errors import UserError
from ffsd_fast.method.base import LossTerms, Method
from ffsd_fast.step.distributed import World, all_reduce_sum
from ffsd_fast.step.optimizers import set_learning_rates
from ffsd_fast.step.schedules import imagenet_sgd_lr, multistep_lr, warmed_up_lambda
from ffsd_fast.trainer.config import Config
from ffsd_fast.trainer.state import Run

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


def lambdas_for(cfg: Config, method: Method, epoch: int) -> dict[str, float]:
    """The method's λ's (configuration fields ``method.lambdas``) for a 1-based epoch: its own schedule's, when it
    has one, else each warmed up."""
    own = method.epoch_lambdas(epoch)
    if own is not None:
        return {name: own[name] for name in method.lambdas}
    return {name: warmed_up_lambda(getattr(cfg, name), epoch, cfg.lambda_warmup_epochs) for name in method.lambdas}


def between_epochs(run: Run) -> dict[str, float]:
    """The method's work after an epoch's training (``Method.between_epochs``: a fit on the held-out slice), outside
    the step, so host syncs are allowed; what it returns, and the seconds it took when it returned anything, join
    the epoch's record. Every rank runs it on its own share and the method sums over the ranks."""
    started = time.perf_counter()
    fitted = run.method.between_epochs(run.heldout_loader, lambda tensor: all_reduce_sum(tensor, run.world))
    return {**fitted, "between_epochs_seconds": time.perf_counter() - started} if fitted else {}


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


def train_epoch(run: Run, epoch: int) -> tuple[dict[str, float], float, int]:
    """The epoch's λ's written to the device, then its steps; losses are read back every ``--log-every`` steps.
    Returns (λ's, seconds, images)."""
    cfg, world, loader = run.cfg, run.world, run.train_loader
    lambdas = lambdas_for(cfg, run.method, epoch)
    run.lambdas.copy_(torch.tensor(list(lambdas.values()), dtype=run.lambdas.dtype))
    last_good = (
        f"the last good checkpoint is {run.checkpoint_path} (epoch {epoch - 1})"
        if os.path.exists(run.checkpoint_path)
        else "no checkpoint was written yet"
    )
    loader.set_epoch(epoch)
    run.method.train()
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
        set_learning_rates(run.optimizers, *learning_rates(cfg, epoch, step, steps))
        meter.add(run.step(images, labels))
        images_seen += labels.shape[0] * world.world_size
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            means, non_finite = meter.read(world)
            if non_finite:
                raise NonFiniteLoss(
                    f"non-finite loss in epoch {epoch} by step {step + 1}: stopped; {last_good}; try a lower --lr"
                )
            run.log.log({"kind": "train", "epoch": epoch, "step": step + 1, **means}, (epoch - 1) * steps + step + 1)
            # The deployed network's CE where it has one (PCL's deployed temporal mean has none: it is not trained).
            ce = means.get(f"{run.method.deployed}.ce")
            bar.set_postfix(loss=f"{means['total']:.3f}", **({} if ce is None else {"ce": f"{ce:.3f}"}))
    bar.close()
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return lambdas, time.perf_counter() - started, images_seen
