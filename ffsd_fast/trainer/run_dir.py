"""The run directory: a new one for a fresh run (never another run's), and the cleaning a resumed one gets."""

import glob
import os
import time

from ffsd_fast.errors import UserError
from ffsd_fast.files import PARTIAL_PATTERN
from ffsd_fast.trainer.checkpoint import CHECKPOINT_NAME
from ffsd_fast.trainer.config import FIELDS, Config


def prepare_output_dir(output_dir: str) -> None:
    """``--output-dir`` exists as a folder this process can write into, or a one-line error says why not."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir} is a file, not a folder")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:  # read-only, /proc, a file on the path, no permission
        raise UserError(f"cannot create --output-dir {output_dir}: {error.strerror or error}") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {output_dir} is not writable")


def new_run_dir(cfg: Config) -> str:
    """``--output-dir/--run-name`` (which must not hold a run already), else ``dataset-model-mM-time`` made unique."""
    method = "" if cfg.method == FIELDS["method"].default else f"-{cfg.method}"
    name = cfg.run_name or (f"{cfg.dataset}-{cfg.model}-m{cfg.num_students}{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    path = os.path.join(cfg.output_dir, name)
    # A named folder without a checkpoint is an attempt that never finished an epoch: started over (its log is
    # cleared). One with a checkpoint holds a run's work: never trained over.
    if cfg.run_name is not None and os.path.isfile(os.path.join(path, CHECKPOINT_NAME)):
        raise UserError(
            f"run directory {path} holds a run already: continue it with --resume {path} (or --resume auto), or "
            "choose another --run-name"
        )
    suffix = 1
    while os.path.exists(path) and cfg.run_name is None:
        suffix += 1
        path = os.path.join(cfg.output_dir, f"{name}-{suffix}")
    try:
        os.makedirs(path, exist_ok=cfg.run_name is not None)
    except OSError as error:
        raise UserError(f"cannot create run directory {path}: {error.strerror or error}") from None
    return path


def remove_partial_files(run_dir: str) -> list[str]:
    """Deletes the temporary files that a process killed while writing (a checkpoint, a summary) left; returns them."""
    stale = glob.glob(os.path.join(glob.escape(run_dir), PARTIAL_PATTERN))
    for path in stale:
        os.unlink(path)
    return stale
