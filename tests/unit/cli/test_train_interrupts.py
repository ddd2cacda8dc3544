"""What a run meets from outside, in one line: Ctrl-C (exit 130, saying the partial epoch is not saved), a full disk at
a checkpoint or anywhere else (exit 2), and a resume whose data gained a class (no pages of size mismatches)."""

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from ffsd_fast.cli import train as train_cli
from ffsd_fast.errors import UserError
from ffsd_fast.trainer import checkpoint
from tests.helpers import FAST
from tests.helpers.methods import build


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    args = [*FAST, "--epochs", "50", "--output-dir", str(tmp_path), "--run-name", "r"]
    # SIGINT back to its default in the child: a test run started in the background by a shell inherits SIGINT
    # ignored, and Python then never installs its KeyboardInterrupt handler (the run trains on, Ctrl-C unheard).
    run = subprocess.Popen(
        [sys.executable, "-m", "ffsd_fast.cli.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert run.stdout.readline().startswith("run directory:")  # training has started
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("ffsd-train: interrupted: the partial epoch is not saved"), err


def test_a_full_disk_at_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    def full(obj, fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(UserError) as error:
        checkpoint.save_atomic({"epoch": 1, "networks": {}}, path)
    assert str(error.value) == (
        f"cannot save the checkpoint of epoch 1 to {path}: No space left on device; nothing of this run is saved "
        "yet: free space and start it again"
    )
    assert os.listdir(tmp_path) == []  # no partial file left


def test_a_full_disk_anywhere_in_a_run_is_one_line(capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.jsonl")

    monkeypatch.setattr(train_cli, "train", full)
    assert train_cli.main([*FAST]) == 2
    assert capsys.readouterr().err == "ffsd-train: error: /runs/r/metrics.jsonl: No space left on device\n"


def test_a_resume_after_a_class_folder_was_added_is_one_line():
    saved_nets = build("resnet20", 3, 2, 8, False)
    state = checkpoint.state({}, 3, 1, saved_nets, [], None, [])
    with pytest.raises(UserError) as error:
        checkpoint.restore(state, build("resnet20", 4, 2, 8, False), [], None)
    text = str(error.value)
    assert "\n" not in text and text.startswith("cannot resume: the run was saved with 3 classes"), text
    assert "[3, 64] saved, [4, 64] now" in text and "class folder added or removed" in text, text
