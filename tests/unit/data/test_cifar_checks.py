"""The CIFAR loader checks its files once: lengths agree, labels are integers in range, pixels are uint8; each failure
is one line naming the file and the key. Every case here once trained on silently (or failed mid-epoch)."""

import pickle

import numpy as np
import pytest
import torch

from ffsd_fast.data.common import DataSpec
from ffsd_fast.data.loaders import build_loaders
from ffsd_fast.errors import UserError
from tests.helpers import write_cifar


def pixels(n, dtype=np.uint8):
    return np.random.RandomState(0).randint(0, 256, (n, 3072)).astype(dtype)


def nan_pixels(n):
    data = pixels(n, np.float32)
    data[0, 0] = np.nan
    return data


# (case, the train file's entry, a fragment of the error after "cifar100: <file>: ")
BAD = [
    (
        "fewer-labels",
        lambda: {"data": pixels(64), "fine_labels": [1] * 54},
        "key 'data' has 64 images and key 'fine_labels' 54 labels",
    ),
    (
        "more-labels",
        lambda: {"data": pixels(54), "fine_labels": [1] * 64},
        "key 'data' has 54 images and key 'fine_labels' 64 labels",
    ),
    (
        "float-pixels",
        lambda: {"data": pixels(8, np.float64), "fine_labels": [1] * 8},
        "key 'data' holds float64 pixels; the official format's are uint8",
    ),
    ("nan-pixels", lambda: {"data": nan_pixels(8), "fine_labels": [1] * 8}, "key 'data' holds float32 pixels"),
    (
        "fractional-labels",
        lambda: {"data": pixels(8), "fine_labels": [79.7] * 8},
        "key 'fine_labels' holds float64 values (e.g. 79.7); the labels must be integers",
    ),
    (
        "label-too-large",
        lambda: {"data": pixels(8), "fine_labels": [1] * 7 + [100]},
        "key 'fine_labels' has labels outside 0..99 (e.g. 100)",
    ),
    ("negative-label", lambda: {"data": pixels(8), "fine_labels": [-1] * 8}, "outside 0..99 (e.g. -1)"),
    ("wrong-shape", lambda: {"data": pixels(8)[:, :1024], "fine_labels": [1] * 8}, "key 'data' has shape [8, 1024]"),
    ("no-labels", lambda: {"data": pixels(8), "labels": [1] * 8}, "has no key 'fine_labels' (keys: data, labels)"),
]


@pytest.mark.parametrize(("entry", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_cifar_file_is_one_line_naming_the_file_and_the_key(tmp_path, entry, message):
    folder = write_cifar(tmp_path, 100, train_per_file=8, test=4)
    with open(folder / "train", "wb") as fh:
        pickle.dump(entry(), fh)
    with pytest.raises(UserError) as error:
        build_loaders(DataSpec("cifar100", str(tmp_path), 32, 8, 8, workers=0), torch.device("cpu"))
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"cifar100: {folder / 'train'}: "), text
    assert message in text, text


def test_a_cifar_file_that_is_no_dict_is_one_line(tmp_path):
    folder = write_cifar(tmp_path, 10, train_per_file=2, test=2)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(UserError, match=f"{folder / 'data_batch_2'} holds a list, not the official format's dict"):
        build_loaders(DataSpec("cifar10", str(tmp_path), 32, 4, 4, workers=0), torch.device("cpu"))


def test_a_missing_data_root_suggests_the_flag(tmp_path):
    with pytest.raises(UserError, match="give --data-root"):
        build_loaders(DataSpec("cifar10", str(tmp_path / "nowhere"), 32, 4, 4, workers=0), torch.device("cpu"))


def test_a_missing_imagenet_root_suggests_the_flag(tmp_path):
    with pytest.raises(UserError, match="give --data-root: the folder that holds train/ and val/"):
        build_loaders(DataSpec("imagenet", str(tmp_path / "nowhere"), 32, 4, 4, workers=0), torch.device("cpu"))
