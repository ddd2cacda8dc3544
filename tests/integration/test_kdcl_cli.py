"""KDCL trains end to end through the CLI on the embedded digits data, one by one (students of one architecture)
and stacked (of two, each stacked apart), exports student 1 as the stock ``--model`` network, evaluates and
reports; the fitted ensembles (linear, general) too, holding out part of the training set, their weights fitted
after each epoch, saved in the checkpoint and resumed."""

import json

import pytest
import torch

from ffsd_fast.cli.eval import main as eval_main
from ffsd_fast.cli.export import main as export_main
from ffsd_fast.cli.report import main as report_main
from ffsd_fast.cli.train import main as train_main
from ffsd_fast.method import registry
from ffsd_fast.models import create
from ffsd_fast.trainer import checkpoint

DIGITS_TRAIN = 1347


def _args(tmp_path, name, epochs, *flags):
    args = ["--no-progress", "--workers", "0", "--method", "kdcl", "--num-students", "2", "--epochs", str(epochs)]
    return [*args, "--device", "cpu", "--output-dir", str(tmp_path), "--run-name", name, "--seed", "0", *flags]


def _export_evaluate_report(tmp_path, run, summary, capsys):
    out = tmp_path / f"{run.name}.pt"
    assert export_main([str(run), "--out", str(out)]) == 0
    create("resnet20", 10).load_state_dict(torch.load(out), strict=True)  # student 1: the stock --model network
    capsys.readouterr()
    assert eval_main([str(out), "--device", "cpu"]) == 0
    assert f"{summary['student0_top1']:.2f}%" in capsys.readouterr().out
    assert report_main([str(tmp_path)]) == 0
    assert f"{summary['best_student0_top1']:.2f}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "flags"),
    [("linear", ["--step", "per-network"]), ("general", ["--kdcl-models", "resnet20,wrn16_2", "--step", "stacked"])],
    ids=["linear-separate", "general-mixed-stacked"],
)
def test_fitted_ensembles_hold_out_fit_between_epochs_export_evaluate_and_report(tmp_path, capsys, kind, flags):
    flags = ["--kdcl-ensemble", kind, "--kdcl-holdout", "0.2", *flags]
    assert train_main(_args(tmp_path, kind, 2, *flags)) == 0
    run = tmp_path / kind
    summary = json.loads((run / "summary.json").read_text())
    evaluated = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in evaluated if r["kind"] == "eval"]
    held = round(0.2 * DIGITS_TRAIN)
    fits = []
    for record in evaluated:
        assert record["train_images"] == DIGITS_TRAIN - held  # the held-out slice is not trained on
        fits.append([record["kdcl_weight0"], record["kdcl_weight1"]])
        assert sum(fits[-1]) == pytest.approx(1) and record["between_epochs_seconds"] > 0
        if kind == "linear":
            assert min(fits[-1]) >= 0  # on the simplex
    assert fits[0] != fits[1]  # fitted again after each epoch
    saved = checkpoint.load(str(run))
    assert saved["networks"]["ensemble_weights"].tolist() == pytest.approx(fits[-1], abs=1e-7)
    assert summary["config"]["kdcl_holdout"] == 0.2
    capsys.readouterr()
    assert eval_main([str(run), "--device", "cpu"]) == 0  # the run's checkpoint, its weights' buffer included
    assert f"{summary['student0_top1']:.2f}%" in capsys.readouterr().out
    _export_evaluate_report(tmp_path, run, summary, capsys)


@pytest.mark.slow
def test_a_fitted_ensemble_resumed_trains_as_it_would_have_straight_through(tmp_path):
    flags = ["--kdcl-ensemble", "linear", "--step", "per-network", "--lr-milestones", "1", "3"]
    assert train_main(_args(tmp_path, "straight", 2, *flags)) == 0
    assert train_main(_args(tmp_path, "stopped", 1, *flags)) == 0
    assert train_main(_args(tmp_path, "stopped", 2, *flags, "--resume", str(tmp_path / "stopped"))) == 0
    a, b = checkpoint.load(str(tmp_path / "straight")), checkpoint.load(str(tmp_path / "stopped"))
    assert b["epoch"] == 2
    for name, value in a["networks"].items():  # the ensemble's weights among them
        assert torch.equal(value, b["networks"][name]), name
    assert [h["kdcl_weight0"] for h in a["history"]] == [h["kdcl_weight0"] for h in b["history"]]


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
