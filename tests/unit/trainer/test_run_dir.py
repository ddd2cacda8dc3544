"""``--resume auto``: which checkpoint a run continues from."""

import os

import torch

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
