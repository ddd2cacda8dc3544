"""``ffsd-train`` refuses bad input before it trains: one line on stderr, exit status 2."""

import pytest

from ffsd_fast.cli.train import main
from tests.helpers import FAST, one_line_error


def test_unknown_method_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        main([*FAST, "--method", "kd"])
    assert stop.value.code == 2
    assert "'ffsd', 'dml', 'independent'" in capsys.readouterr().err


def test_cuda_graph_on_a_cpu_is_a_one_line_error(capsys):
    assert "CPU" in one_line_error(capsys, [*FAST, "--device", "cpu", "--cuda-graph"])


def test_apex_without_apex_is_a_one_line_error(capsys):
    assert "apex" in one_line_error(capsys, [*FAST, "--optimizer-impl", "apex"])


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


def test_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    err = one_line_error(capsys, [*FAST, "--resume", str(bad)])
    assert str(bad) in err


def test_config_file_and_flags(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: resnet32\nlambda_f: 3.0\n")
    from ffsd_fast.trainer.config import parse_args

    config = parse_args(["-c", str(cfg), "--lambda-f", "4"])
    assert config.model == "resnet32" and config.lambda_f == 4.0
    cfg.write_text("modle: resnet32\n")
    err = one_line_error(capsys, ["-c", str(cfg)])
    assert "modle" in err
