"""PCL trains end to end through the CLI on the embedded digits data, one by one and stacked, exports its deployed
network (the temporal means of the trunk and of branch 1) as the stock backbone, evaluates it and reports."""

import json
import math

import pytest
import torch

from ffsd_fast.cli.eval import main as eval_main
from ffsd_fast.cli.export import main as export_main
from ffsd_fast.cli.report import main as report_main
from ffsd_fast.cli.train import main as train_main
from ffsd_fast.method import registry
from ffsd_fast.models import create
from ffsd_fast.trainer import checkpoint
from tests.helpers import FAST, run_ok


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
def test_pcl_trains_exports_evaluates_and_reports(tmp_path, capsys, stacked):
    args = ["--no-progress", "--workers", "0", "--method", "pcl", "--num-students", "3", "--epochs", "2"]
    args += ["--device", "cpu", "--output-dir", str(tmp_path), "--run-name", "run", "--seed", "0"]
    args += ["--pcl-rampup-epochs", "1", "--step", "stacked" if stacked else "per-network"]
    assert train_main(args) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "pcl" and len(summary["students_top1"]) == 3
    assert {"mean0_top1", "mean2_top1", "peer_ensemble_top1"} <= summary.keys()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in records if r["kind"] == "train")
    assert {"student0.ce", "student0.pe", "student0.pm1", "student2.pm1", "peer_ensemble.ce"} <= train.keys()
    evaluated = [r for r in records if r["kind"] == "eval"]
    # The code's ramp, 0-based: e^-5 in the first epoch, 1 in the second.
    assert evaluated[0]["pcl_ensemble_consistency"] == pytest.approx(math.exp(-5.0))
    assert evaluated[1]["pcl_mean_consistency"] == pytest.approx(1.0)

    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    networks = checkpoint["networks"]
    assert int(networks["mean_steps"]) > 0  # the temporal mean moved once a step, and is saved
    assert not torch.equal(networks["mean_trunk.conv1.weight"], networks["trunk.conv1.weight"])

    out = tmp_path / "mean.pt"
    assert export_main([str(run), "--out", str(out)]) == 0
    sidecar = json.loads((tmp_path / "mean.pt.json").read_text())
    assert (sidecar["method"], sidecar["network"]) == ("pcl", registry.get("pcl").deployed)
    weights = torch.load(out)
    create("resnet20", 10).load_state_dict(weights, strict=True)  # mean trunk + mean branch 1: the stock backbone
    assert torch.equal(weights["conv1.weight"], networks["mean_trunk.conv1.weight"])
    assert torch.equal(weights["fc.weight"], networks["mean_students.0.fc.weight"])

    capsys.readouterr()
    assert eval_main([str(out), "--device", "cpu"]) == 0  # the stock network scores what the run's temporal mean did
    assert f"{summary['mean0_top1']:.2f}%" in capsys.readouterr().out

    assert report_main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "pcl" in line)
    assert f"{summary['best_mean0_top1']:.2f}" in row


@pytest.mark.slow
def test_pcl_resumes_its_temporal_mean_as_if_it_had_not_stopped(tmp_path):
    """The temporal mean and its step count are in the checkpoint: stopping after epoch 1 and resuming gives the
    weights, means and count of a run straight through."""
    args = [*FAST, "--method", "pcl", "--num-students", "2", "--batch-size", "128", "--lr-milestones", "1", "3"]
    straight = run_ok([*args, "--epochs", "2", "--stack-networks"], tmp_path, "straight")
    stopped = run_ok([*args, "--stack-networks"], tmp_path, "stopped")
    assert train_main([*args, "--epochs", "2", "--resume", str(stopped), "--stack-networks"]) == 0
    a, b = checkpoint.load(str(straight)), checkpoint.load(str(stopped))
    assert b["epoch"] == 2 and int(a["networks"]["mean_steps"]) > 0
    for name, value in a["networks"].items():
        assert torch.equal(value, b["networks"][name]), name
