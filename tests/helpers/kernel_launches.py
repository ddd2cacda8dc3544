"""Record the Triton launches an op makes, and compile a recorded launch for an H100 without a GPU.

Patching ``run`` of Triton's kernel classes (``JITFunction``; ``InterpretedFunction`` under ``TRITON_INTERPRET=1``)
sees each launch with the arguments, constexprs and ``num_warps`` the launcher really passes. The interpreter
accepts code the compiler rejects, so each launch is also compiled, with Triton's own argument specialisation
(dtypes, 16-byte alignment, ints equal to 1), for ``sm_90``. Compiling needs a process where the interpreter is off
(with it on, Triton 3.8's code generator mis-handles loops): ``tests/kernels/test_compile.py`` starts one.
"""

import importlib
import inspect
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

H100 = GPUTarget("cuda", 90, 32)
# Tensor methods that wait for the device: none may run inside a step or a kernel launcher (CUDA-graph capture).
HOST_SYNCS = ("item", "tolist", "__bool__", "cpu", "nonzero", "__float__", "__int__", "numpy")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@dataclass
class Launch:
    kernel: JITFunction | InterpretedFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@contextmanager
def recorded_launches(monkeypatch: pytest.MonkeyPatch, execute: bool = True) -> Iterator[list[Launch]]:
    """Every Triton launch inside the block, in order; with ``execute=False`` the kernels do not run (outputs stay
    uninitialised), which is enough to see the launches of an op whose launch configuration reads no tensor data."""
    launches: list[Launch] = []

    def recorder(original):
        def run(self, *args, grid, warmup, **kwargs):
            launches.append(Launch(self, args, kwargs))
            if execute:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            return None

        return run

    with monkeypatch.context() as patch:
        for kind in (JITFunction, InterpretedFunction):
            patch.setattr(kind, "run", recorder(kind.run))
        yield launches


# Ops that launch nothing although their schema does not say so.
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}
SCHEMA_HIDDEN = {"_unsafe_view": "view", "_local_scalar_dense": "host copy", "lift_fresh": "host copy"}


def no_kernel_reason(func: torch._ops.OpOverload) -> str | None:
    """Why ``func`` launches no GPU kernel ("view", "allocation", "host copy", "profiler marker"), or None when it
    launches one: the rule of the kernel tests here and of ``benchmarks/step_kernels.py``."""
    schema = func._schema
    namespace, name = schema.name.split("::")
    if namespace == "profiler":  # record_function's markers (zero_grad, step)
        return "profiler marker"
    if name in ALLOCATIONS:
        return "allocation"
    if name in SCHEMA_HIDDEN:
        return SCHEMA_HIDDEN[name]
    if torch.Tag.inplace_view in func.tags:  # t_, unsqueeze_, as_strided_: metadata written, no data
        return "view"
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    aliases = all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    if schema.returns and aliases and not writes:
        return "view"
    return None


class AtenKernels(TorchDispatchMode):
    """The aten ops inside the block that launch a kernel (``ops``, by name, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if no_kernel_reason(func) is None:
            self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


@dataclass
class Kernels:
    """What ran inside a ``kernels_launched`` block: Triton kernels by name, and the aten ops that launch one."""

    triton: list[str]
    aten: list[str]


@contextmanager
def kernels_launched(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernels]:
    """Every Triton launch (recorded, not run: the interpreter's own torch ops are not the op's, and a launch reads
    no tensor data) and every launching aten op inside the block. Take gradients with ``torch.autograd.grad`` in
    it: the recorder holds each launch's arguments, so AccumulateGrad would copy a gradient instead of adopting it."""
    seen = Kernels([], [])
    with recorded_launches(monkeypatch, execute=False) as launches, AtenKernels() as aten:
        yield seen
    seen.triton[:] = [launch.name for launch in launches]
    seen.aten[:] = aten.ops


def forbid_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every host-synchronising tensor method raise until ``monkeypatch.undo()``.

    The CPU tensors of these tests stand in for CUDA ones. ``cross_entropy_kl_loss`` and
    ``fused_linear_distillation_loss`` read CPU labels to check their range (there is no device to wait for) and
    never CUDA ones, so that one read is switched off here, as on CUDA.
    """
    from ffsd_kernels import fused_linear

    kl_div = importlib.import_module("ffsd_kernels.kl_div")  # the module: ffsd_kernels.kl_div is the function

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for module in (kl_div, fused_linear):
        monkeypatch.setattr(module, "check_label_range", lambda *args: None)
    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, refuse)


def compile_for_h100(launch: Launch):
    """``triton.compile`` of one recorded launch for ``sm_90``: returns the compiled kernel (PTX and cubin)."""
    assert isinstance(launch.kernel, JITFunction), "compile in a process without TRITON_INTERPRET=1"
    fn = launch.kernel.fn
    parameters = inspect.signature(fn).parameters
    arguments = (
        inspect.signature(fn)
        .bind(*launch.args, **{k: v for k, v in launch.kwargs.items() if k in parameters})
        .arguments
    )
    options = {k: v for k, v in launch.kwargs.items() if k not in parameters}
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, parameter) in enumerate(parameters.items()):
        value = arguments.get(name, parameter.default)
        if "constexpr" in str(parameter.annotation):
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, attr = _specialize(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = attr
        elif attr:
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=H100, options=options)


def _specialize(value):
    # Triton's own specialisation of a launch argument (type, and "D" for 16-divisible/aligned), as jit does it.
    from triton._C.libtriton import native_specialize_impl

    return native_specialize_impl(BaseBackend, value, False, True, True)


@dataclass
class Resources:
    registers: int
    spill_stores: int
    spill_loads: int


def ptxas_resources(ptx: str, workdir: Path) -> Resources:
    """Registers and spills of the kernel in ``ptx`` as ``ptxas -v -arch=sm_90a`` reports them."""
    path = workdir / "kernel.ptx"
    path.write_text(ptx)
    result = subprocess.run(
        [str(PTXAS), "-v", "-arch=sm_90a", str(path), "-o", str(workdir / "kernel.cubin")],
        capture_output=True,
        text=True,
        check=True,
    )
    report = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert registers and spills, report
    return Resources(int(registers.group(1)), int(spills.group(1)), int(spills.group(2)))
