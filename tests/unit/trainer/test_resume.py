"""``--resume``: the configuration a resumed run trains with, and what it refuses."""

import pytest
import torch

from ffsd_fast.errors import UserError
from ffsd_fast.trainer.config import RESULT_NEUTRAL, Config, parse_command, resolve, to_dict
from ffsd_fast.trainer.resume import changes, find_auto, resumed_config


def _saved(tmp_path, epoch=3, **changes_):
    cfg = resolve(
        Config(device="cpu", epochs=4, batch_size=64, seed=7, lr_milestones=[3], output_dir=str(tmp_path), **changes_)
    )
    (tmp_path / "r").mkdir(exist_ok=True)
    torch.save({"networks": {}, "config": to_dict(cfg), "epoch": epoch}, tmp_path / "r" / "checkpoint.pt")
    return cfg, str(tmp_path / "r")


def test_no_flags_means_the_saved_configuration(tmp_path):
    saved, run = _saved(tmp_path)
    cfg, given = parse_command(["--resume", run])
    resumed = resolve(resumed_config(cfg, given))
    assert resumed == resolve(Config(**{**to_dict(saved), "resume": run}))
    assert (resumed.epochs, resumed.batch_size, resumed.seed, resumed.lr_milestones) == (4, 64, 7, [3])


def test_epochs_may_grow_and_milestones_stay(tmp_path):
    _, run = _saved(tmp_path)
    resumed = resumed_config(*parse_command(["--resume", run, "--epochs", "8", "--log-every", "5"]))
    assert (resumed.epochs, resumed.lr_milestones, resumed.log_every) == (8, [3], 5)
    with pytest.raises(UserError, match="trained 3 epochs already: --epochs must be at least 3, got 2"):
        resumed_config(*parse_command(["--resume", run, "--epochs", "2"]))


def test_a_flag_equal_to_the_saved_value_is_no_conflict(tmp_path):
    _, run = _saved(tmp_path)
    assert resumed_config(*parse_command(["--resume", run, "--seed", "7", "--batch-size", "64"])).seed == 7
    with pytest.raises(UserError, match="--seed 7 → 8"):
        resumed_config(*parse_command(["--resume", run, "--seed", "8"]))


def test_a_yaml_value_counts_as_given(tmp_path):
    _, run = _saved(tmp_path)
    (tmp_path / "c.yaml").write_text("lr: 0.05\n")
    with pytest.raises(UserError, match="--lr 0.1 → 0.05"):
        resumed_config(*parse_command(["-c", str(tmp_path / "c.yaml"), "--resume", run]))


def test_auto_continues_only_a_run_of_the_same_settings(tmp_path):
    saved, run = _saved(tmp_path)
    same = resolve(
        Config(
            device="cpu", epochs=4, batch_size=64, seed=7, lr_milestones=[3], output_dir=str(tmp_path), resume="auto"
        )
    )
    assert find_auto(same) == run + "/checkpoint.pt"
    assert find_auto(resolve(Config(**{**to_dict(same), "epochs": 9}))) is not None  # extending
    for other in ({"seed": 8}, {"batch_size": 32}, {"lr": 0.05}, {"epochs": 2}):
        assert find_auto(resolve(Config(**{**to_dict(same), **other}))) is None, other
    assert find_auto(resolve(Config(**{**to_dict(same), "log_every": 3, "workers": 0}))) is not None
    # Milestones the command did not give may differ (a recipe derives them from the epochs); given ones may not.
    other_milestones = resolve(Config(**{**to_dict(same), "lr_milestones": [2]}))
    assert find_auto(other_milestones, given={"seed"}) is not None and find_auto(other_milestones) is None


def test_auto_passes_over_an_empty_checkpoint(tmp_path):
    saved, run = _saved(tmp_path)
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "checkpoint.pt").write_bytes(b"")
    assert find_auto(resolve(Config(**{**to_dict(saved), "resume": "auto"}))) == run + "/checkpoint.pt"


def test_changes_names_every_changed_field(tmp_path):
    saved, _ = _saved(tmp_path)
    now = Config(**{**to_dict(saved), "epochs": 6, "log_every": 1})
    assert changes(to_dict(saved), now) == {"epochs": [4, 6], "log_every": [20, 1]}


def test_neutral_fields_are_fields():
    assert RESULT_NEUTRAL <= set(to_dict(Config()))
