"""``ffsd-eval`` evaluates whatever trained: an ImageNet run is read with its own loader and without the files it left
out; every val image is decoded once first, so DALI never meets a truncated JPEG (one crashed it: a segmentation
fault at batch 256); the accuracies are printed before ``--json`` is written; and a file that is no checkpoint is
one line saying so."""

import json
import subprocess
import sys

import pytest

from ffsd_fast.cli.eval import main as eval_main
from ffsd_fast.data import loaders as loaders_module
from ffsd_fast.trainer import evaluate as evaluate_module
from tests.helpers import write_folder
from tests.unit.cli.test_export_eval import make_run, refused


def truncate(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def asked(monkeypatch) -> list:
    """(spec, index) of each build_loaders call ffsd-eval makes."""
    calls = []

    def spy(spec, device, **kwargs):
        calls.append((spec, kwargs.get("index")))
        return loaders_module.build_loaders(spec, device, **kwargs)

    monkeypatch.setattr(evaluate_module, "build_loaders", spy)
    return calls


def imagenet_run(tmp_path, **fields):
    tree = write_folder(tmp_path / "tree", classes=("a", "b", "c"), train=1, val=4)
    run = make_run(tmp_path, num_classes=3, dataset="imagenet", data_root=str(tree), image_size=8, **fields)
    return tree, run


def test_eval_uses_the_runs_loader_and_leaves_out_what_the_run_left_out(tmp_path, asked):
    tree, run = imagenet_run(tmp_path, loader="torchvision")
    bad = tree / "val" / "b" / "1.jpg"
    truncate(bad, 0.3)
    record = {"kind": "corrupt_images", "epoch": 0, "count": 1, "files": [str(bad)]}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert eval_main([str(run), "--device", "cpu", "--no-check-images"]) == 0
    spec, index = asked[-1]
    assert spec.loader == "torchvision" and not spec.check_images
    assert len(index.val) == 11 and str(bad) not in index.val.files and str(bad) in index.corrupt


def test_eval_checks_the_val_images_by_default(tmp_path, asked, capsys):
    tree, run = imagenet_run(tmp_path, loader="torchvision")
    bad = tree / "val" / "c" / "0.jpg"
    truncate(bad, 0.3)  # not in the run's list (it changed after training): the check finds it
    assert eval_main([str(run), "--device", "cpu"]) == 0
    _, index = asked[-1]
    assert len(index.val) == 11 and str(bad) in index.corrupt
    assert str(bad) in capsys.readouterr().err


def test_eval_takes_the_loader_asked_for(tmp_path, asked):
    _, run = imagenet_run(tmp_path, loader="dali")
    assert eval_main([str(run), "--device", "cpu", "--loader", "torchvision"]) == 0
    assert asked[-1][0].loader == "torchvision"


def test_dali_without_the_image_check_is_refused_in_one_line(capsys, tmp_path):
    _, run = imagenet_run(tmp_path, loader="dali")
    err = refused(capsys, eval_main, [str(run), "--device", "cpu", "--no-check-images"])
    assert "--no-check-images with the DALI loader (--loader dali)" in err and "segmentation fault" in err


def test_dali_on_a_truncated_jpeg_at_batch_256_does_not_crash(tmp_path):
    pytest.importorskip("nvidia.dali")
    tree, run = imagenet_run(tmp_path, loader="dali")
    bad = tree / "val" / "b" / "1.jpg"
    truncate(bad, 0.3)  # cut to 30 %: DALI's CPU decoder died on it with SIGSEGV at batch 256
    # In another process: a segmentation fault here would take pytest down with it.
    done = subprocess.run(
        [sys.executable, "-m", "ffsd_fast.cli.eval", str(run), "--device", "cpu", "--batch-size", "256"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "leader_top1" in done.stdout and str(bad) in done.stderr


def test_accuracies_are_printed_before_a_json_that_cannot_be_written(capsys, tmp_path):
    _, run = imagenet_run(tmp_path, loader="torchvision")
    capsys.readouterr()
    assert eval_main([str(run), "--device", "cpu", "--json", "/proc/ffsd-test/accuracies.json"]) == 2
    out, err = capsys.readouterr()
    assert "leader_top1" in out and "ensemble_top1" in out
    assert err.count("\n") == 1 and err.startswith("ffsd-eval: error: cannot write --json /proc/ffsd-test/"), err


@pytest.mark.parametrize("text", ["hello world\n", "a\nb\n", "[1, 2, 3]\n"])
def test_eval_of_a_text_file_says_it_is_no_checkpoint(capsys, tmp_path, text):
    (tmp_path / "notes.txt").write_text(text)
    err = refused(capsys, eval_main, [str(tmp_path / "notes.txt")])
    assert err == (
        f"ffsd-eval: error: cannot read checkpoint {tmp_path}/notes.txt: not a file written by torch.save (expected "
        "a run's checkpoint.pt or weights from ffsd-export)"
    )
