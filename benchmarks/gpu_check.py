"""One GPU call measures everything: ``make gpu-check``, sized for a 15-minute lease (done within 6 minutes on an H100
or H200), with the same script run on a CPU on tiny sizes by ``make test``.

    python3 benchmarks/gpu_check.py                                   # the GPU machine (make gpu-check)
    .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu      # the CPU dry run, into a temporary folder
    .venv/bin/python benchmarks/gpu_check.py --stamp                  # here, before a GPU run: writes .code_commit

Stages run in priority order, each a subprocess with its own time budget (seconds on an H100/H200, ``STAGES``); one
that overruns is interrupted (SIGINT, then SIGKILL 5 s later), recorded as ``timeout``, and what it wrote is kept.
A stage may use the time earlier ones left unused, never the time reserved for the stages after it, and the whole
run keeps within ``--budget``. Stages:

1. ``cuda-step`` (30 s): the CUDA tests of the training step (the captured step against the eager one, stacked
   on the Triton kernels too; the Triton step against the PyTorch one), alone, so that the step reports even if
   the rest runs out;
   ``cuda-tests`` (60 s): every other ``pytest -m cuda`` test, on 8 pytest-xdist workers where xdist imports;
   ``grouped-conv`` (20 s): ``grouped_conv.py``, one grouped convolution against its groups as dense ones at the
   stacked step's shapes (CIFAR ResNet-32, ImageNet ResNet-18), forward, input and weight gradient, bf16
   channels-last and fp32: whether stacking can pay on this GPU.
2. ``trainer-cifar`` (40 s) and ``trainer-stacked`` (25 s, ``--stack-networks``): ``ffsd-train`` with the device's
   defaults (on CUDA: Triton losses, bf16, channels-last, the captured step) on a CIFAR-100 tree in the official
   python format generated on the spot (``tests.helpers.write_cifar``): 2 epochs with evaluation and checkpoint,
   ``--resume`` to a third, ``ffsd-export``, ``ffsd-eval`` of the run and of the export. ``dali-wheels`` (40 s):
   where ``make gpu-wheels`` parts were carried to ``.gpu-wheels/`` and DALI does not import, they are joined,
   checked against ``SHA256SUMS`` and installed with ``pip install --no-deps --target``; skipped otherwise.
   ``trainer-imagenet`` (25 s): an ImageNet-style JPEG tree with one truncated file, trained one epoch through DALI
   (``mixed`` decoding on CUDA) where it imports, else torchvision; the corrupt file must be left out and named.
3. ``throughput-cifar`` (45 s) and ``throughput-imagenet`` (35 s): ``train_throughput.py`` over reference, fast,
   fast-cudnn-blocks, stacked, stacked-cudnn-blocks, auto (``--step auto``'s own pick among the four before it),
   backbones-only and (CIFAR) the ablation ``BASE-no-LEVER``; ``throughput-densenet`` (20 s): DenseNet-40's fast,
   stacked, auto and backbones-only.
4. ``kernel-sweep`` (30 s): ``kernel_sweep.py --shapes ffsd,llm --variants triton,eager``: eager time and GPU time
   inside a CUDA graph (``graph_ms``), at FFSD's shapes and three LLM ones.
5. ``step-kernels`` (15 s): the CPU count of the kernels one step launches, by phase (``step_kernels.py``, at batch
   8: the same count); ``profile`` (25 s): ``torch.profiler`` over the captured fast, stacked and
   fast-cudnn-blocks steps: kernels and GPU time per step, and per phase from the same stepper run eagerly under
   phase marks (and on the replay where its kernels are the eager step's, in order), beside that CPU count.
6. ``throughput-compiled`` (60 s, CUDA only): ``--step auto``'s compiled forms, ``fast-compiled`` and
   ``stacked-compiled`` (``torch.compile`` of the networks or stacks, then captured), on CIFAR ResNet-32; last, as
   their compile takes the longest.

Results (JSON lines, each row with device, torch, triton, ``code_commit`` and this run's ``gpu_check_run``), under
``--results`` (default ``benchmarks/results/``; with ``--tiny`` a temporary folder): ``gpu_check.jsonl`` (one row
per stage: status ok / failed / timeout / skipped, reason, seconds, budget), ``gpu_trainer.jsonl``,
``train_throughput.jsonl``, ``kernels-<device>-<commit>-gpu-check.jsonl``, ``step_kernels.jsonl``,
``gpu_profile.jsonl``; each stage's log, and the profiler traces, under ``logs/``. Where ``$OUT`` is set (the GPU
machine), the results folder is packed into ``$OUT/gpu-check-results.tar.gz`` after every stage, so that a command
cut short still brings back what ran. A summary table is printed last.

``code_commit`` is the commit of the tree that ran: ``FFSD_COMMIT`` where set, else ``.code_commit`` where its
fingerprint of the files matches this tree (``--stamp`` writes it here; carry it to the GPU machine, whose copy of
the tree has no trustworthy ``.git``: one run there recorded an older commit), else ``git``. Children get it as
``FFSD_COMMIT``, and rows written by the other scripts get it added.

With ``--tiny`` every stage runs on tiny sizes (a check of the script, not a measurement); the CUDA-only stages
(the CUDA tests, the profile, the DALI install) are recorded as skipped, with the reason.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ffsd_fast, and tests.helpers' dataset writers (benchmarks may import tests)
sys.path.insert(1, str(ROOT / "benchmarks"))  # train_throughput and step_kernels, for the profile

STAMP = ROOT / ".code_commit"
WHEELS = ROOT / ".gpu-wheels"
DALI_SITE = Path(tempfile.gettempdir()) / "ffsd-gpu-check-dali"
GRACE_S = 5.0
# The training step's CUDA tests, run first: a step that is wrong on the GPU makes every later stage's numbers moot.
STEP_TESTS = ("tests/unit/step/test_train_step.py", "tests/integration/test_step_parity.py")
THROUGHPUT_VARIANTS = (
    "reference",
    "fast",
    "fast-cudnn-blocks",
    "stacked",
    "stacked-cudnn-blocks",
    "auto",
    "backbones-only",
)
PROFILED = ("fast", "stacked", "fast-cudnn-blocks")
TINY_BUDGET_S = 180.0  # per stage on a CPU, where a shared machine can be slow; the sizes keep each to seconds


# ---------------------------------------------------------------------------------------------------------------
# The commit of the tree that runs
# ---------------------------------------------------------------------------------------------------------------


def code_files() -> list[str]:
    """What travels to the GPU machine (tracked and untracked-not-ignored files), less the results a run appends to."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [p for p in listed if not p.startswith("benchmarks/results/") and (ROOT / p).is_file()]


def fingerprint(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        file = ROOT / path
        digest.update(path.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"<missing>") + b"\0")
    return digest.hexdigest()


def write_stamp() -> dict:
    """``.code_commit``: the commit label and a fingerprint of the files, to carry with the tree to the GPU machine."""
    from ffsd_fast.trainer.runlog import commit_label

    files = code_files()
    stamp = {"code_commit": commit_label(), "fingerprint": fingerprint(files), "files": files, "date": now()}
    STAMP.write_text(json.dumps(stamp))
    return stamp


def code_commit() -> tuple[str, str]:
    """(the commit of the tree that runs, where it was read: FFSD_COMMIT, stamp, git or none)."""
    if os.environ.get("FFSD_COMMIT"):
        return os.environ["FFSD_COMMIT"], "FFSD_COMMIT"
    if STAMP.is_file():
        stamp = json.loads(STAMP.read_text())
        if fingerprint(stamp["files"]) == stamp["fingerprint"]:
            return stamp["code_commit"], "stamp"
        print(f"gpu-check: {STAMP.name} describes another tree (files changed since --stamp): ignored", file=sys.stderr)
    from ffsd_fast.trainer.runlog import commit_label

    label = commit_label()
    return label, "git" if label != "unknown" else "none"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------------------------------------------


class Context:
    """What the stages share: options, folders, the rows' metadata, the environment of the children."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import triton

        self.args = args
        self.tiny = args.tiny
        self.cuda = args.device == "cuda"
        self.python = sys.executable
        self.results = Path(args.results)
        self.logs = self.results / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="ffsd-gpu-check-"))  # generated data and runs
        commit, source = code_commit()
        device = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.meta = {
            "gpu_check_run": uuid.uuid4().hex[:12],
            "date": now(),
            "device": device,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "code_commit": commit,
            "code_commit_source": source,
        }
        self.slug = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()
        self.tag = f"{self.slug}-{commit[:12]}"
        self.env = {**os.environ, "FFSD_COMMIT": commit, "PYTHONUNBUFFERED": "1"}
        self.env.pop("TRITON_INTERPRET", None)  # set only where a stage asks for it (the CPU kernel sweep)

    def log(self, stage: str) -> Path:
        return self.logs / f"gpu-check-{self.tag}-{stage}.log"

    def run(self, stage: str, argv: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, bool]:
        """``argv`` in its own process group, output appended to the stage's log; (exit status, timed out). On
        timeout it gets SIGINT first (pytest then prints its summary; the scripts have written their rows already),
        SIGKILL after ``GRACE_S``; leftovers of the group (DataLoader workers) are killed either way."""
        with self.log(stage).open("a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            child = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
            timed_out = False
            try:
                child.wait(timeout=max(timeout, 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(child.pid, signal.SIGINT)
                try:
                    child.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return child.returncode, timed_out

    def worker(self, stage: str, name: str, timeout: float, *extra: str, env: dict | None = None) -> tuple:
        """This script's ``--worker name`` (a stage's in-process part) as a subprocess."""
        argv = [self.python, str(Path(__file__)), "--worker", name, "--device", self.args.device]
        argv += ["--results", str(self.results), "--workdir", str(self.work), "--run-id", self.meta["gpu_check_run"]]
        return self.run(stage, [*argv, *(["--tiny"] if self.tiny else []), *extra], timeout, env)


def status_of(rc: int | None, timed_out: bool) -> str:
    return "timeout" if timed_out else "ok" if rc == 0 else "failed"


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def adopt_rows(ctx: Context, written: Path, into: Path) -> list[dict]:
    """The rows another script wrote to ``written``, with this run's metadata added (its ``code_commit`` is the one
    to trust: the script's own ``commit`` comes from git), appended to ``into``."""
    rows = [
        {**r, **{k: ctx.meta[k] for k in ("gpu_check_run", "code_commit", "code_commit_source")}}
        for r in read_rows(written)
    ]
    append_rows(into, rows)
    return rows


def worker_rows(ctx: Context, file: str, stage: str) -> list[dict]:
    rows = read_rows(ctx.results / file)
    return [r for r in rows if r.get("gpu_check_run") == ctx.meta["gpu_check_run"] and r.get("stage") == stage]


# ---------------------------------------------------------------------------------------------------------------
# Stages: each (ctx, timeout) -> {"status", "reason", "detail"}
# ---------------------------------------------------------------------------------------------------------------


def parse_pytest(text: str) -> dict:
    """The counts of pytest's last summary line and the failing tests' ids."""
    counts = {}
    summaries = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    if summaries:
        for number, word in re.findall(
            r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summaries[-1]
        ):
            counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    failing = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)
    return {"counts": counts, "failing": failing[:30]}


def pytest_stage(ctx: Context, stage: str, timeout: float, argv: list[str]) -> dict:
    ctx.log(stage).write_text("")
    rc, timed_out = ctx.run(stage, [ctx.python, "-m", "pytest", *argv, "-q", "-rfE", "-p", "no:cacheprovider"], timeout)
    detail = parse_pytest(ctx.log(stage).read_text())
    status = status_of(rc, timed_out)
    if status == "ok" and not detail["counts"].get("passed"):
        status = "failed"  # nothing ran: the tests were not found, or all skipped
    counts = ", ".join(f"{n} {word}" for word, n in detail["counts"].items()) or "no summary"
    return {"status": status, "reason": counts, "detail": detail}


def stage_cuda_step(ctx: Context, timeout: float) -> dict:
    return pytest_stage(ctx, "cuda-step", timeout, [*STEP_TESTS, "-m", "cuda"])


def stage_cuda_tests(ctx: Context, timeout: float) -> dict:
    import importlib.util

    # Workers compile the Triton kernels in parallel (most of the 2 minutes one process took on an H100).
    workers = ["-n", "8", "--dist", "loadgroup"] if importlib.util.find_spec("xdist") else []
    ignored = [f"--ignore={path}" for path in STEP_TESTS]
    return pytest_stage(ctx, "cuda-tests", timeout, ["tests", "-m", "cuda", *ignored, *workers])


def stage_grouped_conv(ctx: Context, timeout: float) -> dict:
    """Grouped against dense convolution at the stacked step's shapes (``benchmarks/grouped_conv.py``)."""
    stage = "grouped-conv"
    ctx.log(stage).write_text("")
    written = ctx.work / "grouped_conv.jsonl"
    argv = [ctx.python, str(ROOT / "benchmarks" / "grouped_conv.py"), "--device", ctx.args.device]
    argv += ["--output", str(written), *(["--tiny", "--steps", "2", "--repeats", "1"] if ctx.tiny else [])]
    rc, timed_out = ctx.run(stage, argv, timeout)
    rows = adopt_rows(ctx, written, ctx.results / "grouped_conv.jsonl")
    slower = sorted({f"{r['channels']}ch {r['dtype']}" for r in rows if r["ratio"] > 1})
    reason = f"{len(rows)} shapes×passes timed; grouped slower than dense at: {', '.join(slower) or 'none'}"
    return {"status": status_of(rc, timed_out), "reason": reason, "detail": {"rows": len(rows)}}


def trainer_stage(ctx: Context, stage: str, timeout: float) -> dict:
    ctx.log(stage).write_text("")
    rc, timed_out = ctx.worker(stage, stage, timeout)
    rows = worker_rows(ctx, "gpu_trainer.jsonl", stage)
    checks = rows[-1]["checks"] if rows else {}
    status = status_of(rc, timed_out)
    failed = [name for name, c in checks.items() if not c["ok"]]
    reason = ", ".join(f"{name} {'ok' if c['ok'] else 'FAILED'}" for name, c in checks.items()) or "no checks ran"
    if failed:
        reason += f"; {checks[failed[0]].get('error', '')[:100]}"
    return {"status": status, "reason": reason, "detail": {"checks": checks}}


def stage_trainer_cifar(ctx: Context, timeout: float) -> dict:
    return trainer_stage(ctx, "trainer-cifar", timeout)


def stage_trainer_stacked(ctx: Context, timeout: float) -> dict:
    return trainer_stage(ctx, "trainer-stacked", timeout)


def dali_imports(env: dict) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import nvidia.dali.plugin.pytorch"], env=env, capture_output=True)
    return probe.returncode == 0


def stage_dali_wheels(ctx: Context, timeout: float) -> dict:
    """Joins the parts under ``.gpu-wheels/call-*/`` (``make gpu-wheels``), checks each wheel against SHA256SUMS and
    installs them into ``DALI_SITE``, which the ImageNet stage puts on ``PYTHONPATH``."""
    sums = sorted(WHEELS.glob("*/SHA256SUMS"))
    if not sums:
        return {"status": "skipped", "reason": "no DALI wheel parts in .gpu-wheels/ (make gpu-wheels, carried here)"}
    site_env = {"PYTHONPATH": os.pathsep.join(p for p in (str(DALI_SITE), ctx.env.get("PYTHONPATH")) if p)}
    if dali_imports({**ctx.env, **site_env}):
        ctx.env.update(site_env)
        return {"status": "skipped", "reason": "nvidia.dali imports already"}
    joined = ctx.work / "wheels"
    joined.mkdir(exist_ok=True)
    problems = []
    for line in sums[0].read_text().splitlines():
        digest, name = line.split()
        parts = sorted(WHEELS.glob(f"*/{name}.part-*"), key=lambda p: p.name)
        with (joined / name).open("wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        if hashlib.sha256((joined / name).read_bytes()).hexdigest() != digest:
            problems.append(f"{name}: {len(parts)} part(s) here, the joined file does not match SHA256SUMS")
    if problems:
        return {"status": "failed", "reason": f"incomplete wheels (carry every call-* folder): {problems[0]}"}
    argv = [ctx.python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile", "--upgrade"]
    rc, timed_out = ctx.run(
        "dali-wheels", [*argv, "--target", str(DALI_SITE), *map(str, joined.glob("*.whl"))], timeout
    )
    init = DALI_SITE / "nvidia" / "__init__.py"
    if rc == 0 and init.is_file():
        # Some of these wheels make ``nvidia`` a regular package, which would hide the image's own nvidia.* (CUDA
        # libraries) behind this folder: extend_path merges every ``nvidia/`` folder on sys.path into it.
        init.write_text(init.read_text() + "\n__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    if rc == 0 and not dali_imports({**ctx.env, **site_env}):
        return {"status": "failed", "reason": "installed, but nvidia.dali.plugin.pytorch does not import"}
    if rc == 0:
        ctx.env.update(site_env)
    return {"status": status_of(rc, timed_out), "reason": f"{len(list(joined.glob('*.whl')))} wheels into {DALI_SITE}"}


def stage_trainer_imagenet(ctx: Context, timeout: float) -> dict:
    return trainer_stage(ctx, "trainer-imagenet", timeout)


def throughput_stage(ctx: Context, stage: str, timeout: float, workload: str, variants: list[str], steps: list[str]):
    ctx.log(stage).write_text("")
    written = ctx.work / f"{stage}.jsonl"
    argv = [ctx.python, str(ROOT / "benchmarks" / "train_throughput.py"), "--device", ctx.args.device]
    argv += ["--workload", workload, "--variants", ",".join(variants), *steps, "--output", str(written)]
    rc, timed_out = ctx.run(stage, argv, timeout)
    rows = adopt_rows(ctx, written, ctx.results / "train_throughput.jsonl")
    measured = {r["variant"]: round(r["images_per_s"], 1) for r in rows if "images_per_s" in r}
    failed = [r["variant"] for r in rows if "error" in r]
    reason = f"{len(rows) - len(failed)}/{len(variants)} variants measured" + (
        f"; failed: {', '.join(failed)}" if failed else ""
    )
    status = status_of(rc, timed_out)
    if status == "ok" and (failed or len(rows) < len(variants)):
        status = "failed"
    return {"status": status, "reason": reason, "detail": {"images_per_s": measured, "workload": workload}}


def stage_throughput_cifar(ctx: Context, timeout: float) -> dict:
    import train_throughput

    ablation = [v for v in train_throughput.VARIANTS if "-no-" in v]
    if ctx.tiny:  # one of each kind: the levers are off on a CPU, so every ablation is fast there
        variants = ["reference", "fast", "stacked", "auto", "backbones-only", "fast-no-kl-kernel", "stacked-no-graph"]
        return throughput_stage(ctx, "throughput-cifar", timeout, "cifar100-resnet20-m2-b4", variants, _steps(2, 1, 1))
    variants = [*THROUGHPUT_VARIANTS, *ablation]
    return throughput_stage(ctx, "throughput-cifar", timeout, "cifar100-resnet32-m2-b128", variants, _steps(30, 5, 10))


def stage_throughput_imagenet(ctx: Context, timeout: float) -> dict:
    if ctx.tiny:
        return throughput_stage(
            ctx, "throughput-imagenet", timeout, "imagenet-resnet18-m2-b2", ["fast"], _steps(1, 1, 1)
        )
    workload = "imagenet-resnet18-m2-b256"
    return throughput_stage(ctx, "throughput-imagenet", timeout, workload, list(THROUGHPUT_VARIANTS), _steps(15, 3, 5))


def stage_throughput_densenet(ctx: Context, timeout: float) -> dict:
    # DenseNet-40: each network's channel concatenations stay in its own slice of the stack (models.stacking).
    if ctx.tiny:
        workload = "cifar100-densenet40-m2-b2"
        return throughput_stage(ctx, "throughput-densenet", timeout, workload, ["fast", "stacked"], _steps(1, 1, 1))
    variants = ["fast", "stacked", "auto", "backbones-only"]
    workload = "cifar100-densenet40-m2-b64"
    return throughput_stage(ctx, "throughput-densenet", timeout, workload, variants, _steps(20, 3, 5))


def stage_throughput_compiled(ctx: Context, timeout: float) -> dict:
    # --step auto's compiled forms, apart and last: Inductor's compile costs tens of seconds a form, which would
    # starve the stages before it; here it only decides how much of its budget is left to time them.
    variants = ["fast-compiled", "stacked-compiled"]
    workload = "cifar100-resnet32-m2-b128"
    return throughput_stage(ctx, "throughput-compiled", timeout, workload, variants, _steps(30, 5, 10))


def _steps(steps: int, warmup: int, window: int) -> list[str]:
    return ["--steps", str(steps), "--warmup", str(warmup), "--window", str(window)]


def stage_kernel_sweep(ctx: Context, timeout: float) -> dict:
    stage = "kernel-sweep"
    ctx.log(stage).write_text("")
    written = ctx.work / "sweep"
    sweep = str(ROOT / "benchmarks" / "kernel_sweep.py")
    argv = [ctx.python, sweep, "--device", ctx.args.device, "--out", str(written)]
    env = None
    if ctx.tiny:  # the Triton variant runs under the interpreter on a CPU
        argv += ["--quick", "--ops", "kl_div_loss,fusion_block", "--variants", "triton,eager"]
        env = {"TRITON_INTERPRET": "1"}
    else:
        argv += ["--shapes", "ffsd,llm", "--variants", "triton,eager"]
    rc, timed_out = ctx.run(stage, argv, timeout, env)
    rows = []
    for path in sorted(written.glob("*.jsonl")):
        rows += adopt_rows(ctx, path, ctx.results / f"kernels-{ctx.tag}-gpu-check.jsonl")
    graphed = [r for r in rows if r.get("graph_ms") is not None]
    failed = [f"{r['op']} {r['variant']}" for r in rows if "error" in r or "graph_error" in r]
    reason = f"{len(rows)} rows, {len(graphed)} with graph_ms" + (
        f"; failed: {', '.join(failed[:4])}" if failed else ""
    )
    if not ctx.cuda:
        reason += " (graph_ms: CUDA only)"
    return {"status": status_of(rc, timed_out), "reason": reason, "detail": {"rows": len(rows), "failed": failed}}


def stage_step_kernels(ctx: Context, timeout: float) -> dict:
    stage = "step-kernels"
    ctx.log(stage).write_text("")
    written = ctx.work / "step_kernels.jsonl"
    workload, variants = (
        ("cifar100-resnet20-m2-b2", "fast") if ctx.tiny else ("cifar100-resnet32-m2-b128", ",".join(PROFILED))
    )
    argv = [ctx.python, str(ROOT / "benchmarks" / "step_kernels.py"), "--workload", workload, "--variants", variants]
    rc, timed_out = ctx.run(stage, [*argv, "--batch", "2" if ctx.tiny else "8", "--output", str(written)], timeout)
    rows = adopt_rows(ctx, written, ctx.results / "step_kernels.jsonl")
    counts = {r["variant"]: r.get("kernels") for r in rows}
    return {"status": status_of(rc, timed_out), "reason": f"CPU-counted kernels per step: {counts}", "detail": counts}


def stage_profile(ctx: Context, timeout: float) -> dict:
    stage = "profile"
    ctx.log(stage).write_text("")
    rc, timed_out = ctx.worker(stage, stage, timeout, "--cpu-counts", str(ctx.work / "step_kernels.jsonl"))
    rows = worker_rows(ctx, "gpu_profile.jsonl", stage)
    parts = []
    for r in rows:
        if "error" in r:
            parts.append(f"{r['variant']} failed: {r['error'][:60]}")
            continue
        cpu = (r.get("cpu_counted") or {}).get("kernels", "-")
        captured = r["captured"]
        parts.append(
            f"{r['variant']}: {captured['kernels']} kernels, {captured['gpu_ms']:.2f} ms GPU (CPU count {cpu})"
        )
    status = status_of(rc, timed_out)
    if status == "ok" and (len(rows) < len(PROFILED) or any("error" in r for r in rows)):
        status = "failed"
    return {
        "status": status,
        "reason": "; ".join(parts) or "no rows",
        "detail": {"variants": [r["variant"] for r in rows]},
    }


# (name, budget on an H100/H200 in seconds, CUDA only, the stage): in priority order.
STAGES: list[tuple[str, float, bool, Callable[[Context, float], dict]]] = [
    ("cuda-step", 30, True, stage_cuda_step),
    ("cuda-tests", 60, True, stage_cuda_tests),
    ("grouped-conv", 20, False, stage_grouped_conv),
    ("trainer-cifar", 40, False, stage_trainer_cifar),
    ("trainer-stacked", 25, False, stage_trainer_stacked),
    ("dali-wheels", 40, True, stage_dali_wheels),
    ("trainer-imagenet", 25, False, stage_trainer_imagenet),
    ("throughput-cifar", 45, False, stage_throughput_cifar),
    ("throughput-imagenet", 35, False, stage_throughput_imagenet),
    ("throughput-densenet", 20, False, stage_throughput_densenet),
    ("kernel-sweep", 30, False, stage_kernel_sweep),
    ("step-kernels", 15, False, stage_step_kernels),
    ("profile", 25, True, stage_profile),
    ("throughput-compiled", 60, True, stage_throughput_compiled),  # CUDA only: Inductor's CPU compile takes minutes
]


def skip_reason(ctx: Context, name: str, cuda_only: bool) -> str | None:
    """Why a stage does not run here, decided before the run (so that its budget is not held for it)."""
    if cuda_only and not ctx.cuda:
        return "needs CUDA"
    if name == "dali-wheels" and not any(WHEELS.glob("*/SHA256SUMS")):
        return "no DALI wheel parts in .gpu-wheels/ (make gpu-wheels, carried here)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Workers: a stage's in-process part, run by ``--worker`` in a subprocess of its own
# ---------------------------------------------------------------------------------------------------------------


def run_checks(checks: list[tuple[str, Callable[[], dict]]]) -> dict:
    """Each check in order, timed; one that raises fails with its error, and the checks after it are not attempted
    (each needs the previous one's output). The stage's SIGINT at its budget's end fails the check running then, so
    that the row still says how far it came."""
    results = {}
    for name, check in checks:
        begin = time.perf_counter()
        try:
            results[name] = {"ok": True, **check()}
        except KeyboardInterrupt:
            results[name] = {"ok": False, "error": "interrupted: the stage's time budget ran out"}
        except Exception as exc:  # noqa: BLE001
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        results[name]["seconds"] = round(time.perf_counter() - begin, 1)
        print(f"{name}: {results[name]}", flush=True)
        if not results[name]["ok"]:
            break
    return results


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def worker_trainer(args: argparse.Namespace, stage: str) -> bool:
    import torch
    import yaml

    from ffsd_fast.cli.eval import main as eval_main
    from ffsd_fast.cli.export import main as export_main
    from ffsd_fast.cli.train import main as train_main
    from ffsd_fast.trainer import checkpoint
    from tests.helpers import write_cifar, write_folder

    work = Path(args.workdir) / stage
    data, run = work / "data", work / "runs" / "run"
    cuda = args.device == "cuda"
    common = ["--device", args.device, "--no-progress", "--output-dir", str(run.parent), "--run-name", run.name]
    if stage == "trainer-imagenet":
        classes = [f"n{i:03d}" for i in range(6)]  # at least 5: top-5 is reported
        write_folder(data, classes=classes, train=2 if args.tiny else 8, val=2)
        corrupt = data / "train" / classes[1] / "1.jpg"
        corrupt.write_bytes(corrupt.read_bytes()[:300])  # truncated: the header opens, the decode fails
        from ffsd_fast.data.dali_loader import dali_available

        loader = "dali" if dali_available() else "torchvision"
        size, batch, workers = ("32", "4", "0") if args.tiny else ("64", "16", "4")
        common += ["--imagenet", "--data-root", str(data), "--model", "resnet18", "--image-size", size]
        common += ["--batch-size", batch, "--workers", workers, "--loader", loader]
        epochs, n_test = 1, len(classes) * 2
    else:
        train, n_test, batch = (16, 8, 8) if args.tiny else (1000, 512, 128)  # 1000: a partial last batch, as 50000 has
        write_cifar(data, 100, train_per_file=train, test=n_test)
        common += ["--dataset", "cifar100", "--data-root", str(data), "--model", "resnet20", "--batch-size", str(batch)]
        common += ["--workers", "0" if args.tiny else "2"] + (
            ["--stack-networks"] if stage == "trainer-stacked" else []
        )
        epochs = 2
    facts: dict = {}

    def train() -> dict:
        expect(train_main([*common, "--epochs", str(epochs)]) == 0, "ffsd-train exited non-zero")
        summary = json.loads((run / "summary.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        levers = {
            k: config[k] for k in ("kernels", "amp", "channels_last", "cuda_graph", "fusion_kernel", "stack_networks")
        }
        if cuda:  # the GPU defaults, which this stage exists to run
            expect(levers["kernels"] == "triton" and levers["amp"] == "bf16", f"not the CUDA defaults: {levers}")
            expect(levers["channels_last"] and levers["cuda_graph"], f"not the CUDA defaults: {levers}")
        expect((run / "checkpoint.pt").is_file(), "no checkpoint.pt")
        evals = [
            r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"
        ]
        expect(evals == list(range(1, epochs + 1)), f"evaluations after epochs {evals}")
        facts["summary"] = summary
        found = {"levers": levers, "device": summary.get("device"), "leader_top1": summary.get("leader_top1")}
        if stage == "trainer-imagenet":
            expect(summary["corrupt_images"] == [str(corrupt)], f"corrupt images reported: {summary['corrupt_images']}")
            expect("leader_top5" in summary, "no top-5 on ImageNet")
            found |= {"loader": loader, "decoding": "mixed (GPU)" if loader == "dali" and cuda else "cpu"}
        return found

    def resume() -> dict:
        expect(
            train_main([*common, "--epochs", str(epochs + 1), "--resume", str(run)]) == 0, "--resume exited non-zero"
        )
        expect(checkpoint.load(str(run))["epoch"] == epochs + 1, "the resumed checkpoint is not at the next epoch")
        facts["summary"] = json.loads((run / "summary.json").read_text())
        return {"leader_top1": facts["summary"]["leader_top1"]}

    def export() -> dict:
        expect(export_main([str(run), "--out", str(work / "leader.pt")]) == 0, "ffsd-export exited non-zero")
        expect((work / "leader.pt.json").is_file(), "no sidecar beside the export")
        return {}

    def evaluate() -> dict:
        # Within one image of the test split: fp32 both times, but cuDNN may pick other algorithms.
        tolerance = 100.0 / n_test + 1e-6
        where = ["--device", args.device, "--data-root", str(data)]  # an export names its dataset, not where it is
        expect(eval_main([str(run), *where, "--json", str(work / "run.json")]) == 0, "ffsd-eval of the run failed")
        run_top1 = json.loads((work / "run.json").read_text())["leader_top1"]
        expect(abs(run_top1 - facts["summary"]["leader_top1"]) <= tolerance, f"ffsd-eval {run_top1} vs the run's")
        leader = [str(work / "leader.pt"), *where, "--json", str(work / "leader.json")]
        expect(eval_main(leader) == 0, "ffsd-eval of the export failed")
        export_top1 = json.loads((work / "leader.json").read_text())["top1"]
        expect(abs(export_top1 - run_top1) <= tolerance, f"the export's top-1 {export_top1} vs the run's {run_top1}")
        return {"run_top1": run_top1, "export_top1": export_top1, "summary_top1": facts["summary"]["leader_top1"]}

    steps = [("train", train)] + ([] if stage == "trainer-imagenet" else [("resume", resume)])
    checks = run_checks([*steps, ("export", export), ("eval", evaluate)])
    if cuda:
        torch.cuda.synchronize()
    append_rows(Path(args.results) / "gpu_trainer.jsonl", [{**worker_meta(args), "stage": stage, "checks": checks}])
    return all(c["ok"] for c in checks.values()) and len(checks) == len(steps) + 2


def worker_meta(args: argparse.Namespace) -> dict:
    import torch
    import triton

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    commit = os.environ.get("FFSD_COMMIT", "unknown")
    return {
        "gpu_check_run": args.run_id,
        "date": now(),
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "code_commit": commit,
    }


def gpu_activities(trace: Path) -> list[dict]:
    """The GPU activities (kernels, copies, fills) of a Chrome trace written by torch.profiler, in start order, each
    with the ``phase:`` mark around the host call that launched it (None where there is none)."""
    import bisect

    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    marks: dict[tuple, list[dict]] = {}
    for e in events:
        if e.get("cat") == "user_annotation" and e["name"].startswith("phase:"):
            marks.setdefault((e["pid"], e["tid"]), []).append(e)
    for thread in marks.values():
        thread.sort(key=lambda e: e["ts"])
    starts = {key: [e["ts"] for e in thread] for key, thread in marks.items()}
    found = []
    for e in sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"]
    ):
        phase = None
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is not None and (launch["pid"], launch["tid"]) in marks:
            key = (launch["pid"], launch["tid"])
            i = bisect.bisect_right(starts[key], launch["ts"]) - 1  # the marks do not nest: the last one begun
            if i >= 0 and launch["ts"] + launch.get("dur", 0) <= marks[key][i]["ts"] + marks[key][i]["dur"]:
                phase = marks[key][i]["name"].removeprefix("phase:")
        found.append({"name": e["name"], "kind": e["cat"], "us": float(e.get("dur", 0)), "phase": phase})
    return found


def by_phase(activities: list[dict]) -> dict:
    """Kernels and GPU milliseconds per ``phase.direction`` (``unattributed``: launched outside every mark)."""
    table: dict[str, dict] = {}
    for a in activities:
        if a["kind"] == "kernel":
            cell = table.setdefault(a["phase"] or "unattributed", {"kernels": 0, "gpu_ms": 0.0})
            cell["kernels"] += 1
            cell["gpu_ms"] = round(cell["gpu_ms"] + a["us"] / 1e3, 4)
    return dict(sorted(table.items()))


def traced(fn: Callable[[], None], steps: int, path: Path) -> list[dict]:
    """The GPU activities of ``steps`` calls of ``fn`` under torch.profiler; the trace is kept as ``path``.gz."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        pass  # the profiler's own start-up (CUPTI) outside the measured one
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    activities = gpu_activities(path)
    with path.open("rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return activities


def eager_activities(stepper, images, labels, path: Path) -> list[dict]:
    """One eager step of ``stepper`` (the captured one's: a partial batch runs it so) under the profiler, every aten
    op and Triton launch inside a ``phase:<phase>.<direction>`` mark from step_kernels' attribution."""
    import importlib

    from torch.profiler import record_function
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import JITFunction

    # Imported once triton is (train_throughput imported it): step_kernels then leaves TRITON_INTERPRET unset.
    step_kernels = importlib.import_module("step_kernels")
    attribution = step_kernels.Attribution()

    class PhaseMarks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            phase, direction = attribution.where()
            with record_function(f"phase:{phase}.{direction}"):
                return func(*args, **(kwargs or {}))

    launch = JITFunction.run

    def marked_launch(self, *args, **kwargs):
        phase, direction = attribution.where()
        with record_function(f"phase:{phase}.{direction}"):
            return launch(self, *args, **kwargs)

    JITFunction.run = marked_launch
    try:
        with step_kernels.attributed(stepper.method, attribution), PhaseMarks():
            return traced(lambda: stepper(images, labels), 1, path)
    finally:
        JITFunction.run = launch


def profile_variant(workload: dict, variant: str, logs: Path, prefix: str) -> dict:
    """Kernels and GPU time of the captured step of ``variant``, in total and by phase."""
    import torch
    import train_throughput as throughput

    device = torch.device("cuda")
    images = torch.randn(workload["batch"], 3, workload["size"], workload["size"], device=device)
    labels = torch.randint(0, workload["classes"], (workload["batch"],), device=device)
    captured = throughput.make_step(workload, variant, device)
    for _ in range(5):  # the capture, then replays
        captured(images, labels)
    steps = 3
    replay = traced(lambda: captured(images, labels), steps, logs / f"{prefix}-captured.json")
    kernels = [a for a in replay if a["kind"] == "kernel"]
    captured.step(images, labels)  # an eager warm-up: the first eager call of a captured step
    eager = eager_activities(captured.step, images, labels, logs / f"{prefix}-eager.json")
    eager_kernels = [a for a in eager if a["kind"] == "kernel"]
    per_step = len(kernels) // steps
    # A replay runs the captured kernels in launch order: where they are the eager step's, name by name, the eager
    # step's phases are the replay's.
    middle = kernels[per_step : 2 * per_step]
    same = len(kernels) == steps * len(eager_kernels) and [k["name"] for k in middle] == [
        k["name"] for k in eager_kernels
    ]
    phases = (
        by_phase([{**k, "phase": e["phase"]} for k, e in zip(middle, eager_kernels, strict=True)]) if same else None
    )
    return {
        "captured": {
            "steps": steps,
            "kernels": per_step,
            "gpu_ms": round(sum(k["us"] for k in kernels) / steps / 1e3, 4),
            "copies_and_fills": sum(a["kind"] != "kernel" for a in replay) // steps,
            "matches_eager": same,
            "phases": phases,
        },
        "eager": {
            "kernels": len(eager_kernels),
            "gpu_ms": round(sum(k["us"] for k in eager_kernels) / 1e3, 4),
            "phases": by_phase(eager),
        },
        "traces": [f"logs/{prefix}-captured.json.gz", f"logs/{prefix}-eager.json.gz"],
    }


def worker_profile(args: argparse.Namespace) -> bool:
    import torch
    import train_throughput as throughput

    torch.backends.cudnn.benchmark = True  # as the trainer and train_throughput run
    cpu_rows = {r["variant"]: r for r in read_rows(Path(args.cpu_counts))} if args.cpu_counts else {}
    workload = throughput.parse_workload("cifar100-resnet32-m2-b128")
    ok = True
    for variant in PROFILED:
        row = {**worker_meta(args), "stage": "profile", "workload": workload["name"], "variant": variant}
        try:
            row |= profile_variant(workload, variant, Path(args.results) / "logs", f"gpu-check-{args.run_id}-{variant}")
            if "kernels" in cpu_rows.get(variant, {}):
                cpu = cpu_rows[variant]
                row["cpu_counted"] = {"kernels": cpu["kernels"], "by_phase": cpu["totals"]["by_phase"]}
            print(f"{variant}: captured {row['captured']}, eager {row['eager']['kernels']} kernels", flush=True)
        except KeyboardInterrupt:  # the stage's budget ran out: say so, and stop
            append_rows(Path(args.results) / "gpu_profile.jsonl", [{**row, "error": "interrupted: out of time"}])
            return False
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"{variant} failed: {row['error']}", flush=True)
            ok = False
        append_rows(Path(args.results) / "gpu_profile.jsonl", [row])
        torch.cuda.empty_cache()
    return ok


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def pack_results(ctx: Context, out: Path) -> None:
    """The results folder as ``out/gpu-check-results.tar.gz``: what comes back from the GPU machine ($OUT)."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "gpu-check-results.tar.gz.part"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(ctx.results, arcname="results")
    partial.replace(out / "gpu-check-results.tar.gz")


def print_summary(ctx: Context, rows: list[dict]) -> str:
    lines = []
    throughput = [
        r
        for r in read_rows(ctx.results / "train_throughput.jsonl")
        if r.get("gpu_check_run") == ctx.meta["gpu_check_run"]
    ]
    if throughput:
        lines.append(f"\n{'workload':<28}{'variant':<28}{'images/s':>10}{'step ms':>9}{'vs fast':>9}")
        for r in throughput:
            if "error" in r:
                lines.append(f"{r['workload']:<28}{r['variant']:<28} failed: {r['error'][:60]}")
                continue
            fast = next(
                (
                    x
                    for x in throughput
                    if x["workload"] == r["workload"] and x["variant"] == "fast" and "error" not in x
                ),
                None,
            )
            ratio = f"{r['images_per_s'] / fast['images_per_s']:.2f}x" if fast else "-"
            lines.append(
                f"{r['workload']:<28}{r['variant']:<28}{r['images_per_s']:>10.1f}{r['step_ms']:>9.2f}{ratio:>9}"
            )
    meta = ctx.meta
    lines.append(
        f"\ngpu-check {meta['gpu_check_run']} on {meta['device']}: torch {meta['torch']}, triton {meta['triton']}, "
        f"code_commit {meta['code_commit']} (from {meta['code_commit_source']})"
    )
    lines.append(f"{'stage':<21}{'status':<9}{'seconds':>8}{'budget':>8}  result")
    for r in rows:
        lines.append(f"{r['stage']:<21}{r['status']:<9}{r['seconds']:>8.1f}{r['budget_s']:>8.0f}  {r['reason'][:150]}")
    total = sum(r["seconds"] for r in rows)
    lines.append(f"{'total':<21}{'':<9}{total:>8.1f}{ctx.args.budget:>8.0f}  results in {ctx.results}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda where there is one")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes, a check of the script (results: a temp folder)"
    )
    parser.add_argument(
        "--results", help="results folder (default: benchmarks/results, or a temporary one with --tiny)"
    )
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 330 on a GPU; 1200 --tiny)")
    parser.add_argument("--stages", default="", help="comma-separated stage names to run (default: all)")
    parser.add_argument("--stage-budget", action="append", default=[], metavar="STAGE=SECONDS", help="override one")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="pack the results here (default: $OUT, if set)")
    parser.add_argument("--stamp", action="store_true", help="write .code_commit for a run elsewhere, and stop")
    # A stage's in-process part, run by the stage in a subprocess of its own.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-counts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stamp:
        stamp = write_stamp()
        print(f"{STAMP.name}: {stamp['code_commit']} over {len(stamp['files'])} files; carry it with the run")
        return 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        done = worker_profile(args) if args.worker == "profile" else worker_trainer(args, args.worker)
        return 0 if done else 1
    names = [name for name, *_ in STAGES]
    selected = [s for s in args.stages.split(",") if s] or names
    if unknown := set(selected) - set(names):
        parser.error(f"unknown stages {sorted(unknown)}; known: {', '.join(names)}")
    overrides = dict(item.split("=", 1) for item in args.stage_budget)
    if unknown := set(overrides) - set(names):
        parser.error(f"--stage-budget: unknown stages {sorted(unknown)}")
    if args.results is None:
        args.results = (
            tempfile.mkdtemp(prefix="ffsd-gpu-check-tiny-") if args.tiny else str(ROOT / "benchmarks" / "results")
        )
    if args.budget is None:
        args.budget = 1200.0 if args.tiny else 330.0
    ctx = Context(args)
    deadline = time.monotonic() + args.budget
    plan = []
    for name, budget, cuda_only, stage in STAGES:
        budget = float(overrides.get(name, TINY_BUDGET_S if args.tiny else budget))
        reason = "not selected (--stages)" if name not in selected else skip_reason(ctx, name, cuda_only)
        plan.append((name, budget, stage, reason))
    rows = []
    try:
        for i, (name, budget, stage, reason) in enumerate(plan):
            remaining = deadline - time.monotonic()
            # Time that earlier stages left unused goes to this one; what the later stages need stays theirs.
            reserved = sum(b for _, b, _, r in plan[i + 1 :] if r is None)
            timeout = max(min(budget, remaining), remaining - reserved)
            if reason is None and timeout < 1:
                reason = "no time left in --budget"
            begin = time.monotonic()
            print(
                f"gpu-check: {name} (up to {timeout:.0f} s)"
                if reason is None
                else f"gpu-check: {name} skipped: {reason}",
                flush=True,
            )
            if reason is not None:
                result = {"status": "skipped", "reason": reason}
            else:
                try:
                    result = stage(ctx, timeout)
                except Exception as exc:  # noqa: BLE001 - a broken stage must not cost the others
                    result = {"status": "failed", "reason": f"gpu_check itself: {type(exc).__name__}: {exc}"[:300]}
            row = {**ctx.meta, "stage": name, "budget_s": budget, "timeout_s": round(max(timeout, 0), 1)}
            row |= {"seconds": round(time.monotonic() - begin, 1), "detail": {}, **result}
            if ctx.log(name).is_file():
                row["log"] = str(ctx.log(name).relative_to(ctx.results))
            rows.append(row)
            append_rows(ctx.results / "gpu_check.jsonl", [row])  # before the next stage starts
            if args.out:
                pack_results(ctx, Path(args.out))
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    text = print_summary(ctx, rows)
    if args.out:
        (Path(args.out) / "gpu-check-summary.txt").write_text(text + "\n")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
