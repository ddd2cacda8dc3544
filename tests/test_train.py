"""The trainer end to end on the embedded digits: outputs, resume, export, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import ffsd_kernels
import ffsd_kernels.reference
from ffsd_fast import models
from ffsd_fast.cli.eval import main as eval_main
from ffsd_fast.cli.export import main as export_main
from ffsd_fast.cli.train import main
from ffsd_fast.method.losses import kernel_ops
from ffsd_fast.step.precision import mixed_precision
from ffsd_fast.trainer import checkpoint
from tests.test_data import write_cifar, write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--epochs", "1", "--no-progress", "--workers", "0"]


def run_ok(args, tmp_path, name="run"):
    assert main([*args, "--output-dir", str(tmp_path), "--run-name", name]) == 0
    return tmp_path / name


def one_line_error(capsys, args):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("ffsd-train: error: "), err
    return err


def test_short_run_writes_every_artifact(tmp_path):
    run = run_ok([*FAST, "--epochs", "2", "--log-every", "5"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "leader_top1",
        "fusion_top1",
        "ensemble_top1",
        "average_top1",
        "oracle_ensemble_top1",
        "best_leader_top1",
    ):
        assert 0.0 <= summary[key] <= 100.0
    assert len(summary["students_top1"]) == 2
    assert summary["average_top1"] == pytest.approx(sum(summary["students_top1"]) / 2)
    for name in ("metrics.jsonl", "accuracy.png", "config.yaml", "version.json", "checkpoint.pt"):
        assert (run / name).is_file(), name
    assert any(p.name.startswith("events.out") for p in (run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert {"leader.ce", "weighted/leader.fusion", "decoder1.feature", "student1.diversity"} <= set(trains[0])
    # λ warm-up: epoch 2 of 5 is exp(-5 (1 - 2/5)^2) of λ_f = 10.
    assert evals[1]["lambda_f"] == pytest.approx(10 * 2.718281828459045 ** (-5 * 0.36))


@pytest.mark.parametrize("method", ["dml", "independent"])
def test_baseline_methods_train_the_students_alone(method, tmp_path):
    run = run_ok([*FAST, "--method", method], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and len(summary["students_top1"]) == 2
    assert "leader_top1" not in summary and "fusion_top1" not in summary
    assert 0.0 <= summary["ensemble_top1"] <= 100.0
    trains = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert ("student1.mutual" in trains[0]) == (method == "dml")
    assert not any(key.startswith(("leader", "fusion", "decoder")) for key in trains[0])
    state = checkpoint.load(str(run))
    assert {key.split(".")[0] for key in state["networks"]} == {"students"}
    assert export_main([str(run), "--out", str(tmp_path / "student.pt")]) == 0
    models.create("resnet20", 10).load_state_dict(torch.load(tmp_path / "student.pt"), strict=True)


def test_unknown_method_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        main([*FAST, "--method", "kd"])
    assert stop.value.code == 2
    assert "'ffsd', 'dml', 'independent'" in capsys.readouterr().err


def test_eval_reproduces_the_run_and_the_exported_leader(tmp_path, capsys):
    run = run_ok(FAST, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert eval_main([str(run), "--json", str(tmp_path / "all.json")]) == 0
    accuracies = json.loads((tmp_path / "all.json").read_text())
    assert accuracies["leader_top1"] == pytest.approx(summary["leader_top1"])
    assert accuracies["student1_top1"] == pytest.approx(summary["students_top1"][1])
    assert export_main([str(run), "--out", str(tmp_path / "leader.pt")]) == 0
    leader = [str(tmp_path / "leader.pt"), "--model", "resnet20", "--dataset", "digits", "--image-size", "16"]
    assert eval_main([*leader, "--json", str(tmp_path / "leader.json")]) == 0
    assert json.loads((tmp_path / "leader.json").read_text())["top1"] == pytest.approx(summary["leader_top1"])
    capsys.readouterr()
    assert eval_main([str(tmp_path / "leader.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffsd-eval: error: ") and "--model" in err and "\n" not in err


def test_channels_last_foreach_run(tmp_path):
    # bf16 autocast is not run here: on this kind of CPU it is ~15× slower than fp32 (a digits epoch 64 s vs 4.3 s);
    # tests/test_step.py runs the bf16 step itself.
    run = run_ok([*FAST, "--channels-last", "--optimizer-impl", "foreach"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["leader_top1"] <= 100.0


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_amp_flag_picks_the_autocast_dtype_and_scaler(amp):
    dtype, scaler = mixed_precision(amp, torch.device("cpu"))
    assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    assert (scaler is not None) == (amp == "fp16")


def test_compile_flag_compiles_every_network(tmp_path, monkeypatch):
    # nn.Module.compile is recorded, not run: Inductor would take minutes on this CPU. The wiring is what is tested.
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(type(self).__name__))
    run_ok([*FAST, "--compile"], tmp_path)
    assert sorted(compiled) == [
        "CifarResNet",
        "CifarResNet",
        "FusionModule",
        "Leader",
        "SelfDistillationDecoder",
        "SelfDistillationDecoder",
    ]


def test_cuda_graph_on_a_cpu_is_a_one_line_error(capsys):
    assert "CPU" in one_line_error(capsys, [*FAST, "--device", "cpu", "--cuda-graph"])


def test_apex_without_apex_is_a_one_line_error(capsys):
    assert "apex" in one_line_error(capsys, [*FAST, "--optimizer-impl", "apex"])


def test_resume_gives_the_same_weights_as_running_straight_through(tmp_path):
    # Explicit milestones: the digits default derives them from --epochs, which differs between the two runs.
    args = [*FAST, "--batch-size", "128", "--lr-milestones", "1", "3"]
    straight = run_ok([*args, "--epochs", "2"], tmp_path, "straight")
    stopped = run_ok(args, tmp_path, "stopped")
    assert main([*args, "--epochs", "2", "--resume", str(stopped)]) == 0
    a = checkpoint.load(str(straight))
    b = checkpoint.load(str(stopped))
    assert b["epoch"] == 2
    for name, value in a["networks"].items():
        assert torch.equal(value, b["networks"][name]), name
    for sa, sb in zip(a["optimizers"], b["optimizers"], strict=True):
        for pid, state in sa["state"].items():
            for key, value in state.items():
                assert torch.equal(value, sb["state"][pid][key]), (pid, key)
    assert [h["leader_top1"] for h in a["history"]] == [h["leader_top1"] for h in b["history"]]


def test_export_loads_into_stock_torchvision_resnet(tmp_path):
    run = run_ok([*FAST, "--model", "resnet18", "--batch-size", "128"], tmp_path)
    out = tmp_path / "leader.pt"
    assert export_main([str(run), "--out", str(out)]) == 0
    weights = torch.load(out, weights_only=True)
    assert not any(k.startswith(("head", "leader", "backbone")) for k in weights)
    stock = torchvision.models.resnet18(num_classes=10)
    stock.load_state_dict(weights, strict=True)
    full = checkpoint.load(str(run))["networks"]
    from ffsd_fast import models

    ours = models.create("resnet18", 10)
    ours.load_state_dict({k[len("leader.backbone.") :]: v for k, v in full.items() if k.startswith("leader.backbone.")})
    stock.eval()
    ours.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(stock(x), ours(x)[0])


def test_unknown_model_lists_the_known_ones(capsys):
    err = one_line_error(capsys, ["--model", "resnet7"])
    assert "resnet7" in err and "resnet20" in err and "resnet50" in err


@pytest.mark.parametrize("dataset", ["cifar100", "imagenet"])
def test_missing_data_folder(capsys, tmp_path, dataset):
    err = one_line_error(capsys, ["--dataset", dataset, "--data-root", str(tmp_path / "nowhere"), *FAST])
    assert "nowhere" in err


def test_empty_data_folder(capsys, tmp_path):
    err = one_line_error(capsys, ["--imagenet", "--data-root", str(tmp_path), "--image-size", "32", *FAST])
    assert str(tmp_path) in err


def test_data_folder_required(capsys):
    err = one_line_error(capsys, ["--dataset", "cifar10", *FAST])
    assert "--data-root" in err or "data_root" in err


def test_batch_that_leaves_one_sample_for_batchnorm(capsys, tmp_path):
    # 1347 digits in batches of 2 leave a last batch of 1; resnet18 at 32 px has 1×1 last maps: BN cannot train.
    err = one_line_error(capsys, ["--model", "resnet18", "--batch-size", "2", *FAST, "--output-dir", str(tmp_path)])
    assert "--batch-size 2" in err and "--drop-last" in err


def test_image_size_that_does_not_halve(capsys):
    err = one_line_error(capsys, ["--model", "resnet18", "--image-size", "16", *FAST])
    assert "16" in err


def test_checkpoint_from_another_model(capsys, tmp_path):
    run = run_ok(FAST, tmp_path)
    err = one_line_error(capsys, [*FAST, "--model", "resnet32", "--resume", str(run)])
    assert "resnet20" in err and "resnet32" in err


def test_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    err = one_line_error(capsys, [*FAST, "--resume", str(bad)])
    assert str(bad) in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path):
    run = run_ok(FAST, tmp_path)
    before = checkpoint.load(str(run))
    err = one_line_error(capsys, [*FAST, "--epochs", "2", "--lr", "1e30", "--log-every", "1", "--resume", str(run)])
    assert "non-finite" in err and "checkpoint.pt" in err
    after = checkpoint.load(str(run))
    assert after["epoch"] == 1
    for name, value in before["networks"].items():
        assert torch.equal(value, after["networks"][name])


def test_kernels_flag_picks_the_loss_library():
    assert kernel_ops("triton") is ffsd_kernels
    assert kernel_ops("torch") is ffsd_kernels.reference
    assert ffsd_kernels.reference.kl_div_loss is ffsd_kernels.kl_div_loss_reference


def test_config_file_and_flags(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: resnet32\nlambda_f: 3.0\n")
    from ffsd_fast.trainer.config import parse_args

    config = parse_args(["-c", str(cfg), "--lambda-f", "4"])
    assert config.model == "resnet32" and config.lambda_f == 4.0
    cfg.write_text("modle: resnet32\n")
    err = one_line_error(capsys, ["-c", str(cfg)])
    assert "modle" in err


def test_cli_error_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "ffsd_fast.train", "--model", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'nope'" in proc.stderr


def test_help_documents_every_flag():
    proc = subprocess.run(
        [sys.executable, "-m", "ffsd_fast.train", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0
    for flag in (
        "--model",
        "--dataset",
        "--imagenet",
        "--data-root",
        "--num-students",
        "--epochs",
        "--batch-size",
        "--image-size",
        "--lr",
        "--seed",
        "--device",
        "--output-dir",
        "--resume",
        "--kernels",
        "-c",
    ):
        assert flag in proc.stdout, flag


def test_torchrun_runs_the_script(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=1",
            "ffsd_fast/train.py",
            *FAST,
            "--output-dir",
            str(tmp_path),
            "--run-name",
            "tr",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "tr" / "summary.json").is_file()


@pytest.mark.slow
def test_demo_leader_learns(tmp_path):
    """`make demo`'s run: the defaults on the embedded digits. The leader reaches 80 % and at least the students'
    mean (the spec's promise: the leader is the one worth keeping)."""
    summary = json.loads((run_ok(["--no-progress"], tmp_path, "demo") / "summary.json").read_text())
    print({k: summary[k] for k in ("leader_top1", "students_top1", "fusion_top1", "ensemble_top1", "train_seconds")})
    assert summary["leader_top1"] >= 80.0
    assert summary["leader_top1"] >= sum(summary["students_top1"]) / len(summary["students_top1"])


@pytest.mark.parametrize("num_classes", [10, 100])
def test_trains_on_a_cifar_tree(tmp_path, num_classes):
    write_cifar(tmp_path / "data", num_classes, train_per_file=40 if num_classes == 100 else 8, test=20)
    dataset = f"cifar{num_classes}"
    run = run_ok(
        ["--dataset", dataset, "--data-root", str(tmp_path / "data"), *FAST, "--batch-size", "16"], tmp_path, dataset
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == dataset and len(summary["students_top1"]) == 2
    assert checkpoint.load(str(run))["num_classes"] == num_classes


def test_trains_on_an_image_folder_with_top5(tmp_path):
    classes = [f"n{i:03d}" for i in range(6)]
    write_folder(tmp_path / "data", classes=classes, train=4, val=2)
    run = run_ok(
        [
            "--imagenet",
            "--data-root",
            str(tmp_path / "data"),
            "--model",
            "resnet18",
            "--image-size",
            "64",
            *FAST,
            "--batch-size",
            "8",
        ],
        tmp_path,
        "imagenet",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert "leader_top5" in summary and summary["leader_top5"] >= summary["leader_top1"]


@pytest.mark.parametrize("path", sorted(p for p in os.listdir(os.path.join(ROOT, "configs")) if p.endswith(".yaml")))
def test_shipped_configs_resolve(path):
    from ffsd_fast.trainer.config import parse_args, resolve

    cfg = resolve(parse_args(["-c", os.path.join(ROOT, "configs", path), "--data-root", "/data"]))
    assert cfg.epochs >= 1 and cfg.model in path


@pytest.mark.parametrize("path", sorted(p for p in os.listdir(os.path.join(ROOT, "configs")) if p.endswith(".yaml")))
def test_shipped_recipes_train_on_generated_data_of_their_shape(path, tmp_path):
    """Each recipe as written (model, m, image size, schedule, λ's), for a few steps on a few generated images."""
    if path.startswith("imagenet"):
        root, batch = write_folder(tmp_path / "data", train=2, val=1), 2
    else:
        root, batch = tmp_path / "data", 4
        write_cifar(root, 100, train_per_file=2, test=4)
    args = [
        "-c",
        os.path.join(ROOT, "configs", path),
        "--data-root",
        str(root),
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--log-every",
        "1",
    ]
    run = run_ok([*args, "--no-progress", "--workers", "0"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] in path and summary["epochs"] == 1 and 0.0 <= summary["leader_top1"] <= 100.0


@pytest.mark.parametrize("script", ["ffsd-train", "ffsd-export", "ffsd-eval"])
def test_console_scripts_are_installed(script):
    path = os.path.join(os.path.dirname(sys.executable), script)
    proc = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"usage: {script}" in proc.stdout
