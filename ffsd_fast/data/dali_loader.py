"""ImageNet-style loaders on NVIDIA DALI: JPEG decoding and augmentation on the GPU (``device="mixed"``), or in DALI's
CPU threads when the training device is a CPU (what the tests here run).

Which files each rank reads, and in what order, comes from :mod:`ffsd_fast.data.sampling`, not from DALI's shuffling, so
the DALI and torchvision loaders visit the same samples and a resumed run sees the batches an uninterrupted one
would. The file list changes every epoch, and a DALI reader's list is fixed when its pipeline is built, so the
training pipeline is rebuilt at the first ``__iter__`` of each epoch; its seed comes from ``(seed, epoch, rank)``,
so the crops and flips reproduce too (DALI draws them per sample, independently of ``threads``).

Images arrive as float32 (float16 when that is the wanted dtype) from DALI and are cast in torch: DALI has no
bfloat16. An unreadable or corrupt file raises ``UserError`` from the iteration, naming the file (any other pipeline
error a ``RuntimeError``); nothing skips it, which is why :func:`ffsd_fast.data.image_folder.index_images` leaves
such files out beforehand.
"""

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from ffsd_fast.data.common import IMAGENET_MEAN, IMAGENET_STD, Loader
from ffsd_fast.data.image_folder import ImageList, decode_error
from ffsd_fast.data.sampling import PAD_LABEL, PIPELINE, eval_indices, seed_for, train_batches, train_indices
from ffsd_fast.errors import UserError

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline

READER = "Reader"


def dali_available() -> bool:
    """Whether DALI and its PyTorch plugin import here."""
    try:
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libraries, ...) means unavailable too
        return False
    return True


class DaliLoader:
    """Batches from a DALI pipeline built per pass by ``make_pipeline(epoch)``, converted to torch on the device.

    ``make_pipeline`` also returns this rank's files in the order the pipeline reads them, to name the file behind
    a pipeline error.
    """

    def __init__(
        self,
        make_pipeline: Callable[[int], tuple["Pipeline", list[str]]],
        batches: int,
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool,
        views: int = 1,
    ) -> None:
        self.make_pipeline, self.batches, self.views = make_pipeline, batches, views
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self.batches == 0:
            return
        # A fresh pipeline per pass: a pass that stopped early (or raised) leaves nothing behind for the next one.
        pipeline, files = self.make_pipeline(self.epoch)
        size = len(files) // self.batches
        # No first batch in the constructor: its errors would escape the naming below.
        names = [f"view{v}" for v in range(self.views)]
        iterator = DALIGenericIterator(pipeline, [*names, "labels"], reader_name=READER, prepare_first_batch=False)
        for step in range(self.batches):
            try:
                (batch,) = next(iterator)
            except RuntimeError as error:
                bad = _unreadable(files[step * size : (step + 1) * size])
                if bad:  # bad input, not a bug: one line, without DALI's operator trace
                    raise UserError(
                        f"DALI cannot read {'; '.join(bad)}: DALI cannot skip a file; remove it, or train with "
                        "--check-images (the default of ffsd-train and ffsd-eval)"
                    ) from None
                raise RuntimeError(
                    f"DALI failed on batch {step}, although PIL decodes all its files ({files[step * size]}, ...); "
                    "see the cause above"
                ) from error
            # Views are concatenated view-major ([V·B, ...]), the loaders' layout (``ffsd_fast.data.in_memory``).
            images = batch[names[0]] if self.views == 1 else torch.cat([batch[n] for n in names])
            labels = batch["labels"]
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC viewed as NCHW is channels_last: no copy
            yield images.to(self.device, self.dtype), labels.view(-1).to(self.device, torch.int64)


def _unreadable(files: list[str]) -> list[str]:
    """``path (reason)`` of each of ``files`` that PIL cannot decode: DALI's message names the operator, never the
    file."""
    reasons = {path: decode_error(path) for path in dict.fromkeys(files)}
    return [f"{path} ({reason})" for path, reason in reasons.items() if reason is not None]


def _pipeline(
    files: list[str],
    labels: list[int],
    *,
    train: bool,
    image_size: int,
    batch_size: int,
    device: torch.device,
    threads: int,
    seed: int,
    dtype: torch.dtype,
    channels_last: bool,
    views: int = 1,
) -> "Pipeline":
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    normalize = dict(
        mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
        dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT,
        output_layout="HWC" if channels_last else "CHW",
    )

    @pipeline_def
    def graph():
        # The files are already this rank's shard, in this epoch's order (ffsd_fast.data.sampling).
        jpegs, targets = fn.readers.file(files=files, labels=labels, random_shuffle=False, name=READER)
        decoder = "mixed" if gpu else "cpu"
        crop = dict(random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        if train and views > 1:  # one decode, then each view's own crop and flip
            decoded = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            crops = [fn.random_resized_crop(decoded, size=[image_size, image_size], **crop) for _ in range(views)]
            flipped = [fn.crop_mirror_normalize(c, mirror=fn.random.coin_flip(), **normalize) for c in crops]
            return (*flipped, targets.gpu() if gpu else targets)
        if train:
            images = fn.decoders.image_random_crop(
                jpegs,
                device=decoder,
                output_type=types.RGB,
                **crop,
            )
            images = fn.resize(images, resize_x=image_size, resize_y=image_size)
            images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), **normalize)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=round(image_size * 256 / 224))
            images = fn.crop_mirror_normalize(images, crop=(image_size, image_size), **normalize)
        return images, targets.gpu() if gpu else targets

    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    # DALI takes a signed 64-bit seed.
    return graph(batch_size=batch_size, num_threads=max(1, threads), device_id=device_id, seed=seed % 2**63)


def dali_loaders(
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
    threads: int,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    views: int = 1,
) -> tuple[Loader, Loader]:
    """Train and eval loaders for this rank over ``train`` and ``val`` (see :class:`ffsd_fast.data.common.Loader`).

    Training: RandomResizedCrop (area [0.08, 1], aspect [3/4, 4/3]) to ``image_size``, a horizontal flip with
    probability 1/2, ImageNet normalisation; every batch full, ``train_batches(...)`` of them. Evaluation: shorter
    side to ``image_size * 256 / 224``, centre crop, normalisation; this rank's ``eval_indices`` in order, the
    padding slots holding the first image with label ``PAD_LABEL``. ``threads`` is DALI's CPU thread count.
    ``views`` > 1: each training image decoded once and cropped and flipped that many times, view-major.
    """
    device = torch.device(device)
    common = dict(image_size=image_size, device=device, threads=threads, dtype=dtype, channels_last=channels_last)

    def train_pipeline(epoch: int) -> tuple["Pipeline", list[str]]:
        # This rank's share alone (``shard_id=0, num_shards=1`` over it) rather than the global list with
        # ``shard_id=rank``: the same samples, but handing DALI 1.28M names costs ~3.3 s per epoch and rank to build
        # the pipeline where this rank's 160k (8 ranks) cost 0.24 s (measured on this project's 2-core machine).
        order = train_indices(len(train), seed, epoch, rank, world_size, batch_size, drop_last).tolist()
        files = [train.files[i] for i in order]
        pipeline = _pipeline(
            files,
            [train.labels[i] for i in order],
            train=True,
            batch_size=batch_size,
            seed=seed_for(seed, epoch, PIPELINE, rank),
            views=views,
            **common,
        )
        return pipeline, files

    mine = eval_indices(len(val), rank, world_size, eval_batch_size).tolist()
    eval_files = [val.files[max(i, 0)] for i in mine]
    eval_labels = [val.labels[i] if i >= 0 else PAD_LABEL for i in mine]

    def eval_pipeline(epoch: int) -> tuple["Pipeline", list[str]]:
        pipeline = _pipeline(eval_files, eval_labels, train=False, batch_size=eval_batch_size, seed=seed, **common)
        return pipeline, eval_files

    batches = train_batches(len(train), batch_size, world_size, drop_last)
    return (
        DaliLoader(train_pipeline, batches, device, dtype, channels_last, views),
        DaliLoader(eval_pipeline, len(mine) // eval_batch_size, device, dtype, channels_last),
    )
