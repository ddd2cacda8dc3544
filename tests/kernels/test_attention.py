"""``attention_map``, ``normalized_distance`` and ``attention_distance`` against float64 formulas written out in
``tests/helpers``.

The contract tests call the public functions on every device (the CPU always: the Triton kernels under the
interpreter, the reference without; CUDA where there is one). The kernel tests run only where the Triton kernels run
(the CPU under ``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets where there is no GPU; CUDA). Values and
gradients are compared with float64 formulas (autograd on ``.double()`` copies of the inputs, which are exact for
half inputs too): layouts NCHW / channels-last / slices along C and along H, W; odd sizes, one pixel, one channel,
one sample; ``grad_output ≠ 1``; both arguments requiring grad; 56×56 maps. Small launch configurations are forced
in some cases so that every loop (channel blocks, sample splits) runs more than once on small inputs.

Tolerances (relative): fp32 1e-5, fp64 1e-12. Half inputs carry rounding of the outputs and gradients: fp16 3e-3,
bf16 2e-2 (bf16 keeps 8 significant bits, and the interpreter converts fp32 to bf16 by truncation, not rounding, so
its error is up to 2⁻⁷ ≈ 7.8e-3 per rounding).
"""

import pytest
import torch

from ffsd_kernels import (
    AttentionDistance,
    NormalizedDistance,
    attention_distance,
    attention_map,
    normalized_distance,
)
from ffsd_kernels import attention as attention_module
from ffsd_kernels import diversity as diversity_module
from tests.helpers import (
    DEVICE_NAMES,
    DEVICES,
    EXACT_DTYPES,
    HALF_DTYPES,
    TRITON_DEVICE_NAMES,
    TRITON_DEVICES,
    attention_distance64,
    attention_map64,
    check,
    compare,
    elementwise_error,
    feature,
    grad_error,
    leaf64,
    normalized_distance64,
    params,
    union,
    value_error,
)
from tests.helpers.kernel_launches import kernels_launched

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the kernels' dtypes
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# The contract's grid: shapes with one pixel, one channel, one row; each in NCHW and channels-last.
MAP_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (4, 16, 8, 8), (3, 5, 1, 9)]
LAYOUTS = ["nchw", "channels_last"]


# ---------------------------------------------------------------------------------------------------------------
# attention_map
# ---------------------------------------------------------------------------------------------------------------

# (shape, view, dtype, device): the kernels' grid (every view, more channels than one NCHW block, halves; where the
# kernels run) and the contract's (float64 too; every device). Three cases are in both: (1, 1, 1, 1) NCHW and
# (2, 3, 5, 7) NCHW and channels-last, in float32 (on the CPU under the interpreter, on CUDA with a GPU).
MAP_CASES = union(
    [
        (shape, view, dtype, device)
        for shape, view in [
            ((1, 1, 1, 1), "nchw"),
            ((2, 3, 5, 7), "nchw"),
            ((2, 3, 5, 7), "channels_last"),
            ((3, 1, 4, 3), "channels_last"),
            ((1, 6, 1, 1), "channels_last"),
            ((2, 3, 5, 7), "slice_c"),
            ((2, 5, 3, 6), "slice_hw"),
            ((2, 5, 3, 6), "slice_hw_cl"),
            ((1, 4, 1, 9), "slice_hw"),
            ((2, 70, 9, 5), "nchw"),  # more channels than one block of the NCHW tile
            ((2, 70, 9, 5), "channels_last"),
        ]
        for dtype in DTYPES
        for device in TRITON_DEVICE_NAMES
    ],
    [
        (shape, layout, dtype, device)
        for shape in MAP_SHAPES
        for layout in LAYOUTS
        for dtype in EXACT_DTYPES
        for device in DEVICE_NAMES
    ],
)


@pytest.mark.parametrize("shape, view, dtype, device", params(MAP_CASES))
def test_attention_map(shape, view, dtype, device):
    x = feature(shape, dtype, view, device=device)
    upstream = torch.randn(shape[0], 1, *shape[2:], dtype=torch.float64)
    a = compare(
        "attention_map",
        dtype,
        attention_map,
        attention_map64,
        [x],
        ["grad"],
        upstream,
        tol=TOL[dtype],
        value_kind=elementwise_error,
    )
    assert a.shape == (shape[0], 1, *shape[2:]) and a.dtype == dtype


def grouped_attention_map64(groups: int):
    def reference(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([attention_map64(part) for part in x.chunk(groups, dim=1)], dim=1)

    return reference


@pytest.mark.parametrize("view", ["nchw", "channels_last", "slice_c", "slice_hw"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_grouped_attention_map_is_each_groups_map(view, dtype, device):
    """``groups = G``: the maps of G stacked networks' features (C/G channels each), values and gradient."""
    if dtype != torch.float64 and device not in TRITON_DEVICE_NAMES:
        pytest.skip("half and fp32 inputs are the Triton kernels' (the reference is checked in float64)")
    x = feature((2, 9, 5, 3), dtype, view, device=device)
    upstream = torch.randn(2, 3, 5, 3, dtype=torch.float64)
    a = compare(
        "attention_map",
        dtype,
        lambda t: attention_map(t, groups=3),
        grouped_attention_map64(3),
        [x],
        ["grad"],
        upstream,
        tol=TOL[dtype],
        value_kind=elementwise_error,
    )
    assert a.shape == (2, 3, 5, 3) and a.dtype == dtype


def test_grouped_attention_map_needs_a_divisor_of_the_channels():
    with pytest.raises(ValueError, match="groups=4 must divide the 9 channels"):
        attention_map(torch.randn(2, 9, 3, 3), groups=4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_attention_map_small_blocks(small_blocks, device):
    for view in ("nchw", "channels_last", "slice_hw"):
        x = feature((2, 7, 3, 5), torch.float32, view, device=device)
        upstream = torch.randn(2, 1, 3, 5, dtype=torch.float64)
        compare(
            "attention_map",
            torch.float32,
            attention_map,
            attention_map64,
            [x],
            ["grad"],
            upstream,
            value_kind=elementwise_error,
        )


# ---------------------------------------------------------------------------------------------------------------
# normalized_distance
# ---------------------------------------------------------------------------------------------------------------

# (shape, view_x, view_y, dtype, upstream, device): the kernels' grid (mixed layouts, slices, a 56×56 map, halves;
# where the kernels run; the loss scaled like a loss under fp16 loss scaling: unscaled, the gradients of a 56·56 map,
# ~2/(B·N·‖x‖)·|u − v| ≈ 1e-7, are below fp16's normal range and lose their digits) and the contract's (same
# layouts, float64, upstream 1, every device).
DISTANCE_CASES = union(
    [
        (shape, view_x, view_y, dtype, -0.6 * 1024, device)
        for shape, view_x, view_y in [
            ((1, 1, 1, 1), "nchw", "nchw"),
            ((2, 3, 5, 7), "nchw", "nchw"),
            ((2, 3, 5, 7), "channels_last", "channels_last"),
            ((2, 3, 5, 7), "channels_last", "nchw"),  # mixed layouts: y read in x's memory order
            ((3, 4, 3, 2), "slice_c", "slice_hw"),
            ((1, 2, 4, 5), "slice_hw_cl", "channels_last"),
            ((2, 1, 56, 56), "nchw", "nchw"),  # several slices per sample
        ]
        for dtype in DTYPES
        for device in TRITON_DEVICE_NAMES
    ],
    [
        (shape, layout, layout, dtype, 1.0, device)
        for shape in MAP_SHAPES
        for layout in LAYOUTS
        for dtype in EXACT_DTYPES
        for device in DEVICE_NAMES
    ],
)


@pytest.mark.parametrize("shape, view_x, view_y, dtype, upstream, device", params(DISTANCE_CASES))
def test_normalized_distance(shape, view_x, view_y, dtype, upstream, device):
    x, y = feature(shape, dtype, view_x, device=device), feature(shape, dtype, view_y, device=device)
    d = compare(
        "normalized_distance",
        dtype,
        normalized_distance,
        normalized_distance64,
        [x, y],
        ["grad_x", "grad_y"],
        upstream=upstream,
        tol=TOL[dtype],
    )
    assert d.shape == () and d.dtype == dtype


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", [(5,), (3, 13), (2, 3, 4), (2, 2, 3, 2, 2)], ids=str)
def test_normalized_distance_other_ranks(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = torch.randn(shape, device=device, requires_grad=True)
    compare(
        "normalized_distance",
        torch.float32,
        normalized_distance,
        normalized_distance64,
        [x, y],
        ["grad_x", "grad_y"],
        upstream=2.5,
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_normalized_distance_detached_and_small_blocks(small_blocks, device):
    x = feature((2, 3, 5, 7), torch.float32, "channels_last", device=device)
    y = feature((2, 3, 5, 7), torch.float32, "slice_hw", requires_grad=False, device=device)
    compare(
        "normalized_distance",
        torch.float32,
        normalized_distance,
        normalized_distance64,
        [x, y],
        ["grad_x", None],
        upstream=1.7,
    )
    x = feature((2, 3, 5, 7), torch.float32, "nchw", requires_grad=False, device=device)
    y = feature((2, 3, 5, 7), torch.float32, "slice_c", device=device)
    compare(
        "normalized_distance",
        torch.float32,
        normalized_distance,
        normalized_distance64,
        [x, y],
        [None, "grad_y"],
        upstream=1.7,
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_normalized_distance_zero_samples(device):
    x = torch.randn(3, 1, 4, 5, device=device)
    y = torch.randn(3, 1, 4, 5, device=device)
    x[1] = 0
    y[1] = 0
    y[2] = 0
    x.requires_grad_()
    y.requires_grad_()
    compare(
        "normalized_distance", torch.float32, normalized_distance, normalized_distance64, [x, y], ["grad_x", "grad_y"]
    )
    assert torch.all(x.grad[1] == 0) and torch.all(y.grad[1] == 0)


# ---------------------------------------------------------------------------------------------------------------
# attention_distance
# ---------------------------------------------------------------------------------------------------------------

# (shape, channels of y, view_x, view_y, dtype, upstream, device): the kernels' grid and the contract's (y with the
# same channels as x or three more, both in one layout; float64 too; upstream 1; every device).
ATTENTION_CASES = union(
    [
        (shape, channels_y, view_x, view_y, dtype, 3.7, device)
        for shape, channels_y, view_x, view_y in [
            ((1, 1, 1, 1), 1, "nchw", "nchw"),  # one pixel: d = 0 and the gradients vanish
            ((2, 1, 5, 7), 3, "nchw", "channels_last"),
            ((1, 6, 3, 5), 2, "channels_last", "channels_last"),
            ((3, 5, 4, 3), 7, "slice_c", "slice_hw"),
            ((2, 3, 6, 5), 4, "slice_hw_cl", "nchw"),
            ((2, 4, 9, 11), 3, "channels_last", "slice_c"),
        ]
        for dtype in DTYPES
        for device in TRITON_DEVICE_NAMES
    ],
    [
        (shape, shape[1] + extra, layout, layout, dtype, 1.0, device)
        for shape in MAP_SHAPES
        for layout in LAYOUTS
        for extra in (0, 3)
        for dtype in EXACT_DTYPES
        for device in DEVICE_NAMES
    ],
)


@pytest.mark.parametrize("shape, channels_y, view_x, view_y, dtype, upstream, device", params(ATTENTION_CASES))
def test_attention_distance(shape, channels_y, view_x, view_y, dtype, upstream, device):
    x = feature(shape, dtype, view_x, device=device)
    y = feature((shape[0], channels_y, *shape[2:]), dtype, view_y, device=device)
    d = compare(
        "attention_distance",
        dtype,
        attention_distance,
        attention_distance64,
        [x, y],
        ["grad_x", "grad_y"],
        upstream=upstream,
        tol=TOL[dtype],
    )
    assert d.shape == () and d.dtype == dtype


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_attention_distance_detached_and_small_blocks(small_blocks, device):
    x = feature((2, 5, 3, 7), torch.float32, "channels_last", device=device)
    y = feature((2, 3, 3, 7), torch.float32, "slice_hw", requires_grad=False, device=device)
    compare(
        "attention_distance",
        torch.float32,
        attention_distance,
        attention_distance64,
        [x, y],
        ["grad_x", None],
        upstream=0.4,
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_attention_distance_relu_features(device):
    x = feature((2, 8, 7, 7), torch.float32, "channels_last", fn=torch.relu, device=device)
    y = feature((2, 4, 7, 7), torch.float32, "channels_last", fn=torch.relu, device=device)
    compare("attention_distance", torch.float32, attention_distance, attention_distance64, [x, y], ["grad_x", "grad_y"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_upstream_gradient_not_one(layout, dtype, device):
    x = feature((3, 6, 4, 5), dtype, layout, device=device)
    y = feature((3, 2, 4, 5), dtype, layout, device=device)
    (attention_distance(x, y) * 3.7).backward()
    x64, y64 = leaf64(x), leaf64(y)
    (attention_distance64(x64, y64) * 3.7).backward()
    check("attention_distance", dtype, "grad_x", grad_error(x.grad, x64.grad))
    check("attention_distance", dtype, "grad_y", grad_error(y.grad, y64.grad))

    u = feature((3, 1, 4, 5), dtype, device=device)
    v = feature((3, 1, 4, 5), dtype, device=device)
    (normalized_distance(u, v) * -0.6).backward()
    u64, v64 = leaf64(u), leaf64(v)
    (normalized_distance64(u64, v64) * -0.6).backward()
    check("normalized_distance", dtype, "grad_x", grad_error(u.grad, u64.grad))
    check("normalized_distance", dtype, "grad_y", grad_error(v.grad, v64.grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_zero_sample_is_finite(layout, dtype, device):
    # Sample 1 of x is all zeros: its norm is clamped to 1e-12, so n(0) = 0, and nothing is NaN.
    x = feature((3, 4, 5, 6), dtype, layout, requires_grad=False, device=device)
    x[1] = 0
    x.requires_grad_()
    y = feature((3, 2, 5, 6), dtype, layout, device=device)
    d = attention_distance(x, y)
    d.backward()
    assert torch.isfinite(d) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert torch.all(x.grad[1] == 0)  # dA/dx = 2x/C vanishes at x = 0
    x64, y64 = leaf64(x), leaf64(y)
    d64 = attention_distance64(x64, y64)
    d64.backward()
    check("attention_distance", dtype, "value", value_error(d, d64))
    check("attention_distance", dtype, "grad_x", grad_error(x.grad, x64.grad))
    check("attention_distance", dtype, "grad_y", grad_error(y.grad, y64.grad))

    # The same through normalized_distance: the zero sample contributes mean(n(y_1)²) = 1/N per sample to the sum.
    a = attention_map(x.detach()).requires_grad_()
    b = attention_map(y.detach()).requires_grad_()
    d = normalized_distance(a, b)
    d.backward()
    assert torch.isfinite(d) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    a64, b64 = leaf64(a), leaf64(b)
    d64 = normalized_distance64(a64, b64)
    d64.backward()
    check("normalized_distance", dtype, "value", value_error(d, d64))
    check("normalized_distance", dtype, "grad_x", grad_error(a.grad, a64.grad))
    check("normalized_distance", dtype, "grad_y", grad_error(b.grad, b64.grad))

    # Both samples zero: the distance is exactly 0 there.
    z = torch.zeros(2, 3, 4, 4, dtype=dtype, device=device, requires_grad=True)
    d = attention_distance(z, torch.zeros(2, 5, 4, 4, dtype=dtype, device=device))
    d.backward()
    assert d.item() == 0.0 and torch.all(z.grad == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_half_precision(layout, dtype, device):
    x = feature((4, 16, 8, 8), dtype, layout, device=device)
    y = feature((4, 8, 8, 8), dtype, layout, device=device)
    a = attention_map(x)
    assert a.dtype == dtype
    check("attention_map", dtype, "value", elementwise_error(a, attention_map64(leaf64(x, False))))
    d = attention_distance(x, y)
    assert d.dtype == dtype
    d.backward()
    assert x.grad.dtype == dtype and y.grad.dtype == dtype
    x64, y64 = leaf64(x), leaf64(y)
    d64 = attention_distance64(x64, y64)
    d64.backward()
    check("attention_distance", dtype, "value", value_error(d, d64), tol=2e-2)
    check("attention_distance", dtype, "grad_x", grad_error(x.grad, x64.grad), tol=2e-2)
    check("attention_distance", dtype, "grad_y", grad_error(y.grad, y64.grad), tol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, dtypes, modules, shapes
# ---------------------------------------------------------------------------------------------------------------

REFERENCES = [
    (attention_module, "attention_map_reference"),
    (attention_module, "normalized_distance_reference"),
    (attention_module, "attention_distance_reference"),
    (diversity_module, "diversity_loss_reference"),
    (diversity_module, "diversity_shift_reference"),
]


def _raise(*args, **kwargs):
    raise AssertionError("the reference ran instead of the Triton kernels")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_path_runs(monkeypatch, dtype, device):
    for module, name in REFERENCES:
        monkeypatch.setattr(module, name, _raise)
    x = feature((2, 3, 4, 5), dtype, "channels_last", device=device)
    y = feature((2, 6, 4, 5), dtype, device=device)
    a, b = attention_map(x), attention_map(y)
    (attention_distance(x, y) + normalized_distance(a, b)).backward()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_float64_runs_the_reference(monkeypatch, device):
    calls = []

    def spy(name, fn):
        def wrapped(*args):
            calls.append(name)
            return fn(*args)

        return wrapped

    for module, name in REFERENCES:
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    y = torch.randn(2, 1, 4, 5, dtype=torch.float64, device=device)
    for op, args, name in [
        (attention_map, (x,), "attention_map_reference"),
        (normalized_distance, (x, x.flip(0)), "normalized_distance_reference"),
        (attention_distance, (x, y), "attention_distance_reference"),
    ]:
        calls.clear()
        assert op(*args).dtype == torch.float64
        assert calls[:1] == [name]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_autocast_returns_fp32_for_half_inputs(device):
    x = torch.randn(2, 3, 4, 5, device=device).to(torch.bfloat16).requires_grad_()
    y = torch.randn(2, 2, 4, 5, device=device).to(torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        a = attention_map(x)
        d = attention_distance(x, y)
    assert a.dtype == d.dtype == torch.float32
    d.backward()
    assert x.grad.dtype == torch.bfloat16


def test_attention_module_equals_function():
    x = torch.randn(3, 8, 4, 4)
    y = torch.randn(3, 5, 4, 4)
    assert torch.equal(AttentionDistance()(x, y), attention_distance(x, y))
    xc, yc = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    assert torch.equal(AttentionDistance()(xc, yc), attention_distance(xc, yc))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_modules_equal_functions(device):
    x = feature((3, 4, 5, 6), torch.float32, "channels_last", requires_grad=False, device=device)
    y = feature((3, 2, 5, 6), torch.float32, requires_grad=False, device=device)
    a, b = attention_map(x), attention_map(y)
    assert torch.equal(AttentionDistance()(x, y), attention_distance(x, y))
    assert torch.equal(NormalizedDistance()(a, b), normalized_distance(a, b))


# (op, argument shapes, dtype, device): the kernels' cases in float32 and float64 where the kernels run, and the
# contract's in float32 on the CPU. Five are in both on the CPU under the interpreter: both attention_map cases and
# three attention_distance ones, in float32.
BAD_SHAPES = union(
    [
        (op, shapes, dtype, device)
        for device in TRITON_DEVICE_NAMES
        for dtype in EXACT_DTYPES
        for op, shapes in [
            (attention_map, [(2, 3, 4)]),
            (attention_map, [(2, 3, 4, 5, 6)]),
            (normalized_distance, [(2, 3, 4, 5), (2, 3, 5, 4)]),
            (normalized_distance, [(), ()]),
            (attention_distance, [(2, 3, 4, 5), (3, 3, 4, 5)]),
            (attention_distance, [(2, 3, 4, 5), (2, 3, 4, 6)]),
            (attention_distance, [(2, 3, 20), (2, 3, 20)]),
        ]
    ],
    [
        (op, shapes, torch.float32, "cpu")
        for op, shapes in [
            (attention_map, [(2, 3, 4)]),
            (attention_map, [(2, 3, 4, 5, 6)]),
            (normalized_distance, [(2, 3, 4, 5), (2, 3, 4, 6)]),
            (normalized_distance, [(2, 1, 4, 5), (3, 1, 4, 5)]),
            (attention_distance, [(2, 3, 4, 5), (3, 3, 4, 5)]),
            (attention_distance, [(2, 3, 4, 5), (2, 3, 5, 4)]),
            (attention_distance, [(2, 3, 4, 5), (2, 3, 4, 6)]),
            (attention_distance, [(2, 3, 20), (2, 3, 20)]),
            (attention_distance, [(2, 3, 4, 5), (2, 12, 5)]),
        ]
    ],
)


@pytest.mark.parametrize("op, shapes, dtype, device", params(BAD_SHAPES))
def test_attention_bad_shapes_raise(op, shapes, dtype, device):
    with pytest.raises(ValueError):
        op(*[torch.randn(shape, dtype=dtype, device=device) for shape in shapes])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_normalized_distance_is_two_forward_launches_and_one_backward(device, monkeypatch):
    """No torch epilogue around the kernels: the partial sums and the finish forward, one elementwise backward that
    reads the upstream gradient from device memory; no other kernel either way."""
    x = torch.randn(5, 3, 4, 6, device=device, requires_grad=True)
    y = torch.randn(5, 3, 4, 6, device=device, requires_grad=True)
    with kernels_launched(monkeypatch) as forward:
        loss = normalized_distance(x, y)
    assert forward.triton == ["_distance_partial_kernel", "_distance_finish_kernel"] and forward.aten == []
    grad = torch.tensor(1.5, device=device)
    with kernels_launched(monkeypatch) as backward:
        torch.autograd.grad(loss, [x, y], grad)
    assert backward.triton == ["_distance_backward_kernel"] and backward.aten == []
