"""The GPU sweep of the ``ffsd_kernels`` ops: Triton vs PyTorch eager vs ``torch.compile``, beside the bandwidth floor.

    python benchmarks/kernel_sweep.py                      # every case, on CUDA; JSON lines under benchmarks/results/
    python benchmarks/kernel_sweep.py --quick --device cpu # tiny shapes, any machine: checks the script, not speed

Each case runs three variants in one process, on the same inputs: ``triton`` (the public op, which must take its
Triton path), ``eager`` (its ``*_reference``) and ``compile`` (``torch.compile`` of the reference), in two modes:
``forward`` (a training forward: inputs that require grad) and ``forward+backward``. Times are medians of
``triton.testing.do_bench`` (which clears the L2 cache before each call) on CUDA, of wall-clock repeats elsewhere.

The floor is the time the bytes that must move take at the device's measured copy bandwidth (a device-to-device
``copy_``, bytes read plus written, per second). Bytes that must move: ``forward`` reads every input once and
writes the output; ``forward+backward`` does that, then reads the inputs once more in the backward (an autograd op
cannot know its upstream gradient in the forward, so it either reads the inputs again or writes then reads a saved
gradient, which moves as much) together with the upstream gradient, and writes each input's gradient once.
``fraction_of_copy_bw`` is floor / measured time.

One JSON object per (case, mode, variant) line: device, torch, triton, commit, date, op, shape, dtype, layout,
mode, variant, ms, bytes, gb_per_s, floor_ms, copy_gb_per_s, fraction_of_copy_bw, speedup_vs_eager,
speedup_vs_compile. A table follows on stdout.
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
VARIANTS = ("triton", "eager", "compile")
MODES = ("forward", "forward+backward")


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
        attention_case((256, 64, 56, 56), bf16, "channels_last"),
        attention_case((128, 64, 8, 8), fp32, "nchw"),
        distance_case((128, 32, 16, 16), fp32),
        diversity_case((128, 1, 8, 8), fp32),
        fusion_block_case(128, 2, 64, 8, bf16),
        fusion_block_case(256, 2, 512, 7, bf16),
    ]


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
    return torch.compile(case.reference, dynamic=False)


def run_case(case: Case, device: torch.device, variants: tuple[str, ...], copy_bw: float, meta: dict) -> list[dict]:
    inputs, grad_inputs = case.make(device)
    grad_output = torch.ones_like(case.reference(*inputs))
    rows = []
    for mode in MODES:
        times, errors = {}, {}
        for variant in variants:
            fn = variant_fn(case, variant, inputs)
            if mode == "forward":

                def step(fn=fn):
                    fn(*inputs)
            else:

                def step(fn=fn):
                    fn(*inputs).backward(grad_output)

            # One variant failing (a torch.compile error, say) must not cost the others' numbers on a rare GPU.
            try:
                step()  # compiles (torch.compile, Triton) outside the timing
                times[variant] = time_ms(step, device, grad_inputs)
            except Exception as exc:  # noqa: BLE001
                errors[variant] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{case.op} {mode} {variant} failed: {errors[variant]}", file=sys.stderr)
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
        f"{'op':<22} {'shape':<20} {'dtype':<9} {'layout':<13} {'mode':<17} {'variant':<8} {'ms':>9} "
        f"{'GB/s':>8} {'floor ms':>9} {'of copy bw':>10} {'vs eager':>8} {'vs compile':>10}"
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
        print(
            f"{r['op']:<22} {shape:<20} {r['dtype']:<9} {r['layout']:<13} {r['mode']:<17} {r['variant']:<8} "
            f"{r['ms']:>9.4f} {r['gb_per_s']:>8.1f} {r['floor_ms']:>9.4f} {r['fraction_of_copy_bw']:>10.1%} "
            f"{ratio(r['speedup_vs_eager']):>8} {ratio(r['speedup_vs_compile']):>10}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a check of the script, not a benchmark")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset of the default")
    parser.add_argument("--ops", default="", help="comma-separated op names to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON lines")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    variants = tuple(v for v in args.variants.split(",") if v)
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    selected = [c for c in cases(args.quick) if not args.ops or c.op in args.ops.split(",")]
    meta = metadata(device)
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(device)
    slug = "".join(ch if ch.isalnum() else "-" for ch in meta["device"]).strip("-").lower()
    out = Path(args.out) / f"kernels-{slug}-{meta['commit'][:12]}{'-quick' if args.quick else ''}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    rows = []
    for case in selected:
        case_rows = run_case(case, device, variants, copy_bw, meta)
        rows += case_rows
        with out.open("a") as fh:  # as measured, so a run cut short keeps what it measured
            fh.writelines(json.dumps(r) + "\n" for r in case_rows)
    print_table(rows)
    print(f"\n{len(rows)} rows -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
