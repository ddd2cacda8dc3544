"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``."""

import os
import random
import tempfile
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import torch

from ffsd_fast.errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Calls ``write`` on a temporary file beside ``path``, then renames it over ``path``: the path always holds
    either the old file or the complete new one, even if the process is killed mid-write or the machine loses
    power."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_atomic(state: dict, path: str) -> None:
    """``torch.save`` through :func:`write_atomic`."""
    write_atomic(path, lambda fh: torch.save(state, fh))


def resolve_path(path: str) -> str:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    return path


def read(path: str, device: torch.device | str = "cpu") -> dict:
    """Whatever dict a ``.pt`` file holds (a training checkpoint or an exported state dict), read safely."""
    path = resolve_path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, in one line
        raise UserError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict")
    return state


def is_training_checkpoint(state: dict) -> bool:
    return "networks" in state and "config" in state


def load(path: str, device: torch.device | str = "cpu") -> dict:
    """A full training checkpoint (networks, optimisers, history, RNG and config)."""
    state = read(path, device)
    if not is_training_checkpoint(state):
        raise UserError(f"{resolve_path(path)} is not an ffsd-fast checkpoint")
    return state


def rng_state() -> dict:
    """Every RNG the process has, in types that ``weights_only`` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
