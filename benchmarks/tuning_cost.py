"""What ``--step auto`` costs before a run trains, in steps and seconds, on the CPU.

    .venv/bin/python benchmarks/tuning_cost.py                  # FFSD on digits, ResNet-20 and ResNet-32, every form
    .venv/bin/python benchmarks/tuning_cost.py --models resnet20 --batch-size 4 --image-size 8 --no-compile \
        --set fusion_kernel=torch                               # tiny: two forms

A CPU has no clock for the forms (there the fixed per-network default applies, and nothing is timed), so this
injects one: the host's clock around each form's timed steps (``tuning.clock_for``, as the tests inject theirs). The
rest is the trainer's own ``--step auto``: ``run.build`` with ``--step auto`` on the digits data, which draws the
first batch, builds every form the configuration allows on copies of the run's tensors (per-network and stacked,
FFSD's fusion blocks on cuDNN/PyTorch and on Triton, each with and without ``torch.compile``, compiled last), runs
``WARMUP`` warm-up and ``STEPS`` timed steps of each, and keeps the fastest. Nothing is dropped for time: the budget
(``--budget``) is far above what the forms take, so that every form's whole cost is measured.

Per form, the host seconds of its phases, which ``tuning.choose`` records: ``build_s`` (copying the method,
stacking, building the optimisers; a compiled form's ``torch.compile`` wrapping), ``warmup_s`` (the warm-up steps:
a compiled form compiles here, forward and backward), ``timed_s``, and its ms per step. Per model, the tuning's
seconds and steps in all, and what they amount to in steps of the chosen form (``tuning seconds / chosen s per
step``: the training the run could have done instead). One JSON line per (model, form) and one per model (``form:
"all"``) is appended to ``--output``; ``--markdown`` is rewritten with the tables and the command.

On a CPU the Triton fusion block runs its PyTorch reference (no interpreter here) and Inductor generates C++, so
the numbers say what tuning costs in steps of a CPU step, not what it costs on a GPU, where the steps are ~100×
faster and compilation is Triton's.
"""

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ffsd_fast.step import tuning  # noqa: E402
from ffsd_fast.step.distributed import SINGLE_PROCESS  # noqa: E402
from ffsd_fast.trainer import step_forms  # noqa: E402
from ffsd_fast.trainer.config import Config, resolve  # noqa: E402
from ffsd_fast.trainer.run import build  # noqa: E402
from ffsd_fast.trainer.runlog import commit_label  # noqa: E402

WARMUP, STEPS = 3, 10  # tuning.choose's defaults, which the trainer uses


def host_clock_for(device: torch.device, steps: int) -> tuning.Clock:
    """``tuning.clock_for`` on any device: the host's seconds per step around the timed steps."""

    def clock(name: str, run) -> float:  # noqa: ANN001 - tuning.Clock's
        started = time.perf_counter()
        run()
        return (time.perf_counter() - started) / steps

    return clock


def setting(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` of ``--set``: a configuration field the forms then keep (its value as JSON, else a string)."""
    field, _, value = text.partition("=")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def tune(model: str, args: argparse.Namespace, output_dir: str) -> tuple[tuning.Tuning, float]:
    """The trainer's ``--step auto`` for ``model`` (its tuning and the seconds ``run.build`` took in all)."""
    settings = {
        "method": args.method,
        "model": model,
        "dataset": "digits",
        "num_students": args.num_students,
        "batch_size": args.batch_size,
        "device": "cpu",
        "step": "auto",
        "step_tuning_seconds": args.budget,
        "workers": 0,
        "progress": False,
        "output_dir": output_dir,
        "run_name": model,
        "image_size": args.image_size,
    }
    if not args.compile:
        settings["compile"] = False  # as the trainer's --no-compile: the compiled forms are left out
    settings.update(args.set)  # a lever set is not tuned, as on the command line
    cfg = resolve(Config(**settings))
    started = time.perf_counter()
    run = build(cfg, SINGLE_PROCESS, torch.device("cpu"), given=set(settings))  # the levers and compile: tuned
    return run.tuning, time.perf_counter() - started


def rows_of(model: str, result: tuning.Tuning, build_s: float, meta: dict) -> list[dict]:
    rows = []
    for name, phases in result.phases.items():
        seconds = result.seconds_per_step.get(name)
        rows.append(
            {
                **meta,
                "model": model,
                "form": name,
                "chosen": name == result.choice,
                "ms_per_step": seconds * 1e3 if seconds is not None else None,
                "steps": WARMUP + STEPS if seconds is not None else None,
                **{key: phases.get(key) for key in ("build_s", "warmup_s", "timed_s")},
                "seconds": sum(phases.values()),
                "dropped": result.dropped.get(name),
            }
        )
    chosen = result.seconds_per_step[result.choice]
    rows.append(
        {
            **meta,
            "model": model,
            "form": "all",
            "choice": result.choice,
            "forms_timed": len(result.seconds_per_step),
            "dropped": result.dropped,
            "steps": (WARMUP + STEPS) * len(result.seconds_per_step),
            "seconds": result.seconds,
            "build_seconds": build_s,
            "chosen_ms_per_step": chosen * 1e3,
            "in_chosen_steps": result.seconds / chosen,
        }
    )
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# What `--step auto` costs, on the CPU",
        "",
        "Written by `benchmarks/tuning_cost.py` (its docstring says what is measured and how):",
        "",
        f"    {command}",
        "",
    ]
    meta = rows[0]
    size = meta["image_size"] or "the dataset's"
    lines += [
        f"{meta['date']}, commit `{meta['commit']}`, torch {meta['torch']}, {meta['threads']} thread(s), "
        f"{meta['method']} m = {meta['num_students']}, digits, batch {meta['batch_size']}, image size {size}, "
        f"compile backend `{meta['compile_backend']}`; every form runs {WARMUP} warm-up and {STEPS} timed steps.",
        "",
    ]
    for total in (r for r in rows if r["form"] == "all"):
        model = total["model"]
        lines += [
            f"## {model}",
            "",
            f"{total['forms_timed']} forms timed, {total['steps']} steps, {total['seconds']:.1f} s in all "
            f"(= {total['in_chosen_steps']:.0f} steps of the chosen form, `{total['choice']}`, at "
            f"{total['chosen_ms_per_step']:.1f} ms/step); `run.build` took {total['build_seconds']:.1f} s.",
            "",
            "| form | build s | warm-up s | timed s | ms/step | |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in rows if r["model"] == model and r["form"] != "all"):
            cells = [f"{r[k]:.2f}" if r[k] is not None else "–" for k in ("build_s", "warmup_s", "timed_s")]
            ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] is not None else "–"
            note = "chosen" if r["chosen"] else (f"dropped: {r['dropped']}" if r["dropped"] else "")
            lines.append(f"| {r['form']} | {' | '.join(cells)} | {ms} | {note} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet32")
    parser.add_argument("--method", default="ffsd")
    parser.add_argument("--num-students", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, help="default: the dataset's")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="time the compiled forms (default)"
    )
    parser.add_argument("--budget", type=float, default=3600.0, help="--step-tuning-seconds (default: none binds)")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend for the compiled forms (eager: trace only)",
    )
    parser.add_argument(
        "--set", type=setting, action="append", default=[], metavar="FIELD=VALUE", help="fix a lever (repeatable)"
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "tuning_cost.jsonl"))
    parser.add_argument("--markdown", default=str(ROOT / "benchmarks" / "results" / "tuning_cost.md"))
    args = parser.parse_args(argv)
    command = "python benchmarks/tuning_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {
        "device": "cpu",
        "run_id": uuid.uuid4().hex[:12],
        "torch": torch.__version__,
        "commit": commit_label(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "threads": args.threads,
        "method": args.method,
        "num_students": args.num_students,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "compile_backend": args.compile_backend if args.compile else None,
        "fixed": dict(args.set),
    }
    saved = tuning.clock_for, step_forms.COMPILE_OPTIONS, torch.get_num_threads()
    tuning.clock_for = host_clock_for
    step_forms.COMPILE_OPTIONS = {} if args.compile_backend == "inductor" else {"backend": args.compile_backend}
    torch.set_num_threads(args.threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            for model in args.models.split(","):
                result, build_s = tune(model, args, output_dir)
                rows += rows_of(model, result, build_s, meta)
                print(result.table(), flush=True)
    finally:  # as it was, for a caller in this process (a test)
        tuning.clock_for, step_forms.COMPILE_OPTIONS = saved[:2]
        torch.set_num_threads(saved[2])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    Path(args.markdown).write_text(markdown(rows, command) + "\n", encoding="utf-8")
    print(f"\n{len(rows)} rows appended to {out}; {args.markdown} written", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
