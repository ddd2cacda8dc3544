"""The GPU sweep of the ``ffsd_kernels`` ops: Triton vs PyTorch eager vs ``torch.compile``, beside the bandwidth floor.

    python benchmarks/kernel_sweep.py                      # every case, on CUDA; JSON lines under benchmarks/results/
    python benchmarks/kernel_sweep.py --quick --device cpu # tiny shapes, any machine: checks the script, not speed
    python benchmarks/kernel_sweep.py --shapes ffsd,llm --variants triton,eager   # FFSD's own and the LLM shapes

Each case runs up to four variants in one process, on the same inputs: ``triton`` (the public op, which must take
its Triton path), ``eager`` (its ``*_reference``), ``compile`` (``torch.compile`` of the reference) and, for the LLM
cases on CUDA where Liger-Kernel imports (``pip install liger-kernel``: a pure-Python wheel that can travel with the
tree), ``liger``: its ``LigerKLDIVLoss``, ``LigerJSD`` (on the log-softmaxes, the inputs it takes) and
``LigerFusedLinearJSD``, at its published shapes ([8192, 128256] bf16, H = 4096). Where Liger is absent its variant is
left out, with one line on stderr. Two modes: ``forward`` (a training forward: inputs that require grad) and
``forward+backward``. Times are medians of ``triton.testing.do_bench`` (which clears the L2 cache before each call)
on CUDA, of wall-clock repeats elsewhere; ``peak_mib`` is the peak of CUDA memory allocated during one call, beyond
what was allocated before it (inputs excluded), on CUDA only.

On CUDA each variant is also timed inside a CUDA graph (``--graph-replays N``, 0 turns it off): N calls captured in
one graph, the graph replayed under ``do_bench``, its median divided by N (``graph_ms``, ``graph_replays``). That is
GPU time with no launch gaps and no host work, what the op costs inside the trainer's captured step; the eager
``ms`` also holds the host's launch overhead, which dominates the small FFSD shapes. N is lowered for slow calls so
that one replay holds about 1 ms of work (at least one call). The L2 is cleared before each replay, not between
the calls inside it. ``graph_ms`` is None off CUDA, and None with ``graph_error`` where capture fails.

Shape sets (``--shapes``, comma-separated): ``all`` (the default: every case below), ``quick`` (tiny, for the CPU
test; ``--quick``), ``ffsd`` (the shapes one FFSD step gives each op, m = 2, bf16 as under the trainer's autocast:
CIFAR-100 ResNet-32 at b128, channels-last, and ImageNet ResNet-18 at b256) and ``llm`` (three of the LLM cases at
Llama 3's vocabulary: KL, CE + KL, the fused linear loss).

The floor is the time the bytes that must move take at the device's measured copy bandwidth (a device-to-device
``copy_``, bytes read plus written, per second). Bytes that must move: ``forward`` reads every input once and
writes the output; ``forward+backward`` does that, then reads the inputs once more in the backward (an autograd op
cannot know its upstream gradient in the forward, so it either reads the inputs again or writes then reads a saved
gradient, which moves as much) together with the upstream gradient, and writes each input's gradient once.
``fraction_of_copy_bw`` is floor / measured time.

One JSON object per (case, mode, variant) line: device, torch, triton, commit, date, op, shape, dtype, layout,
mode, variant, ms, graph_ms, graph_replays, peak_mib, bytes, gb_per_s, floor_ms, copy_gb_per_s, fraction_of_copy_bw,
speedup_vs_eager, speedup_vs_compile, shape_set. A table follows on stdout.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

import ffsd_kernels as K
from ffsd_fast.trainer.runlog import commit_label
from ffsd_kernels._dispatch import use_triton

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("triton", "eager", "compile", "liger")
MODES = ("forward", "forward+backward")
SHAPE_SETS = ("all", "quick", "ffsd", "llm")


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    # (device) -> (all inputs in call order, the ones that require grad)
    make: Callable[[torch.device], tuple[list, list[torch.Tensor]]]
    triton: Callable
    reference: Callable
    # () -> the same call on Liger-Kernel's modules, or None where Liger has no counterpart
    liger: Callable[[], Callable] | None = None


def _randn(shape, dtype, device, requires_grad, channels_last=False):
    x = torch.randn(shape, device=device, dtype=torch.float32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype).requires_grad_(requires_grad)


def _scalar(fn):
    # Ops with several outputs are benchmarked on their sum, so that one backward covers every output.
    def call(*args):
        out = fn(*args)
        return sum(out) if isinstance(out, tuple) else out.sum() if out.dim() else out

    return call


def kl_case(batch, classes, dtype, temperature=2.0) -> Case:
    def make(device):
        s = _randn((batch, classes), dtype, device, True)
        t = _randn((batch, classes), dtype, device, False)
        return [s, t, temperature], [s]

    return Case("kl_div_loss", (batch, classes), dtype, "-", make, K.kl_div_loss, K.kl_div_loss_reference)


def cross_entropy_kl_case(batch, classes, dtype, temperature=2.0) -> Case:
    def make(device):
        s = _randn((batch, classes), dtype, device, True)
        t = _randn((batch, classes), dtype, device, False)
        labels = torch.randint(0, classes, (batch,), device=device)
        return [s, t, labels, temperature], [s]

    return Case(
        "cross_entropy_kl_loss",
        (batch, classes),
        dtype,
        "-",
        make,
        _scalar(K.cross_entropy_kl_loss),
        _scalar(K.cross_entropy_kl_loss_reference),
    )


def mutual_case(students, batch, classes, dtype, temperature=2.0) -> Case:
    def make(device):
        z = _randn((students, batch, classes), dtype, device, True)
        return [z, temperature], [z]

    return Case(
        "mutual_kl_loss",
        (students, batch, classes),
        dtype,
        "-",
        make,
        _scalar(K.mutual_kl_loss),
        _scalar(K.mutual_kl_loss_reference),
    )


def torch_kl_div_case(rows, classes, dtype, reduction="batchmean") -> Case:
    """The drop-in for ``F.kl_div`` on log-probabilities, beside Liger's ``LigerKLDIVLoss`` (the same call)."""

    def make(device):
        x = torch.log_softmax(torch.randn(rows, classes, device=device), -1).to(dtype).requires_grad_()
        y = torch.softmax(torch.randn(rows, classes, device=device), -1).to(dtype)
        return [x, y], [x]

    def liger():
        from liger_kernel.transformers import LigerKLDIVLoss

        return LigerKLDIVLoss(reduction=reduction)

    def call(fn):
        return lambda x, y: fn(x, y, reduction=reduction)

    return Case("kl_div", (rows, classes), dtype, reduction, make, call(K.kl_div), call(K.kl_div_reference), liger)


def jsd_case(rows, classes, dtype, beta=0.5) -> Case:
    """``jsd_loss`` from logits; Liger's ``LigerJSD`` takes log-probabilities, so its variant adds the two
    log-softmaxes a user would run first (and its argument order: student, then teacher)."""

    def make(device):
        s = _randn((rows, classes), dtype, device, True)
        t = _randn((rows, classes), dtype, device, False)
        return [s, t, beta], [s]

    def liger():
        from liger_kernel.transformers import LigerJSD

        module = LigerJSD(beta=beta)
        return lambda s, t, b: module(torch.log_softmax(s, -1), torch.log_softmax(t, -1))

    return Case("jsd_loss", (rows, classes), dtype, f"beta={beta}", make, K.jsd_loss, K.jsd_loss_reference, liger)


def sparse_kl_case(rows, classes, k, dtype, tail="zero", temperature=1.0) -> Case:
    """``sparse_kl_div_loss``: the student's logits against a teacher's top-k log-probabilities, as an offline
    teacher stores them (Liger-Kernel has no counterpart: linkedin/Liger-Kernel#441)."""

    def make(device):
        s = _randn((rows, classes), dtype, device, True)
        logprobs, indices = torch.log_softmax(torch.randn(rows, classes, device=device), -1).topk(k, dim=-1)
        return [s, logprobs.to(dtype), indices, temperature], [s]

    def call(fn):
        return lambda s, logprobs, indices, t: fn(s, logprobs, indices, t, tail=tail)

    return Case(
        "sparse_kl_div_loss",
        (rows, classes, k),
        dtype,
        f"tail={tail}",
        make,
        call(K.sparse_kl_div_loss),
        call(K.sparse_kl_div_loss_reference),
    )


def fused_linear_sparse_case(rows, hidden, vocab, k, dtype, tail="zero") -> Case:
    """``fused_linear_sparse_kl_div_loss``: the student's head (hidden states and weight) against a teacher's top-k
    log-probabilities, the logits made chunk by chunk."""

    def make(device):
        h = _randn((rows, hidden), dtype, device, True)
        w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
        logprobs, indices = torch.log_softmax(torch.randn(rows, vocab, device=device), -1).topk(k, dim=-1)
        return [h, w, logprobs.to(dtype), indices], [h, w]

    def call(fn):
        return lambda h, w, logprobs, indices: fn(h, w, logprobs, indices, tail=tail)

    return Case(
        "fused_linear_sparse_kl_div_loss",
        (rows, hidden, vocab, k),
        dtype,
        f"tail={tail}",
        make,
        call(K.fused_linear_sparse_kl_div_loss),
        call(K.fused_linear_sparse_kl_div_loss_reference),
    )


def fused_linear_case(rows, hidden, vocab, dtype, beta=0.5) -> Case:
    """``fused_linear_distillation_loss`` (student and teacher heads of one width, the teacher frozen), beside
    ``LigerFusedLinearJSD``; eager is the unfused definition, which makes both ``[N, V]`` logits."""

    def make(device):
        h_s = _randn((rows, hidden), dtype, device, True)
        w_s = (_randn((vocab, hidden), dtype, device, False) * hidden**-0.5).requires_grad_()
        h_t = _randn((rows, hidden), dtype, device, False)
        w_t = _randn((vocab, hidden), dtype, device, False) * hidden**-0.5
        return [h_s, w_s, h_t, w_t], [h_s, w_s]

    def liger():
        from liger_kernel.transformers import LigerFusedLinearJSD

        module = LigerFusedLinearJSD(jsd_beta=beta)
        return lambda h_s, w_s, h_t, w_t: module(h_s, w_s, h_t, w_t, None)

    def call(fn):
        return lambda h_s, w_s, h_t, w_t: fn(h_s, w_s, h_t, w_t, beta=beta)

    return Case(
        "fused_linear_distillation",
        (rows, hidden, vocab),
        dtype,
        f"beta={beta}",
        make,
        call(K.fused_linear_distillation_loss),
        call(K.fused_linear_distillation_loss_reference),
        liger,
    )


def attention_case(shape, dtype, layout) -> Case:
    def make(device):
        channels_last = layout == "channels_last"
        x = _randn(shape, dtype, device, True, channels_last)
        y = _randn(shape, dtype, device, True, channels_last)
        return [x, y], [x, y]

    return Case("attention_distance", shape, dtype, layout, make, K.attention_distance, K.attention_distance_reference)


def distance_case(shape, dtype) -> Case:
    def make(device):
        x = _randn(shape, dtype, device, True)
        y = _randn(shape, dtype, device, False)
        return [x, y], [x]

    return Case(
        "normalized_distance", shape, dtype, "nchw", make, K.normalized_distance, K.normalized_distance_reference
    )


def diversity_case(shape, dtype) -> Case:
    def make(device):
        # Attention maps are non-negative.
        x = _randn(shape, dtype, device, False).abs().requires_grad_()
        y = _randn(shape, dtype, device, False).abs()
        return [x, y], [x]

    return Case("diversity_loss", shape, dtype, "nchw", make, K.diversity_loss, K.diversity_loss_reference)


def fusion_block_case(batch, num_inputs, channels, size, dtype, layout="channels_last") -> Case:
    """FFSD's fusion module block (m·C → C); eager is ``torch.cat`` and the Sequential (cuDNN)."""

    def make(device):
        block = K.FusionBlock(channels, num_inputs, channels).to(device, dtype).train()
        maps = [
            _randn((batch, channels, size, size), dtype, device, True, layout == "channels_last")
            for _ in range(num_inputs)
        ]
        return [*maps, block], maps

    def call(fn):
        return lambda *args: fn(list(args[:-1]), args[-1])

    return Case(
        "fusion_block",
        (num_inputs, batch, channels, size, size),
        dtype,
        layout,
        make,
        call(K.fusion_block),
        call(K.fusion_block_reference),
    )


def cases(quick: bool) -> list[Case]:
    bf16, fp32 = torch.bfloat16, torch.float32
    if quick:
        return [
            kl_case(3, 37, fp32),
            cross_entropy_kl_case(3, 37, fp32),
            mutual_case(3, 2, 37, fp32),
            torch_kl_div_case(3, 37, fp32),
            jsd_case(4, 37, fp32),
            sparse_kl_case(3, 37, 5, fp32),
            fused_linear_sparse_case(8, 16, 64, 5, fp32),
            fused_linear_case(8, 16, 64, fp32),
            attention_case((2, 5, 3, 3), fp32, "channels_last"),
            distance_case((2, 3, 4, 4), fp32),
            diversity_case((2, 1, 4, 4), fp32),
            fusion_block_case(2, 2, 3, 4, fp32),
        ]
    return [
        kl_case(8192, 128256, bf16),
        kl_case(128, 100, fp32),
        kl_case(256, 1000, fp32),
        cross_entropy_kl_case(8192, 128256, bf16),
        cross_entropy_kl_case(128, 100, fp32),
        mutual_case(3, 128, 100, fp32),
        mutual_case(4, 256, 1000, bf16),
        # Liger-Kernel's published shapes: Llama 3's vocabulary, 8192 tokens, H = 4096.
        torch_kl_div_case(8192, 128256, bf16),
        jsd_case(8192, 128256, bf16),
        # An offline teacher's top-64 log-probabilities at Llama 3's vocabulary.
        sparse_kl_case(8192, 128256, 64, bf16),
        fused_linear_sparse_case(8192, 4096, 128256, 64, bf16),
        fused_linear_case(8192, 4096, 128256, bf16),
        attention_case((256, 64, 56, 56), bf16, "channels_last"),
        attention_case((128, 64, 8, 8), fp32, "nchw"),
        distance_case((128, 32, 16, 16), fp32),
        diversity_case((128, 1, 8, 8), fp32),
        fusion_block_case(128, 2, 64, 8, bf16),
        fusion_block_case(256, 2, 512, 7, bf16),
    ]


def ffsd_cases() -> list[Case]:
    """The shapes one FFSD step (m = 2) gives each op, in bf16 as under the trainer's autocast: CIFAR-100 ResNet-32
    at b128 (last stage 64 x 8 x 8, channels-last), then ImageNet ResNet-18 at b256 (512 x 7 x 7)."""
    bf16 = torch.bfloat16
    return [
        mutual_case(2, 128, 100, bf16),
        cross_entropy_kl_case(128, 100, bf16),
        attention_case((128, 64, 8, 8), bf16, "channels_last"),
        diversity_case((128, 1, 8, 8), bf16),
        fusion_block_case(128, 2, 64, 8, bf16),
        mutual_case(2, 256, 1000, bf16),
        cross_entropy_kl_case(256, 1000, bf16),
        attention_case((256, 512, 7, 7), bf16, "channels_last"),
        diversity_case((256, 1, 7, 7), bf16),
        fusion_block_case(256, 2, 512, 7, bf16),
    ]


def llm_cases() -> list[Case]:
    """Three of the LLM cases, at Llama 3's vocabulary (8192 tokens, V = 128256, H = 4096, bf16)."""
    bf16 = torch.bfloat16
    return [
        kl_case(8192, 128256, bf16),
        cross_entropy_kl_case(8192, 128256, bf16),
        fused_linear_case(8192, 4096, 128256, bf16),
    ]


def shape_cases(name: str) -> list[Case]:
    return {"all": lambda: cases(False), "quick": lambda: cases(True), "ffsd": ffsd_cases, "llm": llm_cases}[name]()


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], None], device: torch.device, grad_to_none: list[torch.Tensor]) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, [])
    return 2 * nbytes / (ms * 1e-3)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def must_move(mode: str, inputs: list, grad_inputs: list[torch.Tensor], output: torch.Tensor) -> int:
    """Forward: the inputs read and the output written. Forward+backward adds the inputs read again, the upstream
    gradient read and each input's gradient written (the output of a loss is a scalar: nothing)."""
    forward = sum(_nbytes(t) for t in inputs) + _nbytes(output)
    if mode == "forward":
        return forward
    return 2 * forward + sum(_nbytes(t) for t in grad_inputs)


def variant_fn(case: Case, variant: str, inputs: list) -> Callable:
    if variant == "triton":
        tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not use_triton(*tensors):
            raise SystemExit(f"{case.op}: the Triton path does not run here (CUDA, or TRITON_INTERPRET=1 on a CPU)")
        return case.triton
    if variant == "eager":
        return case.reference
    if variant == "liger":
        return case.liger()
    return torch.compile(case.reference, dynamic=False)


def liger_imports() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present without what it needs (CUDA, its triton)
        return False
    return True


def case_variants(case: Case, device: torch.device, variants: tuple[str, ...], has_liger: bool) -> tuple[str, ...]:
    """The requested variants that this case has here: ``liger`` only for a case with a Liger counterpart, on CUDA,
    where Liger-Kernel imports."""
    keep_liger = case.liger is not None and device.type == "cuda" and has_liger
    return tuple(v for v in variants if v != "liger" or keep_liger)


def peak_mib(step: Callable[[], None], device: torch.device, grad_inputs: list[torch.Tensor]) -> float | None:
    """CUDA memory allocated at the peak of one call beyond what was allocated before it (the inputs), in MiB."""
    if device.type != "cuda":
        return None
    for t in grad_inputs:
        t.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def graph_ms(step: Callable[[], None], grad_inputs: list[torch.Tensor], replays: int) -> float:
    """GPU time of one call of ``step`` with ``replays`` calls captured in one CUDA graph: no launch gaps, no host
    work. Each call starts from no gradients, as the eager timing's do (``grad_to_none``)."""

    def calls() -> None:
        for _ in range(replays):
            for t in grad_inputs:
                t.grad = None
            step()

    # Capture needs one warm-up on a side stream (lazy allocations, cuBLAS handles), as torch.cuda.graphs asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    ms = triton.testing.do_bench(graph.replay, return_mode="median") / replays
    for t in grad_inputs:  # the graph's pool holds them: let it go with the graph
        t.grad = None
    del graph
    return ms


def graph_replays(eager_ms: float, most: int) -> int:
    """Calls per captured graph: ``most``, fewer for slow calls, so that one replay holds about 1 ms of work."""
    return max(1, min(most, int(1.0 / max(eager_ms, 1e-6))))


def make_step(fn: Callable, inputs: list, mode: str, grad_output: torch.Tensor) -> Callable[[], None]:
    if mode == "forward":
        return lambda: fn(*inputs)
    return lambda: fn(*inputs).backward(grad_output)


def run_case(
    case: Case,
    device: torch.device,
    variants: tuple[str, ...],
    copy_bw: float,
    meta: dict,
    has_liger: bool = False,
    most_replays: int = 0,
) -> list[dict]:
    inputs, grad_inputs = case.make(device)
    grad_output = torch.ones_like(case.reference(*inputs))
    rows = []
    for mode in MODES:
        times, errors, peaks, graphs = {}, {}, {}, {}
        for variant in case_variants(case, device, variants, has_liger):
            # One variant failing (a torch.compile error, Liger's import) must not cost the others' numbers on a rare
            # GPU; a triton variant that would silently fall back stops the run (SystemExit passes through).
            try:
                step = make_step(variant_fn(case, variant, inputs), inputs, mode, grad_output)
                step()  # compiles (torch.compile, Triton) outside the timing
                times[variant] = time_ms(step, device, grad_inputs)
                peaks[variant] = peak_mib(step, device, grad_inputs)
            except Exception as exc:  # noqa: BLE001
                errors[variant] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{case.op} {mode} {variant} failed: {errors[variant]}", file=sys.stderr)
                continue
            graphs[variant] = {"graph_ms": None, "graph_replays": None}
            if device.type == "cuda" and most_replays > 0:
                # A variant that cannot be captured (a host sync, torch.compile's guards) keeps its eager time.
                replays = graph_replays(times[variant], most_replays)
                try:
                    graphs[variant] = {"graph_ms": graph_ms(step, grad_inputs, replays), "graph_replays": replays}
                except Exception as exc:  # noqa: BLE001
                    graphs[variant]["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
                    print(f"{case.op} {mode} {variant} graph failed: {graphs[variant]['graph_error']}", file=sys.stderr)
        nbytes = must_move(mode, inputs, grad_inputs, grad_output)
        floor_ms = nbytes / copy_bw * 1e3
        base = {
            **meta,
            "op": case.op,
            "shape": list(case.shape),
            "dtype": str(case.dtype).removeprefix("torch."),
            "layout": case.layout,
            "mode": mode,
            "bytes": nbytes,
            "floor_ms": floor_ms,
            "copy_gb_per_s": copy_bw / 1e9,
        }
        for variant, error in errors.items():
            rows.append({**base, "variant": variant, "error": error})
        for variant, ms in times.items():
            rows.append(
                {
                    **base,
                    "variant": variant,
                    "ms": ms,
                    **graphs[variant],
                    "peak_mib": peaks[variant],
                    "gb_per_s": nbytes / (ms * 1e-3) / 1e9,
                    "fraction_of_copy_bw": floor_ms / ms,
                    "speedup_vs_eager": times["eager"] / ms if "eager" in times else None,
                    "speedup_vs_compile": times["compile"] / ms if "compile" in times else None,
                }
            )
    return rows


def metadata(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit_label(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'op':<22} {'shape':<20} {'dtype':<9} {'layout':<13} {'mode':<17} {'variant':<8} {'ms':>9} {'graph ms':>9} "
        f"{'peak MiB':>9} {'GB/s':>8} {'floor ms':>9} {'of copy bw':>10} {'vs eager':>8} {'vs compile':>10}"
    )
    print(header)

    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            print(
                f"{r['op']:<22} {shape:<20} {r['dtype']:<9} {r['layout']:<13} {r['mode']:<17} {r['variant']:<8} "
                f"failed: {r['error'][:80]}"
            )
            continue
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        graph = f"{r['graph_ms']:.4f}" if r.get("graph_ms") is not None else "-"
        print(
            f"{r['op']:<22} {shape:<20} {r['dtype']:<9} {r['layout']:<13} {r['mode']:<17} {r['variant']:<8} "
            f"{r['ms']:>9.4f} {graph:>9} {peak:>9} {r['gb_per_s']:>8.1f} {r['floor_ms']:>9.4f} "
            f"{r['fraction_of_copy_bw']:>10.1%} "
            f"{ratio(r['speedup_vs_eager']):>8} {ratio(r['speedup_vs_compile']):>10}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a check of the script (--shapes quick)")
    parser.add_argument("--shapes", default="all", help=f"comma-separated shape sets, of {', '.join(SHAPE_SETS)}")
    parser.add_argument(
        "--graph-replays", type=int, default=50, help="calls per CUDA graph for graph_ms (CUDA only; 0: off)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset of the default")
    parser.add_argument("--ops", default="", help="comma-separated op names to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON lines")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    variants = tuple(v for v in args.variants.split(",") if v)
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    shape_sets = ["quick"] if args.quick else [name for name in args.shapes.split(",") if name]
    if unknown := set(shape_sets) - set(SHAPE_SETS):
        parser.error(f"unknown shape sets {sorted(unknown)}")
    selected = [
        (name, c) for name in shape_sets for c in shape_cases(name) if not args.ops or c.op in args.ops.split(",")
    ]
    meta = metadata(device)
    has_liger = "liger" in variants and device.type == "cuda" and liger_imports()
    if "liger" in variants and not has_liger:
        print("liger: Liger-Kernel does not import here (or no CUDA): its variant is left out", file=sys.stderr)
    replays = args.graph_replays if device.type == "cuda" else 0
    if args.graph_replays and device.type != "cuda":
        print("graph_ms: CUDA graphs need a CUDA device: left out", file=sys.stderr)
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(device)
    slug = "".join(ch if ch.isalnum() else "-" for ch in meta["device"]).strip("-").lower()
    suffix = "" if shape_sets == ["all"] else "-" + "-".join(shape_sets)
    out = Path(args.out) / f"kernels-{slug}-{meta['commit'][:12]}{suffix}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    rows = []
    for shape_set, case in selected:
        case_rows = run_case(case, device, variants, copy_bw, {**meta, "shape_set": shape_set}, has_liger, replays)
        rows += case_rows
        with out.open("a") as fh:  # as measured, so a run cut short keeps what it measured
            fh.writelines(json.dumps(r) + "\n" for r in case_rows)
    print_table(rows)
    print(f"\n{len(rows)} rows -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
