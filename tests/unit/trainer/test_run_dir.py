"""``--resume auto``: which checkpoint a run continues from."""

import os

import pytest
import torch

from ffsd_fast.errors import UserError
from ffsd_fast.trainer.config import Config, resolve
from ffsd_fast.trainer.resume import find_auto as find_auto_resume


def test_resume_auto_finds_the_newest_checkpoint_of_this_run(tmp_path):
    cfg = resolve(Config(device="cpu", output_dir=str(tmp_path)))
    assert find_auto_resume(cfg) is None  # nothing yet: a fresh start

    def write(name, **changes):
        (tmp_path / name).mkdir()
        config = {**vars(cfg), **changes}
        torch.save({"networks": {}, "config": config}, tmp_path / name / "checkpoint.pt")
        return str(tmp_path / name / "checkpoint.pt")

    older = write("a")
    os.utime(older, (1, 1))
    newer = write("b")
    write("other-model", model="resnet32")  # newest of all, but another run
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "checkpoint.pt").write_bytes(b"truncated")
    assert find_auto_resume(cfg) == newer
    named = resolve(Config(device="cpu", output_dir=str(tmp_path), run_name="a"))
    assert find_auto_resume(named) == older
    assert find_auto_resume(resolve(Config(device="cpu", output_dir=str(tmp_path), run_name="new"))) is None


def test_resume_auto_of_a_named_run_with_other_settings_names_the_field(tmp_path):
    # It used to start fresh, then be refused with "continue it with --resume auto", the flag already given.
    cfg = resolve(Config(device="cpu", output_dir=str(tmp_path), run_name="a", resume="auto"))
    (tmp_path / "a").mkdir()
    saved = {**vars(cfg), "seed": 7, "lr": 0.05}
    torch.save({"networks": {}, "config": saved, "epoch": 3}, tmp_path / "a" / "checkpoint.pt")
    with pytest.raises(UserError) as error:
        find_auto_resume(cfg)
    text = str(error.value)
    assert f"run {tmp_path / 'a'} was trained with other settings (--lr 0.05 → 0.1; --seed 7 → 0" in text, text
    assert "--resume auto)" not in text and "\n" not in text
    fewer = resolve(Config(device="cpu", output_dir=str(tmp_path), run_name="a", resume="auto", epochs=2))
    torch.save({"networks": {}, "config": vars(fewer), "epoch": 3}, tmp_path / "a" / "checkpoint.pt")
    with pytest.raises(UserError, match="--epochs must be at least 3, got 2"):
        find_auto_resume(fewer)
