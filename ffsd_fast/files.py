"""Files written whole or not at all: what every layer that writes a file uses (checkpoints, caches, summaries)."""

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

# What a write in progress is called; a resumed run deletes those an interrupted one left (``glob`` pattern).
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".partial-", ".tmp"
PARTIAL_PATTERN = PARTIAL_PREFIX + "*" + PARTIAL_SUFFIX


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Calls ``write`` on a temporary file beside ``path``, then renames it over ``path``: the path always holds
    either the old file or the complete new one, even if the process is killed mid-write or the machine loses
    power."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX, dir=directory)
    try:
        # mkstemp makes the file 0600; the finished file gets the mode any other new file would (0644 under 022).
        os.fchmod(fd, 0o666 & ~current_umask())
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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``); elsewhere set and
    restored at once (``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
