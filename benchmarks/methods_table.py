"""Every online-distillation method side by side: its deployed network's top-1 over seeds, in both step forms.

    .venv/bin/python benchmarks/methods_table.py --epochs 20 --jobs 2               # the embedded digits, CPU
    .venv/bin/python benchmarks/methods_table.py --data-root ~/data --device cuda   # CIFAR-100, each paper's recipe

Per method (``METHODS``: those this installation registers; the others are listed as skipped, with why), per step
form (``--step per-network`` and ``--step stacked``), per seed: one ``python -m ffsd_fast.train`` run, ``--jobs`` of
them side by side (on a CPU one thread each).

Digits (the default): the same for every method: ResNet-20 at 16 px, the digits recipe (batch 32, lr 0.1, ×0.1
after epochs 16 and 18: ``--epochs`` below 17 trains at 0.1 throughout unless ``--milestones`` says otherwise),
``--num-students 3`` (three peers or branches; OKDDip's three peers and its leader), and each method's ramp-up
options (``*_rampup_epochs``) shortened to the same share of the run as their default is of the method's CIFAR
recipe (80 of 300 epochs: 5 of 20). CIFAR-100 (``--data-root``): each method's paper recipe,
``configs/cifar100-resnet32-<method>.yaml``, and for a method without one (FFSD, DML, independent) the FFSD paper's
``configs/cifar100-resnet32.yaml`` with ``--method``; its m is the config's.

One JSON line per run (the command, its seconds, the commit, the deployed network's last and best top-1) is
appended to ``OUT/methods-<dataset>.jsonl``; the table, from ``python -m ffsd_fast.report``'s statistics over the
runs of each form, is written to ``OUT/methods-<dataset>.md`` and, for digits with the default ``--out``, between the
README's markers. With ``--runs-dir``, a run that folder already holds finished with the same command is not trained
again (its row, with the commit that trained it, is reused): a table can be built in parts, or resumed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffsd_fast.cli import report  # noqa: E402
from ffsd_fast.method import registry  # noqa: E402
from ffsd_fast.trainer.recipes import RECIPES  # noqa: E402
from ffsd_fast.trainer.runlog import commit_label  # noqa: E402

# Every method of the comparison, in the order of the table; a method this installation does not register is skipped.
METHODS = ("independent", "dml", "ffsd", "one", "cl-ilr", "okddip", "kdcl", "pcl")
FORMS = ("per-network", "stacked")
NUM_STUDENTS = 3  # digits: the same m for every method (the branch methods' public code runs three branches)
README_BEGIN, README_END = "<!-- methods-digits:begin -->", "<!-- methods-digits:end -->"
RESULTS = ROOT / "benchmarks" / "results"
CIFAR_CONFIG = ROOT / "configs" / "cifar100-resnet32.yaml"


def order(method: str) -> int:
    """A method's place in the table: ``METHODS``'s order, any other registered method after them."""
    return METHODS.index(method) if method in METHODS else len(METHODS)


def plan(methods: list[str], forms: list[str], registered: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (method, form) pairs to run, and a line for each one skipped, saying why."""
    pairs, skipped = [], []
    for method in methods:
        if method not in registered:
            skipped.append(f"{method}: not registered in this installation (ffsd_fast.method.registry.names())")
            continue
        for form in forms:
            if form == "stacked" and not registry.get(method).stackable:
                skipped.append(f"{method} stacked: the method cannot run its networks stacked")
            else:
                pairs.append((method, form))
    return pairs, skipped


def rampup_flags(method: str, epochs: int) -> list[str]:
    """Each ``*_rampup_epochs`` option of the method at the share of ``epochs`` that its default is of the method's
    CIFAR-100 recipe (80 of 300 → 5 of 20); nothing for a method without one."""
    cls = registry.get(method)
    reference = cls.recipe.get("cifar100", {}).get("epochs", RECIPES["cifar100"].epochs)
    flags = []
    for name, (_, field) in cls.options.items():
        if name.endswith("_rampup_epochs"):
            flags += [f"--{name.replace('_', '-')}", str(round(field.default * epochs / reference))]
    return flags


def cifar_config(method: str) -> tuple[Path, list[str]]:
    """The method's paper recipe: its own config, else the FFSD paper's with ``--method``."""
    own = ROOT / "configs" / f"cifar100-resnet32-{method.replace('-', '_')}.yaml"
    return (own, []) if own.is_file() else (CIFAR_CONFIG, ["--method", method])


def command(method: str, form: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The training command of one run, without its output folder."""
    cmd = [sys.executable, "-m", "ffsd_fast.train"]
    if args.data_root:
        config, flags = cifar_config(method)
        cmd += ["-c", str(config.relative_to(ROOT)), *flags, "--data-root", args.data_root]
    else:
        epochs = args.epochs or 20  # the digits recipe's
        cmd += ["--method", method, "--num-students", str(NUM_STUDENTS), *rampup_flags(method, epochs)]
        cmd += ["--workers", "0"]
    cmd += ["--seed", str(seed), "--step", form, "--device", args.device, "--no-progress"]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.milestones:
        cmd += ["--lr-milestones", *args.milestones.split(",")]
    return cmd


def run_one(method: str, form: str, seed: int, args: argparse.Namespace, runs: Path) -> tuple[int, float, str]:
    """Trains one run into ``runs/<form>/<method>-<seed>``: (exit status, seconds, its log's tail)."""
    cmd = [*command(method, form, seed, args), "--output-dir", str(runs / form), "--run-name", f"{method}-{seed}"]
    shutil.rmtree(runs / form / f"{method}-{seed}", ignore_errors=True)  # an unfinished earlier try: start afresh
    # Side by side on a CPU: one thread each, so that the runs do not fight over the cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.device == "cpu" else dict(os.environ)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - start, (done.stdout + done.stderr)[-2000:]


def row(method: str, form: str, seed: int, seconds: float, args: argparse.Namespace, runs: Path) -> dict:
    summary = json.loads((runs / form / f"{method}-{seed}" / "summary.json").read_text())
    params, macs = report.deployed_cost(summary)
    return {
        "method": method,
        "form": form,
        "seed": seed,
        "dataset": summary["dataset"],
        "model": summary["model"],
        "num_students": summary["num_students"],
        "epochs": summary["epochs"],
        "command": " ".join(["python", *command(method, form, seed, args)[1:]]),
        "seconds": seconds,
        "deployed": registry.get(method).deployed,
        "deployed_top1": report.deployed_top1(summary, best=False),
        "best_deployed_top1": report.deployed_top1(summary, best=True),
        "images_per_s": summary["images_per_s"],
        "deployed_params": params,
        "deployed_macs": macs,
        "device": summary["device"],
        "threads": summary["threads"],
        "lr_milestones": summary["config"]["lr_milestones"],
        "commit": args.commit,
    }


def _form_rows(runs: Path, form: str) -> dict[str, dict]:
    """The report's row of each method, over the seeds of one form (its statistics: ``ffsd_fast.cli.report``)."""
    if not (runs / form).is_dir() or not any((runs / form).rglob("summary.json")):
        return {}
    table = report.rows(report.load_summaries(runs / form))
    by_method = {r["method"]: r for r in table}
    # One row each: a form's runs of a method differ only in their seed.
    assert len(by_method) == len(table), [r["settings"] for r in table]
    return by_method


def table(runs: Path, forms: list[str], results: list[dict]) -> list[str]:
    """The markdown table: a line per method, each form's last- and best-epoch top-1 (mean ± std), n, images/s and
    seconds a run."""
    # Only the methods of this invocation's rows: a shared --runs-dir may hold other methods' runs, some unfinished.
    planned = {x["method"] for x in results}
    stats = {form: {m: r for m, r in _form_rows(runs, form).items() if m in planned} for form in forms}
    forms = [form for form in forms if stats[form]]
    methods = sorted({m for rows in stats.values() for m in rows}, key=lambda m: (order(m), m))
    head = ["method", "m", "deployed", "parameters", "multiply-adds"]
    for form in forms:
        head += [f"{form}: last epoch", f"{form}: best epoch", f"{form}: n", f"{form}: img/s", f"{form}: s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        first = next(stats[form][method] for form in forms if method in stats[form])
        params, macs = ("?", "?") if first["cost"] is None else map(report.short_count, first["cost"])
        cells = [method, str(first["m"]), first["deployed"], params, macs]
        for form in forms:
            r = stats[form].get(method)
            seconds = [x["seconds"] for x in results if x["method"] == method and x["form"] == form]
            cells += (
                ["–"] * 5
                if r is None
                else [
                    report.mean_std_cell(r["deployed_final"]),
                    report.mean_std_cell(r["deployed_best"]),
                    str(r["n"]),
                    f"{r['images_per_s']:.0f}",
                    f"{sum(seconds) / len(seconds):.0f}" if seconds else "–",
                ]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


RECIPE_NOTE = {
    "digits": "Each run (S: the seed), on the digits recipe; a `--*-rampup-epochs` flag is the method's ramp-up at the "
    "share of the run that its default takes of its CIFAR-100 recipe (80 of 300 epochs: 5 of 20):\n",
    "cifar100": "Each run (S: the seed): the method's paper recipe, its configuration file (m included), on "
    "CIFAR-100:\n",
}
NOTE = (
    "Top-1 in % of the network each method keeps (`deployed`: what `ffsd-export` writes), mean ± std over the seeds. "
    "*Last epoch*: after the final epoch, the network exported; *best epoch*: its best over epochs on the test split, "
    "as several papers report (chosen on the test set, so it reads high). img/s: training images a second, every "
    "network's step included; s/run: each run's wall time, start-up and evaluation included. Parameters and "
    "multiply-adds: the deployed stock backbone on one image. per-network and stacked (`--step`) compute the same "
    "maths (the parity tests); their numbers differ through floating-point rounding, which compounds over epochs."
)


def setup(results: list[dict]) -> str:
    """One line: what every run of the table shared, read from their rows."""

    def values(key: str) -> str:
        shown = {r[key] if isinstance(r[key], str) else json.dumps(r[key]) for r in results}
        return ", ".join(sorted(shown)) or "–"

    hours = sum(r["seconds"] for r in results) / 3600
    return (
        f"Epochs {values('epochs')} (lr ×0.1 after epochs {values('lr_milestones')}), seeds {values('seed')}, "
        f"m {values('num_students')}, {values('model')}, device {values('device')}, {values('threads')} thread(s) a "
        f"run; {hours:.2f} hours of runs in all."
    )


def markdown(args: argparse.Namespace, lines: list[str], results: list[dict], skipped: list[str]) -> str:
    """The whole ``.md``: how it was made, the table, each run's command, what was skipped or failed."""
    dataset = "CIFAR-100, each method's paper recipe" if args.data_root else "the embedded digits"
    shown = " ".join(args.argv) if args.argv else "(defaults)"
    # One command per method and form, its seed written S.
    commands = {(r["method"], r["form"]): r["command"].replace(f"--seed {r['seed']} ", "--seed S ") for r in results}
    text = [
        f"# Online-distillation methods on {dataset}\n",
        f"Written by `benchmarks/methods_table.py {shown}` at commit `{args.commit}` "
        f"({len(results)} runs; rows in `methods-{args.dataset}.jsonl`). {setup(results)}\n",
        *lines,
        "",
        NOTE,
        "",
        RECIPE_NOTE[args.dataset],
        *[f"    {commands[key]}" for key in sorted(commands, key=lambda k: (order(k[0]), FORMS.index(k[1])))],
    ]
    if skipped:
        text += ["", "Skipped:", "", *[f"- {line}" for line in skipped]]
    return "\n".join(text) + "\n"


def update_readme(path: Path, lines: list[str], results: list[dict], md_name: str) -> None:
    """Rewrites what lies between the README's markers: the table and where it comes from."""
    text = path.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        sys.exit(f"methods_table: error: {path} has no {README_BEGIN} … {README_END} block to rewrite")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    source = f"Written by `benchmarks/methods_table.py`: [{md_name}](benchmarks/results/{md_name})."
    block = "\n".join([setup(results), "", *lines, "", source])
    path.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}", encoding="utf-8")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all eight)")
    parser.add_argument("--forms", default=",".join(FORMS), help="--step forms, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, help="instead of the recipe's (digits 20; CIFAR-100 each method's)")
    parser.add_argument("--milestones", help="lr ×0.1 after these epochs, comma-separated (default: the recipe's)")
    parser.add_argument("--jobs", type=int, help="runs side by side (default: the CPU cores; 1 on a GPU)")
    parser.add_argument("--data-root", help="the CIFAR-100 comparison: the folder holding cifar-100-python/")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cpu for digits, cuda for CIFAR-100")
    parser.add_argument("--out", default=str(RESULTS), help="where the .jsonl and .md go")
    parser.add_argument("--runs-dir", help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("--readme", help="digits: the README whose block to rewrite (default: with the default --out)")
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.dataset = "cifar100" if args.data_root else "digits"
    # The README's block links the default results folder: it shows a table written elsewhere only when asked.
    args.readme = args.readme or (str(ROOT / "README.md") if Path(args.out).resolve() == RESULTS else None)
    args.device = args.device or ("cuda" if args.data_root else "cpu")
    args.jobs = args.jobs or (os.cpu_count() or 1 if args.device == "cpu" else 1)
    unknown = set(args.methods.split(",")) - set(METHODS) - set(registry.names())
    if unknown or not set(args.forms.split(",")) <= set(FORMS):
        parser.error(f"unknown methods {sorted(unknown)} or forms {args.forms}: methods {METHODS}, forms {FORMS}")
    return args


def finished_row(method: str, form: str, seed: int, args: argparse.Namespace, runs: Path) -> dict | None:
    """The row of a run that ``--runs-dir`` already holds, finished, with this command (a table built in parts,
    or one resumed after an interruption); None when it must run. The row keeps the commit that trained it."""
    path = runs / form / f"{method}-{seed}" / "row.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved["command"] == " ".join(["python", *command(method, form, seed, args)[1:]]) else None


def train_all(args: argparse.Namespace, pairs: list[tuple[str, str]], runs: Path) -> tuple[list[dict], list[str]]:
    """Every (method, form, seed) run, ``--jobs`` at a time: their rows, and a line for each that failed."""
    jobs = [(method, form, int(seed)) for method, form in pairs for seed in args.seeds.split(",")]
    results, failed = [], []
    done = {job: finished_row(*job, args, runs) for job in jobs}
    results += [{**r, "reused": True} for r in done.values() if r is not None]
    jobs = [job for job in jobs if done[job] is None]
    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = pool.map(lambda job: (job, run_one(*job, args, runs)), jobs)
        for (method, form, seed), (status, seconds, tail) in outcomes:
            if status != 0:
                failed.append(f"{method} {form} seed {seed}: exit status {status}")
                print(f"{method} {form} seed {seed} failed:\n{tail}", flush=True)
                continue
            results.append(row(method, form, seed, seconds, args, runs))
            (runs / form / f"{method}-{seed}" / "row.json").write_text(json.dumps(results[-1]))
            print(json.dumps(results[-1]), flush=True)
    return results, failed


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    pairs, skipped = plan(args.methods.split(","), args.forms.split(","), registry.names())
    for line in skipped:
        print(f"skipped: {line}", flush=True)
    args.commit = commit_label()  # the code the runs import, read before any of them starts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        results, failed = train_all(args, pairs, runs)
        lines = table(runs, args.forms.split(","), results)
    with open(out / f"methods-{args.dataset}.jsonl", "a") as fh:  # the rows this invocation trained
        fh.writelines(json.dumps(r) + "\n" for r in results if not r.get("reused"))
    md_name = f"methods-{args.dataset}.md"
    (out / md_name).write_text(markdown(args, lines, results, skipped + [f"failed: {f}" for f in failed]))
    if args.dataset == "digits" and args.readme and not args.no_readme:
        update_readme(Path(args.readme), lines, results, md_name)
    print(f"written: {out / md_name}, {out / f'methods-{args.dataset}.jsonl'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
