"""The data-parallel flags' one-line errors, checked before any work starts (``run.training_device``)."""

import pytest

from ffsd_fast.errors import UserError
from ffsd_fast.step.distributed import SINGLE_PROCESS, World
from ffsd_fast.trainer.config import Config, parse_args, resolve
from ffsd_fast.trainer.run import training_device


def test_grad_compression_needs_several_processes():
    cfg = resolve(Config(device="cpu", grad_compression="bf16"))
    with pytest.raises(UserError, match=r"^--grad-compression bf16 compresses .* this run has one process"):
        training_device(cfg, SINGLE_PROCESS)
    assert training_device(resolve(Config(device="cpu")), SINGLE_PROCESS).type == "cpu"


def test_stacked_networks_train_under_ddp():
    """DDP reduces the stacks' gradients (``distributed._StackedParameters``; tests/integration/test_distributed.py)."""
    cfg = resolve(Config(device="cpu", stack_networks=True))
    assert training_device(cfg, World(rank=0, local_rank=0, world_size=2)).type == "cpu"


def test_the_flags_parse_and_check_their_values():
    cfg = parse_args(["--grad-compression", "fp16", "--ddp-bucket-mb", "50"])
    assert (cfg.grad_compression, cfg.ddp_bucket_mb) == ("fp16", 50)
    assert resolve(Config()).grad_compression == "none" and resolve(Config()).ddp_bucket_mb == 25
    with pytest.raises(UserError, match=r"^--ddp-bucket-mb must be at least 1, got 0$"):
        resolve(Config(ddp_bucket_mb=0))
    with pytest.raises(SystemExit):  # argparse's choices
        parse_args(["--grad-compression", "int8"])
