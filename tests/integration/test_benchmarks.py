"""The benchmark scripts run end to end on tiny shapes (their numbers mean nothing here; GPU sessions are rare, and a
script that breaks there wastes one)."""

import importlib.util
import json

import pytest

from ffsd_kernels._dispatch import INTERPRETER
from tests.helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_sweep():
    return _load_script("kernel_sweep")


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETER, reason="the Triton variant needs TRITON_INTERPRET=1 on a CPU")
def test_kernel_sweep_writes_one_row_per_case_mode_and_variant(tmp_path, capsys):
    sweep = _load_sweep()
    sweep.main(["--quick", "--device", "cpu", "--variants", "triton,eager", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("kernels-cpu-*-quick.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(sweep.cases(quick=True)) * len(sweep.MODES) * 2
    for row in rows:
        assert {
            "device",
            "torch",
            "triton",
            "commit",
            "op",
            "shape",
            "dtype",
            "mode",
            "variant",
            "ms",
            "gb_per_s",
            "floor_ms",
            "fraction_of_copy_bw",
            "speedup_vs_eager",
        } <= row.keys()
        assert row["ms"] > 0 and row["bytes"] > 0
        if row["variant"] == "eager":
            assert row["speedup_vs_eager"] == pytest.approx(1.0)
    assert {r["op"] for r in rows} == {c.op for c in sweep.cases(quick=True)}
    assert "of copy bw" in capsys.readouterr().out


def test_bytes_that_must_move():
    import torch

    sweep = _load_sweep()
    s, t, loss = torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(())
    assert sweep.must_move("forward", [s, t, 2.0], [s], loss) == 320 + 4
    assert sweep.must_move("forward+backward", [s, t, 2.0], [s], loss) == 2 * (320 + 4) + 160


@pytest.mark.slow
def test_train_throughput_writes_its_schema(tmp_path, capsys):
    module = _load_script("train_throughput")
    out = tmp_path / "throughput.jsonl"
    variants = ["reference", "one-backward", "fast", "backbones-only"]
    module.main(
        [
            "--device",
            "cpu",
            "--workload",
            "cifar100-resnet20-m2-b4",
            "--variants",
            ",".join(variants),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--window",
            "1",
            "--output",
            str(out),
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == variants
    for row in rows:
        assert {
            "device",
            "run_id",
            "workload",
            "variant",
            "images_per_s",
            "step_ms",
            "peak_mem_mb",
            "torch",
            "triton",
            "commit",
        } <= row.keys()
        assert row["images_per_s"] > 0 and row["workload"] == "cifar100-resnet20-m2-b4"
    assert len({r["run_id"] for r in rows}) == 1
    assert "vs reference" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main(["--device", "cpu", "--workload", "cifar100-resnet20-2-32"])


@pytest.mark.slow
def test_data_throughput_dali_row_schema(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    script = _load_script("data_throughput")
    out = tmp_path / "results" / "data.jsonl"
    args = [
        "--loader",
        "dali",
        "--device",
        "cpu",
        "--images",
        "12",
        "--threads",
        "1",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--warmup",
        "1",
        "--batches",
        "4",
        "--data-root",
        str(tmp_path / "tree"),
        "--out",
        str(out),
    ]
    script.main(args)
    script.main(args)  # the second run reads the tree the first one made, and appends
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {
            "time",
            "device",
            "device_type",
            "torch",
            "triton",
            "dali",
            "commit",
            "loader",
            "threads",
            "batch_size",
            "image_size",
            "channels_last",
            "images",
            "jpeg_kb",
            "warmup",
            "batches",
            "seconds",
            "images_per_s",
        } <= row.keys()
        assert row["loader"] == "dali" and row["device_type"] == "cpu" and row["dali"]
        settings = (row["threads"], row["batch_size"], row["image_size"], row["images"], row["batches"])
        assert settings == (1, 4, 32, 12, 4)  # 4 timed batches run on into the second epoch of 3
        assert row["images_per_s"] > 0 and row["seconds"] > 0 and row["jpeg_kb"] > 20
    assert "dali" in capsys.readouterr().out


def test_data_throughput_rejects_an_unknown_loader():
    with pytest.raises(SystemExit):
        _load_script("data_throughput").parse_args(["--loader", "pillow"])


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETER, reason="the Triton launches are counted under TRITON_INTERPRET=1")
def test_step_kernels_counts_every_phase(tmp_path, capsys):
    script = _load_script("step_kernels")
    out = tmp_path / "kernels.jsonl"
    variants = ["reference", "one-backward", "fast"]
    script.main(["--workload", "cifar100-resnet20-m2-b2", "--variants", ",".join(variants), "--output", str(out)])
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == variants
    for row in rows.values():
        assert {"device", "torch", "triton", "commit", "workload", "batch_counted", "top_ops", "excluded"} <= row.keys()
        assert row["device"] == "cpu (counted)" and row["workload"] == "cifar100-resnet20-m2-b2"
        counts = row["counts"]
        assert set(counts) == set(script.PHASES)
        assert sum(sum(cells.values()) for cells in counts.values()) == row["kernels"] > 0
        assert row["kernels"] == row["aten_ops"] + row["triton_launches"]
        assert all(counts[p]["forward"] > 0 and counts[p]["backward"] > 0 for p in ("backbones", "fusion", "losses"))
        assert counts["decoders"]["forward"] > 0 and counts["optimisers"]["update"] > 0
        assert row["network_ops_in_losses"] == {}  # every conv and batch norm, forward and backward, in a network
        assert "view" in row["excluded"] and "allocation" in row["excluded"]
    assert rows["fast"]["triton_launches"] > 0 and rows["one-backward"]["triton_launches"] == 0
    assert rows["fast"]["casts"]  # bf16 autocast
    assert rows["one-backward"]["counts"]["optimisers"]["update"] < rows["reference"]["counts"]["optimisers"]["update"]
    assert "optimisers" in capsys.readouterr().out
