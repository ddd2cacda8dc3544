"""The Triton kernels behind attention_map, normalized_distance, attention_distance, diversity_loss, diversity_shift.

On a machine without a GPU they run through Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``).
Values and gradients are compared with float64 formulas (autograd on ``.double()`` copies of the inputs, which are
exact for half inputs too): layouts NCHW / channels-last / slices along C and along H, W; odd sizes, one pixel, one
channel, one sample; ``grad_output ≠ 1``; both arguments requiring grad; 56×56 maps and maps full of ties. Small
launch configurations are forced in some cases so that every loop (channel blocks, sample splits, streamed rows in
the θ selection) runs more than once on small inputs.

Tolerances (relative, as in tests/test_kernels.py): fp32 1e-5. Half inputs carry rounding of the outputs and
gradients: fp16 3e-3, bf16 2e-2 (bf16 keeps 8 significant bits, and the interpreter converts fp32 to bf16 by
truncation, not rounding, so its error is up to 2⁻⁷ ≈ 7.8e-3 per rounding).
"""

import pytest
import torch

import ffsd_kernels
from ffsd_kernels import (
    AttentionDistance,
    DiversityLoss,
    NormalizedDistance,
    attention_distance,
    attention_map,
    diversity_loss,
    diversity_shift,
    normalized_distance,
)
from ffsd_kernels import attention as attention_module
from ffsd_kernels import diversity as diversity_module
from ffsd_kernels._dispatch import INTERPRETER
from tests.test_kernels import (  # noqa: F401  (_report_worst_errors: prints the worst errors of this file too)
    _report_worst_errors,
    attention_map64,
    check,
    diversity_loss64,
    diversity_shift64,
    elementwise_error,
    grad_error,
    leaf64,
    normalized_distance64,
    value_error,
)

DEVICE = "cpu" if INTERPRETER else "cuda"
# On a GPU machine (no interpreter) the whole module runs on CUDA, and `make gpu-check` selects it with `-m cuda`.
pytestmark = [
    pytest.mark.skipif(
        not (INTERPRETER or torch.cuda.is_available()), reason="needs Triton's interpreter or a CUDA device"
    )
]
pytestmark += [pytest.mark.cuda] if DEVICE == "cuda" else []
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
VIEWS = ["nchw", "channels_last", "slice_c", "slice_hw", "slice_hw_cl"]


def feature(shape, dtype, view="nchw", requires_grad=True, fn=None) -> torch.Tensor:
    """A leaf tensor of ``shape`` laid out as ``view``; its strides are kept (``detach`` of a view keeps them)."""
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
    x = base.to(DEVICE, dtype)[index].detach()
    assert x.shape == shape
    if view != "nchw" and channels > 1 and height * width > 1:
        assert not x.is_contiguous()
    return x.requires_grad_(requires_grad)


def compare(name, dtype, op, op64, inputs, grad_names, upstream=1.0, tol=None, value_kind=value_error):
    """Value and gradients of ``op(*inputs)`` against ``op64`` on float64 copies, with the loss scaled by
    ``upstream`` (a number, or a tensor for non-scalar outputs) before backward."""
    tol = TOL[dtype] if tol is None else tol
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


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny launch configurations, so that every loop of every kernel runs several times on small inputs."""
    monkeypatch.setattr(attention_module, "_map_config", lambda c, p, inner: (2, 4, 1))
    monkeypatch.setattr(
        attention_module, "_distance_config",
        lambda b, n: (8, 16, max(-(-n // 16), 1), 1),
    )  # fmt: skip
    monkeypatch.setattr(diversity_module, "_select_config", lambda n: (16, n <= 16, 1))


# ---------------------------------------------------------------------------------------------------------------
# attention_map
# ---------------------------------------------------------------------------------------------------------------

MAP_CASES = [
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, view", MAP_CASES, ids=str)
def test_attention_map(shape, view, dtype):
    x = feature(shape, dtype, view)
    upstream = torch.randn(shape[0], 1, *shape[2:], dtype=torch.float64)
    a = compare(
        "attention_map", dtype, attention_map, attention_map64, [x], ["grad"], upstream, value_kind=elementwise_error
    )
    assert a.shape == (shape[0], 1, *shape[2:]) and a.dtype == dtype


def test_attention_map_small_blocks(small_blocks):
    for view in ("nchw", "channels_last", "slice_hw"):
        x = feature((2, 7, 3, 5), torch.float32, view)
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

DISTANCE_CASES = [
    ((1, 1, 1, 1), "nchw", "nchw"),
    ((2, 3, 5, 7), "nchw", "nchw"),
    ((2, 3, 5, 7), "channels_last", "channels_last"),
    ((2, 3, 5, 7), "channels_last", "nchw"),  # mixed layouts: y read in x's memory order
    ((3, 4, 3, 2), "slice_c", "slice_hw"),
    ((1, 2, 4, 5), "slice_hw_cl", "channels_last"),
    ((2, 1, 56, 56), "nchw", "nchw"),  # several slices per sample
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, view_x, view_y", DISTANCE_CASES, ids=str)
def test_normalized_distance(shape, view_x, view_y, dtype):
    x, y = feature(shape, dtype, view_x), feature(shape, dtype, view_y)
    # Scaled like a loss under fp16 loss scaling: unscaled, the gradients of a 56·56 map (~2/(B·N·‖x‖)·|u − v|,
    # about 1e-7) are below fp16's normal range and lose their digits.
    d = compare(
        "normalized_distance",
        dtype,
        normalized_distance,
        normalized_distance64,
        [x, y],
        ["grad_x", "grad_y"],
        upstream=-0.6 * 1024,
    )
    assert d.shape == () and d.dtype == dtype


@pytest.mark.parametrize("shape", [(5,), (3, 13), (2, 3, 4), (2, 2, 3, 2, 2)], ids=str)
def test_normalized_distance_other_ranks(shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    y = torch.randn(shape, device=DEVICE, requires_grad=True)
    compare(
        "normalized_distance",
        torch.float32,
        normalized_distance,
        normalized_distance64,
        [x, y],
        ["grad_x", "grad_y"],
        upstream=2.5,
    )


def test_normalized_distance_detached_and_small_blocks(small_blocks):
    x = feature((2, 3, 5, 7), torch.float32, "channels_last")
    y = feature((2, 3, 5, 7), torch.float32, "slice_hw", requires_grad=False)
    compare(
        "normalized_distance",
        torch.float32,
        normalized_distance,
        normalized_distance64,
        [x, y],
        ["grad_x", None],
        upstream=1.7,
    )
    x = feature((2, 3, 5, 7), torch.float32, "nchw", requires_grad=False)
    y = feature((2, 3, 5, 7), torch.float32, "slice_c")
    compare(
        "normalized_distance",
        torch.float32,
        normalized_distance,
        normalized_distance64,
        [x, y],
        [None, "grad_y"],
        upstream=1.7,
    )


def test_normalized_distance_zero_samples():
    x = torch.randn(3, 1, 4, 5, device=DEVICE)
    y = torch.randn(3, 1, 4, 5, device=DEVICE)
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


def attention_distance64(x, y):
    return normalized_distance64(attention_map64(x), attention_map64(y))


ATTENTION_CASES = [
    ((1, 1, 1, 1), 1, "nchw", "nchw"),  # one pixel: d = 0 and the gradients vanish
    ((2, 1, 5, 7), 3, "nchw", "channels_last"),
    ((1, 6, 3, 5), 2, "channels_last", "channels_last"),
    ((3, 5, 4, 3), 7, "slice_c", "slice_hw"),
    ((2, 3, 6, 5), 4, "slice_hw_cl", "nchw"),
    ((2, 4, 9, 11), 3, "channels_last", "slice_c"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, channels_y, view_x, view_y", ATTENTION_CASES, ids=str)
def test_attention_distance(shape, channels_y, view_x, view_y, dtype):
    x = feature(shape, dtype, view_x)
    y = feature((shape[0], channels_y, *shape[2:]), dtype, view_y)
    d = compare(
        "attention_distance",
        dtype,
        attention_distance,
        attention_distance64,
        [x, y],
        ["grad_x", "grad_y"],
        upstream=3.7,
    )
    assert d.shape == () and d.dtype == dtype


def test_attention_distance_detached_and_small_blocks(small_blocks):
    x = feature((2, 5, 3, 7), torch.float32, "channels_last")
    y = feature((2, 3, 3, 7), torch.float32, "slice_hw", requires_grad=False)
    compare(
        "attention_distance",
        torch.float32,
        attention_distance,
        attention_distance64,
        [x, y],
        ["grad_x", None],
        upstream=0.4,
    )


def test_attention_distance_relu_features():
    x = feature((2, 8, 7, 7), torch.float32, "channels_last", fn=torch.relu)
    y = feature((2, 4, 7, 7), torch.float32, "channels_last", fn=torch.relu)
    compare("attention_distance", torch.float32, attention_distance, attention_distance64, [x, y], ["grad_x", "grad_y"])


# ---------------------------------------------------------------------------------------------------------------
# diversity_loss
# ---------------------------------------------------------------------------------------------------------------


def positive(shape, dtype, requires_grad=False):
    return feature(shape, dtype, fn=lambda t: t.abs() + 0.05, requires_grad=requires_grad)


def relu_map(shape, dtype):
    return feature(shape, dtype, fn=torch.relu, requires_grad=False)


def quantised(shape, dtype):
    return feature(shape, dtype, fn=lambda t: t.mul(1.5).round().clamp_min(0), requires_grad=False)


DIVERSITY_CASES = [
    ((3, 1, 1, 1), positive),  # N = 1
    ((2, 1, 1, 2), positive),  # N = 2: θ is the smallest
    ((4, 1, 3, 1), positive),  # N = 3
    ((2, 1, 7, 9), relu_map),  # half the entries are 0 and tie with θ
    ((3, 1, 5, 5), quantised),  # values {0, 1, 2, ...}: many ties
    ((2, 1, 56, 56), relu_map),  # N = 3136
    ((2, 1, 56, 56), positive),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, make_y", DIVERSITY_CASES, ids=str)
def test_diversity_loss(shape, make_y, dtype):
    x = positive(shape, dtype, requires_grad=True)
    y = make_y(shape, dtype)
    loss = compare("diversity_loss", dtype, diversity_loss, diversity_loss64, [x, y], ["grad_x", None], upstream=1.9)
    assert loss.shape == () and loss.dtype == dtype


def test_diversity_loss_layouts_and_signs():
    # Signed maps, a [B, C, H, W] map that is channels-last, a slice, and zero samples (ν = 0; ‖x‖ clamped).
    x = feature((2, 3, 4, 5), torch.float32, "channels_last")
    y = feature((2, 3, 4, 5), torch.float32, "slice_hw", requires_grad=False)
    compare("diversity_loss", torch.float32, diversity_loss, diversity_loss64, [x, y], ["grad_x", None])
    x = feature((3, 1, 6, 4), torch.float32, requires_grad=False)
    y = relu_map((3, 1, 6, 4), torch.float32)
    x[1] = 0
    y[2] = 0
    x.requires_grad_()
    compare("diversity_loss", torch.float32, diversity_loss, diversity_loss64, [x, y], ["grad_x", None])
    x = torch.randn(4, 17, device=DEVICE, requires_grad=True)  # a [B, N] input
    y = torch.randn(4, 17, device=DEVICE).round()
    compare("diversity_loss", torch.float32, diversity_loss, diversity_loss64, [x, y], ["grad_x", None], upstream=-3.0)


def test_diversity_loss_streamed_rows(small_blocks):
    # Rows longer than BLOCK: the selection re-reads the row in chunks on every pass.
    for make_y in (positive, relu_map, quantised):
        x = positive((2, 1, 7, 9), torch.float32, requires_grad=True)
        compare(
            "diversity_loss",
            torch.float32,
            diversity_loss,
            diversity_loss64,
            [x, make_y((2, 1, 7, 9), torch.float32)],
            ["grad_x", None],
            upstream=0.7,
        )


def test_diversity_loss_y_gets_no_gradient():
    x = positive((2, 1, 4, 4), torch.float32, requires_grad=True)
    y = positive((2, 1, 4, 4), torch.float32, requires_grad=True)
    diversity_loss(x, y).backward()
    assert x.grad is not None and y.grad is None


def test_diversity_theta_is_exact():
    # θ must be the ⌊N/3⌋-th smallest exactly, on rows whose entries are a few fp32 ulps apart (8 ulps: far enough
    # that dividing by ν keeps them distinct in fp32 as in float64), all positive, all negative, or around zero; and
    # −0 ties with +0.
    ulps = (torch.randperm(30, dtype=torch.int32) * 8).view(1, 1, 1, 30)
    near_one = (torch.ones(1, 1, 1, 30).view(torch.int32) + ulps).view(torch.float32)
    around_zero = near_one - (1.0 + 15 * 8 * 2**-23)
    zeros = torch.tensor([0.0, -0.0, 1.0, -0.0, 2.0, 0.0] * 5).view(1, 1, 1, 30)
    y = torch.cat([near_one, -near_one, around_zero, zeros], dim=0).to(DEVICE)
    assert (around_zero == 0).sum() == 1 and (zeros == 0).sum() == 20
    x = positive((4, 1, 1, 30), torch.float32, requires_grad=True)
    compare("diversity_loss", torch.float32, diversity_loss, diversity_loss64, [x, y], ["grad_x", None])


# ---------------------------------------------------------------------------------------------------------------
# diversity_shift
# ---------------------------------------------------------------------------------------------------------------

SHIFT_CASES = [
    ((3, 1, 1, 1), "nchw", None),
    ((1, 1, 2, 2), "nchw", None),
    ((2, 4, 1, 2), "channels_last", None),
    ((2, 5, 7, 9), "nchw", None),
    ((2, 5, 7, 9), "channels_last", None),
    ((2, 3, 4, 6), "slice_c", None),
    ((2, 3, 4, 6), "slice_hw_cl", None),
    ((3, 2, 5, 5), "nchw", "ties"),  # entries in {−2, …, 2}: many ties of a at θ
    ((1, 2, 56, 56), "channels_last", "relu"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, view, kind", SHIFT_CASES, ids=str)
def test_diversity_shift(shape, view, kind, dtype):
    fn = {None: None, "ties": lambda t: t.mul(1.2).round().clamp(-2, 2), "relu": torch.relu}[kind]
    y = feature(shape, dtype, view, fn=fn)
    upstream = torch.randn(shape, dtype=torch.float64)
    out = compare("diversity_shift", dtype, diversity_shift, diversity_shift64, [y], ["grad"], upstream)
    assert out.shape == y.shape and out.dtype == dtype
    if view == "channels_last" and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_diversity_shift_zero_sample_and_small_blocks(small_blocks):
    y = feature((3, 5, 3, 7), torch.float32, "channels_last", requires_grad=False)
    y[1] = 0
    y.requires_grad_()
    upstream = torch.randn(y.shape, dtype=torch.float64)
    compare("diversity_shift", torch.float32, diversity_shift, diversity_shift64, [y], ["grad"], upstream)
    y = feature((2, 3, 7, 5), torch.float32, "slice_hw", fn=lambda t: t.round())
    compare(
        "diversity_shift",
        torch.float32,
        diversity_shift,
        diversity_shift64,
        [y],
        ["grad"],
        torch.randn(y.shape, dtype=torch.float64),
    )


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_path_runs(monkeypatch, dtype):
    for module, name in [*REFERENCES, (diversity_module, "_reflected_target")]:
        monkeypatch.setattr(module, name, _raise)
    monkeypatch.setattr(torch.Tensor, "kthvalue", _raise)
    x = feature((2, 3, 4, 5), dtype, "channels_last")
    y = feature((2, 6, 4, 5), dtype)
    a, b = attention_map(x), attention_map(y)
    (attention_distance(x, y) + normalized_distance(a, b) + diversity_loss(a, b.detach())).backward()
    diversity_shift(x).sum().backward()


def test_float64_runs_the_reference(monkeypatch):
    calls = []

    def spy(name, fn):
        def wrapped(*args):
            calls.append(name)
            return fn(*args)

        return wrapped

    for module, name in REFERENCES:
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=DEVICE)
    y = torch.randn(2, 1, 4, 5, dtype=torch.float64, device=DEVICE)
    for op, args, name in [
        (attention_map, (x,), "attention_map_reference"),
        (normalized_distance, (x, x.flip(0)), "normalized_distance_reference"),
        (attention_distance, (x, y), "attention_distance_reference"),
        (diversity_loss, (y, y.flip(0)), "diversity_loss_reference"),
        (diversity_shift, (x,), "diversity_shift_reference"),
    ]:
        calls.clear()
        assert op(*args).dtype == torch.float64
        assert calls[:1] == [name]


def test_autocast_returns_fp32_for_half_inputs():
    x = torch.randn(2, 3, 4, 5, device=DEVICE).to(torch.bfloat16).requires_grad_()
    y = torch.randn(2, 2, 4, 5, device=DEVICE).to(torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        a = attention_map(x)
        d = attention_distance(x, y)
        v = diversity_loss(a, a.detach().flip(0))
        s = diversity_shift(x)
    assert a.dtype == d.dtype == v.dtype == torch.float32
    assert s.dtype == torch.bfloat16
    (d + v).backward()
    assert x.grad.dtype == torch.bfloat16


def test_modules_equal_functions():
    x = feature((3, 4, 5, 6), torch.float32, "channels_last", requires_grad=False)
    y = feature((3, 2, 5, 6), torch.float32, requires_grad=False)
    a, b = attention_map(x), attention_map(y)
    assert torch.equal(AttentionDistance()(x, y), attention_distance(x, y))
    assert torch.equal(NormalizedDistance()(a, b), normalized_distance(a, b))
    assert torch.equal(DiversityLoss()(a, b), diversity_loss(a, b))
    assert ffsd_kernels.DiversityLoss is DiversityLoss


@pytest.mark.parametrize(
    "op, shapes",
    [
        (attention_map, [(2, 3, 4)]),
        (attention_map, [(2, 3, 4, 5, 6)]),
        (normalized_distance, [(2, 3, 4, 5), (2, 3, 5, 4)]),
        (normalized_distance, [(), ()]),
        (attention_distance, [(2, 3, 4, 5), (3, 3, 4, 5)]),
        (attention_distance, [(2, 3, 4, 5), (2, 3, 4, 6)]),
        (attention_distance, [(2, 3, 20), (2, 3, 20)]),
        (diversity_loss, [(2, 1, 4, 4), (2, 1, 4, 5)]),
        (diversity_loss, [(), ()]),
        (diversity_shift, [(2, 16, 4)]),
    ],
    ids=lambda v: v.__name__ if callable(v) else str(v),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bad_shapes_raise(op, shapes, dtype):
    with pytest.raises(ValueError):
        op(*[torch.randn(shape, dtype=dtype, device=DEVICE) for shape in shapes])
