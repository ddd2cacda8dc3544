"""Several augmented views of each training image (``DataSpec.views``), for methods that feed each network its own:
view-major ``[V·B, 3, H, W]``, view 0 the one-view batch, the others independent draws, evaluation one view."""

import pytest
import torch

from ffsd_fast.data.common import DataSpec
from ffsd_fast.data.loaders import build_loaders
from ffsd_fast.errors import UserError
from tests.helpers import write_cifar, write_folder

CPU = torch.device("cpu")


def epoch(loader, number=1):
    loader.set_epoch(number)
    return [(x.clone(), y.clone()) for x, y in loader]


def check_views(one, many, views):
    """Every batch of ``many`` is ``views`` batches of ``one``'s images, view 0 exactly ``one``'s."""
    assert len(one) == len(many)
    differ = 0
    for (x1, y1), (xv, yv) in zip(one, many, strict=True):
        assert torch.equal(y1, yv)
        assert xv.shape == (views * x1.shape[0], *x1.shape[1:])
        parts = xv.unflatten(0, (views, -1))
        assert torch.equal(parts[0], x1)
        differ += sum(not torch.equal(parts[v], parts[0]) for v in range(1, views))
    assert differ > 0, "the other views must be their own draws"


@pytest.mark.parametrize("dataset", ["digits", "cifar100"])
def test_in_memory_views(tmp_path, dataset):
    root = None if dataset == "digits" else str(write_cifar(tmp_path, 100).parent)
    spec = dict(dataset=dataset, data_root=root, image_size=16, batch_size=8, eval_batch_size=8, seed=3)
    train1, test1, _ = build_loaders(DataSpec(**spec), CPU)
    train3, test3, _ = build_loaders(DataSpec(**spec, views=3), CPU)
    check_views(epoch(train1), epoch(train3), 3)
    for (xa, ya), (xb, yb) in zip(epoch(test1), epoch(test3), strict=True):  # evaluation: one view
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_torchvision_views(tmp_path):
    spec = dict(dataset="imagenet", data_root=str(write_folder(tmp_path)), image_size=32, batch_size=4)
    spec.update(eval_batch_size=3, workers=0, loader="torchvision")
    train1, val1, _ = build_loaders(DataSpec(**spec), CPU)
    train2, val2, _ = build_loaders(DataSpec(**spec, views=2), CPU)
    check_views(epoch(train1), epoch(train2), 2)
    assert all(x.shape[0] == 3 for x, _ in epoch(val2))


def test_dali_views(tmp_path):
    pytest.importorskip("nvidia.dali")
    spec = dict(dataset="imagenet", data_root=str(write_folder(tmp_path)), image_size=32, batch_size=4)
    spec.update(eval_batch_size=3, workers=1, loader="dali")
    train, val, _ = build_loaders(DataSpec(**spec, views=3), CPU, channels_last=True)
    for images, labels in epoch(train):
        assert images.shape == (12, 3, 32, 32) and labels.shape == (4,)
        assert images.is_contiguous(memory_format=torch.channels_last)
        parts = images.unflatten(0, (3, -1))
        assert not torch.equal(parts[0], parts[1])
    assert all(x.shape[0] == 3 for x, _ in epoch(val))


def test_views_must_be_positive():
    with pytest.raises(UserError, match="number of views must be at least 1, got 0"):
        DataSpec("digits", None, 16, 8, 8, views=0)
