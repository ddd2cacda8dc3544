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


@pytest.mark.slow
def test_ddp_step_times_every_variant_on_one_and_two_processes(tmp_path, capsys):
    script = _load_script("ddp_step")
    out = tmp_path / "ddp.jsonl"
    args = ["--workload", "cifar100-resnet20-m2-b2-s16", "--procs", "1,2", "--steps", "1", "--window", "1"]
    script.main([*args, "--warmup", "1", "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["world_size"], r["variant"]) for r in rows] == [(n, v) for n in (1, 2) for v in script.VARIANTS]
    for row in rows:
        assert {
            "device",
            "run_id",
            "torch",
            "triton",
            "commit",
            "date",
            "backend",
            "world_size",
            "workload",
            "variant",
            "step_ms",
            "best_ms",
            "images_per_s",
            "vs_none",
        } <= row.keys()
        assert row["backend"] == "gloo" and row["step_ms"] > 0 and row["workload"] == "cifar100-resnet20-m2-b2-s16"
    assert len({r["run_id"] for r in rows}) == 1
    assert "vs none" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--workload", "cifar100-resnet20-2-32"])


@pytest.mark.slow
def test_gpu_check_runs_every_stage_on_a_cpu(tmp_path, capsys):
    """The dry run of ``make gpu-check``: every stage on tiny sizes, the CUDA-only ones skipped with the reason, a
    row per stage before the summary table, and the commit of the tree on every row the stages wrote."""
    script = _load_script("gpu_check")
    assert script.main(["--tiny", "--device", "cpu", "--results", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [name for name, *_ in script.STAGES]
    cuda_only = {name for name, _, needs_cuda, _ in script.STAGES if needs_cuda}
    for row in rows:
        assert {
            "device",
            "torch",
            "triton",
            "code_commit",
            "gpu_check_run",
            "status",
            "seconds",
            "budget_s",
        } <= row.keys()
        expected = ("skipped", "needs CUDA") if row["stage"] in cuda_only else ("ok", row["reason"])
        assert (row["status"], row["reason"]) == expected, row
    commit, run = rows[0]["code_commit"], rows[0]["gpu_check_run"]
    assert commit != "unknown"
    written = {
        "gpu_trainer.jsonl": 3,  # cifar, stacked, imagenet
        "train_throughput.jsonl": 10,  # seven CIFAR ResNet variants, one ImageNet, two DenseNet
        "grouped_conv.jsonl": 12,  # two stages, two dtypes, three passes
        f"kernels-cpu-{commit[:12]}-gpu-check.jsonl": 8,  # two ops, two modes, two variants
        "step_kernels.jsonl": 1,
    }
    for name, count in written.items():
        found = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert len(found) == count, name
        assert all(r["code_commit"] == commit and r["gpu_check_run"] == run for r in found), name
    trainer = [json.loads(line) for line in (tmp_path / "gpu_trainer.jsonl").read_text().splitlines()]
    assert all(c["ok"] for r in trainer for c in r["checks"].values())
    assert set(trainer[0]["checks"]) == {"train", "resume", "export", "eval"}
    sweep = (tmp_path / f"kernels-cpu-{commit[:12]}-gpu-check.jsonl").read_text().splitlines()
    assert all(json.loads(line)["graph_ms"] is None for line in sweep)  # CUDA graphs: CUDA only
    assert all((tmp_path / r["log"]).is_file() for r in rows if r["status"] != "skipped")
    out = capsys.readouterr().out
    last = script.STAGES[-1][0]
    assert "stage" in out.splitlines()[-len(rows) - 2] and last in out.splitlines()[-2]  # the table comes last


def test_gpu_check_stops_a_stage_that_overruns_and_goes_on(tmp_path):
    """A stage past its budget is interrupted and recorded; one that finds no time left is skipped, saying so."""
    script = _load_script("gpu_check")
    args = ["--tiny", "--device", "cpu", "--results", str(tmp_path), "--stages", "throughput-cifar,step-kernels"]
    assert script.main([*args, "--stage-budget", "throughput-cifar=1", "--budget", "2"]) == 1
    rows = {r["stage"]: r for r in map(json.loads, (tmp_path / "gpu_check.jsonl").read_text().splitlines())}
    assert rows["throughput-cifar"]["status"] == "timeout" and rows["throughput-cifar"]["seconds"] < 1 + 6
    assert (rows["step-kernels"]["status"], rows["step-kernels"]["reason"]) == ("skipped", "no time left in --budget")
    assert (rows["cuda-tests"]["status"], rows["cuda-tests"]["reason"]) == ("skipped", "not selected (--stages)")


def test_gpu_check_reads_pytest_summaries_and_the_commit_to_trust(tmp_path, monkeypatch):
    script = _load_script("gpu_check")
    log = "....F\nFAILED tests/a.py::test_b[cuda] - AssertionError\n1 failed, 509 passed, 529 deselected in 119.83s\n"
    assert script.parse_pytest(log) == {
        "counts": {"failed": 1, "passed": 509, "deselected": 529},
        "failing": ["tests/a.py::test_b[cuda]"],
    }
    monkeypatch.setattr(script, "STAMP", tmp_path / ".code_commit")
    monkeypatch.setenv("FFSD_COMMIT", "abc123+dirty")
    assert script.code_commit() == ("abc123+dirty", "FFSD_COMMIT")
    monkeypatch.delenv("FFSD_COMMIT")
    stamp = script.write_stamp()
    assert script.code_commit() == (stamp["code_commit"], "stamp")
    # A stamp of another tree (a file changed since) is not believed: git is asked instead.
    (tmp_path / ".code_commit").write_text(json.dumps({**stamp, "fingerprint": "0" * 64}))
    assert script.code_commit()[1] == "git"


def test_gpu_check_charges_each_kernel_to_the_phase_that_launched_it(tmp_path):
    """The profile's reading of a Chrome trace: a kernel belongs to the phase mark around the host call that
    launched it (matched by correlation id, on that thread); a launch outside every mark is unattributed."""
    script = _load_script("gpu_check")

    def event(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}

    events = [
        event("user_annotation", "phase:backbones.forward", 0, 10),
        event("cuda_runtime", "cudaLaunchKernel", 2, 1, correlation=7),
        event("user_annotation", "phase:losses.backward", 20, 10, tid=2),  # the autograd thread
        event("cuda_driver", "cuLaunchKernelEx", 21, 1, tid=2, correlation=8),
        event("cuda_runtime", "cudaMemsetAsync", 40, 1, correlation=9),
        event("kernel", "conv", 5, 3, tid=7, correlation=7),
        event("kernel", "_kl_kernel", 25, 2, tid=7, correlation=8),
        event("gpu_memset", "Memset", 41, 1, tid=7, correlation=9),
        event("kernel", "graph_kernel", 50, 4, tid=7, correlation=99),  # its launch is not in the trace
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    found = script.gpu_activities(trace)
    assert [(a["name"], a["phase"]) for a in found] == [
        ("conv", "backbones.forward"),
        ("_kl_kernel", "losses.backward"),
        ("Memset", None),
        ("graph_kernel", None),
    ]
    assert script.by_phase(found) == {
        "backbones.forward": {"kernels": 1, "gpu_ms": 0.003},
        "losses.backward": {"kernels": 1, "gpu_ms": 0.002},
        "unattributed": {"kernels": 1, "gpu_ms": 0.004},
    }


@pytest.mark.slow
def test_tuning_cost_times_every_form_with_the_host_clock_and_writes_its_tables(tmp_path, capsys):
    import torch

    from ffsd_fast.step import tuning
    from ffsd_fast.trainer import step_forms

    script = _load_script("tuning_cost")
    out, md = tmp_path / "cost.jsonl", tmp_path / "cost.md"
    argv = ["--models", "resnet20", "--batch-size", "4", "--image-size", "8", "--no-compile"]
    argv += ["--set", "fusion_kernel=torch"]  # not the Triton block: under the interpreter, minutes
    script.main([*argv, "--output", str(out), "--markdown", str(md)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    forms = [r for r in rows if r["form"] != "all"]
    (total,) = [r for r in rows if r["form"] == "all"]
    # FFSD's forms without the compiled ones and with the fusion blocks set: per-network and stacked.
    assert [r["form"] for r in forms] == ["per-network fusion_kernel=torch", "stacked fusion_kernel=torch"]
    assert total["forms_timed"] == 2 and not total["dropped"] and forms[0]["fixed"] == {"fusion_kernel": "torch"}
    assert sum(r["chosen"] for r in forms) == 1 and total["choice"] in {r["form"] for r in forms}
    for row in forms:
        assert row["steps"] == script.WARMUP + script.STEPS and row["ms_per_step"] > 0
        assert row["build_s"] > 0 and row["warmup_s"] > 0 and row["timed_s"] > 0
    assert total["steps"] == 2 * (script.WARMUP + script.STEPS)
    assert total["seconds"] >= sum(r["seconds"] for r in forms) and total["in_chosen_steps"] > script.STEPS
    text = md.read_text()
    assert " ".join(argv) in text and "| stacked fusion_kernel=torch |" in text
    assert "<- chosen" in capsys.readouterr().out
    assert tuning.clock_for(torch.device("cpu"), 10) is None and step_forms.COMPILE_OPTIONS == {}  # put back
