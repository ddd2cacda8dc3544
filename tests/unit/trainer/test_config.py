"""The trainer's configuration: the shipped configs resolve, and the defaults a device gets."""

import pytest

from ffsd_fast.trainer.config import Config, parse_args, resolve
from tests.helpers import ROOT

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_resolve(path):
    cfg = resolve(parse_args(["-c", str(ROOT / "configs" / path), "--data-root", "/data"]))
    assert cfg.epochs >= 1 and cfg.model in path


def test_gpu_defaults_are_the_measured_fastest_and_cpu_gets_none(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    gpu = resolve(Config(device="cuda"))
    assert (gpu.amp, gpu.channels_last, gpu.kernels, gpu.fusion_kernel, gpu.cuda_graph) == (
        "bf16",
        True,
        "triton",
        "torch",
        True,
    )
    cpu = resolve(Config(device="cpu"))
    assert (cpu.amp, cpu.channels_last, cpu.kernels, cpu.cuda_graph) == ("off", False, "torch", False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resolve(Config(device="cuda")).cuda_graph is False  # capture across processes: not measured yet
    assert resolve(Config(device="cuda", cuda_graph=True, amp="off")).amp == "off"  # a flag given wins


def test_the_data_root_is_saved_absolute(tmp_path, monkeypatch):
    # A relative --data-root saved as given made `ffsd-eval RUN` and `--resume` from another folder fail.
    monkeypatch.chdir(tmp_path)
    cfg = resolve(Config(dataset="cifar100", data_root="data/cifar", device="cpu"))
    assert cfg.data_root == str(tmp_path / "data" / "cifar")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve(Config(dataset="cifar100", data_root="~/c", device="cpu")).data_root == str(tmp_path / "home/c")
    assert resolve(Config(device="cpu")).data_root is None  # digits needs none
