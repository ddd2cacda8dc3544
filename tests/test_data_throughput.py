"""The data-throughput benchmark runs end to end on a tiny tree (its numbers mean nothing here: GPU sessions are
rare, and a script that breaks there wastes one)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "data_throughput.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("data_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dali_row_schema(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    script = _load_script()
    out = tmp_path / "results" / "data.jsonl"
    args = ["--loader", "dali", "--device", "cpu", "--images", "12", "--threads", "1", "--batch-size", "4",
            "--image-size", "32", "--warmup", "1", "--batches", "4", "--data-root", str(tmp_path / "tree"),
            "--out", str(out)]
    script.main(args)
    script.main(args)  # the second run reads the tree the first one made, and appends
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"time", "device", "device_type", "torch", "triton", "dali", "commit", "loader", "threads",
                "batch_size", "image_size", "channels_last", "images", "jpeg_kb", "warmup", "batches", "seconds",
                "images_per_s"} <= row.keys()
        assert row["loader"] == "dali" and row["device_type"] == "cpu" and row["dali"]
        settings = (row["threads"], row["batch_size"], row["image_size"], row["images"], row["batches"])
        assert settings == (1, 4, 32, 12, 4)  # 4 timed batches run on into the second epoch of 3
        assert row["images_per_s"] > 0 and row["seconds"] > 0 and row["jpeg_kb"] > 20
    assert "dali" in capsys.readouterr().out


def test_rejects_an_unknown_loader():
    with pytest.raises(SystemExit):
        _load_script().parse_args(["--loader", "pillow"])
