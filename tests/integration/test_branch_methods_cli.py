"""Each branch method trains end to end through the CLI on the embedded digits data (one by one and stacked),
exports its deployed network (the trunk and its deployed branch) as the stock backbone, evaluates and reports."""

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

# Per method: its extra flags, the evaluated networks besides the students, and its λ's in epoch 1.
METHODS = {
    # A ramp of one epoch: the code's 0-based ramp gives exp(−5) in the first epoch, 1 from the second.
    "one": (["--one-rampup-epochs", "1"], {"gated_ensemble"}, {"one_consistency": math.exp(-5.0)}),
    "cl-ilr": (["--clilr-rampup-epochs", "1"], set(), {"clilr_consistency": math.exp(-5.0)}),
    "okddip": (["--okddip-rampup-epochs", "1"], {"leader"}, {"okddip_consistency": math.exp(-5.0)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("method", list(METHODS))
def test_branch_method_trains_exports_evaluates_and_reports(tmp_path, capsys, method, stacked):
    flags, others, first_lambdas = METHODS[method]
    args = ["--no-progress", "--workers", "0", "--method", method, "--num-students", "3", "--epochs", "2"]
    args += ["--output-dir", str(tmp_path), "--run-name", "run", "--seed", "0", *flags]
    assert train_main([*args, *(["--stack-networks"] if stacked else [])]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["epochs"] == 2
    assert {f"{name}_top1" for name in others} <= summary.keys()
    assert len(summary["students_top1"]) == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in records if r["kind"] == "train")
    assert {"student0.ce", "student2.ce"} <= train.keys()
    evaluated = next(r for r in records if r["kind"] == "eval")
    assert {k: evaluated[k] for k in first_lambdas} == pytest.approx(first_lambdas)

    out = tmp_path / "student.pt"
    assert export_main([str(run), "--out", str(out)]) == 0
    sidecar = json.loads((tmp_path / "student.pt.json").read_text())
    declared = registry.get(method)
    assert (sidecar["method"], sidecar["network"]) == (method, declared.deployed)
    weights = torch.load(out)
    stock = create("resnet20", 10)
    stock.load_state_dict(weights, strict=True)  # trunk + branch 1 is the stock backbone
    networks = torch.load(run / "checkpoint.pt", weights_only=False)["networks"]
    assert torch.equal(weights["conv1.weight"], networks["trunk.conv1.weight"])
    branch = declared.deployed_prefix[1]  # the deployed branch's keys: students.0. or leader.
    assert torch.equal(weights["fc.weight"], networks[f"{branch}fc.weight"])

    capsys.readouterr()
    assert eval_main([str(out), "--device", "cpu"]) == 0  # the stock network scores what the run's deployed one did
    assert f"{summary[f'{declared.deployed}_top1']:.2f}%" in capsys.readouterr().out

    assert report_main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if method in line)
    assert f"{summary[f'best_{declared.deployed}_top1']:.2f}" in row
