"""``ffsd-eval CHECKPOINT``: test accuracy of a saved run (every network) or of an exported leader.

A run directory or its ``checkpoint.pt`` rebuilds the run's networks from its saved configuration and evaluates all
of them on the dataset's test split. Weights written by ``ffsd-export`` are one backbone, described by the sidecar
beside them (``leader.pt.json``): model, dataset and image size come from it. A plain state dict without a sidecar
says nothing of itself: give its ``--model``, ``--dataset`` and ``--image-size`` (the number of classes is read from
its classifier). ``--image-size`` overrides the run's or the sidecar's; a ``--model`` or ``--dataset`` that
contradicts them is refused. ``--data-root`` points at the dataset where it lives on this machine (default: the
run's). Prints one line per network and then, with ``--json``, writes them. Top-5 is reported on ImageNet with at
least 5 classes.

An ImageNet folder is read as the run read it: with the run's ``--loader`` (``--loader`` chooses another) and without
the files the run left out as undecodable. Every val image is first decoded once and the undecodable ones are left
out and named (``--no-check-images`` skips that; DALI then refuses, since a truncated JPEG can crash it).
"""

import argparse
import json
import os
import sys

import torch

from ffsd_fast import models
from ffsd_fast.data.common import DATASETS, LOADERS
from ffsd_fast.errors import UserError
from ffsd_fast.files import write_atomic
from ffsd_fast.trainer.evaluate import evaluate_checkpoint
from ffsd_fast.trainer.help_text import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ffsd-eval",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("checkpoint", help="a run directory, its checkpoint.pt, or a state dict from ffsd-export")
    parser.add_argument("--data-root", help="the dataset folder (default: the run's)")
    parser.add_argument("--dataset", choices=DATASETS, help="for a state dict without a sidecar")
    parser.add_argument("--model", help="for a state dict without a sidecar: " + ", ".join(models.names()))
    parser.add_argument(
        "--image-size", type=int, help="default: the run's or the sidecar's; required for a state dict without one"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per evaluation batch")
    parser.add_argument(
        "--loader", choices=LOADERS, help="ImageNet folders: DALI or torchvision (default: the run's, else auto)"
    )
    parser.add_argument(
        "--check-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ImageNet folders: decode every val image once first and leave the undecodable ones out",
    )
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes (DALI: threads) reading images"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the networks run (default here: cuda when available)",
    )
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
            args.loader,
            args.check_images,
            args.workers,
        )
        # Printed first: a --json that cannot be written loses nothing.
        for name, value in accuracies.items():
            print(f"{name:<28}{value:>7.2f}%", flush=True)
        if args.json:
            write_json(args.json, accuracies)
    except UserError as error:
        print(f"ffsd-eval: error: {error}", file=sys.stderr)
        return 2
    return 0


def write_json(path: str, accuracies: dict[str, float]) -> None:
    """``--json``: the accuracies, written whole or not at all; a one-line ``UserError`` when it cannot be."""
    if os.path.isdir(path):
        raise UserError(f"--json {path} is a directory: name the file to write")
    try:
        write_atomic(path, lambda fh: fh.write(json.dumps(accuracies, indent=2).encode()))
    except OSError as error:  # a read-only or missing folder, a full disk
        why = error.strerror or error
        raise UserError(f"cannot write --json {path}: {why} (the accuracies are printed above)") from None


if __name__ == "__main__":
    sys.exit(main())
