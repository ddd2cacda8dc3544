"""The digits top-1 of each branch method's deployed network (trunk + branch 1; KDCL's student 1), seeds 0-2, through
the CLI.

    .venv/bin/python benchmarks/branch_methods_digits.py --methods one,cl-ilr --epochs 6 --milestones 4,5

Each run is ``python -m ffsd_fast.train --method M --seed S`` on the embedded digits with the digits recipe (20
epochs, batch 32, lr ×0.1 after epochs 16 and 18) unless ``--epochs``/``--milestones`` shorten it,
``--num-students 3`` (the public code's three branches; OKDDip's three peers and its leader) and the method's
flags below. The runs go side by side, one
thread each (``--parallel``, default all). One JSON line per run (the command, the deployed network's final and
best top-1) is appended to ``benchmarks/results/branch_methods_digits.jsonl``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffsd_fast.method import registry  # noqa: E402
from ffsd_fast.trainer.runlog import commit_label  # noqa: E402

# Per method, the flags beside the digits recipe, and why.
FLAGS = {
    # The code ramps the KL weight over 80 of its 300 epochs; over the digits' 20 epochs, 5 is that share.
    "one": ["--one-rampup-epochs", "5"],
    # The same share of CL-ILR's 80 of 300.
    "cl-ilr": ["--clilr-rampup-epochs", "5"],
    # OKDDip: three peers and the leader (the code's four branches), the same ramp share.
    "okddip": ["--okddip-rampup-epochs", "5"],
    # KDCL: three students, each on its own view, as the others' three branches; its defaults (MinLogit, T 4, α 0.5).
    "kdcl": [],
}


def command(method: str, seed: int, out: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "ffsd_fast.train", "--method", method, "--seed", str(seed), "--num-students", "3"]
    cmd += [*FLAGS[method], "--device", "cpu", "--no-progress", "--workers", "0"]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.milestones:
        cmd += ["--lr-milestones", *args.milestones.split(",")]
    return [*cmd, "--output-dir", str(out), "--run-name", f"{method}-{seed}"]


def row(method: str, seed: int, cmd: list[str], out: Path, commit: str) -> dict:
    summary = json.loads((out / f"{method}-{seed}" / "summary.json").read_text())
    deployed = registry.get(method).deployed
    shown = [a for a in cmd[1:] if not a.startswith(str(out))]
    return {
        "method": method,
        "seed": seed,
        "command": " ".join(["python", *shown[: shown.index("--output-dir")]]),
        "deployed_top1": summary[f"{deployed}_top1"],
        "best_deployed_top1": summary[f"best_{deployed}_top1"],
        "students_top1": summary["students_top1"],
        "epochs": summary["epochs"],
        "device": "cpu",
        "commit": commit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(FLAGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, help="instead of the digits recipe's 20")
    parser.add_argument("--milestones", help="lr ×0.1 after these epochs, comma-separated (with --epochs)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "branch_methods_digits.jsonl"))
    args = parser.parse_args()
    commit = commit_label()  # the code the runs import, read before any of them starts
    runs = [(m, int(s)) for m in args.methods.split(",") for s in args.seeds.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # side by side, one thread each
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        started = []
        for method, seed in runs:
            cmd = command(method, seed, out, args)
            log = open(out / f"{method}-{seed}.log", "w")  # noqa: SIM115 - open until the run ends
            started.append((method, seed, cmd, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)))
        for method, seed, cmd, process in started:
            if (code := process.wait()) != 0:
                print(f"{method} seed {seed} failed ({code}):\n{(out / f'{method}-{seed}.log').read_text()[-2000:]}")
                continue
            result = row(method, seed, cmd, out, commit)
            print(json.dumps(result), flush=True)
            with open(args.output, "a") as fh:
                fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
