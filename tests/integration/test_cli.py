"""The command line from outside: ``python -m ffsd_fast.train`` in a subprocess, and the installed console scripts."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_cli_error_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "ffsd_fast.train", "--model", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'nope'" in proc.stderr


@pytest.mark.slow
def test_help_documents_every_flag():
    proc = subprocess.run(
        [sys.executable, "-m", "ffsd_fast.train", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0
    for flag in (
        "--model",
        "--dataset",
        "--imagenet",
        "--data-root",
        "--num-students",
        "--epochs",
        "--batch-size",
        "--image-size",
        "--lr",
        "--seed",
        "--device",
        "--output-dir",
        "--resume",
        "--kernels",
        "-c",
    ):
        assert flag in proc.stdout, flag


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ffsd-train", "ffsd-export", "ffsd-eval"])
def test_console_scripts_are_installed(script):
    path = os.path.join(os.path.dirname(sys.executable), script)
    proc = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"usage: {script}" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "usage"),
    [("ffsd_fast.train", "usage: ffsd-train"), ("ffsd_fast.report", "usage: python -m ffsd_fast.report")],
)
def test_module_entry_points_run(module, usage):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.startswith(usage), proc.stdout[:200]
