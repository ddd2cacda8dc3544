"""The product of a run: the leader's backbone alone, as a plain state dict (a baseline's first student)."""

import os

import torch

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.trainer import checkpoint


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
