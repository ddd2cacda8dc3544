"""Nothing silently wrong: the table of bad input (the same command, its exit status and its message) and what a
resume must leave behind. Each case is one that once gave a traceback, a wrong number, or a run directory too early.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from ffsd_fast.cli.train import main
from ffsd_fast.trainer import checkpoint
from tests.helpers import FAST, one_line_error, run_ok, write_folder

# (case, YAML text or None, flags, a fragment of the one-line error). Every one exits 2 before anything is written.
REFUSED = [
    ("yaml-quoted-no", 'drop_last: "no"', [], "--drop-last (in {yaml}) must be true or false, got 'no'"),
    ("yaml-epochs-word", 'epochs: "five"', [], "--epochs (in {yaml}) must be an integer, got 'five'"),
    ("yaml-lr-word", "lr: fast", [], "--lr (in {yaml}) must be a number, got 'fast'"),
    ("yaml-batch-float", "batch_size: 3.5", [], "--batch-size (in {yaml}) must be an integer, got 3.5"),
    ("yaml-milestones-scalar", "lr_milestones: 3", [], "--lr-milestones (in {yaml}) must be a list of integers"),
    ("yaml-lr-nan", "lr: .nan", [], "--lr (in {yaml}) must be a finite number, got nan"),
    ("yaml-unknown-field", "learning_rate: 0.1", [], "unknown field(s) (in {yaml}): learning_rate"),
    ("lr-negative", None, ["--lr", "-1"], "--lr must be greater than 0, got -1.0"),
    ("lr-nan", None, ["--lr", "nan"], "--lr must be a finite number, got nan"),
    ("lr-inf", None, ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("momentum-one", None, ["--momentum", "1"], "--momentum must be less than 1, got 1.0"),
    ("weight-decay-negative", None, ["--weight-decay=-1e-4"], "--weight-decay must be at least 0"),
    ("batch-zero", None, ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("epochs-zero", None, ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("seed-negative", None, ["--seed", "-3"], "--seed must be at least 0, got -3"),
    ("temperature-zero", None, ["--temperature", "0"], "--temperature must be greater than 0"),
    ("workers-negative", None, ["--workers", "-1"], "--workers must be at least 0, got -1"),
]


@pytest.mark.parametrize(("text", "flags", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_before_anything_is_written(capsys, tmp_path, text, flags, message):
    out = tmp_path / "runs"
    args = [*FAST, *flags, "--output-dir", str(out)]
    if text is not None:
        (tmp_path / "c.yaml").write_text(text + "\n")
        args = ["-c", str(tmp_path / "c.yaml"), *args]
    err = one_line_error(capsys, args)
    assert message.format(yaml=tmp_path / "c.yaml") in err, err
    assert not out.exists()  # validated at parse time: no run directory, no output folder


def test_output_dir_that_cannot_be_created(capsys, tmp_path):
    assert "cannot create --output-dir /proc/ffsd-test" in one_line_error(
        capsys, [*FAST, "--output-dir", "/proc/ffsd-test/runs"]
    )
    (tmp_path / "a-file").write_text("")
    assert "is a file, not a folder" in one_line_error(capsys, [*FAST, "--output-dir", str(tmp_path / "a-file")])


def test_empty_checkpoint_is_one_line(capsys, tmp_path):
    empty = tmp_path / "checkpoint.pt"
    empty.write_bytes(b"")
    assert f"cannot read checkpoint {empty}: the file is empty (0 bytes)" in one_line_error(
        capsys, [*FAST, "--resume", str(empty)]
    )


# ---------------------------------------------------------------------------------------------------------------
# Resume: the run's own configuration, refusing what would change its result, and a clean run directory
# ---------------------------------------------------------------------------------------------------------------

MADE_WITH = ["--batch-size", "128", "--seed", "7", "--lr-milestones", "5"]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """A run made with non-default settings, one epoch done."""
    out = tmp_path_factory.mktemp("runs")
    return run_ok([*FAST, *MADE_WITH], out, "made")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "99"], "--seed 7 → 99"),
        (["--batch-size", "64", "--lr", "0.2"], "--batch-size 128 → 64; --lr 0.1 → 0.2"),
        (["--model", "resnet32"], "--model 'resnet20' → 'resnet32'"),
        (["--no-quirk-probe-forward"], "--quirk-probe-forward True → False"),
    ],
)
def test_resume_refuses_a_change_of_result_naming_it(capsys, one_epoch_run, flags, message):
    before = (one_epoch_run / "config.yaml").read_text()
    err = one_line_error(capsys, ["--no-progress", "--resume", str(one_epoch_run), *flags])
    assert message in err and "--epochs" in err, err
    assert (one_epoch_run / "config.yaml").read_text() == before


def test_a_named_run_is_never_trained_over(capsys, one_epoch_run):
    err = one_line_error(capsys, [*FAST, "--output-dir", str(one_epoch_run.parent), "--run-name", "made"])
    assert "holds a run already" in err and "--resume" in err


@pytest.mark.slow
def test_resume_with_no_flags_continues_the_saved_run_and_leaves_it_clean(tmp_path):
    run = run_ok([*FAST, *MADE_WITH], tmp_path, "r")
    config_yaml = (run / "config.yaml").read_text()
    # What a process killed after logging epoch 2 but before its checkpoint leaves: a half-written checkpoint, a
    # record past the checkpoint and a line cut short.
    (run / ".partial-x1y2.tmp").write_bytes(b"half a checkpoint")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "eval", "epoch": 2, "leader_top1": 1.0}) + "\n" + '{"kind": "tra')

    assert main(["--no-progress", "--workers", "0", "--resume", str(run), "--epochs", "2"]) == 0

    saved = checkpoint.load(str(run))
    assert saved["epoch"] == 2
    assert {k: saved["config"][k] for k in ("batch_size", "seed", "lr_milestones", "epochs")} == {
        "batch_size": 128,
        "seed": 7,
        "lr_milestones": [5],
        "epochs": 2,
    }
    assert (run / "config.yaml").read_text() == config_yaml  # the run's configuration as it started
    assert not list(run.glob(".partial-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    assert all(r["leader_top1"] != 1.0 for r in records if r["kind"] == "eval")
    train_steps = [(r["epoch"], r["step"]) for r in records if r["kind"] == "train"]
    assert len(train_steps) == len(set(train_steps))
    (resume,) = [r for r in records if r["kind"] == "resume"]
    assert resume["epoch"] == 1 and resume["changed"]["epochs"] == [1, 2]
    assert resume["threads"] == torch.get_num_threads()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    steps = [e.step for e in board.Scalars("eval/leader_top1")]
    assert len(steps) == 2 and steps == sorted(set(steps))  # one curve, in one place, no repeated epoch


@pytest.mark.slow
def test_resume_auto_passes_over_an_empty_checkpoint(tmp_path):
    older = run_ok([*FAST, *MADE_WITH], tmp_path, "older")
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "checkpoint.pt").write_bytes(b"")  # killed before anything was written
    args = ["--no-progress", "--workers", "0", *MADE_WITH, "--epochs", "2", "--output-dir", str(tmp_path)]
    assert main([*args, "--resume", "auto"]) == 0
    assert checkpoint.load(str(older))["epoch"] == 2


def test_version_records_what_decides_the_exact_numbers(one_epoch_run):
    version = json.loads((one_epoch_run / "version.json").read_text())
    assert version["threads"] == torch.get_num_threads() and version["torch"] == torch.__version__
    assert {"commit", "device", "python"} <= set(version)
    summary = json.loads((one_epoch_run / "summary.json").read_text())
    assert summary["threads"] == version["threads"] and summary["config"]["seed"] == 7


def test_a_kill_before_the_first_checkpoint_starts_over_cleanly(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "epoch": 1, "step": 999}) + "\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 3}))
    run_ok(FAST, tmp_path, "r")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("eval") == 1 and all(r.get("step") != 999 for r in records)
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0
    assert len(os.listdir(run / "tensorboard")) == 1


@pytest.mark.slow
def test_dali_on_a_corrupt_image_is_one_line(capsys, tmp_path):
    pytest.importorskip("nvidia.dali")
    write_folder(tmp_path / "data", train=4, val=2)
    bad = next((tmp_path / "data" / "train").rglob("*.*"))
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)
    args = ["--imagenet", "--data-root", str(tmp_path / "data"), "--model", "resnet18", "--image-size", "32"]
    err = one_line_error(
        capsys,
        [*args, *FAST, "--batch-size", "4", "--loader", "dali", "--no-check-images", "--output-dir", str(tmp_path)],
    )
    assert f"DALI cannot read {bad}" in err and "--check-images" in err
