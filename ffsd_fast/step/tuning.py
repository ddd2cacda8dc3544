"""``--step auto``: the step times its equivalent forms on the run's device and keeps the fastest, as
``cudnn.benchmark`` does for convolution algorithms.

A candidate is a way to build the same step (per-network or stacked networks, the cuDNN or the Triton fusion
blocks, with or without ``torch.compile``): the same arithmetic, other kernels (Inductor's fused kernels round
differently, so a compiled form is the same up to rounding). Which one is fastest depends on the GPU, cuDNN, the
dtype and the shapes (how cuDNN runs a grouped convolution, whether a Triton block beats cuDNN), so it is measured,
never guessed. Each candidate is built on copies of the run's tensors, run ``warmup`` steps (captured, when the step
is), timed over ``steps`` steps by the clock, and thrown away: the run's own weights, optimiser state, statistics and
scaler are never touched, and the random generators are put back (here, in ``choose``, and nowhere else), so the run
then computes exactly what it would have computed with the chosen form fixed from the start.

Tuning is bounded: each candidate gets its share of what is left of ``budget_s`` (``choose``); one whose build and
warm-up already used its share is dropped, with the reason, and so is one whose turn comes after the budget is spent.
The bound is the budget plus the overrun of the one candidate running when it ran out (a build or a warm-up step is
not interrupted). Under ``torchrun`` every rank times every candidate, the budget's verdicts are the slowest rank's,
and the choice is made on the slowest rank's time of each, so that every rank builds the same form.
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
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # host seconds: build_s, warmup_s, timed_s

    def record(self) -> dict:
        return {
            "choice": self.choice,
            "ms_per_step": {k: v * 1e3 for k, v in self.seconds_per_step.items()},
            "dropped": self.dropped,
            "tuning_seconds": self.seconds,
            "tuning_peak_memory_mb": self.peak_memory / 2**20,
            "phase_seconds": self.phases,
        }

    def table(self) -> str:
        best = self.seconds_per_step.get(self.choice, math.nan)
        lines = [f"step forms timed ({self.seconds:.1f} s, peak memory {self.peak_memory / 2**20:.0f} MiB):"]
        width = max(map(len, [*self.seconds_per_step, *self.dropped, ""])) + 2
        for name, seconds in self.seconds_per_step.items():
            mark = "  <- chosen" if name == self.choice else ""
            lines.append(f"  {name:<{width}}{seconds * 1e3:>9.2f} ms/step  {seconds / best:>5.2f}×{mark}")
        lines += [f"  {name:<{width}}dropped: {why}" for name, why in self.dropped.items()]
        return "\n".join(lines)


# The host's seconds, for the budget and the phases' costs (tests inject their own).
HostClock = Callable[[], float]


def _agreed(seconds: float, device: torch.device, world: World) -> float:
    """The slowest rank's ``seconds``: every rank then takes the same branch (a rank that dropped a candidate the
    others time would leave them waiting in its collectives)."""
    return all_reduce_max(torch.tensor([seconds], dtype=torch.float64, device=device), world).item()


def _time_candidate(
    build: Callable[[], Callable],
    images: torch.Tensor,
    labels: torch.Tensor,
    clock: Clock,
    name: str,
    plan: tuple[int, int, float],
    now: HostClock,
    world: World,
) -> tuple[float | str, dict[str, float]]:
    """(seconds per step or why the candidate was dropped, the host seconds of its phases: build, warm-up, timed)."""
    warmup, steps, share_s = plan
    phases = {}
    started = now()
    try:
        step = build()
        phases["build_s"] = now() - started
        for _ in range(warmup):
            step(images, labels)
        phases["warmup_s"] = now() - started - phases["build_s"]
        if _agreed(now() - started, images.device, world) > share_s:
            why = f"its build and {warmup} warm-up steps took longer than its share of the budget ({share_s:.1f} s)"
            return why, phases

        def run() -> None:
            for _ in range(steps):
                step(images, labels)

        timed_started = now()
        seconds = clock(name, run)
        phases["timed_s"] = now() - timed_started
        return seconds, phases
    except (RuntimeError, NotImplementedError) as error:  # out of memory, a graph break, a form this device cannot run
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", phases


def _rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


def choose(
    candidates: dict[str, Callable[[], Callable]],
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    clock: Clock,
    budget_s: float = 60.0,
    warmup: int = 3,
    steps: int = 10,
    world: World = SINGLE_PROCESS,
    now: HostClock = time.perf_counter,
) -> Tuning:
    """Times every candidate (``name → build()``, which returns a step of the batch) on the batch that ``batch()``
    draws and returns the fastest; the first of ``candidates`` wins a tie and is the choice when all are dropped.

    The one place that puts the random generators back: as they were before the batch was drawn, whatever the batch,
    the builds and the steps drew. The budget: each candidate may use what is left of it divided among the candidates
    still to time, so a candidate that finishes early leaves its time to the later ones, and the last ones (the
    costly ``torch.compile`` forms, which the caller puts last) are the first dropped when it runs out."""
    rng = _rng_states()
    started = now()
    images, labels = batch()
    cuda = images.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(images.device)
    measured, phases = {}, {}
    for index, (name, build) in enumerate(candidates.items()):
        share = (budget_s - _agreed(now() - started, images.device, world)) / (len(candidates) - index)
        if share <= 0:
            measured[name] = f"the budget ({budget_s:.1f} s) was spent before its turn"
            continue
        plan = (warmup, steps, share)
        measured[name], phases[name] = _time_candidate(build, images, labels, clock, name, plan, now, world)
        torch._dynamo.reset()  # a compiled candidate's code goes with it (and leaves no recompilation to count)
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
    _set_rng_states(rng)
    peak = torch.cuda.max_memory_allocated(images.device) if cuda else 0
    return Tuning(choice, seconds, dropped, now() - started, peak, phases)
