"""``--step auto``: the step times its equivalent forms on the run's device and keeps the fastest, as
``cudnn.benchmark`` does for convolution algorithms.

A candidate is a way to build the same step (per-network or stacked networks, the cuDNN or the Triton fusion
blocks): the same arithmetic, other kernels. Which one is fastest depends on the GPU, cuDNN, the dtype and the
shapes (how cuDNN runs a grouped convolution, whether a Triton block beats cuDNN), so it is measured, never guessed.
Each candidate is built on copies of the run's tensors, run ``warmup`` steps (captured, when the step is), timed over
``steps`` steps by the clock, and thrown away: the run's own weights, optimiser state, statistics and scaler are never
touched, and the random generators are put back, so the run then computes exactly what it would have computed with
the chosen form fixed from the start.

Tuning is bounded: each candidate gets an equal share of ``budget_s``; one whose build and warm-up already used its
share is dropped, with the reason. Under ``torchrun`` every rank times every candidate and the choice is made on the
slowest rank's time of each, so that every rank builds the same form.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ffsd_fast.step.distributed import SINGLE_PROCESS, World, all_reduce_max

# seconds per step ← clock(candidate name, a function that runs the timed steps and returns when they are queued)
Clock = Callable[[str, Callable[[], None]], float]


def cuda_clock(steps: int) -> Clock:
    """Seconds per step, from CUDA events around the steps (the host waits once, at the end)."""

    def clock(name: str, run: Callable[[], None]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / steps

    return clock


def clock_for(device: torch.device, steps: int) -> Clock | None:
    """The clock that times candidates on ``device``; None where nothing is timed (a CPU: the fixed default form
    keeps a CPU run, the demo included, deterministic and quick to start)."""
    return cuda_clock(steps) if device.type == "cuda" else None


@dataclass
class Tuning:
    """What tuning measured and chose: seconds per step by candidate (the slowest rank's), the dropped ones with
    why, the tuning's own time and the peak memory it reached (bytes; 0 on a CPU)."""

    choice: str
    seconds_per_step: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory: int = 0

    def record(self) -> dict:
        return {
            "choice": self.choice,
            "ms_per_step": {k: v * 1e3 for k, v in self.seconds_per_step.items()},
            "dropped": self.dropped,
            "tuning_seconds": self.seconds,
            "tuning_peak_memory_mb": self.peak_memory / 2**20,
        }

    def table(self) -> str:
        best = self.seconds_per_step.get(self.choice, math.nan)
        lines = [f"step forms timed ({self.seconds:.1f} s, peak memory {self.peak_memory / 2**20:.0f} MiB):"]
        for name, seconds in self.seconds_per_step.items():
            mark = "  <- chosen" if name == self.choice else ""
            lines.append(f"  {name:<34}{seconds * 1e3:>9.2f} ms/step  {seconds / best:>5.2f}×{mark}")
        lines += [f"  {name:<34}dropped: {why}" for name, why in self.dropped.items()]
        return "\n".join(lines)


def _time_candidate(
    build: Callable[[], Callable],
    images: torch.Tensor,
    labels: torch.Tensor,
    clock: Clock,
    name: str,
    warmup: int,
    steps: int,
    share_s: float,
) -> float | str:
    """Seconds per step, or why the candidate was dropped."""
    started = time.perf_counter()
    try:
        step = build()
        for _ in range(warmup):
            step(images, labels)
        if time.perf_counter() - started > share_s:
            return f"its build and {warmup} warm-up steps took longer than its share of the budget ({share_s:.1f} s)"

        def run() -> None:
            for _ in range(steps):
                step(images, labels)

        return clock(name, run)
    except (RuntimeError, NotImplementedError) as error:  # out of memory, a form this device cannot run
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def choose(
    candidates: dict[str, Callable[[], Callable]],
    images: torch.Tensor,
    labels: torch.Tensor,
    clock: Clock,
    budget_s: float = 60.0,
    warmup: int = 3,
    steps: int = 10,
    world: World = SINGLE_PROCESS,
) -> Tuning:
    """Times every candidate (``name → build()``, which returns a step of the batch) on ``images, labels`` and
    returns the fastest; the first of ``candidates`` wins a tie and is the choice when all are dropped."""
    cuda = images.device.type == "cuda"
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(images.device)
    started = time.perf_counter()
    measured = {}
    share = budget_s / max(len(candidates), 1)
    for name, build in candidates.items():
        measured[name] = _time_candidate(build, images, labels, clock, name, warmup, steps, share)
        if cuda:
            torch.cuda.empty_cache()  # each candidate's graphs and stacks go with it
    # The slowest rank's time of each candidate (a drop anywhere is a drop everywhere: infinite).
    local = torch.tensor([v if isinstance(v, float) else math.inf for v in measured.values()], dtype=torch.float64)
    slowest = all_reduce_max(local.to(images.device), world).tolist()
    seconds = {n: s for n, s in zip(measured, slowest, strict=True) if math.isfinite(s)}
    dropped = {
        n: v if isinstance(v, str) else "dropped on another rank" for n, v in measured.items() if n not in seconds
    }
    choice = min(seconds, key=seconds.get) if seconds else next(iter(candidates))
    torch.set_rng_state(rng[0])
    if cuda:
        torch.cuda.set_rng_state_all(rng[1])
    peak = torch.cuda.max_memory_allocated(images.device) if cuda else 0
    return Tuning(choice, seconds, dropped, time.perf_counter() - started, peak)
