"""``ffsd-export`` writes the leader and its sidecar; ``ffsd-eval`` reads them back, and refuses what it cannot trust
with one line on stderr and exit status 2.

The runs here are not trained: a checkpoint of freshly built networks is written directly, which is all that export
and evaluation read. They are resnet20 at 8 px on small generated trees, so that each evaluation takes a fraction of
a second (the 450 test digits take seconds on a CPU).
"""

import hashlib
import json

import pytest
import torch

from ffsd_fast import models
from ffsd_fast.cli.eval import main as eval_main
from ffsd_fast.cli.export import main as export_main
from ffsd_fast.data.common import DataSpec
from ffsd_fast.data.loaders import build_loaders
from ffsd_fast.trainer import checkpoint
from ffsd_fast.trainer import evaluate as evaluate_module
from ffsd_fast.trainer.config import Config, resolve, to_dict
from ffsd_fast.trainer.runlog import code_version
from tests.helpers import write_cifar, write_folder
from tests.helpers.methods import build

COMMIT = {"commit": "0123abc", "dirty": False}


def make_run(tmp_path, name="run", version=COMMIT, num_classes=10, **fields):
    """A run directory holding the checkpoint of freshly built networks after epoch 3 (and ``version.json``)."""
    cfg = resolve(Config(**{"model": "resnet20", "device": "cpu", **fields}))
    torch.manual_seed(0)
    nets = build(cfg.model, num_classes, cfg.num_students, cfg.image_size, False, method=cfg.method)
    run = tmp_path / name
    run.mkdir()
    checkpoint.save_atomic(
        checkpoint.state(to_dict(cfg), num_classes, 3, nets, [], None, []), str(run / "checkpoint.pt")
    )
    if version is not None:
        (run / "version.json").write_text(json.dumps(version))
    return run


def refused(capsys, main, args) -> str:
    """``main(args)`` exits with status 2 and one line on stderr; returns that line."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def accuracies(tmp_path, args) -> dict:
    out = tmp_path / "accuracies.json"
    assert eval_main([*args, "--device", "cpu", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture
def cifar_run(tmp_path):
    """A CIFAR-10 run at 8 px on a generated tree of 20 test images, exported to ``leader.pt``."""
    write_cifar(tmp_path / "cifar", 10, train_per_file=2, test=20)
    run = make_run(tmp_path, dataset="cifar10", data_root=str(tmp_path / "cifar"), image_size=8)
    assert export_main([str(run), "--out", str(tmp_path / "leader.pt")]) == 0
    return run


# ---------------------------------------------------------------------------------------------------------------
# ffsd-export
# ---------------------------------------------------------------------------------------------------------------


def test_export_writes_a_plain_state_dict_and_its_sidecar(tmp_path, cifar_run):
    leader = tmp_path / "leader.pt"
    models.create("resnet20", 10).load_state_dict(torch.load(leader, weights_only=True), strict=True)
    assert json.loads((tmp_path / "leader.pt.json").read_text()) == {
        "format": 1,
        "weights": "leader.pt",
        "sha256": hashlib.sha256(leader.read_bytes()).hexdigest(),
        "model": "resnet20",
        "num_classes": 10,
        "image_size": 8,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2470, 0.2435, 0.2616],
        "dataset": "cifar10",
        "method": "ffsd",
        "network": "leader",
        "epoch": 3,
        "commit": "0123abc",
        "dirty": False,
        "commit_source": "run",
        "checkpoint": str(cifar_run / "checkpoint.pt"),
    }


def test_export_of_digits_records_the_pipelines_statistics_and_the_exporting_code(tmp_path):
    # No version.json beside the checkpoint: the commit is the exporting code's, and the sidecar says so.
    run = make_run(tmp_path, version=None, image_size=16)
    assert export_main([str(run / "checkpoint.pt"), "--out", str(tmp_path / "leader.pt")]) == 0
    meta = json.loads((tmp_path / "leader.pt.json").read_text())
    assert meta["commit_source"] == "export" and meta["commit"] == code_version()["commit"]
    # The digits pipeline's one grey mean and std, of the training split resized to 16 px, on each RGB channel.
    _, loader, _ = build_loaders(DataSpec("digits", None, 16, 1, 1, workers=0), "cpu")
    assert (meta["dataset"], meta["image_size"]) == ("digits", 16)
    assert (meta["mean"], meta["std"]) == ([loader.mean.item()] * 3, [loader.std.item()] * 3)


def test_export_of_a_baseline_names_its_first_student(tmp_path, capsys):
    run = make_run(tmp_path, method="dml", dataset="cifar10", data_root=str(tmp_path), image_size=8)
    assert export_main([str(run), "--out", str(tmp_path / "student.pt")]) == 0
    said = capsys.readouterr().out
    assert said.startswith("the dml run's deployed network (student0's backbone) written to"), said
    meta = json.loads((tmp_path / "student.pt.json").read_text())
    assert (meta["method"], meta["network"]) == ("dml", "student0")
    networks = checkpoint.load(str(run))["networks"]
    weights = torch.load(tmp_path / "student.pt", weights_only=True)
    assert weights.keys() == {k.removeprefix("students.0.") for k in networks if k.startswith("students.0.")}
    assert all(torch.equal(v, networks[f"students.0.{k}"]) for k, v in weights.items())


def test_export_to_a_directory_is_refused(capsys, tmp_path, cifar_run):
    err = refused(capsys, export_main, [str(cifar_run), "--out", str(tmp_path)])
    assert err == (
        f"ffsd-export: error: --out {tmp_path} is a directory: name the file to write, e.g. {tmp_path}/leader.pt"
    )


def test_export_into_a_missing_folder_is_refused(capsys, tmp_path, cifar_run):
    err = refused(capsys, export_main, [str(cifar_run), "--out", str(tmp_path / "nowhere" / "leader.pt")])
    assert err == f"ffsd-export: error: output folder does not exist: {tmp_path}/nowhere"


def test_export_over_its_own_checkpoint_is_refused(capsys, cifar_run):
    source = str(cifar_run / "checkpoint.pt")
    err = refused(capsys, export_main, [str(cifar_run), "--out", source])
    assert err == f"ffsd-export: error: --out {source} is the checkpoint being exported: choose another file"
    assert checkpoint.is_training_checkpoint(checkpoint.read(source))


# ---------------------------------------------------------------------------------------------------------------
# ffsd-eval of an exported leader
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def specs(monkeypatch) -> list[DataSpec]:
    """The data each evaluation asks for, in order."""
    asked = []

    def spy(spec, *args, **kwargs):
        asked.append(spec)
        return build_loaders(spec, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "build_loaders", spy)
    return asked


def test_eval_takes_model_dataset_and_image_size_from_the_sidecar(tmp_path, cifar_run, specs):
    leader, data = str(tmp_path / "leader.pt"), ["--data-root", str(tmp_path / "cifar")]
    run = accuracies(tmp_path, [str(cifar_run)])
    assert accuracies(tmp_path, [leader, *data]) == {"top1": pytest.approx(run["leader_top1"])}
    agreeing = ["--model", "resnet20", "--dataset", "cifar10"]
    assert accuracies(tmp_path, [leader, *data, *agreeing]) == {"top1": pytest.approx(run["leader_top1"])}
    accuracies(tmp_path, [leader, *data, "--image-size", "16"])  # an explicit size overrides the sidecar's
    assert [(s.dataset, s.image_size) for s in specs] == [("cifar10", 8)] * 3 + [("cifar10", 16)]


@pytest.mark.parametrize(("flag", "value"), [("--model", "resnet32"), ("--dataset", "digits")])
def test_eval_refuses_a_flag_that_contradicts_the_sidecar(capsys, tmp_path, cifar_run, flag, value):
    err = refused(capsys, eval_main, [str(tmp_path / "leader.pt"), flag, value, "--data-root", str(tmp_path)])
    known = {"--model": "model resnet20", "--dataset": "dataset cifar10"}[flag]
    assert err == f"ffsd-eval: error: {flag} {value} contradicts {tmp_path}/leader.pt.json, which says {known}"


def test_eval_refuses_a_flag_that_contradicts_the_run(capsys, cifar_run):
    err = refused(capsys, eval_main, [str(cifar_run), "--dataset", "digits"])
    source = cifar_run / "checkpoint.pt"
    assert err == (
        f"ffsd-eval: error: --dataset digits contradicts the run's config in {source}, which says dataset cifar10"
    )


def test_eval_of_a_state_dict_without_sidecar_needs_model_dataset_and_image_size(capsys, tmp_path, cifar_run):
    leader = tmp_path / "leader.pt"
    (tmp_path / "leader.pt.json").unlink()
    prefix = f"ffsd-eval: error: {leader} is a single network's weights without a sidecar ({leader}.json): give its"
    assert refused(capsys, eval_main, [str(leader)]) == f"{prefix} --model, --dataset, --image-size"
    err = refused(capsys, eval_main, [str(leader), "--model", "resnet20", "--dataset", "cifar10"])
    assert err == f"{prefix} --image-size"
    run = accuracies(tmp_path, [str(cifar_run)])
    given = [str(leader), "--model", "resnet20", "--dataset", "cifar10", "--image-size", "8"]
    assert accuracies(tmp_path, [*given, "--data-root", str(tmp_path / "cifar")]) == {
        "top1": pytest.approx(run["leader_top1"])
    }


def test_eval_refuses_a_sidecar_of_other_weights(capsys, tmp_path, cifar_run):
    leader = tmp_path / "leader.pt"
    torch.save(models.create("resnet20", 10).state_dict(), leader)  # other weights, the sidecar left as it was
    err = refused(capsys, eval_main, [str(leader)])
    assert err == (
        f"ffsd-eval: error: {leader}.json describes other weights than {leader} (sha256 differs): export them again"
    )


def test_eval_refuses_a_sidecar_that_is_not_one(capsys, tmp_path, cifar_run):
    (tmp_path / "leader.pt.json").write_text('{"top1": 98.0}')
    err = refused(capsys, eval_main, [str(tmp_path / "leader.pt")])
    assert err == (
        f"ffsd-eval: error: {tmp_path}/leader.pt.json is not an ffsd-export sidecar: it lacks format, sha256, model, "
        "num_classes, image_size, dataset"
    )


# ---------------------------------------------------------------------------------------------------------------
# Top-5 only where there are five classes to rank
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [3, 5])
def test_eval_of_imagenet_reports_top5_only_with_five_classes(tmp_path, num_classes):
    tree = write_folder(tmp_path / "tree", classes=[f"c{i}" for i in range(num_classes)], train=1, val=2)
    fields = dict(dataset="imagenet", data_root=str(tree), image_size=8)  # resnet20: small and quick
    run = make_run(tmp_path, num_classes=num_classes, **fields)
    assert export_main([str(run), "--out", str(tmp_path / "leader.pt")]) == 0
    all_networks = accuracies(tmp_path, [str(run)])
    leader = accuracies(tmp_path, [str(tmp_path / "leader.pt"), "--data-root", str(tree)])
    topk = [1, 5] if num_classes >= 5 else [1]
    assert list(leader) == [f"top{k}" for k in topk]
    assert [leader[f"top{k}"] for k in topk] == pytest.approx([all_networks[f"leader_top{k}"] for k in topk])
    assert any(k.endswith("_top5") for k in all_networks) == (num_classes >= 5)
