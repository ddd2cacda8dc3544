"""The datasets that fit in device memory (scikit-learn digits, CIFAR-10/100): one tensor on the device, augmented
there in batches, the last training batch possibly partial, as in the reference.

Every loader of ``ffsd_fast.data`` yields ``(images, labels)`` already on the training device: ``images``
``[B, 3, image_size, image_size]``, normalised; ``labels`` int64 ``[B]``. A training loader of ``views`` V > 1 (a
method that feeds each network its own augmentation) yields ``[V·B, 3, image_size, image_size]``, view-major: view
0 is what V = 1 yields, views 1.. independent draws of the same augmentation. Which samples each rank visits in each
epoch, and how, is ``ffsd_fast.data.sampling``'s rule, shared by all loaders.

A ``DataSpec.holdout`` > 0 holds a slice of the training set out of training (``sampling.holdout_split``): the
training loader's ``heldout`` is a loader over it that reads like evaluation (no augmentation, one view, this rank's
disjoint share, the last batch partial); None without one.

Evaluation shards are disjoint, so every test sample is counted exactly once over all ranks: sum the per-rank
counts (``all_reduce``) after the loop, and do not run per-batch collectives during evaluation, since ranks may
differ by one batch. A label of ``sampling.PAD_LABEL`` marks a slot that only fills a batch: it is not counted.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ffsd_fast.data.common import FIXED_STATISTICS, DatasetInfo, DataSpec
from ffsd_fast.data.sampling import AUGMENTATION, PERMUTATION, generator, holdout_split, shard, train_batches
from ffsd_fast.errors import UserError

DIGITS_NUM_TRAIN = 1347  # of 1797; the remaining 450 are the test split


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


def _hold_out(
    spec: DataSpec, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The training tensors less the slice ``spec.holdout`` holds out, and that slice (None when it is 0)."""
    if not spec.holdout:
        return images, labels, None
    kept, held = (part.to(labels.device) for part in holdout_split(len(labels), spec.holdout, spec.seed))
    return images[kept], labels[kept], (images[held], labels[held])


class TensorLoader:
    """Batches from a dataset held as one tensor on the device, augmented there (digits, CIFAR).

    ``images`` are stored as uint8 (scaled by 1/255) or as float in [0, 1], ``[N, C, H, W]`` with C = 1 or 3.
    Augmentation (when ``augment``): pad by ``pad`` pixels (zeros or reflection), crop back at a random offset
    per sample, and optionally flip horizontally; then normalise, resize to ``image_size`` and replicate a grey
    channel to three. ``shuffle`` and ``augment`` are plain attributes (both True for training). ``views``: augmented
    copies of each batch, concatenated view-major (training only).
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
        views: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.image_size = batch_size, image_size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.shuffle = self.augment = train
        self.drop_last = drop_last and train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad, self.pad_mode, self.flip = pad, pad_mode, flip
        self.views = views if train else 1
        self.epoch = 0
        self.heldout: TensorLoader | None = None  # the held-out slice of a training loader's set, when one is held out

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

    def _draws(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per view, every sample's crop offset and flip for this epoch and rank: one draw each, a few host-to-device
        copies instead of several per batch. View 0's stream is the one-view loader's, so it yields the same images."""
        draws = []
        for view in range(self.views):
            g = generator(self.seed, self.epoch, AUGMENTATION, self.rank + view * self.world_size)
            offsets = torch.randint(0, 2 * self.pad + 1, (count, 2), generator=g)
            flips = torch.rand(count, generator=g) < 0.5
            draws.append((offsets.to(self.images.device), flips.to(self.images.device)))
        return draws

    def _augment(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        x = _random_crop(F.pad(x, [self.pad] * 4, mode=self.pad_mode), x.shape[-1], offsets)
        return torch.where(flips[:, None, None, None], x.flip(3), x) if self.flip else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices()
        draws = self._draws(len(order)) if self.augment else []
        order = order.to(self.images.device)
        for batch in range(len(self)):
            span = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            index = order[span]
            x = self.images[index].float()
            if self.images.dtype == torch.uint8:
                x = x / 255
            if self.augment:
                x = torch.cat([self._augment(x, offsets[span], flips[span]) for offsets, flips in draws])
            x = _resize((x - self.mean) / self.std, self.image_size)
            yield x.expand(-1, 3, -1, -1).contiguous(), self.labels[index]


def digits_loaders(
    spec: DataSpec, device: torch.device, rank: int = 0, world_size: int = 1
) -> tuple[TensorLoader, TensorLoader, DatasetInfo]:
    """scikit-learn's 8x8 digits (shipped with the library, no download), split 1347/450.

    The split is the first 1347 / last 450 positions of ``numpy.random.RandomState(0).permutation(1797)``
    (not stratified): the legacy RandomState stream is frozen by numpy, so the split never changes.
    Images are scaled to [0, 1] and resized (bilinear) to ``image_size`` once, up front; the normalisation is
    one scalar mean/std of the resized training split. Training translates by up to ``max(1, image_size // 8)``
    pixels (zero padding, i.e. a blank pixel) and never flips: digits are not mirror-symmetric.
    """
    from sklearn.datasets import load_digits

    image_size = spec.image_size
    common = dict(seed=spec.seed, drop_last=spec.drop_last, rank=rank, world_size=world_size)

    digits = load_digits()
    permutation = np.random.RandomState(0).permutation(len(digits.target))
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    images = _resize(images, image_size).to(device)
    labels = torch.as_tensor(digits.target, dtype=torch.int64).to(device)
    train = torch.as_tensor(permutation[:DIGITS_NUM_TRAIN]).to(device)
    test = torch.as_tensor(permutation[DIGITS_NUM_TRAIN:]).to(device)
    mean, std = images[train].mean().item(), images[train].std().item()
    stats = dict(mean=(mean,), std=(std,), image_size=image_size)
    train_x, train_y, heldout = _hold_out(spec, images[train], labels[train])
    train_loader = TensorLoader(
        train_x,
        train_y,
        batch_size=spec.batch_size,
        train=True,
        pad=max(1, image_size // 8),
        views=spec.views,
        **stats,
        **common,
    )
    test_loader = TensorLoader(
        images[test], labels[test], batch_size=spec.eval_batch_size, train=False, **stats, **common
    )
    if heldout is not None:
        train_loader.heldout = TensorLoader(*heldout, batch_size=spec.eval_batch_size, train=False, **stats, **common)
    held = 0 if heldout is None else len(heldout[1])
    return train_loader, test_loader, DatasetInfo("digits", 10, len(train_y), len(test), num_heldout=held)


# The official python format: each file a pickled dict; ``data`` a uint8 [N, 3072] array (the red, green and blue
# 32x32 planes of each image, row by row) and the labels a list of N integers under ``labels`` (CIFAR-10) or
# ``fine_labels`` (CIFAR-100).
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta"),
}
CIFAR_LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
CIFAR_PIXELS = 3 * 32 * 32


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def read_cifar_file(path: str, dataset: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One file of the official python format: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``, checked once.

    Refused, in one line naming the file and the key: a file that is no pickled dict, a missing key, pixels that
    are not uint8 (float pixels in 0–255 were used unscaled, NaN ones reached the loss), data not of shape
    [N, 3072], labels that are not integers (79.7 became 79) or outside 0..num_classes-1, and a number of labels
    that differs from the number of images (extra images were dropped, extra labels failed mid-epoch)."""
    key = CIFAR_LABEL_KEYS[dataset]
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        EOFError,
        AttributeError,
        ImportError,
        pickle.UnpicklingError,
    ) as e:
        raise UserError(f"{dataset}: cannot read {path} as the official python format ({_one_line(e)})") from None
    if not isinstance(entry, dict):
        raise UserError(f"{dataset}: {path} holds a {type(entry).__name__}, not the official format's dict")
    for needed in ("data", key):
        if needed not in entry:
            raise UserError(f"{dataset}: {path}: has no key {needed!r} (keys: {', '.join(map(str, entry)) or 'none'})")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8:
        raise UserError(
            f"{dataset}: {path}: key 'data' holds {data.dtype} pixels; the official format's are uint8 (0–255)"
        )
    if data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        raise UserError(
            f"{dataset}: {path}: key 'data' has shape {list(data.shape)}; expected [N, {CIFAR_PIXELS}] (3x32x32 each)"
        )
    try:
        labels = np.asarray(entry[key])
    except (ValueError, TypeError) as e:
        raise UserError(f"{dataset}: {path}: key {key!r} is not a list of integers ({_one_line(e)})") from None
    if labels.ndim != 1 or labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        example = labels.ravel()[:1].tolist() if labels.size else []
        raise UserError(
            f"{dataset}: {path}: key {key!r} holds {labels.dtype} values"
            + (f" (e.g. {example[0]!r})" if example else "")
            + "; the labels must be integers"
        )
    if len(labels) != len(data):
        raise UserError(
            f"{dataset}: {path}: key 'data' has {len(data)} images and key {key!r} {len(labels)} labels; they must "
            "agree"
        )
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise UserError(
            f"{dataset}: {path}: key {key!r} has labels outside 0..{num_classes - 1} (e.g. {int(outside[0])})"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar_loaders(
    spec: DataSpec, device: torch.device, rank: int = 0, world_size: int = 1
) -> tuple[TensorLoader, TensorLoader, DatasetInfo]:
    """CIFAR-10/100 from the official python-format tree; the reference augmentation, done on the device."""
    name, root = spec.dataset, os.path.expanduser(spec.data_root)
    common = dict(seed=spec.seed, drop_last=spec.drop_last, rank=rank, world_size=world_size)
    num_classes = 10 if name == "cifar10" else 100
    mean, std = FIXED_STATISTICS[name]
    base, train_files, test_files, meta = CIFAR_FILES[name]
    folder = os.path.join(root, base)
    expected = [*train_files, *test_files, meta]
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        elsewhere = "" if os.path.isdir(folder) else "; if the dataset is elsewhere on this machine, give --data-root"
        raise UserError(
            f"{name}: {folder} is missing {', '.join(missing)} (expected the official python-format "
            f"files {', '.join(expected)} in {folder}){elsewhere}"
        )

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [
            read_cifar_file(os.path.join(folder, f), name, num_classes) for f in (train_files if train else test_files)
        ]
        images = torch.from_numpy(np.concatenate([x for x, _ in parts]))
        labels = torch.from_numpy(np.concatenate([y for _, y in parts]))
        if len(labels) == 0:
            raise UserError(f"{name}: {folder} has no {'training' if train else 'test'} images")
        return images.to(device), labels.to(device)

    (train_x, train_y), (test_x, test_y) = load(True), load(False)
    train_x, train_y, heldout = _hold_out(spec, train_x, train_y)
    stats = dict(mean=mean, std=std, image_size=spec.image_size)
    train_loader = TensorLoader(
        train_x,
        train_y,
        batch_size=spec.batch_size,
        train=True,
        pad=4,
        pad_mode="reflect",
        flip=True,
        views=spec.views,
        **stats,
        **common,
    )
    test_loader = TensorLoader(test_x, test_y, batch_size=spec.eval_batch_size, train=False, **stats, **common)
    if heldout is not None:
        train_loader.heldout = TensorLoader(*heldout, batch_size=spec.eval_batch_size, train=False, **stats, **common)
    held = 0 if heldout is None else len(heldout[1])
    return train_loader, test_loader, DatasetInfo(name, num_classes, len(train_y), len(test_y), num_heldout=held)
