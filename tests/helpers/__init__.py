"""Plain helpers shared by several test files (no fixtures, no tests): generated datasets, the trainer's command line,
and the float64 formulas and error measures the kernel tests hold the ops to.

The larger helpers have their own modules: ``tests.helpers.kernel_launches`` (record and compile Triton launches),
``tests.helpers.sequential_reference`` (the plain transcription of the spec that the fast step is held to) and
``tests.helpers.distributed_worker`` (one rank's part of the data-parallel checks, run under torchrun).
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ffsd_kernels._dispatch import INTERPRETER

ROOT = Path(__file__).resolve().parents[2]  # the repository

# ---------------------------------------------------------------------------------------------------------------
# Generated datasets
# ---------------------------------------------------------------------------------------------------------------


def write_cifar(root, num_classes, train_per_file=20, test=10):
    """A CIFAR-10 (five train files) or CIFAR-100 tree of random images under ``root``; returns its folder."""
    rng = np.random.RandomState(1)

    def dump(path, n, label_key):
        labels = rng.randint(0, num_classes, n).tolist()
        entry = {"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8), label_key: labels}
        if num_classes == 100:
            entry["coarse_labels"] = [label // 5 for label in labels]
        with open(path, "wb") as f:
            pickle.dump(entry, f)

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", train_per_file, "labels")
        dump(folder / "test_batch", test, "labels")
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", train_per_file, "fine_labels")
        dump(folder / "test", test, "fine_labels")
        meta_name, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)
    return folder


FOLDER_IMAGE_SIZES = [(37, 45), (45, 37), (50, 41)]  # (width, height) of the i-th image of each class, cyclically


def write_folder(root, classes=("ant", "bee", "cat"), train=3, val=2):
    """An ImageNet-style ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` tree of random JPEGs; returns ``root``."""
    rng = np.random.RandomState(2)
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                width, height = FOLDER_IMAGE_SIZES[i % len(FOLDER_IMAGE_SIZES)]
                pixels = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


# ---------------------------------------------------------------------------------------------------------------
# The trainer's command line
# ---------------------------------------------------------------------------------------------------------------

# One epoch on the embedded digits, in this process, without a progress bar.
FAST = ["--epochs", "1", "--no-progress", "--workers", "0"]


def run_ok(args, tmp_path, name="run"):
    """``ffsd-train args`` into ``tmp_path/name``, which must succeed; returns the run's folder."""
    from ffsd_fast.cli.train import main

    assert main([*args, "--output-dir", str(tmp_path), "--run-name", name]) == 0
    return tmp_path / name


def one_line_error(capsys, args):
    """``ffsd-train args`` must fail with exit status 2 and one line on stderr; returns that line."""
    from ffsd_fast.cli.train import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("ffsd-train: error: "), err
    return err


# ---------------------------------------------------------------------------------------------------------------
# Devices and the cases of a parametrised test
# ---------------------------------------------------------------------------------------------------------------

CUDA = ["cuda"] if torch.cuda.is_available() else []
# Where an op's public function is checked: the CPU always (its Triton kernels under the interpreter, its reference
# otherwise) and CUDA where there is one.
DEVICE_NAMES = ["cpu", *CUDA]
# Where its Triton kernels run: the CPU under Triton's interpreter, CUDA with a GPU. Empty elsewhere (the test skips).
TRITON_DEVICE_NAMES = (["cpu"] if INTERPRETER else []) + CUDA


def device_param(device: str):
    """A ``device`` parameter, marked ``cuda`` on CUDA (``make gpu-check`` selects those with ``-m cuda``)."""
    return pytest.param(device, marks=pytest.mark.cuda, id=device) if device == "cuda" else device


DEVICES = [device_param(d) for d in DEVICE_NAMES]
TRITON_DEVICES = [device_param(d) for d in TRITON_DEVICE_NAMES]


def case_id(value) -> str:
    """A stable, readable id for one parameter: a function or a dtype by its name, anything else by ``str``."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if callable(value):
        return value.__name__
    return str(value)


def union(*grids: list[tuple]) -> list[tuple]:
    """The cases of several grids of parameter tuples, each once, in order: where two families of tests checked the
    same case the same way (on the same device), it runs once."""
    seen, cases = set(), []
    for grid in grids:
        for case in grid:
            key = tuple(case_id(v) for v in case)
            if key not in seen:
                seen.add(key)
                cases.append(case)
    return cases


def params(cases: list[tuple], slow=lambda case: False) -> list:
    """``pytest.param`` of each case, a tuple whose last item is the device: its id joins the items' ids, a CUDA case
    is marked ``cuda``, and a case for which ``slow(case)`` holds is marked ``slow``."""

    def marks(case):
        return [pytest.mark.cuda] * (case[-1] == "cuda") + [pytest.mark.slow] * bool(slow(case))

    return [pytest.param(*c, id="-".join(map(case_id, c)), marks=marks(c)) for c in cases]


# ---------------------------------------------------------------------------------------------------------------
# Error measures, and the worst errors seen (printed at the end of each kernel test module)
# ---------------------------------------------------------------------------------------------------------------

# Below this a float64 reference counts as zero and the error is taken as absolute.
ZERO = 1e-10
# The default tolerance of ``check``: relative error per dtype (see the half-precision tolerances in each op's file).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1e-2}
EXACT_DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]

WORST: dict[tuple[str, str, str], float] = {}


def _record(op: str, dtype: torch.dtype, kind: str, err: float) -> float:
    key = (op, str(dtype).removeprefix("torch."), kind)
    WORST[key] = max(WORST.get(key, 0.0), err)
    return err


def value_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max(max|b|, tiny)`` (for a scalar: ``|a − b| / max(|b|, tiny)``); absolute when ``b ≈ 0``."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "non-finite value"
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / (scale if scale > ZERO else 1.0) if b.numel() else 0.0


def elementwise_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max(|b|, tiny)`` entry by entry: for outputs with no cancellation (sums of squares)."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "non-finite value"
    denominator = torch.where(b.abs() > ZERO, b.abs(), torch.ones_like(b))
    return ((a - b).abs() / denominator).max().item()


def grad_error(ga: torch.Tensor | None, gb: torch.Tensor) -> float:
    """``max|ga − gb| / max|gb|``; absolute when the float64 gradient is (numerically) zero."""
    assert ga is not None, "no gradient reached the input"
    return value_error(ga, gb)


def check(op: str, dtype: torch.dtype, kind: str, err: float, tol: float | None = None) -> None:
    tol = TOL[dtype] if tol is None else tol
    _record(op, dtype, kind, err)
    assert err < tol, f"{op} {dtype} {kind}: relative error {err:.3e} >= {tol:.1e}"


def compare(name, dtype, op, op64, inputs, grad_names, upstream=1.0, tol=None, value_kind=value_error):
    """Value and gradients of ``op(*inputs)`` against ``op64`` on float64 copies, with the loss scaled by
    ``upstream`` (a number, or a tensor for non-scalar outputs) before backward. ``grad_names[i]`` names the
    gradient of input ``i`` in the report, or is None for an input that must receive none."""
    out = op(*inputs)
    copies = [leaf64(t, t.requires_grad) for t in inputs]
    out64 = op64(*copies)
    check(name, dtype, "value", value_kind(out, out64), tol)
    if isinstance(upstream, torch.Tensor):
        out.backward(upstream.to(out.device, out.dtype))
        out64.backward(upstream.to(torch.float64))
    else:
        (out * upstream).backward()
        (out64 * upstream).backward()
    for t, t64, kind in zip(inputs, copies, grad_names, strict=True):
        if kind is None:
            assert t.grad is None
        else:
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            check(name, dtype, kind, grad_error(t.grad, t64.grad), tol)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Independent float64 formulas (CPU, autograd in float64)
# ---------------------------------------------------------------------------------------------------------------


def leaf64(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).requires_grad_(requires_grad)


def kl64(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return (
        temperature
        * temperature
        * F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
    )


def attention_map64(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=1, keepdim=True) / x.shape[1]


def unit64(v: torch.Tensor) -> torch.Tensor:
    """Per-sample ``v / max(‖v‖₂, 1e-12)`` of ``v`` flattened to ``[B, N]``."""
    v = v.reshape(v.shape[0], -1)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def normalized_distance64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (unit64(x) - unit64(y)).pow(2).mean()


def attention_distance64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return normalized_distance64(attention_map64(x), attention_map64(y))


def reflected_target64(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ỹ, ŷ, ν)`` for ``y`` flattened to ``[B, N]``: θ is the ⌊N/3⌋-th smallest of ŷ (the smallest if N < 3)."""
    y = y.reshape(y.shape[0], -1)
    nu = y.norm(dim=1, keepdim=True)
    unit = unit64(y)
    theta = unit.topk(max(y.shape[1] // 3, 1), dim=1, largest=False)[0][:, -1:]
    return nu / 2 + (nu / 2 - unit) * torch.sign(unit - theta), unit, nu


def diversity_loss64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target, _, _ = reflected_target64(y)
    return (unit64(x) - target).pow(2).mean()


def diversity_shift64(y: torch.Tensor) -> torch.Tensor:
    batch, channels = y.shape[:2]
    a = attention_map64(y)
    target, unit, nu = reflected_target64(a)
    return y + ((target - unit) * nu / channels).reshape(a.shape)


# ---------------------------------------------------------------------------------------------------------------
# Feature maps in every layout
# ---------------------------------------------------------------------------------------------------------------

# nchw, channels-last, every other channel of a wider map, a window of a larger map (NCHW or channels-last).
VIEWS = ["nchw", "channels_last", "slice_c", "slice_hw", "slice_hw_cl"]


def feature(shape, dtype, view="nchw", requires_grad=True, fn=None, device="cpu") -> torch.Tensor:
    """A leaf tensor of ``shape`` laid out as ``view`` (one of ``VIEWS``), drawn in float64 and rounded once to
    ``dtype``, with ``fn`` applied to the float64 draw; its strides are kept (``detach`` of a view keeps them)."""
    batch, channels, height, width = shape
    if view == "nchw":
        base, index = torch.randn(shape, dtype=torch.float64), (slice(None),) * 4
    elif view == "channels_last":
        base, index = torch.randn(shape, dtype=torch.float64), (slice(None),) * 4
        base = base.contiguous(memory_format=torch.channels_last)
    elif view == "slice_c":  # every other channel
        base = torch.randn(batch, 2 * channels + 1, height, width, dtype=torch.float64)
        index = (slice(None), slice(1, None, 2), slice(None), slice(None))
    elif view in ("slice_hw", "slice_hw_cl"):  # a window of a larger map: stride_h != W · stride_w
        base = torch.randn(batch, channels, height + 2, width + 3, dtype=torch.float64)
        if view == "slice_hw_cl":
            base = base.contiguous(memory_format=torch.channels_last)
        index = (slice(None), slice(None), slice(1, height + 1), slice(2, width + 2))
    else:  # pragma: no cover
        raise AssertionError(view)
    if fn is not None:
        base = fn(base)
    x = base.to(device, dtype)[index].detach()
    assert x.shape == shape
    if view != "nchw" and channels > 1 and height * width > 1:
        assert not x.is_contiguous()
    return x.requires_grad_(requires_grad)


def positive(shape, dtype, requires_grad=False, device="cpu"):
    """An attention-like map: ``|randn| + 0.05``."""
    return feature(shape, dtype, fn=lambda t: t.abs() + 0.05, requires_grad=requires_grad, device=device)
