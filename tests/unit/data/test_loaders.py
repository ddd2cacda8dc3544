"""The loaders of ``ffsd_fast.data``: the embedded digits, CIFAR trees and ImageNet-style folders (torchvision)."""

import pickle

import pytest
import torch
import torch.nn.functional as F

from ffsd_fast.data.common import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DatasetInfo, DataSpec
from ffsd_fast.data.loaders import build_loaders as build_from_spec
from ffsd_fast.errors import UserError
from tests.helpers import write_cifar, write_folder

CPU = torch.device("cpu")
PLACEMENT = ("rank", "world_size", "dtype", "channels_last", "index")


def build_loaders(dataset, data_root, image_size, batch_size, eval_batch_size, device, seed, **kwargs):
    """``build_loaders`` with the spec's fields spelled out: the keyword arguments that place the loaders (rank,
    world size, dtype, memory format, index) go to it, the rest into the ``DataSpec``."""
    placement = {k: kwargs.pop(k) for k in PLACEMENT if k in kwargs}
    spec = DataSpec(dataset, data_root, image_size, batch_size, eval_batch_size, seed, **kwargs)
    return build_from_spec(spec, device, **placement)


def digits(batch_size=64, eval_batch_size=100, image_size=32, seed=0, **kwargs):
    return build_loaders("digits", None, image_size, batch_size, eval_batch_size, CPU, seed, **kwargs)


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


# ---------------------------------------------------------------- digits


def test_digits_shapes_split_and_batch_counts():
    train, test, info = digits()
    assert info == DatasetInfo("digits", 10, 1347, 450)
    assert info.num_train + info.num_test == 1797
    assert (len(train), len(test)) == (22, 5)
    train_batches, test_batches = batches(train), batches(test)
    assert (len(train_batches), len(test_batches)) == (22, 5)
    for x, y in train_batches + test_batches:
        assert x.dtype == torch.float32 and x.device == CPU and x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64 and y.device == CPU and y.shape == x.shape[:1]
        assert 0 <= y.min() and y.max() < 10
    # The last partial batch is kept; the grey channel is replicated.
    assert len(train_batches[-1][1]) == 1347 - 21 * 64 and len(test_batches[-1][1]) == 50
    assert sum(len(y) for _, y in train_batches) == 1347
    assert torch.equal(train_batches[0][0][:, 0], train_batches[0][0][:, 2])


def test_digits_drop_last_and_image_size():
    train, test, _ = digits(drop_last=True, image_size=8)
    assert (len(train), len(test)) == (21, 5)  # eval never drops
    got = batches(train)
    assert len(got) == 21 and all(len(y) == 64 for _, y in got)
    assert got[0][0].shape[1:] == (3, 8, 8)


def test_digits_normalised_with_training_statistics():
    train, test, _ = digits()
    train.augment = False
    x = torch.cat([x for x, _ in train])
    assert len(x) == 1347
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert abs(torch.cat([x for x, _ in test]).mean().item()) < 0.2


def test_digits_deterministic_from_seed_and_epoch_only():
    state = torch.get_rng_state()
    a, _, _ = digits(image_size=16)
    b, _, _ = digits(image_size=16)
    a.set_epoch(3)
    first = batches(a)
    for epoch in range(3):  # a "resumed" loader jumps straight to epoch 3
        b.set_epoch(epoch)
        batches(b)
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(first, batches(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(torch.get_rng_state(), state)
    a.set_epoch(4)
    assert not torch.equal(a.indices(), b.indices())
    other_seed, _, _ = digits(image_size=16, seed=1)
    other_seed.set_epoch(3)
    assert not torch.equal(other_seed.indices(), b.indices())


def test_digits_augmentation_translates_without_flipping():
    train, test, _ = digits(batch_size=2000, image_size=8)
    train.augment = False
    plain = next(iter(train))[0]
    train.augment = True
    shifted = next(iter(train))[0]
    assert not torch.equal(plain, shifted)
    blank = shifted.min()  # a zero pixel after normalisation: what the padding brings in
    for p, s in zip(plain[:50, 0], shifted[:50, 0], strict=True):
        padded = F.pad(p, [1, 1, 1, 1], value=blank.item())
        candidates = [padded[r : r + 8, c : c + 8] for r in range(3) for c in range(3)]
        assert any(torch.allclose(s, cand) for cand in candidates)
    assert torch.equal(next(iter(test))[0], next(iter(test))[0])


def test_sharding_is_disjoint_and_covers_the_epoch():
    ranks = [digits(world_size=2, rank=r)[0] for r in range(2)]
    for loader in ranks:
        loader.set_epoch(5)
    first, second = (set(loader.indices().tolist()) for loader in ranks)
    assert len(ranks[0].indices()) == len(ranks[1].indices()) == 674  # 1347 padded to 1348 by wrapping around
    assert first | second == set(range(1347))
    assert len(first & second) == 1
    assert len(ranks[0]) == len(ranks[1]) == len(batches(ranks[0])) == len(batches(ranks[1])) == 11
    _, y = next(iter(ranks[1]))
    assert torch.equal(y, ranks[1].labels[ranks[1].indices()[: len(y)]])

    dropped = [digits(world_size=2, rank=r, drop_last=True)[0] for r in range(2)]
    first, second = (set(loader.indices().tolist()) for loader in dropped)
    assert not first & second and len(first | second) == 1346

    evals = [digits(world_size=2, rank=r)[1] for r in range(2)]
    first, second = (set(loader.indices().tolist()) for loader in evals)
    assert not first & second and first | second == set(range(450))


def test_bad_arguments():
    with pytest.raises(UserError, match="digits, cifar10, cifar100, imagenet"):
        build_loaders("mnist", None, 32, 8, 8, CPU, 0)
    with pytest.raises(UserError, match="needs a data root"):
        build_loaders("cifar100", None, 32, 8, 8, CPU, 0)
    with pytest.raises(UserError, match="batch size"):
        digits(batch_size=0)
    with pytest.raises(UserError, match="eval batch size"):
        digits(eval_batch_size=0)
    with pytest.raises(UserError, match="smaller than the batch size"):
        digits(batch_size=700, drop_last=True, world_size=2)


# ---------------------------------------------------------------- CIFAR


def raw_images(folder, name):
    with open(folder / name, "rb") as f:
        entry = pickle.load(f)
    return torch.from_numpy(entry["data"]).view(-1, 3, 32, 32)


def normalise(raw, mean, std):
    return (raw.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    "name, num_classes, num_train, test_file, mean, std",
    [
        ("cifar10", 10, 100, "test_batch", CIFAR10_MEAN, CIFAR10_STD),
        ("cifar100", 100, 20, "test", CIFAR100_MEAN, CIFAR100_STD),
    ],
)
def test_cifar_tree_loads_and_augments(tmp_path, name, num_classes, num_train, test_file, mean, std):
    folder = write_cifar(tmp_path, num_classes)
    train, test, info = build_loaders(name, str(tmp_path), 32, 200, 4, CPU, 0)
    assert info == DatasetInfo(name, num_classes, num_train, 10)
    assert (len(train), len(test)) == (1, 3)

    # Eval: fixed order, no augmentation, exactly the normalised test images.
    x = torch.cat([x for x, _ in test])
    y = torch.cat([y for _, y in test])
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x, normalise(raw_images(folder, test_file), mean, std), atol=1e-6)
    assert 0 <= y.min() and y.max() < num_classes

    # Train: each image is a reflect-padded crop of its original, maybe flipped, and some are changed.
    x, y = next(iter(train))
    order = train.indices()
    assert torch.equal(y, train.labels[order])
    plain = normalise(train.images[order], mean, std)
    padded = F.pad(plain, [4, 4, 4, 4], mode="reflect")
    changed = 0
    for i in range(len(x)):
        crops = [padded[i, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        assert any(
            torch.allclose(x[i], crop, atol=1e-6) or torch.allclose(x[i], crop.flip(2), atol=1e-6) for crop in crops
        )
        changed += not torch.allclose(x[i], plain[i], atol=1e-6)
    assert changed > len(x) // 2

    resized, _, _ = build_loaders(name, str(tmp_path), 24, 8, 8, CPU, 0)
    assert next(iter(resized))[0].shape == (8, 3, 24, 24)


def test_cifar_missing_or_wrong_folder_names_the_path(tmp_path):
    with pytest.raises(UserError, match="cifar-100-python") as error:
        build_loaders("cifar100", str(tmp_path / "nowhere"), 32, 8, 8, CPU, 0)
    assert str(tmp_path / "nowhere") in str(error.value) and "\n" not in str(error.value)
    folder = write_cifar(tmp_path, 10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3"):
        build_loaders("cifar10", str(tmp_path), 32, 8, 8, CPU, 0)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read"):
        build_loaders("cifar10", str(tmp_path), 32, 8, 8, CPU, 0)


# ---------------------------------------------------------------- ImageFolder


def imagenet(root, workers=0, **kwargs):
    return build_loaders("imagenet", str(root), 32, 4, 3, CPU, 0, workers=workers, loader="torchvision", **kwargs)


def test_imagefolder_loads_batches(tmp_path):
    state = torch.get_rng_state()
    train, val, info = imagenet(write_folder(tmp_path))
    assert info == DatasetInfo("imagenet", 3, 9, 6)
    assert (len(train), len(val)) == (3, 2)
    got = batches(train)
    assert [len(y) for _, y in got] == [4, 4, 4]  # full batches: the last one wraps around to the epoch's start
    for x, y in got + batches(val):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and x.device == CPU
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 3
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.cat([y for _, y in val]), torch.tensor([0, 0, 1, 1, 2, 2]))


def test_imagefolder_augmentation_depends_on_seed_and_epoch_only(tmp_path):
    write_folder(tmp_path)
    single, _, _ = imagenet(tmp_path)
    pooled, _, _ = imagenet(tmp_path, workers=2)
    for loader in (single, pooled):
        loader.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(batches(single), batches(pooled), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    pooled.set_epoch(3)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches(single), batches(pooled), strict=True))

    ranks = [imagenet(tmp_path, world_size=2, rank=r)[0] for r in range(2)]
    first, second = (set(loader.indices().tolist()) for loader in ranks)
    assert first | second == set(range(9)) and len(ranks[0]) == len(ranks[1])
    ranks = [imagenet(tmp_path, world_size=2, rank=r, drop_last=True)[0] for r in range(2)]
    first, second = (set(loader.indices().tolist()) for loader in ranks)
    assert not first & second and len(first) == len(second) == 4


def test_imagefolder_leaves_corrupt_images_out_and_names_them(tmp_path):
    root = write_folder(tmp_path)
    truncated = root / "train" / "bee" / "0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = root / "val" / "cat" / "9.jpg"
    garbage.write_bytes(b"not an image")
    train, val, info = imagenet(root)
    assert info.corrupt == tuple(sorted([str(truncated), str(garbage)]))
    assert (info.num_train, info.num_test) == (8, 6)
    assert sum(len(y) for _, y in batches(train)) == 8  # 2 full batches of 4 (no wrap needed)
    assert torch.equal(torch.cat([y for _, y in val]), torch.tensor([0, 0, 1, 1, 2, 2]))

    for name in ("0.jpg", "1.jpg", "2.jpg"):
        (root / "val" / "ant" / name).write_bytes(b"")
    with pytest.raises(UserError, match="every image of val/ant is unreadable"):
        imagenet(root)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory") as error:
        imagenet(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(error.value)

    root = write_folder(tmp_path / "a", val=0)
    with pytest.raises(UserError, match="no images in class folder .*val/ant"):
        imagenet(root)

    root = write_folder(tmp_path / "b")
    (root / "train" / "dog").mkdir()
    (root / "val" / "dog").mkdir()
    with pytest.raises(UserError, match="no images in class folder .*train/dog"):
        imagenet(root)

    root = write_folder(tmp_path / "c")
    (root / "val" / "cat").rename(root / "val" / "cow")
    with pytest.raises(UserError, match="only in train: cat; only in val: cow"):
        imagenet(root)

    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="val is missing") as error:
        imagenet(root)
    assert str(root / "val") in str(error.value)
    (root / "val").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        imagenet(root)


def test_imagefolder_without_the_check_never_counts_an_image_twice(tmp_path):
    # An undecodable val image used to be replaced by the next one, which was then counted twice (4/17 over 16 real
    # images); it is now a pad, which evaluation does not count.
    root = write_folder(tmp_path)
    (root / "val" / "bee" / "0.jpg").write_bytes(b"not an image")
    _, val, info = imagenet(root, check_images=False)
    assert info.num_test == 6 and not info.corrupt
    labels = torch.cat([y for _, y in val])
    assert labels.tolist() == [0, 0, -1, 1, 2, 2]  # PAD_LABEL where the bad file was


@pytest.mark.parametrize("drop_last", [False, True])
def test_smallest_train_batch_is_the_smallest_the_loaders_give(tmp_path, drop_last):
    # 25 images at batch 8: the ImageNet loaders wrap around to fill the last batch, so BatchNorm never sees a batch
    # of 1 there (such a run was refused); the in-memory loaders keep a last batch of 1 unless drop_last.
    from ffsd_fast.data.loaders import smallest_train_batch

    root = write_folder(tmp_path / "tree", classes=[f"c{i}" for i in range(5)], train=5, val=1)
    train, _, info = build_loaders(
        "imagenet", str(root), 32, 8, 8, CPU, 0, workers=0, loader="torchvision", drop_last=drop_last
    )
    sizes = [len(y) for _, y in batches(train)]
    assert min(sizes) == smallest_train_batch("imagenet", info.num_train, 8, drop_last) == 8
    write_cifar(tmp_path / "cifar", 10, train_per_file=5, test=2)  # 25 training images
    cifar = build_loaders("cifar10", str(tmp_path / "cifar"), 32, 8, 8, CPU, 0, drop_last=drop_last)[0]
    sizes = [len(y) for _, y in batches(cifar)]
    assert min(sizes) == smallest_train_batch("cifar10", 25, 8, drop_last) == (8 if drop_last else 1)
