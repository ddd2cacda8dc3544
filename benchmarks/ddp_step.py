"""Step time of data-parallel FFSD training, one process against several, gradient synchronisation against
gradient synchronisation, in one run.

    python benchmarks/ddp_step.py                                   # CPU, gloo: 1 and 2 processes, every variant
    python benchmarks/ddp_step.py --device cuda --procs 1,2,4,8     # one process per GPU, NCCL

Each process count is one set of processes (started by torchrun, as the trainer is; gloo on the CPU, NCCL with one
GPU per process), and each process times every variant in turn on synthetic batches of the workload's shape
(``DATASET-MODEL-mM-bB[-sS]``: B images per process, as ``--batch-size`` is in the trainer). Variants:

* ``none``: the step with no synchronisation at all (the ranks drift apart): the floor;
* ``averager``: the hand-made ``GradientAverager`` that the trainer used before DDP (kept here, and only here, for
  this comparison): one all-reduce per ~64 MiB bucket after the backward, nothing overlapped. With one process it
  does nothing, as in the trainer;
* ``ddp``: the trainer's synchronisation: one DDP around a module that holds every network and computes the losses
  (``ffsd_fast.step.distributed.data_parallel``): static graph, gradients as bucket views, ``--bucket-mb`` buckets;
* ``ddp-per-network``: the design not taken: one DDP per network (students, decoders, fusion module, leader), the
  same settings;
* ``ddp-bf16``: ``ddp`` with ``--grad-compression bf16``;
* ``ddp-buffer-sync``: ``ddp`` with DDP's broadcast of rank 0's buffers before every forward on (the trainer has it
  off: see ``ffsd_fast/step/distributed.py``), to show what it would cost.

With one process, the DDP variants run over a one-process group: the trainer does not build DDP then, so those rows
show DDP's bookkeeping alone. The variants take turns, one window of ``--window`` steps each, so that a change in
the machine's load reaches them alike; a window's time is its slowest rank's, and a variant's step time is its
median window (wall clock, after a device synchronisation on a GPU). One JSON line per (process count, variant) is
appended to ``--output``: device, backend, world_size, workload, variant, step_ms (median window), best_ms (fastest
window), windows_ms, images_per_s (over every process), vs_none (the speed against ``none`` at that world size),
torch, triton, commit, date, run_id. A table is printed last.
"""

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from ffsd_fast.method import registry  # noqa: E402
from ffsd_fast.method.base import Method  # noqa: E402
from ffsd_fast.step.distributed import NO_FORWARD_BUFFER_SYNC, data_parallel  # noqa: E402
from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates  # noqa: E402
from ffsd_fast.step.train_step import TrainStep  # noqa: E402
from ffsd_fast.trainer.runlog import commit_label  # noqa: E402

VARIANTS = ("none", "averager", "ddp", "ddp-per-network", "ddp-bf16", "ddp-buffer-sync")
LAMBDAS = (1e-5, 1000.0, 10.0)
SIZES = {"cifar10": (32, 10), "cifar100": (32, 100), "imagenet": (224, 1000)}


class GradientAverager:
    """The trainer's gradient synchronisation before DDP, verbatim but for its bucket constant: every gradient
    replaced by its mean over the ranks, coalesced into ~64 MiB buckets per dtype and device, one ``all_reduce``
    each, after the backward."""

    BUCKET_BYTES = 64 * 2**20

    def __init__(self, parameters: list[torch.nn.Parameter], world_size: int) -> None:
        self.parameters, self.world_size = [p for p in parameters if p.requires_grad], world_size

    def _buckets(self) -> list[list[torch.Tensor]]:
        buckets, current, size, key = [], [], 0, None
        for p in self.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad_key = (p.grad.dtype, p.grad.device)
            if current and (grad_key != key or size + p.grad.numel() * p.grad.element_size() > self.BUCKET_BYTES):
                buckets.append(current)
                current, size = [], 0
            current.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            key = grad_key
        return buckets + ([current] if current else [])

    def __call__(self) -> None:
        if self.world_size == 1:
            return
        for grads in self._buckets():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def parse_workload(name: str) -> dict:
    """``cifar100-resnet20-m2-b32`` → its dataset, model, m, batch per process, image size and classes; an optional
    ``-sS`` last sets the image size (``imagenet-resnet18-m2-b8-s64``: ImageNet's networks, 64 px inputs)."""
    parts = name.split("-")
    size_part = parts.pop() if len(parts) == 5 and parts[4][:1] == "s" and parts[4][1:].isdigit() else None
    if len(parts) != 4 or parts[0] not in SIZES or not parts[2][1:].isdigit() or not parts[3][1:].isdigit():
        raise SystemExit(f"workload {name!r}: expected DATASET-MODEL-mM-bB[-sS], e.g. cifar100-resnet20-m2-b32")
    size, classes = SIZES[parts[0]]
    return {
        "name": name,
        "model": parts[1],
        "m": int(parts[2][1:]),
        "batch": int(parts[3][1:]),
        "size": int(size_part[1:]) if size_part else size,
        "classes": classes,
    }


def per_network(nets: Method, device: torch.device, bucket_mb: int) -> nn.Module:
    """A shallow copy of ``nets`` in which every network (the leader's backbone and head each) is its own DDP, with
    the trainer's settings; its forward is the step's losses over them."""

    def wrap(module: nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(
            module,
            device_ids=[device] if device.type == "cuda" else None,
            bucket_cap_mb=bucket_mb,
            static_graph=True,
            gradient_as_bucket_view=True,
            **NO_FORWARD_BUFFER_SYNC,
        )

    def view_of(module: nn.Module, **children: nn.Module) -> nn.Module:
        view = copy.copy(module)
        view._modules = {**module._modules, **children}
        view.__dict__.pop("_form", None)  # the view's networks run through its own form
        return view

    leader = view_of(nets.leader, backbone=wrap(nets.leader.backbone), head=wrap(nets.leader.head))
    return view_of(
        nets,
        students=nn.ModuleList(wrap(s) for s in nets.students),
        decoders=nn.ModuleList(wrap(d) for d in nets.decoders),
        leader_decoder=wrap(nets.leader_decoder),
        fusion=wrap(nets.fusion),
        leader=leader,
    )


def make_step(variant: str, workload: dict, device: torch.device, world_size: int, bucket_mb: int) -> Callable:
    torch.manual_seed(0)
    nets = registry.create("ffsd", workload["model"], workload["classes"], workload["m"], workload["size"])
    nets = nets.to(device).train()
    optimizers = make_optimizers(nets)
    set_learning_rates(optimizers, 0.05, 1e-3)
    lambdas = torch.tensor(LAMBDAS, device=device)
    module, averager = None, None
    if variant == "averager":
        averager = GradientAverager(list(nets.parameters()), world_size)
    elif variant in ("ddp", "ddp-bf16"):
        module = data_parallel(nets, bucket_mb, "bf16" if variant == "ddp-bf16" else "none")
    elif variant == "ddp-buffer-sync":  # data_parallel's DDP, but for DDP's default buffer broadcast
        module = DistributedDataParallel(
            nets,
            device_ids=[device] if device.type == "cuda" else None,
            bucket_cap_mb=bucket_mb,
            static_graph=True,
            gradient_as_bucket_view=True,
        )
    elif variant == "ddp-per-network":
        module = per_network(nets, device, bucket_mb)
    stepper = TrainStep(nets, optimizers, lambdas, module=module)
    if averager is None:
        return stepper

    def averaged(images: torch.Tensor, labels: torch.Tensor) -> None:
        # The step with the averager: backward, then the averager, then the optimisers.
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        nets(images, labels, lambdas).total.backward()
        averager()
        for optimizer in optimizers:
            optimizer.step()

    return averaged


def time_window(step: Callable, images: torch.Tensor, labels: torch.Tensor, count: int) -> float:
    """Milliseconds per step over ``count`` steps."""
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    begin = time.perf_counter()
    for _ in range(count):
        step(images, labels)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    return (time.perf_counter() - begin) * 1e3 / count


def worker(args: argparse.Namespace) -> None:
    """One rank's part, under torchrun: every variant timed, rank 0's rows (every rank's slowest) to ``--rows-to``."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.set_num_threads(args.threads)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    rows = []
    variants = args.variants.split(",")
    for workload in map(parse_workload, args.workload.split(",")):
        images = torch.randn(workload["batch"], 3, workload["size"], workload["size"], device=device)
        labels = torch.randint(0, workload["classes"], (workload["batch"],), device=device)
        steps = {v: make_step(v, workload, device, world_size, args.bucket_mb) for v in variants}
        for step in steps.values():
            for _ in range(args.warmup):
                step(images, labels)
        # The variants take turns, one window each: a change in the machine's load (a shared CPU) reaches them all
        # alike instead of whichever ran then.
        windows = {v: [] for v in variants}
        for _ in range(max(1, args.steps // args.window)):
            for variant, step in steps.items():
                windows[variant].append(time_window(step, images, labels, args.window))
        for variant in variants:
            # A window takes as long as its slowest rank (the variants that synchronise wait for it anyway).
            slowest = torch.tensor(windows[variant], device=device if backend == "nccl" else "cpu")
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            step_ms = statistics.median(slowest.cpu().tolist())
            best_ms = min(slowest.cpu().tolist())
            rows.append(
                {
                    "backend": backend,
                    "world_size": world_size,
                    "workload": workload["name"],
                    "variant": variant,
                    "step_ms": step_ms,
                    "images_per_s": world_size * workload["batch"] / (step_ms * 1e-3),
                    # The fastest window: on a shared machine, the least disturbed by other work.
                    "best_ms": best_ms,
                    "windows_ms": [round(w, 2) for w in slowest.cpu().tolist()],
                    "threads_per_process": args.threads,
                    "bucket_mb": args.bucket_mb,
                    "steps_per_window": args.window,
                }
            )
        del steps
    if rank == 0:
        Path(args.rows_to).write_text(json.dumps(rows))
    dist.destroy_process_group()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'workload':<28}{'procs':>6}  {'variant':<18}{'step ms':>10}{'best ms':>10}{'images/s':>11}{'vs none':>9}"
    )
    for r in rows:
        print(
            f"{r['workload']:<28}{r['world_size']:>6}  {r['variant']:<18}{r['step_ms']:>10.1f}{r['best_ms']:>10.1f}"
            f"{r['images_per_s']:>11.1f}{r['vs_none']:>9}"
        )


def launch(world_size: int, args: argparse.Namespace, rows_to: str) -> None:
    """This script's worker on ``world_size`` processes, as the trainer runs: under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    command += [str(Path(__file__).resolve()), "--rows-to", rows_to]
    for name in ("device", "workload", "variants", "steps", "warmup", "window", "bucket_mb", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{world_size} process(es) failed:\n{result.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--procs", default="1,2", help="process counts, each one set of processes")
    parser.add_argument("--workload", default="cifar100-resnet20-m2-b32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (in windows, taking turns)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (DDP's first iterations)")
    parser.add_argument("--window", type=int, default=2, help="steps per timed window; the median window counts")
    parser.add_argument("--bucket-mb", type=int, default=25, help="DDP bucket size (the trainer's --ddp-bucket-mb)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "ddp_step.jsonl"))
    parser.add_argument("--rows-to", help=argparse.SUPPRESS)  # set by ``launch``: this process is one rank
    args = parser.parse_args(argv)
    if args.rows_to:
        worker(args)
        return
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    for name in args.workload.split(","):
        parse_workload(name)
    procs = [int(p) for p in args.procs.split(",")]
    if args.device == "cuda" and max(procs) > torch.cuda.device_count():
        raise SystemExit(f"--procs {args.procs}: this machine has {torch.cuda.device_count()} GPU(s), one per process")
    meta = {
        "device": device_name(args.device),
        "run_id": uuid.uuid4().hex[:12],
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": commit_label(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for world_size in procs:
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "rows.json")
            launch(world_size, args, result)
            measured = json.loads(Path(result).read_text())
        floor = {r["workload"]: r["step_ms"] for r in measured if r["variant"] == "none"}
        for row in measured:
            # The speed against the unsynchronised step at this world size: what the synchronisation costs.
            row["vs_none"] = f"{floor[row['workload']] / row['step_ms']:.2f}x" if row["workload"] in floor else "-"
            rows.append({**meta, **row})
            with out.open("a") as fh:  # as measured, so a run cut short keeps what it measured
                fh.write(json.dumps(rows[-1]) + "\n")
    print_table(rows)
    print(f"\n{len(rows)} rows appended to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
