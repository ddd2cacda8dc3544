"""KDCL trains end to end through the CLI on the embedded digits data, one by one (students of one architecture)
and stacked (of two, each stacked apart), exports student 1 as the stock ``--model`` network, evaluates and
reports."""

import json

import pytest
import torch

from ffsd_fast.cli.eval import main as eval_main
from ffsd_fast.cli.export import main as export_main
from ffsd_fast.cli.report import main as report_main
from ffsd_fast.cli.train import main as train_main
from ffsd_fast.method import registry
from ffsd_fast.models import create


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "stacked"),
    [([], False), (["--kdcl-models", "resnet20,wrn16_2", "--kdcl-ensemble", "naive"], True)],
    ids=["one-architecture-separate", "mixed-stacked"],
)
def test_kdcl_trains_exports_evaluates_and_reports(tmp_path, capsys, flags, stacked):
    args = ["--no-progress", "--workers", "0", "--method", "kdcl", "--num-students", "2", "--epochs", "1"]
    args += ["--device", "cpu", "--output-dir", str(tmp_path), "--run-name", "run", "--seed", "0", *flags]
    assert train_main([*args, "--step", "stacked" if stacked else "per-network"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "kdcl" and len(summary["students_top1"]) == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in records if r["kind"] == "train")
    assert {"student0.ce", "student0.kl", "student1.ce", "student1.kl"} <= train.keys()
    evaluated = next(r for r in records if r["kind"] == "eval")
    assert evaluated["kdcl_alpha"] == pytest.approx(0.5)

    out = tmp_path / "student.pt"
    assert export_main([str(run), "--out", str(out)]) == 0
    sidecar = json.loads((tmp_path / "student.pt.json").read_text())
    declared = registry.get("kdcl")
    assert (sidecar["method"], sidecar["network"]) == ("kdcl", declared.deployed)
    weights = torch.load(out)
    create("resnet20", 10).load_state_dict(weights, strict=True)  # student 1: the stock --model network
    networks = torch.load(run / "checkpoint.pt", weights_only=False)["networks"]
    assert torch.equal(weights["fc.weight"], networks["students.0.fc.weight"])

    capsys.readouterr()
    assert eval_main([str(out), "--device", "cpu"]) == 0  # the stock network scores what the run's student 1 did
    assert f"{summary['student0_top1']:.2f}%" in capsys.readouterr().out

    assert report_main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "kdcl" in line)
    assert f"{summary['best_student0_top1']:.2f}" in row
