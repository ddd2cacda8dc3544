"""Grouped against dense convolution at the stacked step's shapes: the one unknown behind ``--step stacked``.

    .venv/bin/python benchmarks/grouped_conv.py --device cuda                 # CIFAR ResNet-32 and ImageNet ResNet-18
    .venv/bin/python benchmarks/grouped_conv.py --device cpu --tiny          # a check of the script

Stacked, ``G`` networks' 3×3 convolutions of ``C`` channels run as one convolution of ``G·C`` channels with ``G``
groups; per network, as ``G`` dense convolutions of ``C`` channels. The stacked step wins only if cuDNN runs the
grouped one about as fast as one dense convolution of its size, not as its ``G`` groups one after another (PyTorch
issues report grouped bf16 convolutions falling back to a slow direct kernel for some shapes). This times, for each
stage of the two workloads, the forward, the input gradient and the weight gradient of both, in bf16 channels-last
and in fp32 NCHW, with CUDA events (the best of ``--repeats`` windows of ``--steps`` calls), and appends one JSON
line per (workload, stage, dtype, pass) to ``--output``: ``grouped_ms`` (one grouped convolution), ``dense_ms``
(``G`` dense ones), ``ratio`` (grouped / dense: below 1, stacking pays at that layer).
"""

import argparse
import datetime
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ffsd_fast.trainer.runlog import commit_label  # noqa: E402

# (workload, batch, groups G = m + 1 networks, [(channels, height) of each stage's 3×3 convolutions])
WORKLOADS = {
    "cifar100-resnet32-m2-b128": (128, 3, [(16, 32), (32, 16), (64, 8)]),
    "imagenet-resnet18-m2-b256": (256, 3, [(64, 56), (128, 28), (256, 14), (512, 7)]),
}
TINY = {"tiny-m2-b2": (2, 3, [(4, 8), (8, 4)])}
DTYPES = {"bf16-channels-last": (torch.bfloat16, torch.channels_last), "fp32": (torch.float32, torch.contiguous_format)}
PASSES = ("forward", "input_grad", "weight_grad")


def timer(device: torch.device) -> Callable[[Callable[[], None], int, int], float]:
    """Milliseconds per call of ``fn``, the best of ``repeats`` windows of ``steps`` calls."""

    def cuda(fn: Callable[[], None], steps: int, repeats: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / steps)
        return best

    def host(fn: Callable[[], None], steps: int, repeats: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(steps):
                fn()
            best = min(best, (time.perf_counter() - started) * 1e3 / steps)
        return best

    return cuda if device.type == "cuda" else host


def passes(x: torch.Tensor, w: torch.Tensor, groups: int) -> dict[str, Callable[[], None]]:
    """The three passes of one convolution of ``x`` by ``w``, each a call that queues its kernels."""
    y = F.conv2d(x, w, padding=1, groups=groups)
    dy = torch.randn_like(y)
    return {
        "forward": lambda: F.conv2d(x, w, padding=1, groups=groups),
        "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1, groups=groups),
        "weight_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1, groups=groups),
    }


def measure(batch: int, g: int, channels: int, size: int, dtype, layout, device, steps: int, repeats: int) -> dict:
    clock = timer(device)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=layout)

    grouped = passes(tensor(batch, g * channels, size, size), tensor(g * channels, channels, 3, 3), g)
    dense = [passes(tensor(batch, channels, size, size), tensor(channels, channels, 3, 3), 1) for _ in range(g)]
    result = {}
    for name in PASSES:
        grouped[name](), [d[name]() for d in dense]  # cuDNN's algorithm choice and the allocator, outside the clock
        grouped_ms = clock(grouped[name], steps, repeats)
        dense_ms = clock(lambda name=name: [d[name]() for d in dense], steps, repeats)
        result[name] = {"grouped_ms": grouped_ms, "dense_ms": dense_ms, "ratio": grouped_ms / dense_ms}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a check of the script, not a measurement")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "grouped_conv.jsonl"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the trainer runs: cuDNN picks each shape's algorithm once
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "run_id": uuid.uuid4().hex[:12],
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "commit": commit_label(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    for workload, (batch, g, stages) in (TINY if args.tiny else WORKLOADS).items():
        for channels, size in stages:
            for dtype_name, (dtype, layout) in DTYPES.items():
                if dtype == torch.bfloat16 and device.type == "cpu" and not args.tiny:
                    continue  # CPU bf16 convolutions say nothing of a GPU's
                timed = measure(batch, g, channels, size, dtype, layout, device, args.steps, args.repeats)
                for name, values in timed.items():
                    row = {**meta, "workload": workload, "groups": g, "channels": channels, "size": size}
                    rows.append({**row, "dtype": dtype_name, "pass": name, **values})
                    print(
                        f"{workload:<28}{channels:>5} ch {size:>3} px  {dtype_name:<19}{name:<12}"
                        f"grouped {values['grouped_ms']:8.3f} ms  dense ×{g} {values['dense_ms']:8.3f} ms  "
                        f"ratio {values['ratio']:.2f}"
                    )
    with open(args.output, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} rows appended to {args.output}")


if __name__ == "__main__":
    main()
