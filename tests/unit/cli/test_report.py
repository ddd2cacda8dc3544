"""``python -m ffsd_fast.report``: summaries grouped over seeds, beside the published numbers."""

import json
import statistics
from pathlib import Path

import pytest

from ffsd_fast.cli.report import deployed_markdown, load_summaries, main, markdown, rows
from ffsd_fast.trainer.config import Config, to_dict

_RUN = {"dataset": "cifar100", "model": "resnet32", "method": "ffsd", "num_students": 2, "epochs": 299}


def _summary(tmp_path, name, config=None, world_size=1, with_config=True, **results):
    """A fake summary.json as finish() writes it: the run's fields, its full configuration and its results."""
    run = tmp_path / name
    run.mkdir()
    cfg = {**to_dict(Config()), **_RUN, "batch_size": 128, **(config or {})}
    summary = {**{key: cfg[key] for key in _RUN}, "world_size": world_size, **results}
    if with_config:
        summary["config"] = cfg
    (run / "summary.json").write_text(json.dumps(summary))


def _ffsd(tmp_path, name, best=75.0, **kwargs):
    _summary(tmp_path, name, best_leader_top1=best, leader_top1=best - 0.5, **kwargs)


def _markdown(tmp_path) -> str:
    return markdown(rows(load_summaries(tmp_path)))


def _table(tmp_path) -> list[dict[str, str]]:
    """The report's markdown table as one dict per row, keyed by the column headers."""
    lines = [line for line in _markdown(tmp_path).splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[1:]]


def _deployed_table(tmp_path) -> list[dict[str, str]]:
    """The by-method table of the deployed network, one dict per row."""
    lines = [line for line in deployed_markdown(rows(load_summaries(tmp_path))).splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[1:]]


def _cell(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_the_deployed_network_by_method_last_and_best_apart(tmp_path):
    ffsd_last, ffsd_best = [70.0, 72.0, 74.0], [71.0, 73.0, 78.0]
    for seed in range(3):
        _summary(
            tmp_path,
            f"ffsd-{seed}",
            {"seed": seed, "image_size": 32},
            leader_top1=ffsd_last[seed],
            best_leader_top1=ffsd_best[seed],
            images_per_s=100.0 * (seed + 1),
            deployed_params=123_000,
            deployed_macs=4_560_000_000,
        )
    # DML keeps its first student: its numbers, not the students' mean (the other two are far off).
    dml_last, dml_best = [60.0, 64.0], [61.0, 66.0]
    for seed in range(2):
        _summary(
            tmp_path,
            f"dml-{seed}",
            {"method": "dml", "seed": seed, "image_size": 32},
            student0_top1=dml_last[seed],
            best_student0_top1=dml_best[seed],
            students_top1=[dml_last[seed], 90.0, 90.0],
            best_students_top1=[dml_best[seed], 95.0, 95.0],
            images_per_s=50.0 + 20 * seed,
            num_classes=100,  # no recorded cost: counted from the model, the classes and the image size
        )
    ffsd, dml = _deployed_table(tmp_path)  # the registry's order: FFSD first
    assert (ffsd["method"], ffsd["deployed"], ffsd["n"], ffsd["seeds"]) == ("ffsd", "leader", "3", "0,1,2")
    assert ffsd["last-epoch top-1 (mean ± std)"] == _cell(ffsd_last) == "72.00 ± 2.00"
    assert ffsd["best-epoch top-1 (mean ± std)"] == _cell(ffsd_best)
    assert (ffsd["train images/s"], ffsd["parameters"], ffsd["multiply-adds"]) == ("200", "0.12 M", "4.56 G")
    assert (dml["method"], dml["deployed"], dml["n"]) == ("dml", "student 1", "2")
    assert dml["last-epoch top-1 (mean ± std)"] == _cell(dml_last) == "62.00 ± 2.83"
    assert dml["best-epoch top-1 (mean ± std)"] == _cell(dml_best)
    # ResNet-32, 100 classes, 32 px: 0.47 M parameters, 69.13 M multiply-adds (tests/unit/models/test_cost.py).
    assert (dml["train images/s"], dml["parameters"], dml["multiply-adds"]) == ("60", "0.47 M", "69.13 M")
    assert main([str(tmp_path)]) == 0
    assert "## The deployed network, by method" in (tmp_path / "report.md").read_text()


def test_the_deployed_table_splits_settings_and_marks_what_it_cannot_know(tmp_path):
    # An older summary of the first student has only the students' list; an unknown method has no deployed network.
    _summary(tmp_path, "old", {"method": "dml"}, students_top1=[61.0, 70.0], best_students_top1=[62.0, 71.0])
    _summary(
        tmp_path,
        "wd",
        {"method": "dml", "weight_decay": 5e-4},
        student0_top1=50.0,
        best_student0_top1=51.0,
        students_top1=[50.0, 80.0],
        best_students_top1=[51.0, 81.0],
    )
    _summary(tmp_path, "plugin", {"method": "nosuch"}, students_top1=[40.0, 41.0], best_students_top1=[42.0, 43.0])
    table = {(row["method"], row["settings"]): row for row in _deployed_table(tmp_path)}
    old, wd = table[("dml", "weight_decay=0.0001")], table[("dml", "weight_decay=0.0005")]
    assert (
        old["last-epoch top-1 (mean ± std)"] == "61.00 ± 0.00"
        and old["best-epoch top-1 (mean ± std)"] == "62.00 ± 0.00"
    )
    assert wd["last-epoch top-1 (mean ± std)"] == "50.00 ± 0.00"
    assert old["train images/s"] == old["parameters"] == "?"  # no images/s, no classes, no image size recorded
    plugin = table[("nosuch", "–")]
    assert plugin["deployed"] == plugin["last-epoch top-1 (mean ± std)"] == "?"
    assert list(table)[-1] == ("nosuch", "–")  # after the registered methods


def test_report_groups_runs_and_compares_with_the_paper(tmp_path, capsys):
    for seed, (best, final) in enumerate([(75.0, 74.5), (74.0, 73.9), (75.5, 75.1)]):
        _summary(tmp_path, f"ffsd-{seed}", {"seed": seed}, best_leader_top1=best, leader_top1=final)
    for seed, students in enumerate([[70.0, 72.0], [71.0, 71.0]]):
        _summary(
            tmp_path,
            f"dml-{seed}",
            {"method": "dml", "seed": seed},
            best_students_top1=students,
            students_top1=students,
        )
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").stat().st_size > 0
    ffsd = next(line for line in text.splitlines() if "| ffsd |" in line)
    mean, std = statistics.fmean([75.0, 74.0, 75.5]), statistics.stdev([75.0, 74.0, 75.5])
    assert f"{mean:.2f} ± {std:.2f}" in ffsd and "74.82–74.92" in ffsd and f"{mean - 74.87:+.2f}" in ffsd
    assert "| 3 | 0,1,2 | 299 | – |" in ffsd
    dml = next(line for line in text.splitlines() if "| dml |" in line)
    assert "| 2 | 0,1 |" in dml and "71.00 ± 0.00" in dml and dml.endswith("| – | – |")
    assert text in capsys.readouterr().out


@pytest.mark.parametrize(
    "field, values", [("epochs", (200, 299)), ("batch_size", (64, 128)), ("lr", (0.05, 0.1))], ids=str
)
def test_runs_that_differ_in_a_setting_land_in_different_rows(tmp_path, field, values):
    for value in values:
        _ffsd(tmp_path, f"run-{value}", config={field: value})
    table = _table(tmp_path)
    assert [row["n"] for row in table] == ["1", "1"]
    if field == "epochs":  # its own column, so not repeated in the settings
        assert [row["epochs"] for row in table] == ["200", "299"] and [row["settings"] for row in table] == ["–"] * 2
    else:
        assert [row["settings"] for row in table] == [f"{field}={value}" for value in values]


def test_the_number_of_processes_splits_a_group(tmp_path):
    # Same batch per process, twice the global batch.
    _ffsd(tmp_path, "one", world_size=1)
    _ffsd(tmp_path, "two", world_size=2)
    assert [row["settings"] for row in _table(tmp_path)] == ["world_size=1", "world_size=2"]


def test_runs_that_differ_only_in_seed_share_a_row(tmp_path):
    _ffsd(tmp_path, "a", 74.0, config={"seed": 1})
    _ffsd(tmp_path, "b", 76.0, config={"seed": 0})
    (row,) = _table(tmp_path)
    assert row["n"] == "2" and row["seeds"] == "0,1" and row["settings"] == "–"
    assert row["best top-1 (mean ± std)"] == f"75.00 ± {statistics.stdev([74.0, 76.0]):.2f}"


def test_result_neutral_fields_do_not_split_a_group(tmp_path):
    _ffsd(tmp_path, "a", config={"seed": 0, "output_dir": "runs", "log_every": 20, "workers": 4})
    _ffsd(tmp_path, "b", config={"seed": 1, "output_dir": "elsewhere", "log_every": 5, "workers": 8})
    (row,) = _table(tmp_path)
    assert row["n"] == "2" and row["settings"] == "–"


def test_settings_name_only_the_fields_that_differ(tmp_path):
    _ffsd(tmp_path, "a", config={"batch_size": 64, "lr": 0.05, "lr_milestones": [150, 225]})
    _ffsd(tmp_path, "b", config={"batch_size": 128, "lr": 0.05, "lr_milestones": [100, 200]})
    _ffsd(tmp_path, "other-model", config={"model": "resnet20", "batch_size": 32})
    settings = {row["settings"] for row in _table(tmp_path)}
    # resnet20's lone row shows none, though its batch differs from the resnet32 rows'.
    assert settings == {"batch_size=64, lr_milestones=[150,225]", "batch_size=128, lr_milestones=[100,200]", "–"}


def test_a_field_one_version_of_the_code_did_not_record_shows_as_unknown(tmp_path):
    _ffsd(tmp_path, "new", config={"temperature": 2.0})
    _ffsd(tmp_path, "old")
    config_path = tmp_path / "old" / "summary.json"
    summary = json.loads(config_path.read_text())
    del summary["config"]["temperature"]
    config_path.write_text(json.dumps(summary))
    assert sorted(row["settings"] for row in _table(tmp_path)) == ["temperature=2.0", "temperature=?"]


def test_another_methods_options_do_not_split_a_group(tmp_path):
    """A run records every method's options; one a later version gave another method (kdcl_holdout), missing from
    an older run's record or set otherwise, changes nothing of an FFSD run."""
    _ffsd(tmp_path, "new", config={"seed": 0, "kdcl_holdout": 0.1, "one_temperature": 5.0})
    _ffsd(tmp_path, "old", config={"seed": 1})
    config_path = tmp_path / "old" / "summary.json"
    summary = json.loads(config_path.read_text())
    del summary["config"]["kdcl_holdout"]
    config_path.write_text(json.dumps(summary))
    (row,) = _table(tmp_path)
    assert row["n"] == "2" and row["settings"] == "–"


def test_summaries_without_config_still_report_with_unknown_settings(tmp_path):
    for seed in range(2):
        _ffsd(tmp_path, f"old-{seed}", 74.0 + seed, with_config=False)
    _ffsd(tmp_path, "new", 80.0)
    _ffsd(tmp_path, "old-long", 70.0, config={"epochs": 400}, with_config=False)
    table = _table(tmp_path)
    # A summary without config never joins one with: its other settings may differ.
    assert [(row["n"], row["seeds"], row["epochs"], row["settings"]) for row in table] == [
        ("1", "0", "299", "–"),
        ("2", "?,?", "299", "unknown (no config)"),
        ("1", "?", "400", "unknown (no config)"),
    ]
    assert table[1]["best top-1 (mean ± std)"].startswith("74.50 ± ")


def test_repeated_seeds_are_flagged(tmp_path):
    for name in ("a", "b"):
        _ffsd(tmp_path, name, config={"seed": 0})
    _ffsd(tmp_path, "c", config={"seed": 1})
    (row,) = _table(tmp_path)
    assert row["n"] == "3" and row["seeds"] == "0,0,1 (repeated)"
    assert "*repeated*" in _markdown(tmp_path)


@pytest.mark.parametrize("make", ["missing", "empty", "corrupt"])
def test_report_errors_are_one_line(tmp_path, capsys, make):
    runs = tmp_path / "runs"
    if make != "missing":
        runs.mkdir()
    if make == "corrupt":
        (runs / "summary.json").write_text("{")
    assert main([str(runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("report: error: ") and "\n" not in err


def test_runs_shorter_than_the_recipe_or_on_fewer_classes_are_not_compared_with_the_paper(tmp_path):
    _ffsd(tmp_path, "one-epoch", config={"epochs": 1})
    _summary(tmp_path, "four-classes", best_leader_top1=90.0, leader_top1=90.0, config={"seed": 5})
    summary = json.loads((tmp_path / "four-classes" / "summary.json").read_text())
    (tmp_path / "four-classes" / "summary.json").write_text(json.dumps({**summary, "num_classes": 4}))
    rows_by_epochs = {r["epochs"]: r for r in _table(tmp_path)}
    assert rows_by_epochs["1"]["best − published"] == "not comparable: 1 of the recipe's 299 epochs"
    assert rows_by_epochs["299"]["best − published"] == "not comparable: 4 of cifar100's 100 classes"
    assert rows_by_epochs["299"]["published"] == "74.82–74.92"  # still shown, for reference


def test_nothing_cites_a_file_outside_the_repository(tmp_path):
    _ffsd(tmp_path, "a")
    assert "ffsd-spec.md" not in _markdown(tmp_path)
    root = Path(__file__).resolve().parents[3]
    citing = [
        str(path.relative_to(root))
        for folder in ("ffsd_fast", "kernels", "tests", "docs", "configs", "benchmarks")
        for path in (root / folder).rglob("*")
        if path.suffix in (".py", ".md", ".yaml")
        and path != Path(__file__).resolve()
        and "ffsd-spec" in path.read_text(encoding="utf-8")
    ]
    assert not citing and "ffsd-spec" not in (root / "README.md").read_text(encoding="utf-8")


def test_the_classes_come_from_the_runs_checkpoint_when_the_summary_lacks_them(tmp_path):
    import torch

    from ffsd_fast.cli.comparable import not_comparable

    torch.save({"num_classes": 4, "config": {}, "networks": {}}, tmp_path / "checkpoint.pt")
    run = {"dataset": "imagenet", "epochs": 89, "run_dir": str(tmp_path)}
    assert not_comparable([run]) == "4 of imagenet's 1000 classes"
    assert not_comparable([{**run, "run_dir": str(tmp_path / "gone")}]) == ""  # unknown: not claimed either way


def test_a_baseline_row_shows_its_papers_number_for_its_reported_network(tmp_path):
    """OKDDip reports its group leader: the row takes the leader's best top-1 and the method's ``published``."""
    from ffsd_fast.method import registry

    low, high = registry.get("okddip").published[("cifar100", "resnet32")]
    config = {"method": "okddip", "num_students": 3, "epochs": 300}
    _summary(tmp_path, "okddip-0", config, best_leader_top1=74.0, leader_top1=73.5, best_students_top1=[1.0] * 3)
    (row,) = _table(tmp_path)
    assert row["method"] == "okddip" and row["published"] == (f"{low:.2f}" if low == high else f"{low:.2f}–{high:.2f}")
    assert row["best − published"] == f"{74.0 - (low + high) / 2:+.2f}"


def test_a_run_is_held_to_its_methods_recipe_epochs():
    """ONE's recipe trains 300 epochs where the dataset's (the reference FFSD's) trains 299: a 299-epoch ONE run is
    one short of its paper's."""
    from ffsd_fast.cli.comparable import not_comparable

    one = {"dataset": "cifar100", "method": "one", "num_classes": 100}
    assert not_comparable([{**one, "epochs": 299}]) == "299 of the recipe's 300 epochs"
    assert not_comparable([{**one, "epochs": 300}]) == ""
    assert not_comparable([{**one, "method": "ffsd", "epochs": 299}]) == ""
