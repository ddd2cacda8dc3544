"""What ``ffsd-eval`` reads a saved network's test split with: by default as its run trained (the run's
``--loader``, and without the files the run left out), every val image decoded once first (``--check-images``)."""

import json
import os

from ffsd_fast.errors import UserError
from ffsd_fast.trainer import checkpoint, export


def run_left_out(checkpoint_path: str) -> list[str]:
    """The image files the run of ``checkpoint_path`` left out as undecodable (its ``metrics.jsonl`` record); none
    when the run's log is gone or unreadable (``--check-images`` finds them again)."""
    metrics = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "metrics.jsonl")
    files: list[str] = []
    try:
        with open(metrics, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a killed process: the others still count
                if isinstance(record, dict) and record.get("kind") == "corrupt_images":
                    files += [f for f in record.get("files", []) if isinstance(f, str)]
    except OSError:
        return []
    return files


def _run_checkpoint(path: str, state: dict) -> str | None:
    """The training checkpoint behind ``path``: itself, or the one an export's sidecar names (if still there)."""
    if checkpoint.is_training_checkpoint(state):
        return path
    try:
        with open(export.sidecar_path(path), encoding="utf-8") as fh:
            source = json.load(fh).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) and os.path.isfile(source) else None


def eval_data(path: str, state: dict, loader: str | None, check_images: bool) -> tuple[str, bool, list[str]]:
    """``(loader, check_images, left_out)`` for evaluating ``path`` (holding ``state``): ``loader`` when given, else
    the run's own; the files its run left out."""
    run = _run_checkpoint(path, state)
    if run is None:
        return loader or "auto", check_images, []
    if loader is None:
        try:
            config = state["config"] if run == path else checkpoint.read_config(run)[0]
        except UserError:
            config = {}
        loader = config.get("loader", "auto")
    return loader, check_images, run_left_out(run)
