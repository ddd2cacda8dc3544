"""The run directory: a new one for a fresh run, or the one whose checkpoint a ``--resume`` continues."""

import os
import time

from ffsd_fast.errors import UserError
from ffsd_fast.trainer import checkpoint
from ffsd_fast.trainer.config import Config

# Fields that must agree between a checkpoint and the run that resumes it.
RUN_IDENTITY = ("method", "model", "dataset", "num_students", "image_size")


def new_run_dir(cfg: Config) -> str:
    method = "" if cfg.method == "ffsd" else f"-{cfg.method}"
    name = cfg.run_name or (f"{cfg.dataset}-{cfg.model}-m{cfg.num_students}{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    path = os.path.join(cfg.output_dir, name)
    suffix = 1
    while os.path.exists(path) and cfg.run_name is None:
        suffix += 1
        path = os.path.join(cfg.output_dir, f"{name}-{suffix}")
    os.makedirs(path, exist_ok=cfg.run_name is not None)
    return path


def find_auto_resume(cfg: Config) -> str | None:
    """``--resume auto``: the checkpoint to continue, or None for a fresh start (see ``Config.resume``)."""
    if cfg.run_name is not None:
        path = os.path.join(cfg.output_dir, cfg.run_name, checkpoint.CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    if not os.path.isdir(cfg.output_dir):
        return None
    candidates = []
    for entry in os.scandir(cfg.output_dir):
        path = os.path.join(entry.path, checkpoint.CHECKPOINT_NAME)
        if entry.is_dir() and os.path.isfile(path):
            candidates.append((os.path.getmtime(path), path))
    for _, path in sorted(candidates, reverse=True):
        try:
            saved = checkpoint.load(path)["config"]
        except UserError:
            continue  # a damaged checkpoint of some other run: not ours to continue
        if all(saved.get(k) == getattr(cfg, k) for k in RUN_IDENTITY):
            return path
    return None


def check_resumable(saved: dict, cfg: Config, path: str) -> None:
    differ = [f"{k} {saved.get(k)!r} → {getattr(cfg, k)!r}" for k in RUN_IDENTITY if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise UserError(
            f"checkpoint {path} is from another run ({'; '.join(differ)}): pass the flags it was "
            "trained with, or start a new run"
        )
