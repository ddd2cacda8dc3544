"""``normalized_distances`` against float64 formulas (``tests.helpers.normalized_distance64`` of each pair).

Every kernel test runs where the Triton kernels run (the CPU under ``TRITON_INTERPRET=1``, CUDA), with the references
patched to raise so that a silent fallback fails. Each call takes several pairs at once: mixed shapes (one pixel, odd
sizes, one sample, a 56×56 map cut into several slices, other ranks), layouts (NCHW, channels-last, slices along C
and along H, W, mixed between the two sides), dtypes (fp32, fp16, bf16, mixed between pairs and between the sides of
a pair), detached sides, and an upstream gradient ``[P]`` that differs per pair. Small launch configurations are
forced in one test so that every loop (the pair search, the slices, the blocks) runs more than once.

Tolerances (relative, per pair, the coarser dtype of its two sides): as ``test_attention.py``, fp32 1e-5, fp16 3e-3,
bf16 2e-2 (the interpreter converts fp32 to bf16 by truncation). The upstream gradients are scaled like a loss under
fp16 loss scaling (×1024): unscaled, the gradients of a 56·56 map are below fp16's normal range.
"""

import pytest
import torch

from ffsd_kernels import NormalizedDistances, normalized_distance, normalized_distances, normalized_distances_reference
from ffsd_kernels import attention as attention_module
from ffsd_kernels import distance_group as group_module
from ffsd_kernels import reference as reference_ops
from tests.helpers import (
    DEVICES,
    TRITON_DEVICES,
    check,
    feature,
    grad_error,
    leaf64,
    normalized_distance64,
    value_error,
)
from tests.helpers.kernel_launches import AtenKernels, kernels_launched, recorded_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 3e-3, torch.bfloat16: 2e-2}
RANK = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}  # coarser last
OP = "normalized_distances"

# (shape, view of x, view of y, x needs a gradient, y needs a gradient)
PAIRS = [
    ((1, 1, 1, 1), "nchw", "nchw", True, True),  # one pixel: d = 0 and the gradients vanish
    ((2, 3, 5, 7), "nchw", "nchw", True, True),
    ((2, 3, 5, 7), "channels_last", "nchw", True, False),  # mixed layouts; y detached
    ((3, 4, 3, 2), "slice_c", "slice_hw", False, True),  # x detached
    ((1, 2, 4, 5), "slice_hw_cl", "channels_last", True, True),  # one sample
    ((2, 1, 56, 56), "nchw", "nchw", True, True),  # several slices per sample
    ((3, 5, 1, 9), "channels_last", "channels_last", False, False),  # neither: no gradient, no backward programs
    ((2, 6, 3, 3), "channels_last", "slice_hw_cl", True, True),
]


def _raise(*args, **kwargs):
    raise AssertionError("the reference ran instead of the Triton kernels")


@pytest.fixture
def no_reference(monkeypatch):
    monkeypatch.setattr(group_module, "normalized_distances_reference", _raise)
    monkeypatch.setattr(group_module, "normalized_distance_reference", _raise)
    monkeypatch.setattr(attention_module, "normalized_distance_reference", _raise)


def _inputs(pairs, dtypes, device):
    xs, ys = [], []
    for (shape, view_x, view_y, grad_x, grad_y), (dtype_x, dtype_y) in zip(pairs, dtypes, strict=True):
        xs.append(feature(shape, dtype_x, view_x, requires_grad=grad_x, device=device))
        ys.append(feature(shape, dtype_y, view_y, requires_grad=grad_y, device=device))
    return xs, ys


def _upstream(pairs: int) -> torch.Tensor:
    """A different upstream gradient per pair, of both signs, scaled like a loss under fp16 loss scaling."""
    return torch.linspace(-1.3, 2.1, pairs, dtype=torch.float64) * 1024


def _compare(xs, ys, upstream=None, tol=None):
    """Value and gradients of ``normalized_distances(xs, ys)`` against float64 pair by pair; ``upstream`` [P]."""
    out = normalized_distances(xs, ys)
    assert out.shape == (len(xs),) and out.dtype == torch.float32 and out.device == xs[0].device
    upstream = _upstream(len(xs)) if upstream is None else upstream
    needs_grad = any(t.requires_grad for t in (*xs, *ys))
    if needs_grad:
        out.backward(upstream.to(out.device, torch.float32))
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        dtype = max(x.dtype, y.dtype, key=RANK.__getitem__)
        limit = TOL[dtype] if tol is None else tol
        x64, y64 = leaf64(x, x.requires_grad), leaf64(y, y.requires_grad)
        d64 = normalized_distance64(x64, y64)
        check(OP, dtype, "value", value_error(out[i], d64), limit)
        if x.requires_grad or y.requires_grad:
            (d64 * upstream[i]).backward()
        for t, t64, kind in ((x, x64, "grad_x"), (y, y64, "grad_y")):
            if not t.requires_grad:
                assert t.grad is None
                continue
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            check(OP, t.dtype, kind, grad_error(t.grad, t64.grad), TOL[t.dtype] if tol is None else tol)
    return out


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_shapes_and_layouts(dtype, device, no_reference):
    xs, ys = _inputs(PAIRS, [(dtype, dtype)] * len(PAIRS), device)
    _compare(xs, ys)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_mixed_dtypes_in_one_call(device, no_reference):
    """fp32, fp16 and bf16 pairs together, and pairs whose two sides differ in dtype: still two launches forward and
    one backward (the launch test below counts them)."""
    dtypes = [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ]
    xs, ys = _inputs(PAIRS, dtypes, device)
    _compare(xs, ys)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_equals_normalized_distance_pair_by_pair(device):
    """The same fp32 sums as normalized_distance: each pair agrees with its own call to within rounding."""
    xs, ys = _inputs(PAIRS, [(torch.float32, torch.float32)] * len(PAIRS), device)
    out = normalized_distances(xs, ys)
    single = torch.stack([normalized_distance(x, y) for x, y in zip(xs, ys, strict=True)])
    torch.testing.assert_close(out, single, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_other_ranks(device, no_reference):
    shapes = [(5,), (3, 13), (2, 3, 4), (2, 2, 3, 2, 2), (1, 7)]
    xs = [torch.randn(shape, device=device, requires_grad=True) for shape in shapes]
    ys = [torch.randn(shape, device=device, requires_grad=True) for shape in shapes]
    _compare(xs, ys)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_small_blocks(device, monkeypatch, no_reference):
    """Tiny blocks, slices and pair-search chunks, so that every loop of every kernel runs several times."""

    def cuts(batches, counts):
        return 8, [(max(-(-n // 16), 1), 16) for n in counts], 1

    monkeypatch.setattr(group_module, "_partial_config", cuts)
    monkeypatch.setattr(group_module, "_backward_config", lambda counts: (8, 1))
    monkeypatch.setattr(group_module, "_pair_block", lambda pairs: 2)
    xs, ys = _inputs(PAIRS, [(torch.float32, torch.float32)] * len(PAIRS), device)
    _compare(xs, ys)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_zero_samples(device, no_reference):
    x = torch.randn(3, 1, 4, 5, device=device)
    y = torch.randn(3, 1, 4, 5, device=device)
    x[1] = 0
    y[1] = 0
    y[2] = 0
    u = torch.zeros(2, 3, 2, 2, device=device)
    xs = [x.requires_grad_(), u.clone().requires_grad_(), torch.randn(2, 2, 3, 3, device=device, requires_grad=True)]
    ys = [y.requires_grad_(), u.clone().requires_grad_(), torch.randn(2, 2, 3, 3, device=device)]
    out = _compare(xs, ys)
    assert out[1].item() == 0.0 and torch.all(xs[1].grad == 0) and torch.all(ys[1].grad == 0)
    assert torch.all(x.grad[1] == 0) and torch.all(y.grad[1] == 0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_one_tensor_in_several_pairs(device, no_reference):
    """A student's map against several teachers: its gradient is the sum over the pairs (autograd adds them)."""
    x = feature((2, 1, 6, 5), torch.float32, device=device)
    ys = [
        feature((2, 1, 6, 5), torch.float32, view, requires_grad=False, device=device) for view in ("nchw", "slice_hw")
    ]
    upstream = torch.tensor([0.8, -1.9], dtype=torch.float64)
    normalized_distances([x, x], ys).backward(upstream.float().to(device))
    x64 = leaf64(x)
    (
        upstream[0] * normalized_distance64(x64, leaf64(ys[0], False))
        + upstream[1] * normalized_distance64(x64, leaf64(ys[1], False))
    ).backward()
    check(OP, torch.float32, "grad_x", grad_error(x.grad, x64.grad))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_upstream_gradient_of_a_sum(device, no_reference):
    """``out.sum().backward()`` hands the backward an expanded (stride-0) upstream gradient."""
    xs, ys = _inputs(PAIRS[:4], [(torch.float32, torch.float32)] * 4, device)
    normalized_distances(xs, ys).sum().backward()
    for x, y in zip(xs, ys, strict=True):
        x64, y64 = leaf64(x, x.requires_grad), leaf64(y, y.requires_grad)
        if x.requires_grad or y.requires_grad:
            normalized_distance64(x64, y64).backward()
        for t, t64, kind in ((x, x64, "grad_x"), (y, y64, "grad_y")):
            if t.requires_grad:
                check(OP, torch.float32, kind, grad_error(t.grad, t64.grad))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_gradients_keep_the_inputs_layout(device, no_reference):
    x = feature((2, 4, 3, 5), torch.float32, "channels_last", device=device)
    y = feature((2, 4, 3, 5), torch.bfloat16, "slice_hw_cl", device=device)
    z = feature((2, 1, 3, 5), torch.float16, "slice_hw", device=device)
    w = (z * 1).contiguous(memory_format=torch.channels_last)  # a dense non-leaf, channels-last
    grads = torch.autograd.grad(normalized_distances([x, w], [y, w.detach()]).sum(), [x, y, w])
    assert grads[0].stride() == x.stride() and grads[2].stride() == w.stride()
    # y is a window of a channels-last map (not dense): its gradient is laid out dense in its memory order.
    assert grads[1].is_contiguous(memory_format=torch.channels_last) and grads[1].dtype == torch.bfloat16


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_three_launches_and_no_torch_kernels(device, monkeypatch):
    """Forward: the partial sums of every pair and the one finish; backward: one elementwise launch reading the
    upstream gradient from device memory. No other kernel either way: the forward's only torch work besides
    allocations is the one host-built table (what ``torch.tensor`` of a list records, and on CUDA its copy)."""
    shapes = [(4, 1, 8, 8), (4, 1, 4, 4), (4, 16, 8, 8), (4, 32, 4, 4), (4, 1, 2, 2)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16]
    xs = [
        feature(s, d, "channels_last" if s[1] > 1 else "nchw", device=device)
        for s, d in zip(shapes, dtypes, strict=True)
    ]
    ys = [
        feature(s, d, requires_grad=i % 2 == 0, device=device)
        for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))
    ]
    with AtenKernels() as aten:
        group_module._device_table([1, 2, 3], torch.device(device))
    table_ops = aten.ops
    with kernels_launched(monkeypatch) as forward:
        out = normalized_distances(xs, ys)
    assert forward.triton == ["_distances_partial_kernel", "_distances_finish_kernel"] and forward.aten == table_ops
    grad = torch.randn(len(xs), device=device)
    with kernels_launched(monkeypatch) as backward:
        out.backward(grad)
    assert backward.triton == ["_distances_backward_kernel"] and backward.aten == []
    assert all(x.grad is not None for x in xs)
    assert [y.grad is not None for y in ys] == [i % 2 == 0 for i in range(len(ys))]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_no_gradient_needed_launches_only_the_forward(device, monkeypatch):
    xs = [torch.randn(2, 3, 4, 4, device=device), torch.randn(3, 5, device=device)]
    ys = [torch.randn(2, 3, 4, 4, device=device), torch.randn(3, 5, device=device)]
    with recorded_launches(monkeypatch) as launches:
        out = normalized_distances(xs, ys)
    assert len(launches) == 2 and not out.requires_grad
    torch.testing.assert_close(out, normalized_distances_reference(xs, ys), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_runs_the_reference(device):
    f64 = {"dtype": torch.float64, "device": device}
    xs = [torch.randn(2, 3, 4, 5, **f64, requires_grad=True), torch.randn(3, 7, **f64)]
    ys = [torch.randn(2, 3, 4, 5, **f64), torch.randn(3, 7, **f64)]
    out = normalized_distances(xs, ys)
    # One float64 pair among float32 ones sends the whole call to the reference, in float64.
    assert normalized_distances([xs[0], ys[1].float()], [ys[0], xs[1].float()]).dtype == torch.float64
    assert out.dtype == torch.float64
    expected = torch.stack(
        [normalized_distance64(leaf64(x, False), leaf64(y, False)) for x, y in zip(xs, ys, strict=True)]
    )
    check(OP, torch.float64, "value", value_error(out, expected))
    out.sum().backward()
    assert xs[0].grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_reference_is_the_stack_of_normalized_distance(device):
    xs = [torch.randn(2, 3, 4, 5, device=device), torch.randn(3, 1, 2, 2, device=device).half()]
    ys = [torch.randn(2, 3, 4, 5, device=device), torch.randn(3, 1, 2, 2, device=device).half()]
    out = normalized_distances_reference(xs, ys)
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert reference_ops.normalized_distances is normalized_distances_reference
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        check(OP, x.dtype, "value", value_error(out[i], normalized_distance64(leaf64(x, False), leaf64(y, False))))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_autocast_returns_fp32(device):
    x = torch.randn(2, 3, 4, 5, device=device).to(torch.bfloat16).requires_grad_()
    y = torch.randn(2, 3, 4, 5, device=device).to(torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = normalized_distances([x], [y])
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_module_equals_function(device):
    xs = [torch.randn(3, 4, 5, 6, device=device), torch.randn(3, 1, 5, 6, device=device)]
    ys = [torch.randn(3, 4, 5, 6, device=device), torch.randn(3, 1, 5, 6, device=device)]
    assert torch.equal(NormalizedDistances()(xs, ys), normalized_distances(xs, ys))
    assert torch.equal(NormalizedDistances()(tuple(xs), iter(ys)), normalized_distances(xs, ys))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shapes",
    [
        ([(2, 3)], [(2, 4)]),  # a pair of two shapes
        ([(2, 3), (4, 5)], [(2, 3)]),  # unequal lengths
        ([], []),  # no pair
        ([()], [()]),  # a 0-d pair
    ],
    ids=["shape", "lengths", "empty", "scalar"],
)
def test_bad_inputs_raise(shapes, device):
    xs = [torch.randn(shape, device=device) for shape in shapes[0]]
    ys = [torch.randn(shape, device=device) for shape in shapes[1]]
    with pytest.raises(ValueError):
        normalized_distances(xs, ys)


def test_integer_inputs_raise():
    with pytest.raises(TypeError, match=r"ys\[0\]"):
        normalized_distances([torch.randn(2, 3)], [torch.ones(2, 3, dtype=torch.int64)])
