"""The forms a run's step can take, all computing the same thing, and how the run gets its own: fixed by ``--step``,
kept from the checkpoint on a resume, or timed on the device (``--step auto``, ``step.tuning``).

A form is per-network or stacked, compiled or not (``torch.compile`` of the networks, their stacks when stacked, as
``--compile`` does), and a value for each of the method's levers (``Method.levers``: FFSD's fusion blocks on cuDNN
or Triton) that the command did not set. ``apply`` turns the run's method, built per-network with
the command's settings, into the form's: rebuilt with the form's settings from the same state (weights and
statistics copied, so nothing changes but the kernels), then stacked when the form is.
"""

import copy
import dataclasses
import itertools
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from ffsd_fast.errors import UserError
from ffsd_fast.method import registry
from ffsd_fast.method.base import Method
from ffsd_fast.models import stack_blocker
from ffsd_fast.step import tuning
from ffsd_fast.step.cuda_graph import DDP_WARMUP_STEPS, CapturedStep
from ffsd_fast.step.distributed import World, data_parallel
from ffsd_fast.step.optimizers import make_optimizers
from ffsd_fast.step.train_step import TrainStep
from ffsd_fast.trainer.config import Config, check_combination, optimizer_spec

# What a run's compile passes to ``torch.compile`` (``Method.compile_networks``); a candidate compiles with
# ``fullgraph`` besides, so that a graph break drops it with the reason instead of timing a half-compiled form. Tests
# set ``backend="eager"``: Dynamo traces (and finds any break) without Inductor's minutes of C++ on a CPU.
COMPILE_OPTIONS: dict = {}


@dataclass(frozen=True)
class StepForm:
    stacked: bool
    settings: tuple[tuple[str, object], ...] = ()  # the method's levers, by name
    compiled: bool = False  # torch.compile of the networks (of their stacks, stacked), as --compile

    @property
    def name(self) -> str:
        words = ["stacked" if self.stacked else "per-network", *(f"{k}={v}" for k, v in self.settings)]
        return " ".join([*words, "compiled"] if self.compiled else words)

    def record(self) -> dict:
        return {"stacked": self.stacked, "settings": dict(self.settings), "compiled": self.compiled}

    @classmethod
    def from_record(cls, record: dict, compiled: bool) -> "StepForm":
        """The form a checkpoint saved (``compiled``: the run's ``--compile``, for a record from before forms
        compiled)."""
        return cls(record["stacked"], tuple(record["settings"].items()), bool(record.get("compiled", compiled)))


def _stacking_blocker(cfg: Config, world: World) -> str | None:
    """Why this run cannot be stacked, or None."""
    method = registry.get(cfg.method)
    if not method.stackable:
        return f"the {cfg.method} method does not stack"
    for model in method.stacked_models(cfg.model, dataclasses.asdict(cfg)):
        if (reason := stack_blocker(model)) is not None:
            return f"{model}: {reason}"
    return None


def candidates(cfg: Config, world: World, given: Collection[str]) -> tuple[list[StepForm], dict[str, str]]:
    """Every form ``--step auto`` times for this run (per-network first: it wins a tie; the compiled forms last,
    the costliest to build, so the first that the budget drops), and the forms left out with why. ``--compile`` or
    ``--no-compile`` fixes whether the forms compile."""
    method = registry.get(cfg.method)
    blocker = _stacking_blocker(cfg, world)
    stacked = [False] if blocker else [False, True]
    compiled = [cfg.compile] if "compile" in given or cfg.compile else [False, True]
    levers = {name: values for name, values in method.levers.items() if name not in given}
    fixed = {name: getattr(cfg, name) for name in method.levers if name in given}
    forms = [
        StepForm(s, tuple(sorted({**fixed, **dict(zip(levers, values, strict=True))}.items())), c)
        for c, s, values in itertools.product(compiled, stacked, itertools.product(*levers.values()))
    ]
    left_out = {"every stacked form": blocker} if blocker else {}
    for form in list(forms):
        try:
            check_combination(dataclasses.replace(cfg, **dict(form.settings)))
        except UserError as error:
            forms.remove(form)
            left_out[form.name] = str(error)
    return forms, left_out


def fixed_form(cfg: Config, stacked: bool) -> StepForm:
    """The form of ``--step per-network`` or ``stacked``: the method's levers and ``--compile`` as the configuration
    sets them."""
    levers = tuple(sorted((name, getattr(cfg, name)) for name in registry.get(cfg.method).levers))
    return StepForm(stacked, levers, cfg.compile)


def apply(method: Method, form: StepForm, cfg: Config) -> Method:
    """``method`` (per-network, unchanged) in ``form``: a new method with the form's settings and the same state."""
    settings = {**method.settings, **dict(form.settings)}
    if settings != method.settings:
        spec = method.spec
        rebuilt = registry.create(
            cfg.method, spec.model, spec.num_classes, spec.num_students, spec.image_size, **settings
        )
        rebuilt = rebuilt.to(next(method.parameters()).device)
        if cfg.channels_last:
            rebuilt = rebuilt.to(memory_format=torch.channels_last)
        rebuilt.load_state_dict(method.state_dict())
        method = rebuilt
    if form.stacked:
        method.stack()  # last: the networks' tensors become views into the stacks'
    return method


def make_step(
    cfg: Config,
    method: Method,
    optimizers: list,
    lambdas: torch.Tensor,
    amp: tuple[torch.dtype | None, torch.amp.GradScaler | None],
    world: World,
) -> TrainStep | CapturedStep:
    """The step of ``method``: DDP around it under torchrun, captured in a CUDA graph with ``--cuda-graph``."""
    ddp = (
        data_parallel(method, cfg.ddp_bucket_mb, cfg.grad_compression, for_capture=cfg.cuda_graph)
        if world.distributed
        else None
    )
    step = TrainStep(method, optimizers, lambdas, *amp, cfg.channels_last, module=ddp)
    if cfg.cuda_graph:
        return CapturedStep(step, DDP_WARMUP_STEPS) if world.distributed else CapturedStep(step)
    return step


def _candidate(cfg: Config, method: Method, form: StepForm, lambdas: torch.Tensor, amp, world: World) -> Callable:
    """A builder of ``form``'s step on copies of the run's method and optimiser state (the run's stay untouched)."""

    def build() -> Callable:
        copied = apply(copy.deepcopy(method), form, cfg)
        if form.compiled:
            copied.compile_networks(**COMPILE_OPTIONS, fullgraph=True)  # compiles at the first warm-up step
        scaler = copy.deepcopy(amp[1])
        return make_step(
            cfg, copied, make_optimizers(copied, optimizer_spec(cfg)), lambdas.clone(), (amp[0], scaler), world
        )

    return build


def tune(
    cfg: Config, method: Method, loader, lambdas: torch.Tensor, amp, world: World, given: Collection[str]
) -> tuple[StepForm, tuning.Tuning | None]:
    """``--step auto``'s form: timed on the loader's first batch where the device has a clock, else the per-network
    default. ``tuning.choose`` draws the batch and puts the random generators back."""
    forms, left_out = candidates(cfg, world, given)
    clock = tuning.clock_for(lambdas.device, steps=10)
    if clock is None or len(forms) == 1:
        return forms[0], None

    def first_batch() -> tuple[torch.Tensor, torch.Tensor]:
        loader.set_epoch(1)
        return next(iter(loader))

    builders = {form.name: _candidate(cfg, method, form, lambdas, amp, world) for form in forms}
    result = tuning.choose(builders, first_batch, clock, cfg.step_tuning_seconds, world=world)
    result.dropped.update(left_out)
    return next(f for f in forms if f.name == result.choice), result


def choose(
    cfg: Config,
    method: Method,
    saved: dict | None,
    loader,
    lambdas: torch.Tensor,
    amp,
    world: World,
    given: Collection[str],
) -> tuple[StepForm, tuning.Tuning | None]:
    """The run's form: a resumed run's own unless the command names one (``--step``, ``--stack-networks``; with
    ``--compile`` or ``--no-compile`` compiled as it says), the fixed one of ``--step per-network|stacked``, or the
    fastest of ``--step auto``."""
    if saved is not None and "step_form" in saved and not {"step", "stack_networks"} & set(given):
        try:
            form = StepForm.from_record(saved["step_form"], cfg.compile)
        except (KeyError, TypeError, AttributeError):
            raise UserError("the checkpoint's step_form is not one this version reads: resume with --step") from None
        return (dataclasses.replace(form, compiled=cfg.compile) if "compile" in given else form), None
    if cfg.step != "auto":
        return fixed_form(cfg, cfg.step == "stacked"), None
    return tune(cfg, method, loader, lambdas, amp, world, given)
