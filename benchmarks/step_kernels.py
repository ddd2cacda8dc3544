"""GPU kernels one FFSD training step launches, counted on a CPU, by phase and direction.

    .venv/bin/python benchmarks/step_kernels.py --workload cifar100-resnet32-m2-b128 --variants reference,fast
    .venv/bin/python benchmarks/step_kernels.py --workload imagenet-resnet18-m2-b256 --variants fast --batch 8
    .venv/bin/python benchmarks/step_kernels.py --method one --workload cifar100-resnet32-m3-b128 --variants stacked

``--method`` counts another method's step (its λ's at their defaults; the ``reference`` variant is FFSD's alone);
``--setting KEY=VALUE`` sets one of its options (a string, e.g. ``kdcl_ensemble=linear``).

Why: on a GPU the step runs as one CUDA graph, and the small CIFAR networks are bound by how many kernels it
launches, not by their arithmetic. This counts them without a GPU, for the workloads and variants of
``train_throughput.py`` (``parse_workload``; ``make_step``: the real ``TrainStep``, or the authors' sequential step).

What counts as a kernel:

* every aten op that reaches the backend, seen by a ``TorchDispatchMode`` (below autograd and autocast, so the
  backward's ops and autocast's casts are seen), except those that launch nothing on a GPU, decided from the op's
  schema: *views* (at least one output, every output aliases an input, no argument written: ``view``, ``t``,
  ``expand``, ``select``, ``detach``, ``split``, ...; in-place views tagged ``inplace_view``; ``_unsafe_view``, a
  view whose schema hides it), *allocations* without a fill (``empty``, ``empty_like``, ``empty_strided``,
  ``new_empty``, ...), *host copies* (``_local_scalar_dense``, i.e. ``.item()``: a device-to-host copy and a sync,
  not a kernel; ``lift_fresh``), and ``profiler::`` markers. Fills (``zeros``, ``ones_like``) and copies count.
  Two things only a CPU runs are set aside too: the fused losses' range check of CPU labels (``min``/``max`` and two
  ``.item()``; CUDA labels are not read), and ops on the step counts that a non-fused, non-capturable Adam (the
  reference's) keeps on the host on a GPU too ("host op"). Every op left out is reported (``excluded``, by reason);
* every Triton launch, seen by wrapping ``run`` of Triton's kernel classes under its interpreter
  (``TRITON_INTERPRET=1``, set here before triton is imported, runs the Triton path on CPU tensors). The kernels are
  launched but not run (``--run-triton`` runs them, slowly): a launch's configuration reads no tensor data (the step
  takes no host syncs, for the CUDA graph), so the count is the same (checked at b8: 1857 both ways).

One aten op is one launch site: on a GPU some launch more than one kernel (``convolution_backward`` runs cuDNN's
data- and weight-gradient kernels; a multi-tensor ``_foreach_*``/``_fused_*`` op launches one per few dozen
tensors), so the count is a lower bound on what ``nsys`` would list, and a like-for-like measure of what the code
asks for.

Phases: ``backbones`` (the students and the leader's backbone, or a branch method's trunk and branches; with
``--stack-networks``, the stack that runs them),
``decoders`` (the self-distillation decoders, their no-grad target passes included; stacked, their stack),
``fusion`` (the fusion module and the leader's trans-fusion head; a branch method's helpers, as ONE's gate),
``optimisers`` (``step`` and ``zero_grad``, and the method's ``after_step``, as PCL's temporal mean;
direction ``update``) and ``losses`` (everything else: the loss terms and their sum, the backward's seed gradient
and, with channels-last, the one copy of the batch into that layout). Forward ops are
attributed by forward pre/post hooks on those modules; backward ops by the autograd node that runs them
(``torch._C._current_autograd_node``): at a module's forward post-hook every node reachable from its outputs that no
module claimed yet becomes its own (the leader's head runs after its backbone, whose nodes are taken by then). A
gradient summed where two consumers meet (a tap read by the next layer and by a loss) is charged to the node that
delivers the second part. Each row lists any convolution, batch norm or fused fusion-block kernel, forward or
backward, that landed in losses or optimisers (``network_ops_in_losses``: empty when the attribution holds).

The step counted is the second one (the first creates the optimisers' state: momentum buffers, Adam moments), at
the workload's image size and by default its batch; ``--batch`` counts a smaller one, which gives the same count
(checked: cifar100-resnet32-m2 at b128 and b8, imagenet-resnet18-m2 at b8 and b4).

The GPU levers on a CPU: each variant gets the flags ``train_throughput.levers`` gives it on CUDA, less the CUDA
graph. channels-last, the Triton losses and the fused fusion blocks then run the same ops and launches as on CUDA.
bf16 autocast runs as CPU autocast, whose op lists differ from CUDA's: both cast the inputs of conv, conv-transpose
and linear to bf16 (the weights once per step, cached alike) and run cross-entropy, NLL and KL in fp32, but CUDA
also runs pow, exp, log, rsqrt, softmax and log-softmax (among others) in fp32, a cast more for each bf16 input.
Each amp row lists the ops that CUDA autocast would have cast and CPU autocast did not (``cuda_autocast_fp32_ops``:
empty means the CPU's casts are CUDA's), and every cast by phase, dtypes and the op that reads it first
(``casts``). Not counted: ``cuda-graph`` (the kernels of ``one-backward``, replayed as one graph) and ``compile``
(Inductor decides its kernels, and on a CPU it emits C++, not the Triton kernels it would launch on CUDA).

Output: a table per (workload, variant) and a summary; one JSON line each appended to ``--output``: device
``cpu (counted)``, torch, triton, commit, workload, variant, batch counted, levers, counts by phase and direction,
totals, the top aten ops, the Triton launches by kernel, every kernel by phase, the excluded ops, the casts and the
two checks.
"""

import os
import sys

# Before triton is first imported (by ffsd_kernels): the Triton losses then run, and are counted, on CPU tensors.
# Where triton is already in (this file loaded by a test), the environment is left alone and main checks.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import weakref  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # train_throughput, whose workloads and steps are counted

import torch  # noqa: E402
import train_throughput as throughput  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ffsd_fast.method.base import Method  # noqa: E402
from ffsd_fast.step.train_step import TrainStep  # noqa: E402
from ffsd_fast.trainer.runlog import commit_label  # noqa: E402
from ffsd_kernels._dispatch import INTERPRETER  # noqa: E402
from tests.helpers.kernel_launches import no_kernel_reason  # noqa: E402  (the rule the kernel tests count by)

PHASES = ("backbones", "decoders", "fusion", "losses", "optimisers")
DIRECTIONS = ("forward", "backward", "update")
# What train_throughput names and this tool does not count, and why.
NOT_COUNTED = {
    "cuda-graph": "the kernels of one-backward, replayed as one graph",
    "compile": "Inductor decides its kernels, and on a CPU it emits C++, not its CUDA Triton kernels",
    "auto": "the kernels of the form it picks, each of which is counted as its own variant",
}
VARIANTS = tuple(v for v in throughput.VARIANTS if v not in NOT_COUNTED)
DEFAULT_VARIANTS = ("reference", "one-backward", "fast")

# Kernels a network runs and a loss never does: the attribution check (the Triton ones: the fused fusion blocks).
NETWORK_OPS = {
    "convolution",
    "convolution_backward",
    "native_batch_norm",
    "native_batch_norm_backward",
    "_dw_forward_kernel",
    "_dw_backward_kernel",
    "_channel_stats_kernel",
    "_bn_forward_finish_kernel",
    "_affine_relu_kernel",
    "_bn_backward_finish_kernel",
}
# The aten ops (as the dispatcher sees them, below autocast) that CUDA autocast runs in fp32, and so casts a bf16
# input first; CPU autocast leaves them in bf16. From PyTorch's CUDA autocast fp32 list; sum and norm are left out:
# CUDA gives them an fp32 dtype argument, no separate cast.
CUDA_AUTOCAST_FP32 = {
    "_log_softmax",
    "_softmax",
    "acos",
    "asin",
    "binary_cross_entropy_with_logits",
    "cosh",
    "cumprod",
    "cumsum",
    "erfinv",
    "exp",
    "expm1",
    "kl_div",
    "log",
    "log10",
    "log1p",
    "log2",
    "mse_loss",
    "native_group_norm",
    "native_layer_norm",
    "nll_loss_forward",
    "pow",
    "prod",
    "reciprocal",
    "rsqrt",
    "sinh",
    "smooth_l1_loss",
    "softplus",
    "tan",
}


class Attribution:
    """The phase and direction of the op running now."""

    def __init__(self) -> None:
        self.forward_phases: list[str] = []  # the hooked modules running now, innermost last
        self.node_phases: dict[object, str] = {}  # autograd node -> the phase whose forward made it
        self.backward_depth = 0
        self.update_depth = 0

    def where(self) -> tuple[str, str]:
        if self.update_depth:
            return "optimisers", "update"
        node = torch._C._current_autograd_node()
        if self.backward_depth or node is not None:
            return self.node_phases.get(node, "losses"), "backward"
        return (self.forward_phases[-1] if self.forward_phases else "losses"), "forward"

    def claim(self, outputs: object, phase: str) -> None:
        """Give ``phase`` every autograd node reachable from ``outputs`` that no module claimed before."""
        pending = [t.grad_fn for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node is None or node in self.node_phases:
                continue
            self.node_phases[node] = phase
            pending.extend(next_node for next_node, _ in node.next_functions)


class KernelCounter(TorchDispatchMode):
    """Counts the aten ops that launch a kernel, by (phase, direction, op), and the ones that do not, by reason."""

    def __init__(self, attribution: Attribution) -> None:
        super().__init__()
        self.attribution = attribution
        self.kernels: Counter[tuple[str, str, str]] = Counter()
        self.excluded: Counter[tuple[str, str]] = Counter()
        self.casts: Counter[str] = Counter()
        self.cuda_autocast_fp32: Counter[str] = Counter()
        self.total = 0  # kept apart from ``kernels``, so that the phases can be checked to sum to it
        # Why the ops running now are set aside (innermost last): a reason is reported with them, None hides them
        # (the Triton interpreter's own torch ops, which are not the step's).
        self.aside: list[str | None] = []
        # Tensors that stay on the host on a GPU too (see ``host_tensors``): an op on them alone is no kernel.
        self.host: set[int] = set()
        # The forward runs under bf16 autocast (amp): then CUDA's fp32 ops with bf16 inputs are listed.
        self.autocast = False
        self._unread_casts: dict[int, tuple[str, weakref.ref]] = {}
        self._reasons: dict[torch._ops.OpOverload, str | None] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.aside:
            if self.aside[-1] is not None:
                self.excluded[(self.aside[-1], func._schema.name.split("::")[-1])] += 1
            return func(*args, **kwargs)
        if func not in self._reasons:
            self._reasons[func] = no_kernel_reason(func)
        name = func._schema.name.split("::")[-1]
        reason = self._reasons[func]
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if reason is None and self.host and tensors and all(t.data_ptr() in self.host for t in tensors):
            reason = "host op"
        phase, direction = self.attribution.where()
        if reason is not None:
            self.excluded[(reason, name)] += 1
        else:
            self.kernels[(phase, direction, name)] += 1
            self.total += 1
            # Autocast is on in the forward only (what backward runs follows from the forward's dtypes).
            bf16 = any(t.dtype == torch.bfloat16 for t in tensors)
            if self.autocast and direction == "forward" and name in CUDA_AUTOCAST_FP32 and bf16:
                self.cuda_autocast_fp32[f"{phase}.{direction} {name}"] += 1
        for t in tensors:  # the first op to read a cast's output says what the cast was for
            cast = self._unread_casts.get(id(t))
            if cast is not None and cast[1]() is t:
                del self._unread_casts[id(t)]
                self.casts[f"{cast[0]} for {name}"] += 1
        out = func(*args, **kwargs)
        if name == "_to_copy" and kwargs.get("dtype") not in (None, tensors[0].dtype):
            source, target = (str(d).removeprefix("torch.") for d in (tensors[0].dtype, kwargs["dtype"]))
            if (dead := self._unread_casts.get(id(out))) is not None:  # its id freed: that cast died unread
                self.casts[f"{dead[0]} unread"] += 1
            # A weak reference: holding the cast would change the step (AccumulateGrad copies a gradient that
            # something else holds instead of taking it).
            self._unread_casts[id(out)] = (f"{phase}.{direction} {source}->{target}", weakref.ref(out))
        return out

    def unread_casts(self) -> None:
        """Counts the casts that no op of the step read."""
        for key, _ in self._unread_casts.values():
            self.casts[f"{key} unread"] += 1
        self._unread_casts.clear()


@contextmanager
def set_aside(counter: KernelCounter, reason: str | None) -> Iterator[None]:
    counter.aside.append(reason)
    try:
        yield
    finally:
        counter.aside.pop()


@contextmanager
def triton_launches(counter: KernelCounter, execute: bool) -> Iterator[Counter[tuple[str, str, str]]]:
    """Every Triton launch inside the block, by (phase, direction, kernel); with ``execute=False`` the kernels do
    not run (their outputs stay uninitialised).

    Like ``tests/helpers/kernel_launches.recorded_launches``, ``run`` of Triton's kernel classes sees each launch,
    but only its phase and kernel are kept: holding a launch's arguments would change the step (AccumulateGrad
    copies a gradient that something else holds instead of taking it)."""
    launches: Counter[tuple[str, str, str]] = Counter()

    def recorder(original):
        def run(self, *args, **kwargs):
            launches[(*counter.attribution.where(), self.fn.__name__)] += 1
            if not execute:
                return None
            with set_aside(counter, None):
                return original(self, *args, **kwargs)

        return run

    saved = {kind: kind.run for kind in (JITFunction, InterpretedFunction)}
    try:
        for kind, original in saved.items():
            kind.run = recorder(original)
        yield launches
    finally:
        for kind, original in saved.items():
            kind.run = original


# Where the fused losses check CPU labels' range (the module, the function): patched wherever it is defined or
# imported by name.
LABEL_CHECKS = (
    ("ffsd_kernels.kl_div", "_check_labels"),
    ("ffsd_kernels.kl_div", "check_label_range"),
    ("ffsd_kernels._rows", "check_label_range"),
    ("ffsd_kernels.fused_linear", "check_label_range"),
    ("ffsd_kernels.logit_group", "_check_label_range"),
    ("ffsd_kernels.branch_group", "_check_label_range"),
)


@contextmanager
def cpu_only_checks(counter: KernelCounter) -> Iterator[None]:
    """Sets aside the label-range check of the fused losses, which reads CPU labels (reductions and host copies)
    and leaves CUDA labels alone (``ffsd_kernels._rows.check_label_range``)."""

    def aside(original):
        def check(*args, **kwargs):
            with set_aside(counter, "cpu-only label check"):
                return original(*args, **kwargs)

        return check

    patched = []
    for module_name, name in LABEL_CHECKS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            patched.append((module, name, getattr(module, name)))
            setattr(module, name, aside(getattr(module, name)))
    try:
        yield
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


def host_tensors(optimizers: list[torch.optim.Optimizer]) -> set[int]:
    """The step counts that PyTorch keeps on the host, on a GPU too, for an optimiser neither fused nor capturable
    (the reference's Adams): ``step += 1`` on them launches nothing there."""
    host = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if group.get("fused") or group.get("capturable"):
                continue
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor):
                    host.add(step.data_ptr())
    return host


def phase_modules(method: Method) -> dict[str, list[nn.Module]]:
    """The modules each phase's forward runs in: the backbones (every group of networks but the decoders, and
    their stacks), the decoders (and their stack), and FFSD's fusion module and trans-fusion head."""
    groups, stacks = method.stack_groups(), getattr(method.form, "stacks", {})
    leader = getattr(method, "leader", None)
    # A branch method's shared trunk (backbone layers), and any other of its trunks (PCL's temporal mean's).
    trunks = [module for name, module in method.named_children() if name.endswith("trunk")]
    # A branch method's gate and the like: its helpers that are not networks of a group (OKDDip's leader is both).
    grouped = {id(m) for group in groups.values() for m in group}
    helpers = [m for m in (method.helpers() if hasattr(method, "helpers") else []) if id(m) not in grouped]
    return {
        "backbones": [m for name, group in groups.items() if name != "decoders" for m in group]
        + [stack for name, stack in stacks.items() if name != "decoders"]
        + trunks,
        "decoders": [*groups.get("decoders", []), *([stacks["decoders"]] if "decoders" in stacks else [])],
        "fusion": [m for m in (getattr(method, "fusion", None), getattr(leader, "head", None)) if m is not None]
        + helpers,
    }


@contextmanager
def attributed(nets: Method, attribution: Attribution) -> Iterator[None]:
    """Hooks that tell ``attribution`` which phase and direction run, for as long as the block lasts."""

    def enter(phase: str):
        def hook(module, args):
            attribution.forward_phases.append(phase)

        return hook

    def leave(phase: str):
        def hook(module, args, output):
            attribution.forward_phases.pop()
            if torch.is_grad_enabled():
                attribution.claim(output, phase)

        return hook

    @contextmanager
    def depth(name: str):
        setattr(attribution, name, getattr(attribution, name) + 1)
        try:
            yield
        finally:
            setattr(attribution, name, getattr(attribution, name) - 1)

    def counted(method: Callable, name: str) -> Callable:
        def wrapper(*args, **kwargs):
            with depth(name):
                return method(*args, **kwargs)

        return wrapper

    def update_begins(optimizer, args, kwargs):
        attribution.update_depth += 1

    def update_ends(optimizer, args, kwargs):
        attribution.update_depth -= 1

    backward, zero_grad = torch.autograd.backward, torch.optim.Optimizer.zero_grad
    with ExitStack() as stack:
        for phase, modules in phase_modules(nets).items():
            for module in modules:
                stack.enter_context(module.register_forward_pre_hook(enter(phase)))
                stack.enter_context(module.register_forward_hook(leave(phase), always_call=True))
        # Every optimiser of the step (the fused pair, or the reference's one per network): global hooks.
        stack.enter_context(register_optimizer_step_pre_hook(update_begins))
        stack.enter_context(register_optimizer_step_post_hook(update_ends))
        # Tensor.backward calls torch.autograd.backward: the seed gradient is made there, before any node runs.
        torch.autograd.backward = counted(backward, "backward_depth")
        torch.optim.Optimizer.zero_grad = counted(zero_grad, "update_depth")
        # The method's work after the optimisers (PCL's temporal mean) is part of the update.
        nets.after_step = counted(nets.after_step, "update_depth")
        try:
            yield
        finally:
            torch.autograd.backward, torch.optim.Optimizer.zero_grad = backward, zero_grad
            del nets.after_step
            attribution.node_phases.clear()  # lets the step's graph go


def gpu_levers(variant: str, levers: Callable[[str, torch.device], dict] = throughput.levers) -> dict:
    """The flags ``variant`` has on CUDA (``train_throughput.levers``), less the graph capture (the same kernels)."""
    if variant == "reference":
        return {}
    return {k: v for k, v in levers(variant, torch.device("cuda")).items() if k != "cuda_graph"}


def cpu_step(workload: dict, variant: str) -> Callable:
    """``throughput.make_step`` on the CPU with the levers the variant has on CUDA: its ``levers`` turns the GPU
    ones off on a CPU, where this tool counts them, so it is swapped for ``gpu_levers`` while the step is built."""
    levers = throughput.levers
    throughput.levers = lambda name, device: gpu_levers(name, levers)
    try:
        return throughput.make_step(workload, variant, torch.device("cpu"))
    finally:
        throughput.levers = levers


def count_step(workload: dict, variant: str, run_triton: bool = False) -> dict:
    """The kernels of the second step of ``variant`` on a batch of ``workload``'s shape (``run_triton``: the Triton
    kernels run in the interpreter, rather than only being launched)."""
    step = cpu_step(workload, variant)
    if isinstance(step, TrainStep):
        nets, optimizers = step.method, step.optimizers
    else:  # the reference's closure
        captured = inspect.getclosurevars(step).nonlocals
        nets, optimizers = captured["nets"], tree_leaves(captured["optimizers"])
    generator = torch.Generator().manual_seed(0)
    size = workload["size"]
    # A method with views of its own (KDCL) reads [V·B, 3, H, W]: V views of the batch's B images.
    images = torch.randn(workload["batch"] * throughput.views(workload, variant), 3, size, size, generator=generator)
    labels = torch.randint(0, workload["classes"], (workload["batch"],), generator=generator)
    attribution = Attribution()
    counter = KernelCounter(attribution)
    with triton_launches(counter, run_triton) as launches:
        step(images, labels)  # the first step: optimiser state, lazy initialisation
        launches.clear()
        counter.host = host_tensors(optimizers)
        counter.autocast = isinstance(step, TrainStep) and step.amp_dtype is not None
        with attributed(nets, attribution), cpu_only_checks(counter), counter:
            step(images, labels)
    counter.unread_casts()
    return summarise(counter, launches)


def summarise(counter: KernelCounter, launches: Counter[tuple[str, str, str]]) -> dict:
    # Every kernel by (phase, direction, name): the aten ops, and the Triton launches as "triton:<kernel>".
    kernels = counter.kernels + Counter({(p, d, f"triton:{name}"): n for (p, d, name), n in launches.items()})
    counts = {phase: dict.fromkeys(DIRECTIONS, 0) for phase in PHASES}
    by_phase: dict[str, Counter[str]] = {}
    for (phase, direction, name), n in kernels.items():
        counts[phase][direction] += n
        by_phase.setdefault(f"{phase}.{direction}", Counter())[name] += n
    total = counter.total + sum(launches.values())
    by_direction = {d: sum(counts[p][d] for p in PHASES) for d in DIRECTIONS}
    assert sum(by_direction.values()) == total, "the phases do not add up to the total"
    ops: Counter[str] = Counter()
    for (_, _, name), n in counter.kernels.items():
        ops[name] += n
    triton_kernels: Counter[str] = Counter()
    for (_, _, name), n in launches.items():
        triton_kernels[name] += n
    misattributed = {
        f"{phase}.{direction} {name}": n
        for (phase, direction, name), n in kernels.items()
        if phase in ("losses", "optimisers") and name.removeprefix("triton:") in NETWORK_OPS
    }
    excluded: dict[str, dict[str, int]] = {}
    for (reason, name), n in sorted(counter.excluded.items()):
        excluded.setdefault(reason, {})[name] = n
    return {
        "kernels": total,
        "aten_ops": counter.total,
        "triton_launches": sum(launches.values()),
        "counts": counts,
        "totals": {"by_direction": by_direction, "by_phase": {p: sum(counts[p].values()) for p in PHASES}},
        "top_ops": ops.most_common(15),
        "triton_by_kernel": dict(triton_kernels.most_common()),
        # Where to look when cutting kernels: every kernel of each phase and direction, most frequent first.
        "kernels_by_phase": {key: dict(by_phase[key].most_common()) for key in sorted(by_phase)},
        "excluded": excluded,
        "casts": dict(sorted(counter.casts.items())),
        "cuda_autocast_fp32_ops": dict(sorted(counter.cuda_autocast_fp32.items())),
        "network_ops_in_losses": misattributed,
    }


def print_row(row: dict) -> None:
    print(
        f"\n{row['workload']} {row['variant']} (batch {row['batch_counted']} counted): {row['kernels']} kernels "
        f"= {row['aten_ops']} aten ops + {row['triton_launches']} Triton launches"
    )
    print(f"{'phase':<12}" + "".join(f"{d:>10}" for d in DIRECTIONS) + f"{'total':>10}")
    for phase in PHASES:
        cells = row["counts"][phase]
        print(f"{phase:<12}" + "".join(f"{cells[d]:>10}" for d in DIRECTIONS) + f"{sum(cells.values()):>10}")
    totals = row["totals"]["by_direction"]
    print(f"{'total':<12}" + "".join(f"{totals[d]:>10}" for d in DIRECTIONS) + f"{row['kernels']:>10}")
    if row["network_ops_in_losses"]:
        print(f"warning: network ops attributed outside the networks: {row['network_ops_in_losses']}")
    if row["levers"].get("amp"):
        fp32 = row["cuda_autocast_fp32_ops"] or "none"
        print(f"{sum(row['casts'].values())} casts; bf16 inputs that CUDA autocast would cast to fp32 too: {fp32}")


def print_summary(rows: list[dict]) -> None:
    print(f"\n{'workload':<28}{'variant':<19}{'batch':>6}" + "".join(f"{p:>11}" for p in PHASES) + f"{'total':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:<28}{r['variant']:<19} failed: {r['error'][:80]}")
            continue
        phases = r["totals"]["by_phase"]
        print(
            f"{r['workload']:<28}{r['variant']:<19}{r['batch_counted']:>6}"
            + "".join(f"{phases[p]:>11}" for p in PHASES)
            + f"{r['kernels']:>8}"
        )


def count_all(workloads: list[dict], variants: list[str], args: argparse.Namespace, meta: dict, out: Path) -> list:
    rows = []
    for workload in workloads:
        counted = {**workload, "batch": args.batch or workload["batch"]}
        for variant in variants:
            row = {**meta, "workload": workload["name"], "variant": variant, "batch_counted": counted["batch"]}
            row["image_size"] = workload["size"]
            row["triton_kernels_run"] = args.run_triton
            row["levers"] = gpu_levers(variant)
            begin = time.perf_counter()
            try:  # a variant that fails is recorded, and the others are still counted
                row |= count_step(counted, variant, args.run_triton)
                print_row(row)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{workload['name']} {variant} failed: {row['error']}", file=sys.stderr)
            row["wall_s"] = round(time.perf_counter() - begin, 1)
            rows.append(row)
            with out.open("a") as fh:  # as counted, so a run cut short keeps what it counted
                fh.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="cifar100-resnet32-m2-b128")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--method", default="ffsd", help="the method whose step is counted (default ffsd; reference: ffsd's only)"
    )
    parser.add_argument("--batch", type=int, help="count this batch instead of the workload's (the same count)")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of --method's, as a string (e.g. kdcl_ensemble=linear); repeat for several",
    )
    parser.add_argument(
        "--run-triton", action="store_true", help="run the Triton kernels in the interpreter (slow; the same count)"
    )
    # The count does not depend on it; with two or more, oneDNN's threads waited on each other on a shared machine's
    # busy cores (a CIFAR conv took 30 ms instead of 0.6 ms).
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "step_kernels.jsonl"))
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for variant in [v for v in variants if v in NOT_COUNTED]:
        print(f"note: {variant} not counted: {NOT_COUNTED[variant]}", file=sys.stderr)
        variants.remove(variant)
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if not INTERPRETER:  # triton was imported before this module set TRITON_INTERPRET
        raise SystemExit("step_kernels: Triton's interpreter is off (TRITON_INTERPRET=1 before triton is imported)")
    workloads = [throughput.parse_workload(name) for name in args.workload.split(",")]
    if args.method != "ffsd":
        if "reference" in variants:
            raise SystemExit("step_kernels: the reference variant is FFSD's sequential step; drop it for --method")
        workloads = [{**w, "method": args.method, "name": f"{w['name']}-{args.method}"} for w in workloads]
    if args.setting:
        if any("=" not in s for s in args.setting):
            raise SystemExit(f"step_kernels: --setting takes KEY=VALUE, got {args.setting}")
        settings = dict(s.split("=", 1) for s in args.setting)
        suffix = "-".join(args.setting)
        workloads = [{**w, "settings": settings, "name": f"{w['name']}-{suffix}"} for w in workloads]
    meta = {
        "device": "cpu (counted)",
        "run_id": uuid.uuid4().hex[:12],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit_label(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": "the second (warm) step",
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = count_all(workloads, variants, args, meta, out)
    finally:  # as it was, for a caller in this process (a test)
        torch.set_num_threads(threads)
    print_summary(rows)
    print(f"\n{len(rows)} rows appended to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
