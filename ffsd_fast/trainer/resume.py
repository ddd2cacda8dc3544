"""``--resume``: which run a command continues, and with which configuration.

A run continues with the configuration it was saved with. On the command line (or in ``-c config.yaml``) a resume
may change only what does not change what the run computes (``RESULT_NEUTRAL``: paths, logging, workers, the captured
step) and extend ``--epochs`` (the learning-rate milestones stay the saved ones); any other field given with a value
that differs from the run's is refused, naming it. ``--resume auto`` continues the newest run under ``--output-dir``
whose saved configuration agrees with the command's on every field that changes the result (the epochs aside), so
re-running the same command after a preemption continues the same run; another seed or learning rate starts fresh.
"""

import os
from collections.abc import Collection

from ffsd_fast.errors import UserError
from ffsd_fast.trainer import checkpoint
from ffsd_fast.trainer.config import FIELDS, RESULT_NEUTRAL, Config, flag_of, to_dict

AUTO = "auto"


def _saved_value(saved: dict, name: str):
    # A checkpoint from before a field existed ran with that field's default.
    return saved[name] if name in saved else FIELDS[name].default


def conflicts(saved: dict, cfg: Config, names: Collection[str]) -> list[str]:
    """``--flag saved → asked`` for each of ``names`` (fields) that would change what the saved run computes."""
    return [
        f"{flag_of(name)} {_saved_value(saved, name)!r} → {getattr(cfg, name)!r}"
        for name in sorted(names)
        if name not in RESULT_NEUTRAL and name != "epochs" and _saved_value(saved, name) != getattr(cfg, name)
    ]


def check_epochs(epochs_done: int, epochs: int | None, path: str) -> None:
    if epochs is not None and epochs < epochs_done:
        raise UserError(
            f"checkpoint {path} has trained {epochs_done} epochs already: --epochs must be at least {epochs_done}, "
            f"got {epochs}"
        )


def check_resumable(saved: dict, epochs_done: int, cfg: Config, given: Collection[str], path: str) -> None:
    """Refuses, naming each flag, a resume of ``path`` that changes any of ``given`` beyond what a resume may."""
    differ = conflicts(saved, cfg, given)
    if differ:
        raise UserError(
            f"--resume {path}: the run was trained with other settings ({'; '.join(differ)}); a resume continues the "
            "run's saved configuration and may change only --epochs (to extend it) and where files go: drop these "
            "flags, or start a new run"
        )
    check_epochs(epochs_done, cfg.epochs, path)


def resumed_config(cfg: Config, given: Collection[str]) -> Config:
    """The configuration that ``--resume PATH`` trains with: the checkpoint's, with the ``given`` fields that a resume
    may change applied; ``cfg`` unchanged when it resumes nothing or ``auto`` (resolved later, in ``find_auto``)."""
    if cfg.resume in (None, "", AUTO):
        return cfg
    path = checkpoint.resolve_path(cfg.resume)
    saved, epochs_done = checkpoint.read_config(path)
    check_resumable(saved, epochs_done, cfg, given, path)
    values = {name: _saved_value(saved, name) for name in FIELDS}
    values.update({name: getattr(cfg, name) for name in given})
    return Config(**values)


def find_auto(cfg: Config, given: Collection[str] = FIELDS) -> str | None:
    """``--resume auto``: the checkpoint to continue (see the module's docstring), or None for a fresh start. With
    ``--run-name`` only that run is looked at; a checkpoint that cannot be read (empty, truncated) is passed over.
    Milestones not ``given`` are not compared: a recipe may derive them from the epochs, which a resume may extend."""
    compared = set(FIELDS) - ({"lr_milestones"} - set(given))
    if cfg.run_name is not None:
        candidates = [os.path.join(cfg.output_dir, cfg.run_name, checkpoint.CHECKPOINT_NAME)]
    elif os.path.isdir(cfg.output_dir):
        candidates = [
            os.path.join(e.path, checkpoint.CHECKPOINT_NAME) for e in os.scandir(cfg.output_dir) if e.is_dir()
        ]
    else:
        return None
    found = sorted(((os.path.getmtime(p), p) for p in candidates if os.path.isfile(p)), reverse=True)
    for _, path in found:
        try:
            saved, epochs_done = checkpoint.read_config(path)
        except UserError:
            continue  # damaged: an older checkpoint of this run, or a fresh start, is what remains
        differ = conflicts(saved, cfg, compared)
        if not differ and (cfg.epochs is None or cfg.epochs >= epochs_done):
            return path
        if cfg.run_name is not None:
            # The run named is not continued, and a fresh start there would train over it: say which field differs
            # (the suggestion "--resume auto" is the flag already given).
            if not differ:
                check_epochs(epochs_done, cfg.epochs, path)
            raise UserError(
                f"--resume auto: run {os.path.dirname(path)} was trained with other settings ({'; '.join(differ)}, "
                "saved → this command's), so it is not continued: run the command with the run's values to continue "
                "it, or choose another --run-name for a new run"
            )
    return None


def changes(saved: dict, cfg: Config) -> dict[str, list]:
    """``{field: [saved, now]}`` for every field a resume changed (what the run's log records of it)."""
    now = to_dict(cfg)
    # ``resume`` itself always changes (None → the path): the record is the resume.
    return {k: [_saved_value(saved, k), v] for k, v in now.items() if k != "resume" and _saved_value(saved, k) != v}
