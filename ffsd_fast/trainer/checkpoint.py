"""Checkpoints: what a run saves after every epoch and how a resumed run takes it back (``state`` and ``restore``),
written atomically (temporary file, fsync, rename) and read with ``weights_only=True``."""

import os
import random
import zipfile

import numpy as np
import torch

from ffsd_fast.errors import UserError
from ffsd_fast.files import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


def state(
    config: dict,
    num_classes: int,
    epoch: int,
    nets: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    history: list[dict],
) -> dict:
    """Everything a run needs to continue after ``epoch`` exactly as if it had not stopped; ``restore`` reads it."""
    return {
        "format": FORMAT,
        "config": config,
        "num_classes": num_classes,
        "epoch": epoch,
        "networks": nets.state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history,
        "rng": rng_state(),
    }


def restore(
    saved: dict,
    nets: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
) -> tuple[list[dict], int]:
    """Loads a ``state`` into freshly built networks, optimisers and scaler, and every RNG; returns (the history of
    the epochs done, the first epoch still to train)."""
    _check_shapes(saved, nets)
    nets.load_state_dict(saved["networks"])
    for optimizer, optimizer_state in zip(optimizers, saved["optimizers"], strict=True):
        optimizer.load_state_dict(optimizer_state)
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    return saved["history"], saved["epoch"] + 1


def _check_shapes(saved: dict, nets: torch.nn.Module) -> None:
    """A one-line error when the networks built now differ in shape from the saved ones: the data's classes changed
    (a class folder added or removed), which ``load_state_dict`` reports as pages of size mismatches."""
    current = nets.state_dict()
    differ = [
        (key, list(value.shape), list(current[key].shape))
        for key, value in saved["networks"].items()
        if key in current and value.shape != current[key].shape
    ]
    if differ:
        key, was, now = differ[0]
        raise UserError(
            f"cannot resume: the run was saved with {saved.get('num_classes', '?')} classes and its networks no longer "
            f"fit the data ({key}: {was} saved, {now} now; {len(differ)} tensors differ): was a class folder added or "
            "removed? Resume with the data the run trained on, or start a new run"
        )


def save_atomic(state: dict, path: str) -> None:
    """``torch.save`` through :func:`write_atomic`; a full disk or a folder that became read-only is a one-line
    ``UserError`` (the previous checkpoint, if any, is still whole)."""
    try:
        write_atomic(path, lambda fh: torch.save(state, fh))
    except OSError as error:
        epoch = state.get("epoch")
        last = (
            f"the last good checkpoint (epoch {epoch - 1}) is still whole: free space and --resume {path}"
            if isinstance(epoch, int) and epoch > 1 and os.path.isfile(path)
            else "nothing of this run is saved yet: free space and start it again"
        )
        raise UserError(
            f"cannot save the checkpoint of epoch {epoch} to {path}: {error.strerror or error}; {last}"
        ) from None


def resolve_path(path: str) -> str:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    return path


def _first_line(error: BaseException) -> str:
    # Some errors (EOFError of a cut file) carry no message at all: name the error instead.
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _why_unreadable(path: str, error: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, in words: a file torch.save never wrote (text, an image) says so rather
    than the unpickler's own message ("101", "pop from empty list")."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive (PK\x03\x04), or with the legacy format a pickle (protocol 2+: 0x80).
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        return "not a file written by torch.save (expected a run's checkpoint.pt or weights from ffsd-export)"
    return f"{type(error).__name__}: {_first_line(error)}"


def read(path: str, device: torch.device | str = "cpu", *, mmap: bool = False) -> dict:
    """Whatever dict a ``.pt`` file holds (a training checkpoint or an exported state dict), read safely. With
    ``mmap`` the tensors stay on disk until touched: reading a checkpoint's config costs no weight I/O."""
    path = resolve_path(path)
    if os.path.getsize(path) == 0:
        raise UserError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    try:
        # mmap needs torch.save's zip format; anything else is read whole, to report what is wrong with it.
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # a truncated, empty or foreign file: say which, in one line
        raise UserError(f"cannot read checkpoint {path}: {_why_unreadable(path, error)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict")
    return state


def is_training_checkpoint(state: dict) -> bool:
    return "networks" in state and "config" in state


def load(path: str, device: torch.device | str = "cpu", *, mmap: bool = False) -> dict:
    """A full training checkpoint (networks, optimisers, history, RNG and config)."""
    state = read(path, device, mmap=mmap)
    if not is_training_checkpoint(state):
        raise UserError(f"{resolve_path(path)} is not an ffsd-fast checkpoint")
    return state


def read_config(path: str) -> tuple[dict, int]:
    """(the saved run configuration, the epochs done) of a training checkpoint, without reading its weights."""
    state = load(path, mmap=True)
    return state["config"], state.get("epoch", 0)


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
