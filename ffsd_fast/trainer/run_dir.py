"""The run directory: a new one for a fresh run (never another run's), the lock that keeps one writer in it, and the
cleaning a resumed one gets."""

import fcntl
import glob
import os
import socket
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


# One writer per run directory: the process that trains or resumes a run holds an exclusive ``flock`` on this file
# for the whole run. The kernel drops the lock when the process ends however it ends (kill -9, a crash), so a stale
# file left by a killed process never blocks a resume; the pid written into it only names the holder in the error.
LOCK_NAME = ".ffsd-train.lock"
_held: dict[str, int] = {}  # run directory (real path) -> the descriptor holding its lock, in this process
_last_claimed: list[str] = []  # the run directories this process claimed, oldest first (for the Ctrl-C message)


def _holder(lock_path: str) -> str:
    """Who holds the lock, as its file says ("process 1234 on host"), or a plain "another process"."""
    try:
        with open(lock_path, encoding="utf-8") as fh:
            words = fh.read().split()
    except OSError:
        words = []
    return f"process {words[0]}" + (f" on {words[1]}" if len(words) > 1 else "") if words else "another process"


def lock_run_dir(run_dir: str) -> None:
    """Takes the run directory's exclusive lock for this process until :func:`release_run_dir` or its exit; a
    one-line ``UserError`` naming the holder when another process trains in it, or saying why it cannot be written.
    Taking a lock this process holds already does nothing."""
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    lock_path = os.path.join(run_dir, LOCK_NAME)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # 0o666: the umask decides
    except OSError as error:  # a read-only folder, no permission: nothing could be saved there either
        raise UserError(f"cannot write in run directory {run_dir}: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(
            f"run directory {run_dir} is in use by {_holder(lock_path)}, which is training in it: wait for it to end "
            "(or stop it, then --resume), or choose another --run-name"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[key] = fd
    _last_claimed.append(run_dir)


def release_run_dir(run_dir: str) -> None:
    """Gives up this process's lock on ``run_dir`` (nothing when it holds none); the file stays, unlocked."""
    fd = _held.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file releases the flock


def release_run_dirs() -> None:
    """Gives up every run directory lock this process holds (a run's end; a later run in this process may take
    them again)."""
    for key in list(_held):
        release_run_dir(key)


def last_claimed_run_dir() -> str | None:
    """The run directory this process last locked, if any: what an interrupted command names for ``--resume``."""
    return _last_claimed[-1] if _last_claimed else None


def claim_new_run_dir(cfg: Config) -> str:
    """:func:`new_run_dir`, locked. A named folder is checked again once locked: another run may have finished its
    first epoch there between the check and the lock, and its work is never trained over."""
    path = new_run_dir(cfg)
    lock_run_dir(path)
    if os.path.isfile(os.path.join(path, CHECKPOINT_NAME)):
        release_run_dir(path)
        new_run_dir(cfg)  # raises the "holds a run already" error
    return path
