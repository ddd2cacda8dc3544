"""``python -m ffsd_fast.report``: summaries grouped over seeds, beside the published numbers."""

import json
import statistics

import pytest

from ffsd_fast.cli.report import main


def _summary(tmp_path, name, **fields):
    run = tmp_path / name
    run.mkdir()
    base = {"dataset": "cifar100", "model": "resnet32", "method": "ffsd", "num_students": 2, "epochs": 299}
    (run / "summary.json").write_text(json.dumps({**base, **fields}))


def test_report_groups_runs_and_compares_with_the_paper(tmp_path, capsys):
    for seed, (best, final) in enumerate([(75.0, 74.5), (74.0, 73.9), (75.5, 75.1)]):
        _summary(tmp_path, f"ffsd-{seed}", best_leader_top1=best, leader_top1=final)
    for seed, students in enumerate([[70.0, 72.0], [71.0, 71.0]]):
        _summary(tmp_path, f"dml-{seed}", method="dml", best_students_top1=students, students_top1=students)
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").stat().st_size > 0
    ffsd = next(line for line in text.splitlines() if "| ffsd |" in line)
    mean, std = statistics.fmean([75.0, 74.0, 75.5]), statistics.stdev([75.0, 74.0, 75.5])
    assert f"{mean:.2f} ± {std:.2f}" in ffsd and "74.82–74.92" in ffsd and f"{mean - 74.87:+.2f}" in ffsd
    dml = next(line for line in text.splitlines() if "| dml |" in line)
    assert "| 2 |" in dml and "71.00 ± 0.00" in dml and dml.endswith("| – | – |")
    assert text in capsys.readouterr().out


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
