"""Recipe defaults have one source (``trainer/recipes.py``); the shipped configs hold only what differs, and still
resolve to the paper's recipes."""

import dataclasses
import pathlib

import pytest
import yaml

from ffsd_fast.trainer.config import Config, parse_args, resolve
from ffsd_fast.trainer.recipes import RECIPES

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[3] / "configs").glob("*.yaml"))
PAPER = {  # docs/models-and-recipes.md: the reference's training recipes
    "cifar100": dict(epochs=299, batch_size=128, lr_schedule="multistep", lr_milestones=[150, 225], image_size=32),
    "imagenet": dict(epochs=89, batch_size=256, lr_schedule="imagenet", image_size=224),
}
METHOD = dict(
    method="ffsd", num_students=2, lr=0.1, temperature=2.0, lambda_div=1e-5, lambda_sd=1000.0, lambda_f=10.0, seed=0
)


# The branch methods' configs: their public code's CIFAR recipes (docs/methods/*.md), on the CIFAR image size.
BRANCH_METHODS = {
    "one": dict(epochs=300, lr_milestones=[151, 225], num_students=3, weight_decay=1e-4, one_temperature=3.0),
    "cl-ilr": dict(epochs=300, lr_milestones=[150, 225], num_students=4, weight_decay=5e-4, clilr_temperature=3.0),
    "okddip": dict(epochs=300, lr_milestones=[150, 225], num_students=3, weight_decay=5e-4, okddip_temperature=3.0),
    # PCL's code (configs/20220223_cifar100.yml lines 21-24, src/optimizer/optimizer_config.yml lines 1-5).
    "pcl": dict(epochs=300, lr_milestones=[150, 225], num_students=3, weight_decay=5e-4, pcl_temperature=3.0),
    # KDCL's code (train.py lines 17-30): batch 64, lr 0.05, 240 epochs, milestones 150, 180, 210.
    "kdcl": dict(
        epochs=240,
        lr_milestones=[150, 180, 210],
        num_students=2,
        weight_decay=5e-4,
        kdcl_temperature=4.0,
        batch_size=64,
        lr=0.05,
        kdcl_alpha=0.5,
        kdcl_ensemble="minlogit",
    ),
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_resolves_to_the_papers_recipe(path):
    cfg = resolve(parse_args(["-c", str(path), "--data-root", "/data", "--device", "cpu"]))
    if cfg.method in BRANCH_METHODS:
        expected = {"batch_size": 128, "lr": 0.1, "momentum": 0.9, "image_size": 32, **BRANCH_METHODS[cfg.method]}
    else:
        expected = {**PAPER[cfg.dataset], **METHOD}
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_holds_only_what_differs(path):
    values = yaml.safe_load(path.read_text())
    defaults = Config()
    recipe = RECIPES[values["dataset"]]
    for field, value in values.items():
        if field in ("model", "dataset"):  # what names the row
            continue
        assert value != getattr(defaults, field, None) and value != getattr(recipe, field, None), field


def test_dataset_defaults_come_from_the_recipe_table():
    digits = resolve(Config(device="cpu"))
    assert (digits.epochs, digits.batch_size, digits.image_size) == (20, 32, 16)
    assert digits.lr_milestones == [16, 18]
    assert resolve(Config(device="cpu", epochs=8)).lr_milestones == [16, 18]  # fixed epochs, as CIFAR's
    assert resolve(Config(device="cpu", model="resnet18")).image_size == 32
    cifar = resolve(Config(device="cpu", dataset="cifar10", data_root="/data"))
    assert (cifar.epochs, cifar.batch_size, cifar.lr_milestones) == (299, 128, [150, 225])
    assert resolve(Config(device="cpu", dataset="cifar10", data_root="/data", epochs=3)).lr_milestones == [150, 225]
    # A recipe without milestones drops the rate after half and three quarters of the epochs.
    assert dataclasses.replace(RECIPES["digits"], lr_milestones=None).milestones(8) == [4, 6]
