"""``benchmarks/methods_table.py``: which runs it plans, the commands it gives the trainer, the table it writes."""

import importlib.util
import json
import statistics

import pytest

from ffsd_fast.cli.report import main as report_main
from ffsd_fast.method import registry
from ffsd_fast.models.cost import cost
from ffsd_fast.trainer.config import Config, parse_command, resolve, to_dict
from tests.helpers import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("methods_table", ROOT / "benchmarks" / "methods_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


table_script = _script()


def test_every_method_of_the_comparison_is_named_and_the_unregistered_are_skipped_with_why(monkeypatch):
    assert table_script.METHODS == ("independent", "dml", "ffsd", "one", "cl-ilr", "okddip", "kdcl", "pcl")
    pairs, skipped = table_script.plan(["dml", "kdcl", "one"], ["per-network", "stacked"], ["dml", "one"])
    assert pairs == [("dml", "per-network"), ("dml", "stacked"), ("one", "per-network"), ("one", "stacked")]
    assert skipped == ["kdcl: not registered in this installation (ffsd_fast.method.registry.names())"]
    monkeypatch.setattr(registry.get("one"), "stackable", False)
    pairs, skipped = table_script.plan(["one"], ["per-network", "stacked"], ["one"])
    assert pairs == [("one", "per-network")] and skipped == ["one stacked: the method cannot run its networks stacked"]


def test_ramp_ups_take_the_share_of_the_run_that_the_default_takes_of_the_recipe():
    assert table_script.rampup_flags("one", 20) == ["--one-rampup-epochs", "5"]  # 80 of 300
    assert table_script.rampup_flags("okddip", 6) == ["--okddip-rampup-epochs", "2"]
    assert table_script.rampup_flags("pcl", 20) == ["--pcl-rampup-epochs", "5"]  # 80 of its 300
    assert table_script.rampup_flags("dml", 20) == []


def _resolved(args, method: str, form: str) -> Config:
    cmd = table_script.command(method, form, 1, args)
    assert cmd[1:3] == ["-m", "ffsd_fast.train"]
    return resolve(parse_command(cmd[3:])[0])


@pytest.mark.parametrize("method", [m for m in table_script.METHODS if m in registry.names()])
def test_the_commands_are_the_ones_the_trainer_reads(tmp_path, method):
    form = "stacked" if registry.get(method).stackable else "per-network"
    digits = _resolved(table_script.parse(["--epochs", "4", "--milestones", "2,3"]), method, form)
    assert (digits.dataset, digits.model, digits.image_size, digits.num_students) == ("digits", "resnet20", 16, 3)
    assert (digits.method, digits.seed, digits.step, digits.epochs, digits.lr_milestones) == (
        method,
        1,
        form,
        4,
        [2, 3],
    )
    (tmp_path / "cifar-100-python").mkdir()
    cifar = _resolved(table_script.parse(["--data-root", str(tmp_path)]), method, "per-network")
    config, _ = table_script.cifar_config(method)
    recipe = parse_command(["-c", str(config)])[0]
    assert (cifar.dataset, cifar.model, cifar.method, cifar.device) == ("cifar100", "resnet32", method, "cuda")
    assert cifar.num_students == recipe.num_students and cifar.weight_decay == recipe.weight_decay
    assert cifar.epochs == registry.get(method).recipe.get("cifar100", {}).get("epochs", 299)  # the paper's recipe


def _fake_run(runs, form, method, seed, last, best, speed):
    run = runs / form / f"{method}-{seed}"
    run.mkdir(parents=True)
    deployed = registry.get(method).deployed
    summary = {
        "dataset": "digits",
        "model": "resnet20",
        "method": method,
        "num_students": 3,
        "epochs": 2,
        "world_size": 1,
        "config": {**to_dict(Config()), "method": method, "num_students": 3, "epochs": 2, "seed": seed},
        f"{deployed}_top1": last,
        f"best_{deployed}_top1": best,
        "students_top1": [last] * 3,
        "best_students_top1": [best] * 3,
        "leader_top1": last,
        "best_leader_top1": best,
        "images_per_s": speed,
        "deployed_params": 272_474,
        "deployed_macs": 10_203_776,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return {"method": method, "form": form, "seed": seed, "seconds": 10.0 * (seed + 1)}


def test_the_table_has_a_line_per_method_and_the_statistics_of_each_form(tmp_path):
    numbers = {
        ("ffsd", "per-network"): ([90.0, 92.0, 97.0], [91.0, 93.0, 98.0]),
        ("ffsd", "stacked"): ([89.0, 95.0], [95.0, 96.0]),
        ("dml", "per-network"): ([80.0, 84.0], [81.0, 85.0]),
    }
    results = [
        _fake_run(tmp_path, form, method, seed, last[seed], best[seed], 100.0 + seed)
        for (method, form), (last, best) in numbers.items()
        for seed in range(len(last))
    ]
    lines = table_script.table(tmp_path, ["per-network", "stacked"], results)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert list(cells) == ["dml", "ffsd"]  # the comparison's order
    ffsd = dict(zip(header, cells["ffsd"], strict=True))
    last, best = numbers[("ffsd", "per-network")]
    assert ffsd["per-network: last epoch"] == f"{statistics.fmean(last):.2f} ± {statistics.stdev(last):.2f}"
    assert ffsd["per-network: best epoch"] == f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}"
    assert (ffsd["per-network: n"], ffsd["per-network: img/s"], ffsd["per-network: s/run"]) == ("3", "101", "20")
    assert (ffsd["stacked: last epoch"], ffsd["stacked: n"]) == ("92.00 ± 4.24", "2")
    assert (ffsd["deployed"], ffsd["parameters"], ffsd["multiply-adds"]) == ("leader", "0.27 M", "10.20 M")
    dml = dict(zip(header, cells["dml"], strict=True))
    assert dml["per-network: last epoch"] == "82.00 ± 2.83" and dml["stacked: last epoch"] == "–"


@pytest.mark.slow
def test_a_tiny_table_writes_its_rows_its_table_and_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{table_script.README_BEGIN}\nold\n{table_script.README_END}\nafter\n")
    argv = ["--methods", "independent,dml", "--forms", "per-network", "--seeds", "0", "--epochs", "1", "--jobs", "2"]
    runs = tmp_path / "runs"
    assert table_script.main([*argv, "--out", str(tmp_path), "--readme", str(readme), "--runs-dir", str(runs)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "methods-digits.jsonl").read_text().splitlines()]
    assert [(r["method"], r["form"], r["seed"], r["epochs"]) for r in rows] == [
        ("independent", "per-network", 0, 1),
        ("dml", "per-network", 0, 1),
    ]
    for r in rows:
        assert r["seconds"] > 0 and r["commit"] and r["threads"] == 1 and r["num_students"] == 3
        assert r["command"].startswith(f"python -m ffsd_fast.train --method {r['method']} --num-students 3")
        # The trainer recorded the deployed network's cost in summary.json.
        assert (r["deployed_params"], r["deployed_macs"]) == cost("resnet20", 10, 16)
        assert 0 <= r["deployed_top1"] <= r["best_deployed_top1"] <= 100
    text = (tmp_path / "methods-digits.md").read_text()
    dml = next(line for line in text.splitlines() if line.startswith("| dml |"))
    assert f"| {rows[1]['deployed_top1']:.2f} ± 0.00 | {rows[1]['best_deployed_top1']:.2f} ± 0.00 | 1 |" in dml
    assert "--seed S --step per-network" in text and "*Last epoch*" in text
    # The same runs through python -m ffsd_fast.report: its by-method table holds the same numbers.
    assert report_main([str(runs / "per-network")]) == 0
    report = (runs / "per-network" / "report.md").read_text()
    assert f"| {rows[1]['deployed_top1']:.2f} ± 0.00 | {rows[1]['best_deployed_top1']:.2f} ± 0.00 |" in report
    block = readme.read_text()
    assert block.startswith("before\n") and block.endswith("after\n") and "old" not in block and dml in block


def test_a_finished_run_in_the_runs_dir_is_reused_only_for_the_same_command(tmp_path):
    args = table_script.parse(["--epochs", "4"])
    folder = tmp_path / "per-network" / "dml-1"
    folder.mkdir(parents=True)
    assert table_script.finished_row("dml", "per-network", 1, args, tmp_path) is None  # unfinished: runs again
    command = " ".join(["python", *table_script.command("dml", "per-network", 1, args)[1:]])
    (folder / "row.json").write_text(json.dumps({"command": command, "commit": "abc", "seconds": 3.0}))
    assert table_script.finished_row("dml", "per-network", 1, args, tmp_path)["commit"] == "abc"
    longer = table_script.parse(["--epochs", "5"])
    assert table_script.finished_row("dml", "per-network", 1, longer, tmp_path) is None
