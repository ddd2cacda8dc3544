"""Data loading for FFSD: scikit-learn digits, CIFAR-10/100 and ImageNet-style image folders.

Every loader yields ``(images, labels)`` already on the training device: ``images`` ``[B, 3, image_size,
image_size]``, normalised; ``labels`` int64 ``[B]``. Which samples each rank visits in each epoch, and how, is
``ffsd_fast.sampling``'s rule, shared by all loaders. Digits and CIFAR live as one tensor on the device and are
augmented there in batches (the last training batch may be partial, as in the reference); ImageNet folders go
through DALI (``ffsd_fast.dali_loader``) or torchvision (``ffsd_fast.torchvision_loader``), in full batches only.

Evaluation shards are disjoint, so every test sample is counted exactly once over all ranks: sum the per-rank
counts (``all_reduce``) after the loop, and do not run per-batch collectives during evaluation, since ranks may
differ by one batch. A label of ``sampling.PAD_LABEL`` marks a slot that only fills a batch: it is not counted.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from ffsd_fast.errors import UserError
from ffsd_fast.image_folder import ImageFolderIndex, index_images
from ffsd_fast.sampling import AUGMENTATION, PERMUTATION, generator, samples_per_rank, shard, train_batches

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
DEFAULT_DATASET = "digits"

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGITS_NUM_TRAIN = 1347  # of 1797; the remaining 450 are the test split


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the schedule need to know about a dataset."""

    name: str  # 'digits' | 'cifar10' | 'cifar100' | 'imagenet'
    num_classes: int
    num_train: int  # samples in the whole training set (all ranks)
    num_test: int
    corrupt: tuple[str, ...] = ()  # image files left out because they could not be decoded


class Loader(Protocol):
    """An epoch-aware iterable of ``(images, labels)`` batches on the device."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def _random_crop(padded: torch.Tensor, size: int, offsets: torch.Tensor) -> torch.Tensor:
    """Crop ``size``x``size`` windows at per-sample ``offsets`` ([B, 2]: row, column) in one gather."""
    steps = torch.arange(size, device=padded.device)
    rows = offsets[:, 0, None] + steps
    cols = offsets[:, 1, None] + steps
    batch = torch.arange(len(padded), device=padded.device)[:, None, None]
    # Advanced indices around a slice put the batch and spatial dims first: [B, size, size, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


class TensorLoader:
    """Batches from a dataset held as one tensor on the device, augmented there (digits, CIFAR).

    ``images`` are stored as uint8 (scaled by 1/255) or as float in [0, 1], ``[N, C, H, W]`` with C = 1 or 3.
    Augmentation (when ``augment``): pad by ``pad`` pixels (zeros or reflection), crop back at a random offset
    per sample, and optionally flip horizontally; then normalise, resize to ``image_size`` and replicate a grey
    channel to three. ``shuffle`` and ``augment`` are plain attributes (both True for training).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        pad: int = 0,
        pad_mode: str = "constant",
        flip: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.image_size = batch_size, image_size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.shuffle = self.augment = train
        self.drop_last = drop_last and train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad, self.pad_mode, self.flip = pad, pad_mode, flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """Sample indices (CPU, int64) this rank visits in the current epoch, in order."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.randperm(n, generator=generator(self.seed, self.epoch, PERMUTATION))
        return shard(order, self.rank, self.world_size, self.drop_last)

    def __len__(self) -> int:
        if self.shuffle:
            return train_batches(len(self.labels), self.batch_size, self.world_size, self.drop_last)
        n = len(range(self.rank, len(self.labels), self.world_size))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        order = self.indices()
        if self.augment:
            # One draw per epoch and rank: a few host-to-device copies instead of several per batch.
            g = generator(self.seed, self.epoch, AUGMENTATION, self.rank)
            offsets = torch.randint(0, 2 * self.pad + 1, (len(order), 2), generator=g).to(device)
            flips = (torch.rand(len(order), generator=g) < 0.5).to(device)
        order = order.to(device)
        for batch in range(len(self)):
            span = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            index = order[span]
            x = self.images[index].float()
            if self.images.dtype == torch.uint8:
                x = x / 255
            if self.augment:
                x = _random_crop(F.pad(x, [self.pad] * 4, mode=self.pad_mode), x.shape[-1], offsets[span])
                if self.flip:
                    x = torch.where(flips[span, None, None, None], x.flip(3), x)
            x = _resize((x - self.mean) / self.std, self.image_size)
            yield x.expand(-1, 3, -1, -1).contiguous(), self.labels[index]


def _digits(
    image_size: int, device: torch.device, batch_size: int, eval_batch_size: int, common: dict
) -> tuple[TensorLoader, TensorLoader, DatasetInfo]:
    """scikit-learn's 8x8 digits (shipped with the library, no download), split 1347/450.

    The split is the first 1347 / last 450 positions of ``numpy.random.RandomState(0).permutation(1797)``
    (not stratified): the legacy RandomState stream is frozen by numpy, so the split never changes.
    Images are scaled to [0, 1] and resized (bilinear) to ``image_size`` once, up front; the normalisation is
    one scalar mean/std of the resized training split. Training translates by up to ``max(1, image_size // 8)``
    pixels (zero padding, i.e. a blank pixel) and never flips: digits are not mirror-symmetric.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    permutation = np.random.RandomState(0).permutation(len(digits.target))
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    images = _resize(images, image_size).to(device)
    labels = torch.as_tensor(digits.target, dtype=torch.int64).to(device)
    train = torch.as_tensor(permutation[:DIGITS_NUM_TRAIN]).to(device)
    test = torch.as_tensor(permutation[DIGITS_NUM_TRAIN:]).to(device)
    mean, std = images[train].mean().item(), images[train].std().item()
    stats = dict(mean=(mean,), std=(std,), image_size=image_size)
    train_loader = TensorLoader(
        images[train], labels[train], batch_size=batch_size, train=True, pad=max(1, image_size // 8), **stats, **common
    )
    test_loader = TensorLoader(images[test], labels[test], batch_size=eval_batch_size, train=False, **stats, **common)
    return train_loader, test_loader, DatasetInfo("digits", 10, len(train), len(test))


class _ExistenceCheckOnly:
    """Accept any tree in the official CIFAR python format: torchvision's md5 checks only pass the real files."""

    def _check_integrity(self) -> bool:
        files = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name in files)

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _CIFAR10(_ExistenceCheckOnly, torchvision.datasets.CIFAR10):
    pass


class _CIFAR100(_ExistenceCheckOnly, torchvision.datasets.CIFAR100):
    pass


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _cifar(
    name: str, root: str, image_size: int, device: torch.device, batch_size: int, eval_batch_size: int, common: dict
) -> tuple[TensorLoader, TensorLoader, DatasetInfo]:
    """CIFAR-10/100 from the official python-format tree; the reference augmentation, done on the device."""
    cls, num_classes = (_CIFAR10, 10) if name == "cifar10" else (_CIFAR100, 100)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    folder = os.path.join(root, cls.base_folder)
    expected = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(
            f"{name}: {folder} is missing {', '.join(missing)} (expected the official python-format "
            f"files {', '.join(expected)} in {folder})"
        )

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            data = cls(root, train=train, download=False)
        except (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            raise UserError(f"{name}: cannot read {folder} as the official python format ({_one_line(e)})") from e
        labels = torch.as_tensor(np.asarray(data.targets, dtype=np.int64))
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"{name}: {folder} has no images or labels outside 0..{num_classes - 1}")
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, still uint8
        return images.to(device), labels.to(device)

    (train_x, train_y), (test_x, test_y) = load(True), load(False)
    stats = dict(mean=mean, std=std, image_size=image_size)
    train_loader = TensorLoader(
        train_x, train_y, batch_size=batch_size, train=True, pad=4, pad_mode="reflect", flip=True, **stats, **common
    )
    test_loader = TensorLoader(test_x, test_y, batch_size=eval_batch_size, train=False, **stats, **common)
    return train_loader, test_loader, DatasetInfo(name, num_classes, len(train_y), len(test_y))


LOADERS = ("auto", "dali", "torchvision")


def dali_available() -> bool:
    from ffsd_fast.dali_loader import dali_available as importable  # imported here: it imports this module

    return importable()


def _imagenet(
    index: ImageFolderIndex,
    loader: str,
    image_size: int,
    device: torch.device,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    drop_last: bool,
    workers: int,
    rank: int,
    world_size: int,
    dtype: torch.dtype,
    channels_last: bool,
) -> tuple[Loader, Loader, DatasetInfo]:
    """The tree's train and val lists through DALI or torchvision; both take the same samples in full batches."""
    if loader == "auto":
        loader = "dali" if dali_available() else "torchvision"
    if loader == "dali" and not dali_available():
        raise UserError(
            "--loader dali: NVIDIA DALI is not installed (pip install 'ffsd-fast[dali]', i.e. "
            "nvidia-dali-cuda130), or use --loader torchvision"
        )
    _check_shard(len(index.train), batch_size, drop_last, world_size)
    common = dict(
        image_size=image_size,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        device=device,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        dtype=dtype,
        channels_last=channels_last,
    )
    if loader == "dali":
        from ffsd_fast.dali_loader import dali_loaders

        train_loader, val_loader = dali_loaders(index.train, index.val, threads=max(workers, 1), **common)
    else:
        from ffsd_fast.torchvision_loader import torchvision_loaders

        train_loader, val_loader = torchvision_loaders(index.train, index.val, workers=workers, **common)
    info = DatasetInfo("imagenet", len(index.classes), len(index.train), len(index.val), tuple(index.corrupt))
    return train_loader, val_loader, info


def _check_shard(num_train: int, batch_size: int, drop_last: bool, world_size: int) -> None:
    per_rank = samples_per_rank(num_train, world_size, drop_last)
    if drop_last and per_rank < batch_size:
        raise UserError(
            f"training shard of {per_rank} samples per rank ({num_train} over {world_size} ranks) is "
            f"smaller than the batch size {batch_size}, so drop_last would leave no batch"
        )


def build_loaders(
    dataset: str,
    data_root: str | None,
    image_size: int,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    seed: int,
    drop_last: bool = False,
    workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    loader: str = "auto",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    index: ImageFolderIndex | None = None,
    check_images: bool = True,
) -> tuple[Loader, Loader, DatasetInfo]:
    """Train and eval loaders for this rank, plus the dataset's facts.

    ``dataset`` is one of ``DATASETS``; ``data_root`` is needed by all but 'digits'. The train loader
    shuffles and augments from ``(seed, epoch)`` only (call ``set_epoch`` before each epoch) and keeps the last
    partial batch unless ``drop_last``; the eval loader keeps a fixed order and never drops. For 'imagenet':
    ``loader`` (auto: DALI when installed), ``workers`` (DataLoader processes or DALI threads), the output
    ``dtype`` and memory format, and ``index``, the tree's file lists (default: ``index_images(data_root)``, which
    with ``check_images`` decodes every image once and leaves the corrupt ones out).
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    for name, value, low in (
        ("image size", image_size, 1),
        ("batch size", batch_size, 1),
        ("eval batch size", eval_batch_size, 1),
        ("world size", world_size, 1),
        ("number of workers", workers, 0),
    ):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if dataset != "digits" and data_root is None:
        raise UserError(f"dataset {dataset} needs a data root (the folder that holds it)")
    device = torch.device(device)
    if loader not in LOADERS:
        raise UserError(f"unknown loader {loader!r}: choose one of {', '.join(LOADERS)}")
    if dataset == "imagenet":
        index = index or index_images(data_root, workers, check_images)
        return _imagenet(
            index,
            loader,
            image_size,
            device,
            batch_size,
            eval_batch_size,
            seed,
            drop_last,
            workers,
            rank,
            world_size,
            dtype,
            channels_last,
        )

    common = dict(seed=seed, drop_last=drop_last, rank=rank, world_size=world_size)
    if dataset == "digits":
        loaders = _digits(image_size, device, batch_size, eval_batch_size, common)
    else:
        loaders = _cifar(
            dataset, os.path.expanduser(data_root), image_size, device, batch_size, eval_batch_size, common
        )
    _check_shard(loaders[2].num_train, batch_size, drop_last, world_size)
    return loaders
