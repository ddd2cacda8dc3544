"""Data parallelism on the CPU (gloo): the trainer under torchrun, and DDP's gradient averaging against one
process (exact, and with bf16 compression), the warm-up undo of a captured step under DDP, and a resume."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ffsd_fast.data.loaders import dali_available
from ffsd_fast.trainer import checkpoint
from tests.helpers import FAST, ROOT, write_folder
from tests.helpers.distributed_worker import LAMBDAS, eval_mode_batchnorm, global_batch, networks


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the trainer's CPU path needs no Triton
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def worker_ranks(tmp_path_factory) -> list[dict]:
    """What ``tests/helpers/distributed_worker.py`` wrote on each of two ranks (one torchrun for every check)."""
    out = tmp_path_factory.mktemp("worker")
    result = torchrun(str(ROOT / "tests" / "helpers" / "distributed_worker.py"), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def single_process_grads() -> dict[str, torch.Tensor]:
    """The gradients of the worker's loss on the whole global batch, in one process."""
    nets = eval_mode_batchnorm(networks())
    nets(*global_batch(), torch.tensor(LAMBDAS)).total.backward()
    return {name: p.grad for name, p in nets.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_two_processes_average_to_the_single_process_gradient_and_stay_in_sync(worker_ranks):
    ranks = worker_ranks
    expected = single_process_grads()
    assert set(ranks[0]["grads"]) == set(expected)
    worst = 0.0
    for name, grad in expected.items():
        for rank in ranks:
            scale = grad.abs().max().item()
            if scale > 1e-8:
                worst = max(worst, (rank["grads"][name] - grad).abs().max().item() / scale)
            else:
                assert rank["grads"][name].abs().max().item() < 1e-8, name
    assert worst < 1e-5, worst

    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert not torch.equal(ranks[0]["params"]["students.0.fc.weight"], networks().students[0].fc.weight)


@pytest.mark.slow
def test_stacked_two_processes_average_to_the_single_process_gradient_and_train_as_per_network(worker_ranks):
    """``--step stacked`` under DDP: DDP reduces the stacks' gradients, which the networks' are views into."""
    expected = single_process_grads()
    for rank in worker_ranks:
        assert set(rank["stacked_grads"]) == set(expected)
        for name, grad in expected.items():
            scale = max(grad.abs().max().item(), 1e-8)
            assert (rank["stacked_grads"][name] - grad).abs().max().item() / scale < 1e-5, name
    for name, value in worker_ranks[0]["stacked_params"].items():
        assert torch.equal(value, worker_ranks[1]["stacked_params"][name]), name
        torch.testing.assert_close(value, worker_ranks[0]["params"][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_bf16_compression_averages_to_the_single_process_gradient_within_its_rounding(worker_ranks):
    # Each rank's half of the gradient rounded to bf16, then their sum: two roundings of at most 2⁻⁹ of the values
    # rounded (and the halves may be larger than their sum). Tolerance: 1e-2 of each tensor's largest entry, for
    # every tensor (worst seen 6.1e-3).
    expected = single_process_grads()
    assert set(worker_ranks[0]["bf16_grads"]) == set(expected)
    worst = 0.0
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        for rank in worker_ranks:
            if scale > 1e-8:
                worst = max(worst, (rank["bf16_grads"][name] - grad).abs().max().item() / scale)
            else:
                assert rank["bf16_grads"][name].abs().max().item() < 1e-8, name
    assert 0 < worst < 1e-2, worst  # above 0: the gradients did go through bf16
    for name, value in worker_ranks[0]["bf16_params"].items():
        assert torch.equal(value, worker_ranks[1]["bf16_params"][name]), name  # every rank decompresses the same sum


@pytest.mark.slow
def test_warmup_undone_under_ddp_leaves_training_exactly_as_without_it(worker_ranks):
    # A captured step under DDP first runs DDP_WARMUP_STEPS eager steps and undoes them: the undo is exact, whatever
    # the warm-up left in DDP (its rebuilt buckets, its recorded static graph) and in the optimisers.
    for rank in worker_ranks:
        for name, value in rank["undone_params"].items():
            assert torch.equal(value, rank["params"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "loader",
    [
        "torchvision",
        pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")),
    ],
)
def test_torchrun_trains_imagenet_folders_and_reports_the_corrupt_file(tmp_path, loader):
    root = write_folder(tmp_path / "data", train=4)
    corrupt = root / "train" / "bee" / "1.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # truncated: the header opens, the decode fails
    out = tmp_path / "runs"
    # The same command both times, but for the epochs (and --resume auto the second time).
    args = ["ffsd_fast/train.py", "--imagenet", "--data-root", str(root), "--model", "resnet18", "--image-size", "64"]
    args += ["--batch-size", "4", "--device", "cpu", "--loader", loader, "--output-dir", str(out), "--run-name", "r"]
    args += ["--workers", "1", "--no-progress"]
    result = torchrun(*args, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(corrupt) in result.stderr and result.stderr.count("cannot be decoded") == 1  # rank 0 alone says it
    summary = json.loads((out / "r" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["corrupt_images"] == [str(corrupt)]
    assert 0 <= summary["leader_top1"] <= 100
    records = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "corrupt_images" and r["files"] == [str(corrupt)] for r in records)
    assert sorted(os.listdir(out / "r")).count("checkpoint.pt") == 1

    if loader != "torchvision":
        return  # resuming is the trainer's, not the loader's: checked once
    # --resume auto continues the run where it stopped: epoch 2 only.
    result = torchrun(*args, "--epochs", "2", "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in evals if r["kind"] == "eval"] == [1, 2]


@pytest.mark.slow
def test_a_bad_data_root_stops_every_rank_with_one_line(tmp_path):
    # Rank 0 lists the tree; the others wait for it. Its error must reach them, or they would wait forever.
    result = torchrun(
        "ffsd_fast/train.py",
        "--imagenet",
        "--data-root",
        str(tmp_path / "nowhere"),
        "--model",
        "resnet18",
        "--device",
        "cpu",
        "--output-dir",
        str(tmp_path / "runs"),
        "--no-progress",
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.count("ffsd-train: error: imagenet: data root") == 2, result.stderr[-2000:]
    # torchrun prints its own summary of the failed children; no traceback comes from our code.
    assert "ffsd_fast/" not in result.stderr.replace("ffsd_fast/train.py", "")


@pytest.mark.slow
def test_a_two_process_run_resumed_gives_the_weights_of_running_straight_through(tmp_path):
    # bf16 compression on, so that the trainer's --grad-compression path runs end to end too (it is deterministic:
    # a resume stays exact). Explicit milestones: both runs drop the lr at the same epochs.
    args = ["ffsd_fast/train.py", *FAST, "--batch-size", "128", "--lr-milestones", "1", "3", "--device", "cpu"]
    args += ["--grad-compression", "bf16", "--output-dir", str(tmp_path)]
    for run, epochs in (("straight", "2"), ("stopped", "1")):
        result = torchrun(*args, "--run-name", run, "--epochs", epochs)
        assert result.returncode == 0, result.stderr[-3000:]
    stopped = tmp_path / "stopped"
    result = torchrun(*args, "--run-name", "stopped", "--epochs", "2", "--resume", str(stopped))
    assert result.returncode == 0, result.stderr[-3000:]
    a = checkpoint.load(str(tmp_path / "straight"))
    b = checkpoint.load(str(stopped))
    assert b["epoch"] == 2 and b["config"]["grad_compression"] == "bf16"
    for name, value in a["networks"].items():
        assert torch.equal(value, b["networks"][name]), name
    for sa, sb in zip(a["optimizers"], b["optimizers"], strict=True):
        for pid, state in sa["state"].items():
            for key, value in state.items():
                assert torch.equal(value, sb["state"][pid][key]), (pid, key)
    assert [h["leader_top1"] for h in a["history"]] == [h["leader_top1"] for h in b["history"]]


@pytest.mark.slow
def test_every_rank_chooses_the_same_step_form_from_the_slowest_ranks_times(tmp_path):
    result = torchrun(str(ROOT / "tests" / "helpers" / "tuning_worker.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"tuning{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] == {"choice": "b", "seconds": {"a": 5.0, "b": 4.0, "c": 6.0}}


@pytest.mark.slow
def test_a_two_process_kdcl_run_fits_its_ensemble_on_every_ranks_share(tmp_path):
    """KDCL's linear ensemble under torchrun: each rank runs the students on its share of the held-out slice and the
    L-BFGS fit sums over the ranks at every evaluation, so that the ranks step together (a rank that took another
    step count would hang the next all-reduce)."""
    args = ["ffsd_fast/train.py", *FAST, "--method", "kdcl", "--kdcl-ensemble", "linear", "--device", "cpu"]
    result = torchrun(*args, "--batch-size", "64", "--output-dir", str(tmp_path), "--run-name", "run")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = checkpoint.load(str(tmp_path / "run"))
    record = next(r for r in saved["history"] if r["kind"] == "eval")
    weights = [record["kdcl_weight0"], record["kdcl_weight1"]]
    assert saved["networks"]["ensemble_weights"].tolist() == pytest.approx(weights, abs=1e-7)
    assert sum(weights) == pytest.approx(1) and min(weights) >= 0
    assert record["train_images"] == 1347 - 135  # the held-out tenth is trained on by no rank
