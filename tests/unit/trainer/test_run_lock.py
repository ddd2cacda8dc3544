"""One writer per run directory: a second fresh run or a resume of a run that is training is refused in one line
naming the process that holds the folder; a lock left by a killed process never blocks a resume."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ffsd_fast.errors import UserError
from ffsd_fast.trainer import run_dir
from tests.helpers import FAST, one_line_error, run_ok


def hold_lock(folder) -> subprocess.Popen:
    """Another process that takes ``folder``'s lock (as a training run does) and waits; returns once it holds it."""
    # Plain fcntl, as run_dir does it (pid first in the file): no torch to import, so it starts in milliseconds.
    path = os.path.join(str(folder), run_dir.LOCK_NAME)
    code = textwrap.dedent(
        f"""
        import fcntl, os, time
        fd = os.open({path!r}, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{{os.getpid()}} testhost\\n".encode())
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def holders():
    started: list[subprocess.Popen] = []
    yield started
    for holder in started:
        holder.kill()
        holder.wait()


def test_a_second_run_with_the_same_name_is_refused_naming_the_holder(capsys, tmp_path, holders):
    (tmp_path / "same").mkdir()
    holders.append(hold_lock(tmp_path / "same"))
    err = one_line_error(capsys, [*FAST, "--output-dir", str(tmp_path), "--run-name", "same", "--seed", "1"])
    assert f"is in use by process {holders[0].pid}" in err, err
    assert not (tmp_path / "same" / "metrics.jsonl").exists()  # nothing of the second run written


def test_a_resume_of_a_run_in_training_is_refused_naming_the_holder(capsys, one_epoch, holders):
    run = one_epoch
    tmp_path = run.parent
    before = (run / "metrics.jsonl").read_text()
    holders.append(hold_lock(run))
    err = one_line_error(capsys, ["--no-progress", "--epochs", "2", "--resume", str(run)])
    assert f"is in use by process {holders[0].pid}" in err, err
    err = one_line_error(capsys, [*FAST, "--epochs", "2", "--output-dir", str(tmp_path), "--resume", "auto"])
    assert f"is in use by process {holders[0].pid}" in err, err
    assert (run / "metrics.jsonl").read_text() == before


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, holders):
    holder = hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / run_dir.LOCK_NAME).read_text().split()[0] == str(holder.pid)  # the stale file stays
    run_dir.lock_run_dir(str(tmp_path))  # and does not block
    try:
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            subprocess_lock(tmp_path)
    finally:
        run_dir.release_run_dir(str(tmp_path))
    subprocess_lock(tmp_path)  # released: another process takes it


def subprocess_lock(folder) -> None:
    """Whether another process can take ``folder``'s lock now: a UserError here when it cannot."""
    holder = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True)
    if holder.returncode:
        raise UserError(f"in use by process {holder.stdout.strip()}")


PROBE = textwrap.dedent(
    f"""
    import fcntl, os, sys
    path = os.path.join(sys.argv[1], {run_dir.LOCK_NAME!r})
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(open(path).read().split()[0])
        sys.exit(1)
    """
)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    return run_ok(FAST, tmp_path_factory.mktemp("runs"), "r")


def test_a_run_folder_that_cannot_be_written_is_one_line(capsys, one_epoch, monkeypatch):
    run = one_epoch
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(path).startswith(str(run)):
            raise OSError(30, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    err = one_line_error(capsys, ["--no-progress", "--epochs", "2", "--resume", str(run)])
    assert f"cannot write in run directory {run}: Read-only file system" in err, err


def test_the_lock_is_released_when_the_run_ends(one_epoch):
    subprocess_lock(one_epoch)  # would raise if this process still held it
