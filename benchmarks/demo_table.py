"""`make demo`'s run for several seeds: every network's final top-1 per seed, as one markdown table.

    .venv/bin/python benchmarks/demo_table.py                    # seeds 0 1 2, torch's default thread count
    .venv/bin/python benchmarks/demo_table.py --seeds 0 --threads 1
    .venv/bin/python benchmarks/demo_table.py --seeds 0 --epochs 1 --out /tmp/demo.md   # other flags go to the trainer

Each seed is one child process, ``python -m ffsd_fast.train --no-progress --seed S --output-dir D`` (the demo's
defaults otherwise), run one after another so that they do not share the cores. The table goes to stdout and to
``--out``. The header names the thread count: the same seed gives different numbers with 1 and 2 intra-op threads
(the CPU reductions split differently, and training amplifies the difference), so a row is only comparable with
rows of the same thread count, torch version and CPU.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the checkout's ffsd_fast, whose commit is recorded

from ffsd_fast.trainer.runlog import commit_label  # noqa: E402


def cpu_name() -> str:
    try:  # the CPU model, where Linux says it (platform.processor() is empty on most Linux machines)
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_seed(seed: int, threads: int, output_dir: Path, extra: list[str]) -> dict:
    """One demo run in a child process; returns its summary.json, plus the child's wall time as ``wall_seconds``."""
    # A folder of its own, empty: the trainer names the run inside it, and nothing there can be resumed by mistake.
    parent = Path(tempfile.mkdtemp(prefix=f"seed{seed}-", dir=output_dir))
    command = [sys.executable, "-m", "ffsd_fast.train", "--no-progress", "--seed", str(seed)]
    command += ["--output-dir", str(parent), *extra]
    # torch reads OMP_NUM_THREADS when it starts: the child's intra-op thread count, whatever the parent's is.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"$ OMP_NUM_THREADS={threads} python " + " ".join(command[1:]), flush=True)
    start = time.monotonic()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    wall = time.monotonic() - start  # what `make demo` takes: start-up, data, training, evaluation, checkpoints
    (path,) = parent.glob("*/summary.json")
    summary = json.loads(path.read_text())
    # The trainer records the thread count it ran with (older summaries do not): the header must not lie.
    if summary.get("threads", threads) != threads:
        raise SystemExit(f"seed {seed} ran with {summary['threads']} threads, not {threads}")
    return {**summary, "wall_seconds": wall}


def rows(summary: dict) -> list[tuple[str, str, int | None]]:
    """(label, summary key, index into a list-valued key) for every network the run reports, in the trainer's order
    (ffsd_fast/trainer/summary.py); the baselines (--method dml | independent) have no fusion module or leader."""
    out: list[tuple[str, str, int | None]] = [
        (f"student {i + 1}", "students_top1", i) for i in range(len(summary["students_top1"]))
    ]
    for label, key in [
        ("fusion module", "fusion_top1"),
        ("leader", "leader_top1"),
        ("students' average", "average_top1"),
        ("ensemble (mean logits)", "ensemble_top1"),
        ("oracle ensemble (any)", "oracle_ensemble_top1"),
    ]:
        if key in summary:
            out.append((label, key, None))
    return out


def table(summaries: dict[int, dict], header: str) -> str:
    """Markdown: one row per network, final top-1 (%) per seed and the lowest over the seeds."""
    seeds = list(summaries)
    lines = [header, "", "| network | " + " | ".join(f"seed {s}" for s in seeds) + " | min |"]
    lines.append("|---|" + "---:|" * (len(seeds) + 1))
    for label, key, index in rows(summaries[seeds[0]]):
        values = [s[key][index] if index is not None else s[key] for s in summaries.values()]
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {min(values):.2f} |")
    train = " / ".join(f"{s['train_seconds']:.0f}" for s in summaries.values())
    wall = " / ".join(f"{s['wall_seconds']:.0f}" for s in summaries.values())
    lines += ["", f"Seconds per seed: training {train}; the whole command {wall}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Other flags go to the trainer.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of each run")
    parser.add_argument("--output-dir", type=Path, default=None, help="the runs' parent folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo.md")
    args, extra = parser.parse_known_args(argv)

    with tempfile.TemporaryDirectory(prefix="demo-table-") as tmp:
        output_dir = args.output_dir or Path(tmp)
        output_dir.mkdir(parents=True, exist_ok=True)
        summaries = {seed: run_seed(seed, args.threads, output_dir, extra) for seed in args.seeds}
    command = " ".join(["python -m ffsd_fast.train --no-progress --seed S", *extra])
    header = (
        f"`{command}`, final test top-1 (%) on the digits test split; {args.threads} intra-op thread(s), "
        f"torch {torch.__version__}, CPU {cpu_name()}, commit {commit_label()}."
    )
    text = table(summaries, header)
    print("\n" + text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
