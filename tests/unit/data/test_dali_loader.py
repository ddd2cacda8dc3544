"""The DALI loaders on a CPU-only pipeline, over a tiny tree of real JPEGs.

Every image's red and green channels are one flat colour that names it (red: its class, green: its place in the
class), so a batch can be traced back to the files it came from whatever the crop; the blue channel is a gradient,
so crops and flips change the pixels and reproducibility means something.
"""

import numpy as np
import pytest
import torch

from ffsd_fast.errors import UserError

pytest.importorskip("nvidia.dali")

from ffsd_fast.data.common import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from ffsd_fast.data.dali_loader import dali_available, dali_loaders  # noqa: E402
from ffsd_fast.data.image_folder import ImageList, find_images  # noqa: E402
from ffsd_fast.data.sampling import PAD_LABEL, eval_indices, train_batches, train_indices  # noqa: E402

SIZES = [(37, 53), (70, 41), (45, 45), (64, 33)]  # (width, height): odd, not square
TRAIN_PER_CLASS, VAL_PER_CLASS = (5, 6, 7), (2, 3, 2)


def _colour(label: int, j: int) -> tuple[int, int]:
    return 30 + 100 * label, 20 + 30 * j


def _write(path, label: int, j: int, size: tuple[int, int]) -> None:
    from PIL import Image

    width, height = size
    red, green = _colour(label, j)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = red, green
    pixels[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    Image.fromarray(pixels).save(path, quality=95)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split, counts in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, count in enumerate(counts):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for j in range(count):
                _write(folder / f"{j:02d}.jpg", label, j, SIZES[(label + j) % len(SIZES)])
    return find_images(str(root))


def _identify(images: torch.Tensor, files: ImageList) -> list[int]:
    """The index in ``files`` of each image of a batch, from its flat red and green."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    pixels = (images.float() * std + mean).mean((2, 3))[:, :2]
    known = []
    for label in range(len(TRAIN_PER_CLASS)):
        known += [_colour(label, j) for j in range(files.labels.count(label))]
    distance = (pixels[:, None, :] - torch.tensor(known, dtype=torch.float32)[None]).abs().amax(-1)
    assert (distance.amin(1) < 8).all(), "an image's colour matches no file"
    return distance.argmin(1).tolist()


def _loaders(train: ImageList, val: ImageList, **overrides):
    options = dict(
        image_size=32,
        batch_size=4,
        eval_batch_size=3,
        device=torch.device("cpu"),
        seed=5,
        rank=0,
        world_size=1,
        drop_last=False,
        threads=2,
    )
    return dali_loaders(train, val, **{**options, **overrides})


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_dali_is_available():
    assert dali_available()


@pytest.mark.parametrize(
    "channels_last, dtype",
    [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16), (False, torch.float16)],
)
def test_batches_are_full_with_the_wanted_dtype_and_layout(tree, channels_last, dtype):
    train, val = _loaders(tree.train, tree.val, channels_last=channels_last, dtype=dtype)
    assert len(train) == train_batches(len(tree.train), 4, 1, False) == 5
    for loader, batch_size in ((train, 4), (val, 3)):
        batches = _epoch(loader, 0)
        assert len(batches) == len(loader)
        for images, labels in batches:
            assert images.shape == (batch_size, 3, 32, 32) and images.dtype == dtype
            assert labels.shape == (batch_size,) and labels.dtype == torch.int64
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            assert images.is_contiguous(memory_format=memory_format)


def test_training_reads_exactly_the_sampled_files_with_their_labels(tree):
    train, _ = _loaders(tree.train, tree.val)
    for epoch in (0, 1):
        batches = _epoch(train, epoch)
        expected = train_indices(len(tree.train), 5, epoch, 0, 1, 4, False).tolist()
        assert [i for images, _ in batches for i in _identify(images, tree.train)] == expected
        assert torch.cat([labels for _, labels in batches]).tolist() == [tree.train.labels[i] for i in expected]


def test_two_ranks_read_disjoint_shards_that_cover_the_epoch(tree):
    seen = []
    for rank in (0, 1):
        train, _ = _loaders(tree.train, tree.val, rank=rank, world_size=2, batch_size=3, drop_last=True)
        assert len(train) == 3
        mine = [i for images, _ in _epoch(train, 2) for i in _identify(images, tree.train)]
        assert mine == train_indices(len(tree.train), 5, 2, rank, 2, 3, True).tolist()
        seen.append(mine)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(tree.train)))


def test_same_seed_and_epoch_reproduce_the_batches_and_epochs_differ(tree):
    first, _ = _loaders(tree.train, tree.val)
    again, _ = _loaders(tree.train, tree.val, threads=1)
    other_seed, _ = _loaders(tree.train, tree.val, seed=6)
    reference = _epoch(first, 3)
    for replay in (_epoch(again, 3), _epoch(first, 3)):
        for (x, y), (x2, y2) in zip(reference, replay, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    images = torch.cat([x for x, _ in reference])
    assert not torch.equal(images, torch.cat([x for x, _ in _epoch(first, 4)]))
    assert not torch.equal(images, torch.cat([x for x, _ in _epoch(other_seed, 3)]))


def test_augmentation_depends_on_epoch_and_rank_not_only_on_the_order(tree):
    # One image everywhere: the order cannot make batches differ, only the pipeline's seed can.
    same = ImageList([tree.train.files[0]] * 8, [0] * 8)

    def images(epoch: int, rank: int) -> torch.Tensor:
        train, _ = _loaders(same, tree.val, rank=rank, world_size=2, drop_last=True)
        return torch.cat([x for x, _ in _epoch(train, epoch)])

    reference = images(0, 0)
    assert torch.equal(reference, images(0, 0))
    assert not torch.equal(reference, images(1, 0))
    assert not torch.equal(reference, images(0, 1))


def test_evaluation_pads_with_pad_label_and_covers_val_once_over_ranks(tree):
    real = []
    for rank in (0, 1):
        _, val = _loaders(tree.train, tree.val, rank=rank, world_size=2)
        indices = eval_indices(len(tree.val), rank, 2, 3).tolist()
        batches = _epoch(val, 0)
        assert len(val) == len(batches) == len(indices) // 3
        labels = torch.cat([y for _, y in batches]).tolist()
        read = [i for x, _ in batches for i in _identify(x, tree.val)]
        assert [y for y, i in zip(labels, indices, strict=True) if i < 0] == [PAD_LABEL] * indices.count(-1)
        assert [(r, y) for r, y, i in zip(read, labels, indices, strict=True) if i >= 0] == [
            (i, tree.val.labels[i]) for i in indices if i >= 0
        ]
        real += [y for y in labels if y != PAD_LABEL]
    assert sorted(real) == sorted(tree.val.labels)


@pytest.mark.parametrize("position", [0, 5])  # in the first batch (built with the iterator) or a later one
def test_a_corrupt_file_raises_naming_it_instead_of_hanging(tree, tmp_path, position):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)
    files = list(tree.train.files[:8])
    files[train_indices(len(files), 0, 0, 0, 1, 4, False)[position]] = str(bad)
    broken = ImageList(files, [0] * len(files))
    train, _ = _loaders(broken, tree.val, seed=0)
    read = 0
    with pytest.raises(UserError, match=f"DALI cannot read {bad}.*--check-images"):
        for _ in train:
            read += 1
    assert read == position // 4


@pytest.mark.parametrize("rank", [0, 1])
def test_dali_and_torchvision_read_the_same_files_with_the_same_labels(tree, rank):
    from ffsd_fast.data.torchvision_loader import torchvision_loaders

    common = dict(
        image_size=32,
        batch_size=4,
        eval_batch_size=3,
        device=torch.device("cpu"),
        seed=5,
        rank=rank,
        world_size=2,
        drop_last=False,
    )
    dali = dali_loaders(tree.train, tree.val, threads=1, **common)
    vision = torchvision_loaders(tree.train, tree.val, workers=0, **common)
    for split, files in ((0, tree.train), (1, tree.val)):
        a, b = dali[split], vision[split]
        a.set_epoch(3)
        b.set_epoch(3)
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(ya, yb)
            real = ya >= 0  # evaluation pads carry PAD_LABEL and any image
            assert _identify(xa[real], files) == _identify(xb[real], files)
