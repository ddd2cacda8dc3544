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

from ffsd_fast import checkpoint, models
from ffsd_fast.data import DATASETS, build_loaders
from ffsd_fast.errors import UserError
from ffsd_fast.evaluate import evaluate, evaluate_network
from ffsd_fast.method import build_networks


def _num_classes(weights: dict[str, torch.Tensor]) -> int:
    # The classifier is the last 2-D weight of every backbone here (fc / linear).
    matrices = [v for k, v in weights.items() if k.endswith("weight") and v.dim() == 2]
    if not matrices:
        raise UserError("the state dict has no classifier (no 2-D weight): is it a backbone's?")
    return matrices[-1].shape[0]


def evaluate_checkpoint(
    path: str,
    data_root: str | None,
    dataset: str | None,
    model: str | None,
    image_size: int | None,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    state = checkpoint.read(path, device)
    if checkpoint.is_training_checkpoint(state):
        cfg = state["config"]
        dataset, model, image_size = cfg["dataset"], cfg["model"], cfg["image_size"]
        data_root = data_root or cfg["data_root"]
    elif dataset is None or model is None:
        raise UserError(f"{path} is a single network's weights: give its --model and --dataset")
    image_size = image_size or models.default_image_size(model)
    topk = (1, 5) if dataset == "imagenet" else (1,)
    # No start-up decode of every image (the training tree is listed, not read): evaluation reads val/ only.
    _, test_loader, info = build_loaders(
        dataset, data_root, image_size, batch_size, batch_size, device, seed=0, workers=0, check_images=False
    )
    if checkpoint.is_training_checkpoint(state):
        nets = build_networks(
            model,
            state["num_classes"],
            cfg["num_students"],
            image_size,
            probe_forward=False,
            method=cfg.get("method", "ffsd"),
        ).to(device)
        nets.load_state_dict(state["networks"])
        return evaluate(nets, test_loader, topk)
    num_classes = _num_classes(state)
    if num_classes != info.num_classes:
        raise UserError(f"the network has {num_classes} classes, {dataset} has {info.num_classes}")
    network = models.create(model, num_classes).to(device)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} does not load into {model}: {str(error).splitlines()[0]}") from None
    return evaluate_network(network, test_loader, topk)


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
            checkpoint.write_atomic(args.json, lambda fh: fh.write(json.dumps(accuracies, indent=2).encode()))
    except UserError as error:
        print(f"ffsd-eval: error: {error}", file=sys.stderr)
        return 2
    for name, value in accuracies.items():
        print(f"{name:<28}{value:>7.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
