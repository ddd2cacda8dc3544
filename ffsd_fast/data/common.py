"""What every data module shares: the dataset names and statistics, the loader contract, and ``DataSpec``, the data
slice of a run's configuration (checked here, once, for the trainer and for every other caller)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ffsd_fast.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
DEFAULT_DATASET = "digits"
LOADERS = ("auto", "dali", "torchvision")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per-channel (mean, std) on pixels in [0, 1] of the datasets whose pipelines use fixed constants (digits computes its
# own from the training split): what the loaders normalise with and an exported leader's sidecar records.
FIXED_STATISTICS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}

# What --data-root must hold, by dataset: named in the error when it is missing.
DATA_ROOT_HOLDS = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/", "imagenet": "train/ and val/"}


def absolute_data_root(data_root: str | None) -> str | None:
    """``--data-root`` as an absolute path (``~`` expanded): what a run saves, so that ``ffsd-eval RUN`` and
    ``--resume`` find the data from any working folder."""
    return os.path.abspath(os.path.expanduser(data_root)) if data_root else data_root


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the schedule need to know about a dataset."""

    name: str  # 'digits' | 'cifar10' | 'cifar100' | 'imagenet'
    num_classes: int
    num_train: int  # samples trained on, over all ranks (the training set less its held-out slice)
    num_test: int
    corrupt: tuple[str, ...] = ()  # image files left out because they could not be decoded
    num_heldout: int = 0  # training samples held out of training (``DataSpec.holdout``), over all ranks


class Loader(Protocol):
    """An epoch-aware iterable of ``(images, labels)`` batches on the device."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class DataSpec:
    """Which data to load and how: a dataset of ``DATASETS`` (all but 'digits' need ``data_root``), the input size,
    the per-process batch sizes, the seed of the shuffling and the augmentation, whether the last partial training
    batch is dropped, and for ImageNet folders the ``loader`` (auto: DALI when installed), its ``workers``
    (DataLoader processes or DALI threads) and whether every image is decoded once up front (``check_images``).
    ``holdout``: the fraction of the training set held out of training for a method to fit on between epochs
    (``sampling.holdout_split``; the in-memory datasets only).

    Constructing one checks every value and raises ``UserError`` with the flag to fix."""

    dataset: str
    data_root: str | None
    image_size: int
    batch_size: int
    eval_batch_size: int
    seed: int = 0
    drop_last: bool = False
    workers: int = 4
    loader: str = "auto"
    check_images: bool = True
    # Augmented copies of each training image, view-major (``in_memory``'s docstring): one per network for some methods.
    views: int = 1
    # The fraction of the training set held out of training, unaugmented, for a method that fits on it (0: none).
    holdout: float = 0.0

    def __post_init__(self) -> None:
        check_dataset(self.dataset)
        if self.dataset != "digits" and not self.data_root:
            raise UserError(
                f"dataset {self.dataset} needs a data root (--data-root: the folder that holds "
                f"{DATA_ROOT_HOLDS[self.dataset]})"
            )
        if self.loader not in LOADERS:
            raise UserError(f"unknown loader {self.loader!r}: choose one of {', '.join(LOADERS)}")
        for name, value, low in (
            ("image size", self.image_size, 1),
            ("batch size", self.batch_size, 1),
            ("eval batch size", self.eval_batch_size, 1),
            ("number of workers", self.workers, 0),
            ("number of views", self.views, 1),
        ):
            if value < low:
                raise UserError(f"{name} must be at least {low}, got {value}")
        if not 0 <= self.holdout < 1:
            raise UserError(f"the held-out fraction of the training set must be in [0, 1), got {self.holdout}")
