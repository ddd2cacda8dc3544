"""The digits top-1 of each branch method's deployed network (trunk + branch 1), seeds 0-2, through the CLI.

    .venv/bin/python benchmarks/branch_methods_digits.py --methods one --seeds 0,1,2

Each run is ``python -m ffsd_fast.train --method M --seed S`` on the embedded digits with the digits recipe (20
epochs, batch 32), ``--num-students 3`` (the public code's three branches) and the method's flags below; one JSON
line per run (the summary's deployed top-1, final and best over epochs) is appended to
``benchmarks/results/branch_methods_digits.jsonl``.
"""

import argparse
import json
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
}


def run(method: str, seed: int, out: Path) -> dict:
    command = [sys.executable, "-m", "ffsd_fast.train", "--method", method, "--seed", str(seed), "--num-students", "3"]
    command += [*FLAGS[method], "--device", "cpu", "--no-progress", "--workers", "0"]
    command += ["--output-dir", str(out), "--run-name", f"{method}-{seed}"]
    subprocess.run(command, check=True, cwd=ROOT)
    summary = json.loads((out / f"{method}-{seed}" / "summary.json").read_text())
    deployed = registry.get(method).deployed
    return {
        "method": method,
        "seed": seed,
        "command": " ".join(["python", *command[1:]]),
        "deployed_top1": summary[f"{deployed}_top1"],
        "best_deployed_top1": summary[f"best_{deployed}_top1"],
        "students_top1": summary["students_top1"],
        "epochs": summary["epochs"],
        "commit": commit_label(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(FLAGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "branch_methods_digits.jsonl"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for seed in map(int, args.seeds.split(",")):
                row = run(method, seed, Path(tmp))
                print(json.dumps(row), flush=True)
                with open(args.output, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
