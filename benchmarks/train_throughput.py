"""Training throughput of one FFSD step, variant against variant, in one run.

    python benchmarks/train_throughput.py --device cuda --workload cifar100-resnet32-m2-b128,imagenet-resnet18-m2-b256
    python benchmarks/train_throughput.py --device cpu --workload cifar100-resnet20-m2-b32 --steps 10 --warmup 2

Synthetic batches of the workload's shape already on the device (the input pipeline is measured elsewhere). A
workload is ``DATASET-MODEL-mM-bB`` (CIFAR: 32 px, 100 classes; ImageNet: 224 px, 1000 classes). Variants:

* ``reference``: the authors' structure (``tests/helpers/sequential_reference.py``): one backward and one optimiser
  step per network, every loss read back to the host each step, fp32, NCHW;
* ``one-backward``: this project's step (one forward of every network, one backward, one fused optimiser step per
  kind), fp32, NCHW, PyTorch losses: the structure alone;
* each lever on top of ``one-backward`` alone: ``amp`` (bf16 autocast), ``channels-last``, ``cuda-graph`` (the
  whole step captured and replayed; CUDA only, skipped on a CPU), ``compile`` (every network through
  ``torch.compile``), ``triton-kernels`` (``--kernels triton``: the fused losses and fusion blocks);
* ``fast``: the levers together except ``compile``, which has a variant of its own (on a CPU: none of them,
  which is the trainer's CPU default); ``fast-cudnn-blocks``: the same with the fusion blocks on ``torch.cat`` and
  cuDNN instead of the Triton fusion-block kernels (the fused losses kept), which measured fastest on an H100 and
  is the trainer's CUDA default;
* ``stacked``, ``stacked-cudnn-blocks``: ``fast`` and ``fast-cudnn-blocks`` with the ``m + 1`` backbones run as one
  stacked network (``--stack-networks``: grouped convolutions, channels network by network);
* ``auto``: ``--step auto``'s own pick among ``fast``, ``fast-cudnn-blocks``, ``stacked`` and ``stacked-cudnn-blocks``
  (the trainer's candidates), timed as the trainer times them; its row records what was timed and chosen (``auto``);
* ``backbones-only``: the same ``m + 1`` backbones trained with plain CE (``--method independent``) with the fast
  flags: the floor for FFSD's overhead;
* the ablation, ``BASE-no-LEVER``: ``fast`` or ``stacked`` with one lever removed, so that what each buys inside the
  captured step is measured, not assumed (``ABLATIONS``): ``-no-amp`` (fp32), ``-no-channels-last`` (NCHW),
  ``-no-graph`` (the step run eagerly), ``-no-triton`` (no custom kernel: PyTorch losses, ``torch.cat`` and cuDNN
  fusion blocks), and one custom kernel at a time put back on its PyTorch reference, the other kernels kept:
  ``-no-kl-kernel`` (``kernels/kl_div.py``: the mutual and CE + KL losses), ``-no-attention-kernel``
  (``kernels/attention.py``: attention maps and normalised distances), ``-no-diversity-kernel``
  (``kernels/diversity.py``) and, for ``stacked``, ``-no-distance-kernel`` (``kernels/distance_group.py``, the
  grouped distances only the stack uses) and ``-no-maps-kernel`` (``kernels/attention_group.py``, its grouped
  attention maps). The fusion-block kernel's ablation is ``fast-cudnn-blocks`` and
  stacking's is ``fast`` against ``stacked``. On a CPU ``fast`` has no levers, so its ablations equal it.

Images/s is the median over windows of ``--window`` steps (CUDA-event timed on a GPU, wall clock on a CPU). One
JSON line per (workload, variant) is appended to ``--output``: device, run_id, workload, variant, images_per_s,
step_ms, peak_mem_mb (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS so far), torch, triton, commit.
A table is printed last.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the plain transcription lives in tests/

import torch  # noqa: E402
import triton  # noqa: E402

import ffsd_kernels  # noqa: E402
import ffsd_kernels.reference  # noqa: E402
from ffsd_fast import models  # noqa: E402
from ffsd_fast.method import registry  # noqa: E402
from ffsd_fast.step import tuning  # noqa: E402
from ffsd_fast.step.cuda_graph import CapturedStep  # noqa: E402
from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates  # noqa: E402
from ffsd_fast.step.train_step import TrainStep  # noqa: E402
from ffsd_fast.trainer.runlog import commit_label  # noqa: E402
from tests.helpers.sequential_reference import make_reference_optimizers, reference_step  # noqa: E402

VARIANTS = (
    "reference",
    "one-backward",
    "amp",
    "channels-last",
    "cuda-graph",
    "compile",
    "triton-kernels",
    "fast",
    "fast-cudnn-blocks",
    "stacked",
    "stacked-cudnn-blocks",
    "fast-compiled",
    "stacked-compiled",
    "auto",
    "backbones-only",
)
# What ``--step auto`` chooses among, as the trainer does: per-network or stacked, Triton or cuDNN fusion blocks.
AUTO_CANDIDATES = ("fast", "fast-cudnn-blocks", "stacked", "stacked-cudnn-blocks")
# One lever of ``fast`` or ``stacked`` removed: the flags it overrides. ``torch_ops``: op files (``kernels/<file>.py``)
# whose functions run their PyTorch references while the other kernels stay on.
ABLATIONS = {
    "amp": {"amp": False},
    "channels-last": {"channels_last": False},
    "graph": {"cuda_graph": False},
    "triton": {"triton": False, "fused_blocks": False},
    "kl-kernel": {"torch_ops": ("kl_div", "mutual_kl")},
    "attention-kernel": {"torch_ops": ("attention",)},
    "diversity-kernel": {"torch_ops": ("diversity",)},
    "distance-kernel": {"torch_ops": ("distance_group",)},
    "maps-kernel": {"torch_ops": ("attention_group",)},
}
# The levers each base has: the grouped distance and map kernels run only in the stack; the other kernels in both.
ABLATED = {
    "fast": ("amp", "channels-last", "graph", "triton", "kl-kernel", "attention-kernel", "diversity-kernel"),
    "stacked": ("amp", "channels-last", "graph", "triton", "distance-kernel", "maps-kernel"),
}
VARIANTS += tuple(f"{base}-no-{lever}" for base, removed in ABLATED.items() for lever in removed)
DATASETS = {"cifar100": (32, 100), "imagenet": (224, 1000)}
LAMBDAS = (1e-5, 1000.0, 10.0)


def parse_workload(name: str) -> dict:
    try:
        dataset, model, m, b = name.split("-")
        assert m[0] == "m" and b[0] == "b" and dataset in DATASETS
        size, classes = DATASETS[dataset]
        return {
            "name": name,
            "dataset": dataset,
            "model": model,
            "m": int(m[1:]),
            "batch": int(b[1:]),
            "size": size,
            "classes": classes,
        }
    except (ValueError, AssertionError):
        raise SystemExit(
            f"workload {name!r}: expected DATASET-MODEL-mM-bB with DATASET one of "
            f"{', '.join(DATASETS)}, e.g. cifar100-resnet32-m2-b128"
        ) from None


def levers(variant: str, device: torch.device) -> dict:
    """The flags a variant turns on, over fp32 NCHW PyTorch losses."""
    gpu = device.type == "cuda"
    fast = {"amp": gpu, "channels_last": gpu, "triton": gpu, "cuda_graph": gpu}
    base, _, removed = variant.partition("-no-")
    if removed:  # an ablation: its base's flags with one lever overridden (off on a CPU, where fast has none)
        flags = {**levers(base, device), **ABLATIONS[removed]}
        return flags if gpu else {k: v for k, v in flags.items() if k != "torch_ops"}
    return {
        "one-backward": {},
        "amp": {"amp": True},
        "channels-last": {"channels_last": True},
        "cuda-graph": {"cuda_graph": True},
        "compile": {"compile": True},
        "triton-kernels": {"triton": True},
        "fast": fast,
        "fast-cudnn-blocks": {**fast, "fused_blocks": False},
        "stacked": {**fast, "stack": True},
        "stacked-cudnn-blocks": {**fast, "fused_blocks": False, "stack": True},
        # --step auto's compiled forms (torch.compile of the networks, of the stacks when stacked; captured on CUDA)
        "fast-compiled": {**fast, "compile": True},
        "stacked-compiled": {**fast, "stack": True, "compile": True},
        "backbones-only": fast,
    }[variant]


def ops_without(op_files: tuple[str, ...]) -> types.SimpleNamespace:
    """``ffsd_kernels`` with the public functions defined in ``kernels/<file>.py`` for each of ``op_files`` put back on
    their PyTorch references (``ffsd_kernels.reference``), every other op kept: one custom kernel removed."""
    modules = {f"ffsd_kernels.{name}" for name in op_files}
    swapped = {
        name: getattr(ffsd_kernels.reference, name)
        for name in ffsd_kernels.reference.__all__
        if getattr(ffsd_kernels, name).__module__ in modules
    }
    if not swapped:  # a renamed op file would otherwise make the ablation silently equal to fast
        raise ValueError(f"no ffsd_kernels op is defined in {', '.join(sorted(modules))}")
    return types.SimpleNamespace(**{**vars(ffsd_kernels), **swapped})


def auto_step(workload: dict, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``--step auto``'s pick among ``AUTO_CANDIDATES``, timed as the trainer times them (``step.tuning``) on a batch
    of the workload; the step returned carries the tuning's record (``.tuning``). A CPU has no CUDA clock: there the
    host's clock times them, which only checks the script."""
    images, labels = batch(workload, device)
    stackable = models.stack_blocker(workload["model"]) is None
    candidates = [v for v in AUTO_CANDIDATES if stackable or not v.startswith("stacked")]
    builders = {v: (lambda v=v: make_step(workload, v, device)) for v in candidates}
    clock = tuning.clock_for(device, steps=10) or host_clock(steps=10)
    result = tuning.choose(builders, lambda: (images, labels), clock)
    step = make_step(workload, result.choice, device)
    step.tuning = result
    return step


def host_clock(steps: int) -> tuning.Clock:
    def clock(name: str, run: Callable[[], None]) -> float:
        started = time.perf_counter()
        run()
        return (time.perf_counter() - started) / steps

    return clock


def views(workload: dict, variant: str) -> int:
    """The augmentations of each image in a batch of the variant's method (``Method.view_count``): KDCL's one per
    student; the FFSD reference's and the backbones' one."""
    if variant in ("reference", "backbones-only"):
        return 1
    return registry.get(workload.get("method", "ffsd")).view_count({"num_students": workload["m"]})


def batch(workload: dict, device: torch.device, variant: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    rows = workload["batch"] * views(workload, variant)
    images = torch.randn(rows, 3, workload["size"], workload["size"], device=device)
    return images, torch.randint(0, workload["classes"], (workload["batch"],), device=device)


def method_lambdas(name: str) -> tuple[float, ...]:
    """A method's λ's at their defaults (its ``options``), in its ``lambdas`` order."""
    cls = registry.get(name)
    return tuple(float(cls.options[n][1].default) for n in cls.lambdas)


def make_step(workload: dict, variant: str, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A function of one batch that runs one training step of the variant (and nothing else)."""
    if variant == "auto":
        return auto_step(workload, device)
    torch.manual_seed(0)
    if variant == "reference":
        nets = registry.create("ffsd", workload["model"], workload["classes"], workload["m"], workload["size"])
        nets = nets.to(device)
        optimizers = make_reference_optimizers(nets, lr=0.1, decoder_lr=1e-3)

        def reference(images: torch.Tensor, labels: torch.Tensor) -> None:
            losses = reference_step(nets, optimizers, images, labels, *LAMBDAS)
            [loss.item() for loss in losses]  # host sync: the reference logs every loss every step

        return reference
    flags = levers(variant, device)
    # workload["method"] (step_kernels.py --method): another method's step, FFSD's by default.
    chosen = workload.get("method", "ffsd")
    method, students = ("independent", workload["m"] + 1) if variant == "backbones-only" else (chosen, workload["m"])
    kernels = "triton" if flags.get("triton") else "torch"
    if flags.get("triton") and flags.get("torch_ops"):
        kernels = ops_without(flags["torch_ops"])
    fused = flags.get("fused_blocks", flags.get("triton", False))
    nets = registry.create(
        method,
        workload["model"],
        workload["classes"],
        students,
        workload["size"],
        fusion_kernel="triton" if fused else "torch",
        kernels=kernels,
        **workload.get("settings", {}),  # step_kernels.py --setting: the method's options
    ).to(device)
    if flags.get("channels_last"):
        nets = nets.to(memory_format=torch.channels_last)
    if flags.get("stack"):
        nets.stack()
    if flags.get("compile"):
        nets.compile_networks()
    optimizers = make_optimizers(nets)
    set_learning_rates(optimizers, 0.1, 1e-3)
    amp = torch.bfloat16 if flags.get("amp") else None
    lambdas = torch.tensor(LAMBDAS if method == "ffsd" else method_lambdas(method), device=device)
    stepper = TrainStep(nets.train(), optimizers, lambdas, amp, channels_last=flags.get("channels_last", False))
    return CapturedStep(stepper) if flags.get("cuda_graph") else stepper


def measure(step: Callable, workload: dict, device: torch.device, steps: int, warmup: int, window: int) -> dict:
    images = torch.randn(workload["batch"], 3, workload["size"], workload["size"], device=device)
    labels = torch.randint(0, workload["classes"], (workload["batch"],), device=device)
    for _ in range(warmup):
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    window_ms = []
    for start in range(0, steps, window):
        count = min(window, steps - start)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(count):
                step(images, labels)
            end.record()
            end.synchronize()
            window_ms.append(begin.elapsed_time(end) / count)
        else:
            begin_s = time.perf_counter()
            for _ in range(count):
                step(images, labels)
            window_ms.append((time.perf_counter() - begin_s) * 1e3 / count)
    step_ms = statistics.median(window_ms)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": workload["batch"] / (step_ms * 1e-3), "step_ms": step_ms, "peak_mem_mb": peak}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU model, where Linux says it
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def print_table(rows: list[dict]) -> None:
    print(f"\n{'workload':<28}{'variant':<26}{'images/s':>11}{'step ms':>10}{'peak MB':>10}{'vs reference':>14}")
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:<28}{r['variant']:<26} failed: {r['error'][:80]}")
            continue
        base = next(
            (x for x in rows if x["workload"] == r["workload"] and x["variant"] == "reference" and "error" not in x),
            None,
        )
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        print(
            f"{r['workload']:<28}{r['variant']:<26}{r['images_per_s']:>11.1f}{r['step_ms']:>10.2f}"
            f"{r['peak_mem_mb']:>10.0f}{ratio:>14}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--workload", default="cifar100-resnet32-m2-b128,imagenet-resnet18-m2-b256")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning, Triton JIT)")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window; the median window counts")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "train_throughput.jsonl"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if "triton-kernels" in variants and device.type == "cpu" and not os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "note: on a CPU without TRITON_INTERPRET=1 the triton-kernels variant runs the PyTorch references",
            file=sys.stderr,
        )
    meta = {
        "device": device_name(device),
        "run_id": uuid.uuid4().hex[:12],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit_label(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if device.type == "cpu" and "cuda-graph" in variants:
        print("note: cuda-graph needs a CUDA device: skipped", file=sys.stderr)
        variants.remove("cuda-graph")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for workload in map(parse_workload, args.workload.split(",")):
        for variant in variants:
            row = {**meta, "workload": workload["name"], "variant": variant}
            # A variant that fails (a compile or capture error) is recorded, and the others still get measured:
            # a GPU is rare here, and one run has to bring back every number it can.
            try:
                step = make_step(workload, variant, device)
                row |= measure(step, workload, device, args.steps, args.warmup, args.window)
                if hasattr(step, "tuning"):  # auto: what it timed and chose
                    row["auto"] = step.tuning.record()
                print(f"{workload['name']} {variant}: {row['images_per_s']:.1f} images/s", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{workload['name']} {variant} failed: {row['error']}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            with out.open("a") as fh:  # as measured, so a run cut short keeps what it measured
                fh.write(json.dumps(row) + "\n")
    print_table(rows)
    print(f"\n{len(rows)} rows appended to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
