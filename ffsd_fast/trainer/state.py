"""``Run``: what a run trains with, made by ``run.build`` and worked on by every later phase (and the epoch loop)."""

import os
from dataclasses import dataclass, field

import torch

from ffsd_fast.data.common import DatasetInfo, Loader
from ffsd_fast.method.base import Method
from ffsd_fast.step.cuda_graph import CapturedStep
from ffsd_fast.step.distributed import World
from ffsd_fast.step.train_step import TrainStep
from ffsd_fast.step.tuning import Tuning
from ffsd_fast.trainer import checkpoint
from ffsd_fast.trainer.config import Config
from ffsd_fast.trainer.runlog import NullLog, RunLog
from ffsd_fast.trainer.step_forms import StepForm


@dataclass
class Run:
    cfg: Config
    world: World
    device: torch.device
    run_dir: str
    info: DatasetInfo
    train_loader: Loader
    test_loader: Loader
    method: Method
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None
    lambdas: torch.Tensor  # the method's λ's on the device (``method.lambdas``' order), written in place each epoch
    step: TrainStep | CapturedStep
    form: StepForm  # what the step is: per-network or stacked, and the method's levers
    tuning: Tuning | None  # what --step auto timed, when it did
    topk: tuple[int, ...]
    heldout_loader: Loader | None = None  # this rank's share of the training set's held-out slice, if one is held out
    saved: dict | None = None  # the checkpoint this run resumes, until ``restore`` has taken it in
    saved_config: dict | None = None  # the configuration the resumed checkpoint was saved with
    log: RunLog | NullLog = field(default_factory=NullLog)
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 1

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, checkpoint.CHECKPOINT_NAME)
