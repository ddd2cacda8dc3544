"""What a run leaves for other people and programs: files that follow the umask (they were 0600 under umask 022),
and a log without progress bars when stderr is not a terminal (they filled it with ``\\r``-joined lines)."""

import os
import stat

import pytest

from ffsd_fast.cli.train import main
from tests.helpers import FAST


@pytest.mark.slow
def test_run_files_follow_the_umask_and_no_progress_bar_without_a_terminal(capsys, tmp_path):
    old = os.umask(0o022)
    try:
        flags = [f for f in FAST if f != "--no-progress"]  # progress bars asked for, stderr captured (no terminal)
        assert main([*flags, "--output-dir", str(tmp_path), "--run-name", "r"]) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch 1/1" not in err, err[-500:]
    run = tmp_path / "r"
    for name in ("checkpoint.pt", "summary.json", "config.yaml", "metrics.jsonl", "version.json"):
        assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o644, name
