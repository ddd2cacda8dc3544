"""What a run leaves in its directory besides checkpoints: metrics as JSON lines, TensorBoard scalars, a PNG of the
accuracy curves, the resolved config and the code's commit."""

import json
import os
import platform
import shutil
import subprocess

import torch
import yaml

from ffsd_fast.files import write_atomic


def code_version() -> dict:
    """The git commit of the code that runs (and whether the tree had uncommitted changes), where it is a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                # Rows appended to benchmarks/results/ by a run do not make the code that runs next "dirty".
                [
                    "git",
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                    "--",
                    ":(top)",
                    ":(top,exclude)benchmarks/results",
                ],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            != ""
        )
    except (OSError, subprocess.SubprocessError):
        # A copy of the tree without .git (the GPU machine gets one) names its commit through the environment.
        return {"commit": os.environ.get("FFSD_COMMIT", "unknown"), "dirty": None}
    return {"commit": commit, "dirty": dirty}


def environment(device: torch.device) -> dict:
    """What besides the code and the seed decides a run's exact numbers: the same seed gives other results with
    another intra-op thread count (CPU reductions split differently), device, or library version."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def truncate_metrics(path: str, epochs_done: int) -> None:
    """Drops from ``metrics.jsonl`` every record past ``epochs_done`` (what an interrupted process logged after its
    last checkpoint, which the resumed run logs again) and a last line cut short by a kill."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("epoch", 0) <= epochs_done:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, lambda fh: fh.write("".join(kept).encode()))


def commit_label() -> str:
    """The commit, with ``+dirty`` when the tree had uncommitted changes: what benchmark rows record."""
    version = code_version()
    return version["commit"] + ("+dirty" if version["dirty"] else "")


class RunLog:
    """Appends to ``metrics.jsonl``, writes TensorBoard scalars under ``tensorboard/``, redraws ``accuracy.png``.

    A resumed run (``epochs_done``: its checkpoint's epoch) keeps what was logged up to the checkpoint, drops the
    interrupted process's later records, and has TensorBoard hide that process's later events; a fresh run clears any
    log already in the directory, from an attempt that never reached a checkpoint."""

    def __init__(
        self, run_dir: str, tensorboard: bool = True, epochs_done: int | None = None, steps_per_epoch: int = 0
    ) -> None:
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        board = os.path.join(run_dir, "tensorboard")
        if epochs_done is None:
            if os.path.exists(self.metrics_path):
                os.unlink(self.metrics_path)
            shutil.rmtree(board, ignore_errors=True)
        else:
            truncate_metrics(self.metrics_path, epochs_done)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # The first global step after the checkpoint: TensorBoard hides the earlier files' events from it on.
            purge_step = None if epochs_done is None else epochs_done * steps_per_epoch + 1
            self.writer = SummaryWriter(board, purge_step=purge_step)

    def write_config(self, config: dict, version: dict) -> None:
        """A fresh run's ``config.yaml`` and ``version.json`` (a resumed run logs a ``resume`` record instead)."""
        write_atomic(
            os.path.join(self.run_dir, "config.yaml"),
            lambda fh: fh.write(yaml.safe_dump(config, sort_keys=False).encode()),
        )
        write_atomic(
            os.path.join(self.run_dir, "version.json"), lambda fh: fh.write(json.dumps(version, indent=2).encode())
        )

    def log(self, record: dict, step: int) -> None:
        """One JSON line; every numeric field also as a TensorBoard scalar tagged ``kind/name``."""
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if isinstance(value, float | int) and not isinstance(value, bool) and name != "step":
                    self.writer.add_scalar(f"{record['kind']}/{name}", value, step)
            self.writer.flush()

    def plot_accuracy(self, history: list[dict], curves: dict[str, str], deployed: str) -> None:
        """``accuracy.png``: a line per ``curves`` entry (label → history key), the ``deployed`` network's bold."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [h["epoch"] for h in history]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, key in curves.items():
            style = {"linewidth": 2.5} if key == f"{deployed}_top1" else {"linewidth": 1, "alpha": 0.8}
            ax.plot(epochs, [h[key] for h in history], marker=".", label=label, **style)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.run_dir, "accuracy.png"), dpi=110)
        plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NullLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the run directory)."""

    def write_config(self, config: dict, version: dict) -> None:
        pass

    def log(self, record: dict, step: int) -> None:
        pass

    def plot_accuracy(self, history: list[dict], curves: dict[str, str], deployed: str) -> None:
        pass

    def close(self) -> None:
        pass
