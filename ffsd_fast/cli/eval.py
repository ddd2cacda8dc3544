"""``ffsd-eval CHECKPOINT``: test accuracy of a saved run (every network) or of an exported leader.

A run directory or its ``checkpoint.pt`` rebuilds the run's networks from its saved configuration and evaluates all
of them on the dataset's test split. Weights written by ``ffsd-export`` are one backbone, described by the sidecar
beside them (``leader.pt.json``): model, dataset and image size come from it. A plain state dict without a sidecar
says nothing of itself: give its ``--model``, ``--dataset`` and ``--image-size`` (the number of classes is read from
its classifier). ``--image-size`` overrides the run's or the sidecar's; a ``--model`` or ``--dataset`` that
contradicts them is refused. ``--data-root`` points at the dataset where it lives on this machine (default: the
run's). Prints one line per network and, with ``--json``, writes them. Top-5 is reported on ImageNet with at least
5 classes.
"""

import argparse
import json
import sys

import torch

from ffsd_fast import models
from ffsd_fast.data.common import DATASETS
from ffsd_fast.errors import UserError
from ffsd_fast.files import write_atomic
from ffsd_fast.trainer.evaluate import evaluate_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ffsd-eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory, its checkpoint.pt, or a state dict from ffsd-export")
    parser.add_argument("--data-root", help="the dataset folder (default: the run's)")
    parser.add_argument("--dataset", choices=DATASETS, help="for a state dict without a sidecar")
    parser.add_argument("--model", help="for a state dict without a sidecar: " + ", ".join(models.names()))
    parser.add_argument(
        "--image-size", type=int, help="default: the run's or the sidecar's; required for a state dict without one"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the accuracies to this file")
    args = parser.parse_args(argv)
    try:
        accuracies = evaluate_checkpoint(
            args.checkpoint,
            args.data_root,
            args.dataset,
            args.model,
            args.image_size,
            args.batch_size,
            torch.device(args.device),
        )
        if args.json:
            write_atomic(args.json, lambda fh: fh.write(json.dumps(accuracies, indent=2).encode()))
    except UserError as error:
        print(f"ffsd-eval: error: {error}", file=sys.stderr)
        return 2
    for name, value in accuracies.items():
        print(f"{name:<28}{value:>7.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
