"""``ffsd-eval CHECKPOINT``: test accuracy of a saved run (every network) or of an exported leader.

A run directory or its ``checkpoint.pt`` rebuilds the run's networks from its saved configuration and evaluates all
of them on the dataset's test split. A state dict written by ``ffsd-export`` is one backbone: name its ``--model``
and ``--dataset`` (the number of classes is read from its classifier). ``--data-root`` points at the dataset where
it lives on this machine (default: the run's). Prints one line per network and, with ``--json``, writes them.
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
    parser.add_argument("--dataset", choices=DATASETS, help="for an exported state dict")
    parser.add_argument("--model", help="for an exported state dict: " + ", ".join(models.names()))
    parser.add_argument("--image-size", type=int, help="default: the run's, or the model's usual size")
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
