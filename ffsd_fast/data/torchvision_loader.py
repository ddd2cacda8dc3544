"""ImageNet-style folders through torchvision transforms and a DataLoader: the fallback when DALI is absent.

Same contract as ``ffsd_fast.data.dali_loader``: the samples of ``ffsd_fast.data.sampling`` (so both loaders shard and
shuffle alike), full batches only, images on the device in the requested dtype and memory format.
"""

import sys
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from ffsd_fast.data.common import IMAGENET_MEAN, IMAGENET_STD
from ffsd_fast.data.image_folder import ImageList, decode_error
from ffsd_fast.data.sampling import PAD_LABEL, SAMPLE, WORKERS, eval_indices, seed_for, train_batches, train_indices


class _Images(Dataset):
    """``dataset[(index, sample_seed)]``: the transformed image and its label; index ``-1`` is an evaluation pad.

    torchvision transforms draw from the global torch RNG; seeding it per sample (inside ``fork_rng``, so the
    caller's state survives when there are no workers) makes the crops independent of worker count and
    scheduling, which is what lets a resumed run reproduce an epoch exactly.

    A file that no longer decodes (the start-up check passed it, or was skipped): training takes the next image
    instead, so that a multi-day run does not die on it; evaluation (``train=False``) turns it into a pad, which is
    not counted, rather than counting the next image twice.

    ``views`` > 1: that many transforms of the image, drawn one after another from its seed (the first is the
    one-view image), stacked ``[views, C, H, W]``.
    """

    def __init__(self, images: ImageList, transform: transforms.Compose, train: bool = True, views: int = 1) -> None:
        self.images, self.transform, self.train, self.views = images, transform, train, views

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int) -> Image.Image | None:
        """The image at ``index`` (the next decodable one in training); None for an undecodable one in evaluation."""
        path = self.images.files[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception:  # noqa: BLE001
            what = "using the next image" if self.train else "left out of the accuracy"
            print(f"warning: cannot decode {path} ({decode_error(path)}); {what}", file=sys.stderr, flush=True)
            if not self.train:
                return None
            return self._load((index + 1) % len(self.images))

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        label = self.images.labels[index] if index >= 0 else PAD_LABEL
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            image = self._load(max(index, 0))
            if image is None:  # evaluation: a pad of any pixels (the first image's), never counted
                image, label = self._load_first(), PAD_LABEL
            if self.views == 1:
                return self.transform(image), label
            return torch.stack([self.transform(image) for _ in range(self.views)]), label

    def _load_first(self) -> Image.Image:
        for index in range(len(self.images)):
            try:
                with Image.open(self.images.files[index]) as image:
                    return image.convert("RGB")
            except Exception:  # noqa: BLE001 - undecodable too: try the next
                continue
        return Image.new("RGB", (1, 1))


class _EpochSampler(Sampler):
    """This rank's indices of ``train_indices`` for the current epoch, each with its sample seed."""

    def __init__(
        self, num_samples: int, seed: int, rank: int, world_size: int, batch_size: int, drop_last: bool
    ) -> None:
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.batch_size, self.drop_last, self.epoch = batch_size, drop_last, 0

    def indices(self) -> torch.Tensor:
        return train_indices(
            self.num_samples, self.seed, self.epoch, self.rank, self.world_size, self.batch_size, self.drop_last
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, seed_for(self.seed, self.epoch, SAMPLE, i)) for i in self.indices().tolist())

    def __len__(self) -> int:
        return train_batches(self.num_samples, self.batch_size, self.world_size, self.drop_last) * self.batch_size


class TorchvisionLoader:
    """Batches of a DataLoader, moved to the device in the training dtype and memory format."""

    def __init__(self, loader: DataLoader, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        self.loader, self.device, self.dtype = loader, device, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.loader.sampler, _EpochSampler):
            self.loader.sampler.epoch = epoch

    def indices(self) -> torch.Tensor:
        """Sample indices this rank visits in the current epoch, in order (``-1``: an evaluation pad)."""
        sampler = self.loader.sampler
        return sampler.indices() if isinstance(sampler, _EpochSampler) else torch.tensor([i for i, _ in sampler])

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            if images.dim() == 5:  # [B, V, C, H, W] → view-major [V·B, C, H, W], the loaders' layout of views
                images = images.transpose(0, 1).flatten(0, 1)
            images = images.to(self.device, non_blocking=True)
            yield (
                images.to(dtype=self.dtype, memory_format=self.memory_format),
                labels.to(self.device, non_blocking=True),
            )


def torchvision_loaders(
    train: ImageList,
    val: ImageList,
    *,
    image_size: int,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
    drop_last: bool,
    workers: int,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    views: int = 1,
) -> tuple[TorchvisionLoader, TorchvisionLoader]:
    """(train, eval) loaders: random-resized crop + flip for training (``views`` of each image), resize + centre
    crop for evaluation."""
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_set = _Images(
        train,
        transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *normalize]),
        views=views,
    )
    val_set = _Images(
        val,
        transforms.Compose(
            [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size), *normalize]
        ),
        train=False,
    )
    options = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed_for(seed, 0, WORKERS)),
    )
    sampler = _EpochSampler(len(train), seed, rank, world_size, batch_size, drop_last)
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, **options)
    # Evaluation needs no randomness: the sample seed is a constant.
    val_keys = [(i, 0) for i in eval_indices(len(val), rank, world_size, eval_batch_size).tolist()]
    val_loader = DataLoader(val_set, batch_size=eval_batch_size, sampler=val_keys, **options)
    return (
        TorchvisionLoader(train_loader, device, dtype, channels_last),
        TorchvisionLoader(val_loader, device, dtype, channels_last),
    )
