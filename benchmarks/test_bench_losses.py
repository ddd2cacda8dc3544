"""pytest-benchmark suite for the distillation losses: public op vs its eager reference vs ``torch.compile``.

Run it explicitly (``pytest tests`` does not collect it; the project's testpaths is ``tests``)::

    python -m pytest benchmarks/test_bench_losses.py                      # timings, grouped by op and shape
    python -m pytest benchmarks/test_bench_losses.py --benchmark-disable  # each variant once, as a smoke test

Each group holds three variants side by side: ``public`` (what ``ffsd_kernels`` exports: the Triton kernels on CUDA,
the reference on a CPU), ``reference`` (the eager ``*_reference``) and ``compiled`` (``torch.compile`` of the
reference). Runs on CUDA when there is one, else on the CPU. The GPU sweep with the bandwidth floor and JSON lines is
``benchmarks/kernel_sweep.py``. ``compiled`` is skipped with the reason when
``torch.compile`` is unavailable or fails here (on a CPU it needs a C++ compiler).

On a CPU, ``FFSD_BENCH_THREADS=N`` sets torch's thread count (default: torch's own). On a small or shared machine
the intra-op thread pool can cost far more than these small ops (2 threads on 2 busy cores: ~20 ms for a [128, 100]
KL that takes ~0.2 ms on 1 thread), so ``FFSD_BENCH_THREADS=1`` gives the more telling numbers there. The thread
count is part of each group's name.
"""

import os
import shutil

import pytest
import torch

from ffsd_kernels import attention_distance, attention_distance_reference, kl_div_loss, kl_div_loss_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("FFSD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FFSD_BENCH_THREADS"]))
WHERE = "cuda" if DEVICE.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
VARIANTS = ["public", "reference", "compiled"]
KL_SHAPES = [(128, 100), (256, 1000)]
ATTENTION_SHAPE = (128, 64, 8, 8)
TEMPERATURE = 4.0


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _compile_unavailable_reason() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    compilers = (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")
    if DEVICE.type == "cpu" and not any(shutil.which(c) for c in compilers):
        return "torch.compile on the CPU needs a C++ compiler, none found"
    return None


def _variant(name: str, public, reference, *example_args):
    """The callable for one variant; ``compiled`` is compiled and run once here, or the test is skipped."""
    if name == "public":
        return public
    if name == "reference":
        return reference
    reason = _compile_unavailable_reason()
    if reason:
        pytest.skip(reason)
    compiled = torch.compile(reference, dynamic=False)
    try:
        expected = reference(*example_args)
        got = compiled(*example_args)
        _sync()
    except Exception as error:  # any compile/backend failure: skip with the cause, the eager variants still run
        pytest.skip(f"torch.compile failed on {DEVICE.type}: {type(error).__name__}: {str(error)[:200]}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    return compiled


def _forward_backward(fn, grad_inputs):
    def step(*args):
        for t in grad_inputs:
            t.grad = None
        fn(*args).backward()
        _sync()

    return step


def _forward(fn):
    def step(*args):
        fn(*args)
        _sync()

    return step


def _run(benchmark, step, *args):
    # One untimed call first: torch.compile builds the backward graph on the first backward, and pytest-benchmark
    # sizes its rounds from the first timed call, so without it the compiled fwd+bwd would get ~3 rounds.
    step(*args)
    benchmark(step, *args)


# ---------------------------------------------------------------------------------------------------------------
# kl_div_loss
# ---------------------------------------------------------------------------------------------------------------


def _logits(shape, requires_grad):
    torch.manual_seed(0)
    s = torch.randn(shape, device=DEVICE).requires_grad_(requires_grad)
    t = torch.randn(shape, device=DEVICE)
    return s, t


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kl_div_loss_forward(benchmark, shape, variant):
    benchmark.group = f"kl_div_loss fwd [{shape[0]},{shape[1]}] fp32 {WHERE}"
    s, t = _logits(shape, requires_grad=False)
    with torch.no_grad():
        fn = _variant(variant, kl_div_loss, kl_div_loss_reference, s, t, TEMPERATURE)
        _run(benchmark, _forward(fn), s, t, TEMPERATURE)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kl_div_loss_forward_backward(benchmark, shape, variant):
    benchmark.group = f"kl_div_loss fwd+bwd [{shape[0]},{shape[1]}] fp32 {WHERE}"
    s, t = _logits(shape, requires_grad=True)
    fn = _variant(variant, kl_div_loss, kl_div_loss_reference, s, t, TEMPERATURE)
    _run(benchmark, _forward_backward(fn, [s]), s, t, TEMPERATURE)
    assert s.grad is not None and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# attention_distance
# ---------------------------------------------------------------------------------------------------------------


def _feature_maps(layout, requires_grad):
    torch.manual_seed(0)
    x = torch.randn(ATTENTION_SHAPE, device=DEVICE)
    y = torch.randn(ATTENTION_SHAPE, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        y = y.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad), y


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_attention_distance_forward(benchmark, layout, variant):
    benchmark.group = f"attention_distance fwd [{','.join(map(str, ATTENTION_SHAPE))}] {layout} fp32 {WHERE}"
    x, y = _feature_maps(layout, requires_grad=False)
    with torch.no_grad():
        fn = _variant(variant, attention_distance, attention_distance_reference, x, y)
        _run(benchmark, _forward(fn), x, y)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_attention_distance_forward_backward(benchmark, layout, variant):
    benchmark.group = f"attention_distance fwd+bwd [{','.join(map(str, ATTENTION_SHAPE))}] {layout} fp32 {WHERE}"
    x, y = _feature_maps(layout, requires_grad=True)
    fn = _variant(variant, attention_distance, attention_distance_reference, x, y)
    _run(benchmark, _forward_backward(fn, [x]), x, y)
    assert x.grad is not None and torch.isfinite(x.grad).all()
