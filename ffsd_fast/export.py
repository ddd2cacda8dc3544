"""``ffsd-export RUN_DIR --out leader.pt``: the product of an FFSD run, the leader's backbone alone.

The file is a plain state dict (no trans-fusion head, no other network). For the ImageNet ResNets it loads into the
stock ``torchvision.models.resnetXX(num_classes=…)`` with ``strict=True``. A baseline run (``--method dml`` or
``independent``) has no leader: its first student is written.
"""

import argparse
import os
import sys

import torch

from ffsd_fast import checkpoint, models
from ffsd_fast.errors import UserError


def leader_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """The leader backbone's parameters and buffers (a baseline's first student's) out of a full checkpoint."""
    prefix = "leader.backbone." if state["config"].get("method", "ffsd") == "ffsd" else "students.0."
    weights = {k[len(prefix) :]: v for k, v in state["networks"].items() if k.startswith(prefix)}
    # Build the backbone to prove that the weights are complete and of the right shapes before writing anything.
    backbone = models.create(state["config"]["model"], state["num_classes"])
    backbone.load_state_dict(weights, strict=True)
    return weights


def export(run: str, out: str) -> str:
    state = checkpoint.load(run)
    weights = leader_state_dict(state)
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UserError(f"output folder does not exist: {directory}")
    checkpoint.save_atomic(weights, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ffsd-export", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory (holding checkpoint.pt) or a checkpoint file")
    parser.add_argument("--out", required=True, help="where to write the leader's state dict (.pt)")
    args = parser.parse_args(argv)
    try:
        path = export(args.run, args.out)
    except UserError as error:
        print(f"ffsd-export: error: {error}", file=sys.stderr)
        return 2
    print(f"leader backbone written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
