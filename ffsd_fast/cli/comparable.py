"""Whether a run can stand beside the paper's number: it must have trained the published recipe's epochs on the
whole dataset (all its classes). A 1-epoch run, or one on a 4-class ImageNet folder, reports a top-1 that the
paper's says nothing about; the report marks it instead of printing a difference."""

import os

from ffsd_fast.errors import UserError
from ffsd_fast.method import registry
from ffsd_fast.trainer.checkpoint import CHECKPOINT_NAME, read
from ffsd_fast.trainer.recipes import RECIPES

# The classes of each dataset the paper reports on.
PAPER_CLASSES = {"cifar100": 100, "imagenet": 1000}


def num_classes(summary: dict) -> int | None:
    """The classes the run trained on: its summary's, else its checkpoint's (summaries do not all record them)."""
    if isinstance(summary.get("num_classes"), int):
        return summary["num_classes"]
    run_dir = summary.get("run_dir")
    path = os.path.join(run_dir, CHECKPOINT_NAME) if isinstance(run_dir, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        value = read(path, mmap=True).get("num_classes")
    except UserError:
        return None
    return value if isinstance(value, int) else None


def recipe_epochs(method: str | None, dataset: str) -> int:
    """The epochs the paper's recipe trains: the method's own recipe where it sets them (ONE's 300), else the
    dataset's (the reference FFSD's 299)."""
    own = registry.get(method).recipe.get(dataset, {}) if method in registry.names() else {}
    return own.get("epochs", RECIPES[dataset].epochs)


def not_comparable(runs: list[dict]) -> str:
    """Why the runs of one report row cannot be compared with the paper's number ("" when they can)."""
    reasons: list[str] = []
    for summary in runs:
        dataset = summary.get("dataset")
        if dataset not in PAPER_CLASSES:
            continue
        wanted = recipe_epochs(summary.get("method"), dataset)
        epochs = summary.get("epochs")
        if isinstance(epochs, int) and epochs < wanted:
            reasons.append(f"{epochs} of the recipe's {wanted} epochs")
        classes = num_classes(summary)
        if classes is not None and classes != PAPER_CLASSES[dataset]:
            reasons.append(f"{classes} of {dataset}'s {PAPER_CLASSES[dataset]} classes")
    return "; ".join(dict.fromkeys(reasons))
