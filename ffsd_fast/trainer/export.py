"""The product of a run: the leader's backbone alone, as a plain state dict (a baseline's first student), and beside
it a JSON sidecar saying what the weights are and what inputs they expect.

The sidecar is the weights' path plus ``.json`` (``leader.pt`` → ``leader.pt.json``), so that no other file a user
names after the leader (``ffsd-eval leader.pt --json leader.json``) can be taken for it, or overwrite it. It holds:
``format``; ``weights`` (the weights' file name) and their ``sha256`` (a sidecar left over from other weights is
refused); ``model``, ``num_classes``, ``image_size``; ``mean`` and ``std``, per RGB channel, applied to pixels in
[0, 1] as the run's data pipeline did; ``dataset``, ``method``, ``network`` (``leader``, or ``student0`` for a
baseline) and ``epoch`` (the checkpoint's, the last epoch trained); ``commit`` and ``dirty``, with
``commit_source``: ``run`` (the code the run was started with, from its ``version.json``) or ``export`` (no
``version.json`` beside the checkpoint: the code that exported); and ``checkpoint``, the path it was exported from.
"""

import hashlib
import io
import json
import os

import torch

from ffsd_fast import models
from ffsd_fast.data import common
from ffsd_fast.data.loaders import build_loaders
from ffsd_fast.errors import UserError
from ffsd_fast.files import write_atomic
from ffsd_fast.trainer import checkpoint
from ffsd_fast.trainer.config import method_of
from ffsd_fast.trainer.runlog import code_version

SIDECAR_FORMAT = 1
# What ffsd-eval reads from a sidecar; a file without one of them is not one of ours.
SIDECAR_KEYS = ("format", "sha256", "model", "num_classes", "image_size", "dataset")


def sidecar_path(weights: str) -> str:
    """Where the sidecar of the weights at ``weights`` lives: ``leader.pt`` → ``leader.pt.json``."""
    return weights + ".json"


def deployed_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """The deployed network's parameters and buffers (FFSD's leader backbone, a baseline's first student) out of a
    full checkpoint."""
    prefix = method_of(state["config"]).deployed_prefix
    prefixes = (prefix,) if isinstance(prefix, str) else prefix  # several: a network assembled from parts
    # Cloned: a run with --stack-networks saves its networks as views into shared tensors, and torch.save would
    # write those whole (every student's weights) beside the leader's.
    weights = {k[len(p) :]: v.clone() for k, v in state["networks"].items() for p in prefixes if k.startswith(p)}
    # Build the backbone to prove that the weights are complete and of the right shapes before writing anything.
    backbone = models.create(state["config"]["model"], state["num_classes"])
    backbone.load_state_dict(weights, strict=True)
    return weights


def normalization(dataset: str, image_size: int) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` that the dataset's pipeline (``ffsd_fast.data``) subtracts and divides by."""
    if dataset in common.FIXED_STATISTICS:
        mean, std = common.FIXED_STATISTICS[dataset]
        return list(mean), list(std)
    # Digits: one grey mean and std of the training split as resized to image_size, computed when the data loads;
    # the grey channel is then copied to all three, so each RGB channel has the same pair.
    _, test_loader, _ = build_loaders(common.DataSpec(dataset, None, image_size, 1, 1, workers=0), "cpu")
    return test_loader.mean.flatten().tolist() * 3, test_loader.std.flatten().tolist() * 3


def _version(checkpoint_path: str) -> dict:
    """The commit the run recorded (``version.json`` beside its checkpoint), else the exporting code's."""
    path = os.path.join(os.path.dirname(checkpoint_path), "version.json")
    if not os.path.isfile(path):
        return {**code_version(), "commit_source": "export"}
    try:
        with open(path, encoding="utf-8") as fh:
            version = json.load(fh)
        return {"commit": version["commit"], "dirty": version.get("dirty"), "commit_source": "run"}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read the run's commit from {path}: {error}") from None


def sidecar(state: dict, checkpoint_path: str, weights_name: str, weights_bytes: bytes) -> dict:
    """The sidecar of the weights exported from ``state`` (a full checkpoint read from ``checkpoint_path``)."""
    cfg = state["config"]
    mean, std = normalization(cfg["dataset"], cfg["image_size"])
    return {
        "format": SIDECAR_FORMAT,
        "weights": weights_name,
        "sha256": hashlib.sha256(weights_bytes).hexdigest(),
        "model": cfg["model"],
        "num_classes": state["num_classes"],
        "image_size": cfg["image_size"],
        "mean": mean,
        "std": std,
        "dataset": cfg["dataset"],
        "method": method_of(cfg).name,
        "network": method_of(cfg).deployed,
        "epoch": state["epoch"],
        **_version(checkpoint_path),
        "checkpoint": os.path.abspath(checkpoint_path),
    }


def read_sidecar(weights: str) -> dict | None:
    """The sidecar of the weights file ``weights``, checked against them; None when there is none."""
    path = sidecar_path(weights)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    missing = [key for key in SIDECAR_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise UserError(f"{path} is not an ffsd-export sidecar: it lacks {', '.join(missing)}")
    if meta["format"] != SIDECAR_FORMAT:
        raise UserError(f"{path} is of format {meta['format']}; this ffsd-eval reads format {SIDECAR_FORMAT}")
    with open(weights, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    if digest != meta["sha256"]:
        raise UserError(f"{path} describes other weights than {weights} (sha256 differs): export them again")
    return meta


def export(run: str, out: str) -> str:
    """Writes the deployed network's weights to ``out`` and their sidecar beside them (each atomically); returns
    ``out``."""
    source = checkpoint.resolve_path(run)
    state = checkpoint.load(source)
    weights = deployed_state_dict(state)
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UserError(f"output folder does not exist: {directory}")
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory: name the file to write, e.g. {os.path.join(out, 'leader.pt')}")
    if os.path.isdir(sidecar_path(out)):
        raise UserError(f"--out {out}: its sidecar {sidecar_path(out)} is a directory")
    if os.path.realpath(out) == os.path.realpath(source):
        raise UserError(f"--out {out} is the checkpoint being exported: choose another file")
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    data = buffer.getvalue()
    meta = json.dumps(sidecar(state, source, os.path.basename(out), data), indent=2) + "\n"
    # Weights first: a crash between the two leaves no sidecar or an old one, which read_sidecar refuses by its
    # sha256, never a sidecar that silently describes other weights.
    for path, content in ((out, data), (sidecar_path(out), meta.encode())):
        try:
            write_atomic(path, lambda fh, content=content: fh.write(content))
        except OSError as error:
            raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return out
