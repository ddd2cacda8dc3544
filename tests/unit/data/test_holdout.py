"""A held-out slice of the training set (``DataSpec.holdout``), for a method that fits on it between epochs: drawn
from the seed alone, disjoint from what is trained on, read unaugmented, one view, each rank its own share."""

import pytest
import torch

from ffsd_fast.data.common import DataSpec
from ffsd_fast.data.loaders import build_loaders
from ffsd_fast.data.sampling import holdout_split
from ffsd_fast.errors import UserError
from tests.helpers import write_cifar, write_folder

CPU = torch.device("cpu")


def test_split_is_disjoint_complete_sorted_and_sized():
    for n, fraction, held in ((1347, 0.1, 135), (100, 0.05, 5), (10, 0.01, 1), (10, 0.0, 0)):
        kept, out = holdout_split(n, fraction, seed=4)
        assert len(out) == held and len(kept) == n - held
        assert torch.equal(torch.cat([kept, out]).sort().values, torch.arange(n))
        assert torch.equal(kept, kept.sort().values) and torch.equal(out, out.sort().values)


def test_split_depends_on_the_seed_alone():
    assert all(torch.equal(a, b) for a, b in zip(holdout_split(500, 0.1, 3), holdout_split(500, 0.1, 3), strict=True))
    assert not torch.equal(holdout_split(500, 0.1, 3)[1], holdout_split(500, 0.1, 4)[1])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_refuses_a_fraction_outside_0_1(fraction):
    with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
        holdout_split(100, fraction, 0)
    with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
        DataSpec("digits", None, 8, 4, 4, holdout=fraction)


def test_split_refuses_to_leave_nothing_to_train_on():
    with pytest.raises(UserError, match="leaves none to train on"):
        holdout_split(3, 0.9, 0)


def _spec(dataset, root, **kwargs):
    return DataSpec(dataset, root, image_size=8, batch_size=16, eval_batch_size=7, seed=5, workers=0, **kwargs)


@pytest.fixture(params=["digits", "cifar10"])
def dataset(request, tmp_path):
    root = None if request.param == "digits" else str(write_cifar(tmp_path, 10).parent)
    return request.param, root


def test_training_leaves_the_slice_out_and_the_slice_reads_as_evaluation(dataset):
    name, root = dataset
    whole, _, whole_info = build_loaders(_spec(name, root), CPU)
    train, test, info = build_loaders(_spec(name, root, holdout=0.1, views=3), CPU)
    kept, held = holdout_split(whole_info.num_train, 0.1, seed=5)
    assert whole.heldout is None and whole_info.num_heldout == 0
    assert (info.num_train, info.num_heldout) == (len(kept), len(held))
    # The training loader holds exactly the kept samples; the held-out loader exactly the others.
    assert torch.equal(train.images, whole.images[kept]) and torch.equal(train.labels, whole.labels[kept])
    heldout = train.heldout
    assert torch.equal(heldout.images, whole.images[held]) and torch.equal(heldout.labels, whole.labels[held])
    # Read like evaluation: one view, no augmentation (the same batches in every epoch), the eval batch size.
    heldout.set_epoch(1)
    first = [(x.clone(), y.clone()) for x, y in heldout]
    heldout.set_epoch(2)
    second = list(heldout)
    assert [x.shape[0] for x, _ in first] == [7] * (len(held) // 7) + ([len(held) % 7] if len(held) % 7 else [])
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(torch.cat([y for _, y in first]), whole.labels[held])
    # Evaluation is untouched by the holding out.
    _, whole_test, _ = build_loaders(_spec(name, root), CPU)
    for (xa, ya), (xb, yb) in zip(test, whole_test, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_every_rank_holds_out_the_same_slice_and_reads_its_own_share(dataset):
    name, root = dataset
    ranks = [build_loaders(_spec(name, root, holdout=0.2), CPU, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(ranks[0].images, ranks[1].images)  # every rank trains on the same kept set (then shards it)
    assert torch.equal(ranks[0].heldout.images, ranks[1].heldout.images)
    shares = [loader.heldout.indices() for loader in ranks]
    assert not set(shares[0].tolist()) & set(shares[1].tolist())
    assert sorted(shares[0].tolist() + shares[1].tolist()) == list(range(len(ranks[0].heldout.labels)))
    read = [torch.cat([y for _, y in loader.heldout]) for loader in ranks]
    assert torch.equal(read[0], ranks[0].heldout.labels[shares[0]])
    assert torch.equal(read[1], ranks[1].heldout.labels[shares[1]])


def test_image_folders_refuse_to_hold_out_in_one_line(tmp_path):
    spec = DataSpec("imagenet", str(write_folder(tmp_path)), 32, 4, 3, workers=0, loader="torchvision", holdout=0.1)
    with pytest.raises(UserError, match="not implemented for image folders") as error:
        build_loaders(spec, CPU)
    assert "\n" not in str(error.value)
