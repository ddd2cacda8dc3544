"""``build_loaders``: the train and eval loaders of a ``DataSpec`` for this rank, from whichever backend serves it
(tensors on the device for digits and CIFAR, DALI or torchvision for ImageNet folders)."""

import sys
from collections.abc import Collection

import torch

from ffsd_fast.data.common import DatasetInfo, DataSpec, Loader
from ffsd_fast.data.dali_loader import dali_available, dali_loaders
from ffsd_fast.data.image_folder import ImageFolderIndex, check_images, find_images, index_images, leave_out
from ffsd_fast.data.in_memory import cifar_loaders, digits_loaders
from ffsd_fast.data.sampling import samples_per_rank
from ffsd_fast.data.torchvision_loader import torchvision_loaders
from ffsd_fast.errors import UserError

__all__ = ["build_loaders", "dali_available", "eval_index"]


def _imagenet(
    spec: DataSpec,
    index: ImageFolderIndex,
    device: torch.device,
    rank: int,
    world_size: int,
    dtype: torch.dtype,
    channels_last: bool,
) -> tuple[Loader, Loader, DatasetInfo]:
    """The tree's train and val lists through DALI or torchvision; both take the same samples in full batches."""
    if spec.holdout:
        raise UserError(
            f"imagenet: holding out {spec.holdout} of the training set, as the method asks, is not implemented for "
            "image folders (the DALI and torchvision loaders have no held-out loader): only digits and CIFAR hold out"
        )
    loader = spec.loader
    if loader == "auto":
        loader = "dali" if dali_available() else "torchvision"
    if loader == "dali" and not dali_available():
        raise UserError(
            "--loader dali: NVIDIA DALI is not installed (pip install 'ffsd-fast[dali]', i.e. "
            "nvidia-dali-cuda130), or use --loader torchvision"
        )
    _check_shard(len(index.train), spec.batch_size, spec.drop_last, world_size)
    common = dict(
        image_size=spec.image_size,
        batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size,
        device=device,
        seed=spec.seed,
        rank=rank,
        world_size=world_size,
        drop_last=spec.drop_last,
        dtype=dtype,
        channels_last=channels_last,
        views=spec.views,
    )
    if loader == "dali":
        train_loader, val_loader = dali_loaders(index.train, index.val, threads=max(spec.workers, 1), **common)
    else:
        train_loader, val_loader = torchvision_loaders(index.train, index.val, workers=spec.workers, **common)
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
    spec: DataSpec,
    device: torch.device | str,
    *,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    index: ImageFolderIndex | None = None,
) -> tuple[Loader, Loader, DatasetInfo]:
    """Train and eval loaders for this rank of ``world_size``, plus the dataset's facts.

    The train loader shuffles and augments from ``(spec.seed, epoch)`` only (call ``set_epoch`` before each epoch)
    and keeps the last partial batch unless ``spec.drop_last``; the eval loader keeps a fixed order and never drops.
    With ``spec.holdout`` > 0 (digits and CIFAR; refused for ImageNet) the train loader leaves that slice of the
    training set out and its ``heldout`` attribute reads it, as evaluation reads (``in_memory``).
    For 'imagenet': the output ``dtype`` and memory format, and ``index``, the tree's file lists (default:
    ``index_images(spec.data_root)``, which with ``spec.check_images`` decodes every image once and leaves the
    corrupt ones out).
    """
    if world_size < 1:
        raise UserError(f"world size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank must be in 0..{world_size - 1}, got {rank}")
    device = torch.device(device)
    if spec.dataset == "imagenet":
        index = index or index_images(spec.data_root, spec.workers, spec.check_images)
        return _imagenet(spec, index, device, rank, world_size, dtype, channels_last)
    make = digits_loaders if spec.dataset == "digits" else cifar_loaders
    loaders = make(spec, device, rank, world_size)
    _check_shard(loaders[2].num_train, spec.batch_size, spec.drop_last, world_size)
    return loaders


# DALI's JPEG decoder crashes the process (a segmentation fault, in native code: nothing to catch) on some truncated
# JPEGs at large batches (seen on the CPU at batch 256 with a file cut to 30 %), so it never reads a file that PIL
# has not decoded first.
DALI_NEEDS_CHECK = (
    "DALI can crash the process (a segmentation fault) on a truncated JPEG, which no error handling can catch, so it "
    "reads only images decoded once beforehand"
)


def eval_index(spec: DataSpec, left_out: Collection[str] = ()) -> ImageFolderIndex | None:
    """For evaluating a saved network (``ffsd-eval``) on an ImageNet folder: the tree's file lists for
    ``build_loaders(spec, device, index=…)``; None for the other datasets.

    Only ``val/`` is read: the files in ``left_out`` (those the run left out) are dropped, and with
    ``spec.check_images`` every other val image is decoded once and the undecodable ones are dropped too, all of them
    in ``index.corrupt``. DALI without the check is refused (``DALI_NEEDS_CHECK``)."""
    if spec.dataset != "imagenet":
        return None
    loader = spec.loader if spec.loader != "auto" else ("dali" if dali_available() else "torchvision")
    if loader == "dali" and not spec.check_images:
        raise UserError(
            f"--no-check-images with the DALI loader (--loader {spec.loader}): {DALI_NEEDS_CHECK}; drop "
            "--no-check-images, or use --loader torchvision (which leaves an undecodable image out of the accuracy)"
        )
    index = find_images(spec.data_root)
    gone = set(left_out) & set(index.val.files)
    corrupt = {path: "left out by the run" for path in gone}
    if spec.check_images:
        corrupt.update(check_images([f for f in index.val.files if f not in gone], spec.workers))
    if corrupt:
        shown = ", ".join(sorted(corrupt)[:5]) + (f" and {len(corrupt) - 5} more" if len(corrupt) > 5 else "")
        print(
            f"warning: {len(corrupt)} val image(s) left out of the accuracy (undecodable, or left out by the run): "
            f"{shown}",
            file=sys.stderr,
            flush=True,
        )
    return leave_out(index, corrupt)


def smallest_train_batch(dataset: str, num_train: int, batch_size: int, drop_last: bool) -> int:
    """The smallest training batch a rank's ``num_train`` samples give: the ImageNet loaders fill every batch by
    wrapping around (``sampling.train_indices``), the in-memory ones keep a partial last batch unless ``drop_last``."""
    last = num_train % batch_size
    return last if dataset != "imagenet" and last and not drop_last else batch_size
