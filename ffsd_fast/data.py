"""Data loading for FFSD: scikit-learn digits, CIFAR-10/100 and ImageNet-style image folders.

Every loader yields ``(images, labels)`` already on the training device: ``images`` float32
``[B, 3, image_size, image_size]``, normalised; ``labels`` int64 ``[B]``.

Randomness (shuffling, augmentation) comes only from ``(seed, epoch)`` through private generators, so a run
resumed at epoch ``e`` sees exactly the batches an uninterrupted run would, and the global RNG is never touched.
Digits and CIFAR live as one tensor on the device and are augmented there in batches; ImageNet goes through a
``DataLoader`` with worker processes.

Sharding (``world_size > 1``) follows ``DistributedSampler``: every rank uses the same epoch permutation and
takes every ``world_size``-th index starting at ``rank``; without ``drop_last`` the permutation is padded by
wrapping around so that every rank gets the same number of samples, with ``drop_last`` it is cut to a multiple
of ``world_size``. Evaluation shards are disjoint and never padded, so every test sample is counted exactly
once over all ranks: sum the per-rank counts (``all_reduce``) after the loop, and do not run per-batch
collectives during evaluation, since ranks may differ by one batch.
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
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import transforms

from ffsd_fast.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
DEFAULT_DATASET = "digits"

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGITS_NUM_TRAIN = 1347  # of 1797; the remaining 450 are the test split

# Tags that keep the random streams drawn from one (seed, epoch) apart from each other.
_PERMUTATION, _AUGMENTATION, _SAMPLE, _WORKERS = 0, 1, 2, 3


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the schedule need to know about a dataset."""

    name: str  # 'digits' | 'cifar10' | 'cifar100' | 'imagenet'
    num_classes: int
    num_train: int  # samples in the whole training set (all ranks)
    num_test: int


class Loader(Protocol):
    """An epoch-aware iterable of ``(images, labels)`` batches on the device."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def _seed_for(seed: int, epoch: int, tag: int, key: int = 0) -> int:
    """A 64-bit seed for one random stream; SeedSequence keeps streams of neighbouring keys independent."""
    sequence = np.random.SeedSequence(seed % 2**64, spawn_key=(epoch, tag, key))
    return int(sequence.generate_state(1, np.uint64)[0])


def _generator(seed: int, epoch: int, tag: int, key: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(seed, epoch, tag, key))


def _shard(order: torch.Tensor, rank: int, world_size: int, drop_last: bool) -> torch.Tensor:
    """This rank's interleaved share of ``order``, padded by wrapping around (or cut) like DistributedSampler."""
    n = len(order)
    if drop_last:
        order = order[: n - n % world_size]
    elif n % world_size:
        padding = world_size - n % world_size
        order = torch.cat([order, order.repeat(math.ceil(padding / n))[:padding]])
    return order[rank::world_size]


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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], train: bool, seed: int, drop_last: bool,
                 rank: int, world_size: int, pad: int = 0, pad_mode: str = "constant", flip: bool = False) -> None:
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
        order = torch.randperm(n, generator=_generator(self.seed, self.epoch, _PERMUTATION))
        return _shard(order, self.rank, self.world_size, self.drop_last)

    def __len__(self) -> int:
        n = len(self.labels)
        if not self.shuffle:
            n = len(range(self.rank, n, self.world_size))
        else:
            n = n // self.world_size if self.drop_last else math.ceil(n / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        order = self.indices()
        if self.augment:
            # One draw per epoch and rank: a few host-to-device copies instead of several per batch.
            g = _generator(self.seed, self.epoch, _AUGMENTATION, self.rank)
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


def _digits(image_size: int, device: torch.device, batch_size: int, eval_batch_size: int,
            common: dict) -> tuple[TensorLoader, TensorLoader, DatasetInfo]:
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
    train_loader = TensorLoader(images[train], labels[train], batch_size=batch_size, train=True,
                                pad=max(1, image_size // 8), **stats, **common)
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


def _cifar(name: str, root: str, image_size: int, device: torch.device, batch_size: int, eval_batch_size: int,
           common: dict) -> tuple[TensorLoader, TensorLoader, DatasetInfo]:
    """CIFAR-10/100 from the official python-format tree; the reference augmentation, done on the device."""
    cls, num_classes = (_CIFAR10, 10) if name == "cifar10" else (_CIFAR100, 100)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    folder = os.path.join(root, cls.base_folder)
    expected = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"{name}: {folder} is missing {', '.join(missing)} (expected the official python-format "
                        f"files {', '.join(expected)} in {folder})")

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
    train_loader = TensorLoader(train_x, train_y, batch_size=batch_size, train=True, pad=4, pad_mode="reflect",
                                flip=True, **stats, **common)
    test_loader = TensorLoader(test_x, test_y, batch_size=eval_batch_size, train=False, **stats, **common)
    return train_loader, test_loader, DatasetInfo(name, num_classes, len(train_y), len(test_y))


class _SeededImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder indexed by ``(index, sample_seed)``: each sample's augmentation depends on its seed only.

    torchvision transforms draw from the global torch RNG; seeding it per sample (inside ``fork_rng``, so the
    caller's state survives when there are no workers) makes the crops independent of worker count, worker
    scheduling and persistent workers, which is what lets a resumed run reproduce an epoch exactly.
    """

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            return super().__getitem__(index)


class _SeededSampler(Sampler):
    """Wraps a DistributedSampler, pairing each index with a seed derived from (seed, epoch, index)."""

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, _seed_for(self.seed, self.epoch, _SAMPLE, i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class FolderLoader:
    """Batches from a torch DataLoader, moved to the device (ImageNet-style folders)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.loader.sampler, _SeededSampler):
            self.loader.sampler.set_epoch(epoch)

    def indices(self) -> torch.Tensor:
        """Sample indices this rank visits in the current epoch, in order."""
        sampler = self.loader.sampler
        if isinstance(sampler, _SeededSampler):
            sampler = sampler.sampler  # skip deriving the per-sample seeds
        return torch.tensor(list(sampler), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def _class_folders(directory: str) -> list[str]:
    # Same rule as torchvision's find_classes, so the names agree with the ImageFolder's.
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def _imagenet(root: str, image_size: int, device: torch.device, batch_size: int, eval_batch_size: int,
              seed: int, drop_last: bool, workers: int, rank: int,
              world_size: int) -> tuple[FolderLoader, FolderLoader, DatasetInfo]:
    """An ImageFolder tree ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` with the standard transforms."""
    if not os.path.isdir(root):
        raise UserError(f"imagenet: data root {root} does not exist or is not a directory")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for directory in (train_dir, val_dir):
        if not os.path.isdir(directory):
            raise UserError(f"imagenet: {directory} is missing (expected {root}/train/<class>/* and "
                            f"{root}/val/<class>/*)")
    train_classes, val_classes = _class_folders(train_dir), _class_folders(val_dir)
    if not train_classes:
        raise UserError(f"imagenet: no class folders in {train_dir} (expected {train_dir}/<class>/<image>)")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise UserError(f"imagenet: class folders of {val_dir} differ from {train_dir}: "
                        f"only in train: {', '.join(only_train[:5]) or '-'}{' ...' if len(only_train) > 5 else ''}; "
                        f"only in val: {', '.join(only_val[:5]) or '-'}{' ...' if len(only_val) > 5 else ''}")

    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_set = _SeededImageFolder(train_dir, allow_empty=True, transform=transforms.Compose(
        [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *normalize]))
    val_set = torchvision.datasets.ImageFolder(val_dir, allow_empty=True, transform=transforms.Compose(
        [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size), *normalize]))
    for dataset, directory in ((train_set, train_dir), (val_set, val_dir)):
        counts = np.bincount(np.asarray(dataset.targets, dtype=np.int64), minlength=len(dataset.classes))
        empty = [os.path.join(directory, c) for c, n in zip(dataset.classes, counts, strict=True) if n == 0]
        if empty:
            raise UserError(f"imagenet: no images in class folder {', '.join(empty[:3])}"
                            f"{f' (and {len(empty) - 3} more)' if len(empty) > 3 else ''}")

    _check_shard(len(train_set), batch_size, drop_last, world_size)
    options = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                   generator=torch.Generator().manual_seed(_seed_for(seed, 0, _WORKERS)))
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=drop_last)
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=_SeededSampler(sampler, seed),
                              drop_last=drop_last, **options)
    val_loader = DataLoader(val_set, batch_size=eval_batch_size, sampler=list(range(rank, len(val_set), world_size)),
                            **options)
    info = DatasetInfo("imagenet", len(train_classes), len(train_set), len(val_set))
    return FolderLoader(train_loader, device), FolderLoader(val_loader, device), info


def _check_shard(num_train: int, batch_size: int, drop_last: bool, world_size: int) -> None:
    per_rank = num_train // world_size if drop_last else math.ceil(num_train / world_size)
    if drop_last and per_rank < batch_size:
        raise UserError(f"training shard of {per_rank} samples per rank ({num_train} over {world_size} ranks) is "
                        f"smaller than the batch size {batch_size}, so drop_last would leave no batch")


def build_loaders(dataset: str, data_root: str | None, image_size: int, batch_size: int, eval_batch_size: int,
                  device: torch.device, seed: int, drop_last: bool = False, workers: int = 4,
                  rank: int = 0, world_size: int = 1) -> tuple[Loader, Loader, DatasetInfo]:
    """Train and eval loaders for this rank, plus the dataset's facts.

    ``dataset`` is one of ``DATASETS``; ``data_root`` is needed by all but 'digits'. The train loader
    shuffles and augments from ``(seed, epoch)`` only (call ``set_epoch`` before each epoch) and keeps the last
    partial batch unless ``drop_last``; the eval loader keeps a fixed order and never drops. ``workers`` only
    matters for 'imagenet'.
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    for name, value, low in (("image size", image_size, 1), ("batch size", batch_size, 1),
                             ("eval batch size", eval_batch_size, 1), ("world size", world_size, 1),
                             ("number of workers", workers, 0)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if dataset != "digits" and data_root is None:
        raise UserError(f"dataset {dataset} needs a data root (the folder that holds it)")
    device = torch.device(device)
    if dataset == "imagenet":
        return _imagenet(os.path.expanduser(data_root), image_size, device, batch_size, eval_batch_size, seed,
                         drop_last, workers, rank, world_size)

    common = dict(seed=seed, drop_last=drop_last, rank=rank, world_size=world_size)
    if dataset == "digits":
        loaders = _digits(image_size, device, batch_size, eval_batch_size, common)
    else:
        loaders = _cifar(dataset, os.path.expanduser(data_root), image_size, device, batch_size, eval_batch_size,
                         common)
    _check_shard(loaders[2].num_train, batch_size, drop_last, world_size)
    return loaders
