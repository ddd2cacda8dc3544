"""``ffsd-train``: flags (and ``-c config.yaml``) → a resolved configuration (a resumed run's own) → one run; bad
input is one line (exit 2), and so are a full disk or a read-only folder met mid-run, and Ctrl-C (exit 130)."""

import errno
import os
import sys

from ffsd_fast.errors import UserError
from ffsd_fast.trainer.checkpoint import CHECKPOINT_NAME, read_config
from ffsd_fast.trainer.config import parse_command, resolve
from ffsd_fast.trainer.resume import resumed_config
from ffsd_fast.trainer.run import train
from ffsd_fast.trainer.run_dir import last_claimed_run_dir

# Failures of the machine, not of the code (a full disk, a read-only folder): one line, naming the file.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def interrupted_message() -> str:
    """What Ctrl-C leaves: the epoch in progress is lost; the run continues from its last checkpoint."""
    run_dir = last_claimed_run_dir()
    if run_dir is None:  # before the run folder was claimed, or a rank other than 0 (rank 0 names it)
        return "ffsd-train: interrupted: the partial epoch is not saved (the last checkpoint, if any, is kept)"
    try:
        _, done = read_config(os.path.join(run_dir, CHECKPOINT_NAME))
    except UserError:
        return f"ffsd-train: interrupted: the partial epoch is not saved, and no epoch was finished ({run_dir})"
    return (
        f"ffsd-train: interrupted: the partial epoch is not saved; --resume {run_dir} continues after epoch {done}, "
        "its last checkpoint"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, given = parse_command(argv)
        # --resume PATH: the run's saved configuration, with what the command may change of it.
        train(resolve(resumed_config(cfg, given)), given)
    except UserError as error:
        print(f"ffsd-train: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in STORAGE_ERRORS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"ffsd-train: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
