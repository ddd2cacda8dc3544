"""The contract of the ``ffsd_kernels`` ops, checked against float64 formulas written out here.

Every public function is compared with an independent float64 transcription of its definition (not with the
library's ``*_reference``, except in ``test_public_equals_reference_on_fp32``), in value and in gradient, so the
same tests hold for the fused Triton kernels that will later sit behind the same names.

Errors: values ``|a − b| / max(|b|, tiny)``, gradients ``max|ga − gb| / max|gb|``. Where the float64 answer is
(numerically) zero — a KL over one class, a distance between one-pixel maps, whose gradients vanish analytically —
the denominator is 1, so the error is absolute. The worst error seen per op and dtype is printed at the end.
"""

import pytest
import torch
import torch.nn.functional as F

import ffsd_kernels
from ffsd_kernels import (
    AttentionDistance,
    KLDivLoss,
    _dispatch,
    attention_distance,
    attention_map,
    diversity_loss,
    diversity_shift,
    kl_div_loss,
    normalized_distance,
)

# Below this a float64 reference counts as zero and the error is taken as absolute.
ZERO = 1e-10
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1e-2}
EXACT_DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])

KL_SHAPES = [(1, 1), (1, 7), (5, 3), (13, 100), (3, 3001)]
TEMPERATURES = [1.0, 2.0, 4.5]
MAP_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (4, 16, 8, 8), (3, 5, 1, 9)]
LAYOUTS = ["nchw", "channels_last"]


# ---------------------------------------------------------------------------------------------------------------
# Error measures and the report of the worst ones
# ---------------------------------------------------------------------------------------------------------------

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


@pytest.fixture(scope="module", autouse=True)
def _report_worst_errors(request):
    yield
    if not WORST:
        return
    lines = ["", "worst relative errors against float64 (op, dtype, kind):"]
    lines += [f"  {op:<22} {dtype:<9} {kind:<12} {err:.3e}" for (op, dtype, kind), err in sorted(WORST.items())]
    # Written past output capture, so that the table shows on a passing run too.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:  # pragma: no cover - only without those plugins
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(line)


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


def make_map(shape, dtype, device, layout="nchw", requires_grad=True) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        if shape[1] > 1 and shape[2] * shape[3] > 1:
            assert not x.is_contiguous()
    return x.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# kl_div_loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=str)
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["t-detached", "t-grad"])
def test_kl_value_and_gradients(shape, temperature, dtype, device, teacher_grad):
    s = (3 * torch.randn(shape, dtype=torch.float64)).to(device, dtype).requires_grad_()
    t = (3 * torch.randn(shape, dtype=torch.float64)).to(device, dtype).requires_grad_(teacher_grad)
    loss = kl_div_loss(s, t, temperature)
    assert loss.shape == () and loss.dtype == dtype and loss.device == s.device
    loss.backward()

    s64, t64 = leaf64(s), leaf64(t, teacher_grad)
    ref = kl64(s64, t64, temperature)
    ref.backward()
    check("kl_div_loss", dtype, "value", value_error(loss, ref))
    check("kl_div_loss", dtype, "grad_student", grad_error(s.grad, s64.grad))
    if teacher_grad:
        check("kl_div_loss", dtype, "grad_teacher", grad_error(t.grad, t64.grad))
    else:
        assert t.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_kl_upstream_gradient_not_one(dtype, device):
    s = torch.randn(7, 33, dtype=torch.float64).to(device, dtype).requires_grad_()
    t = torch.randn(7, 33, dtype=torch.float64).to(device, dtype).requires_grad_()
    (kl_div_loss(s, t, 2.5) * 3.7).backward()
    s64, t64 = leaf64(s), leaf64(t)
    (kl64(s64, t64, 2.5) * 3.7).backward()
    check("kl_div_loss", dtype, "grad_student", grad_error(s.grad, s64.grad))
    check("kl_div_loss", dtype, "grad_teacher", grad_error(t.grad, t64.grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["column_slice", "transposed"])
def test_kl_non_contiguous_inputs(view, device):
    if view == "column_slice":
        s_base = torch.randn(9, 80, device=device, requires_grad=True)
        t_base = torch.randn(9, 80, device=device)
        s, t = s_base[:, ::2], t_base[:, 1::2]
    else:
        s_base = torch.randn(40, 9, device=device, requires_grad=True)
        t_base = torch.randn(40, 9, device=device)
        s, t = s_base.t(), t_base.t()
    assert not s.is_contiguous() and not t.is_contiguous()
    loss = kl_div_loss(s, t, 3.0)
    loss.backward()
    s64 = leaf64(s)
    ref = kl64(s64, leaf64(t, False), 3.0)
    ref.backward()
    check("kl_div_loss", torch.float32, "value", value_error(loss, ref))
    # The gradient lands in the base tensor, at the viewed positions only.
    grad = s_base.grad.t() if view == "transposed" else s_base.grad[:, ::2]
    check("kl_div_loss", torch.float32, "grad_student", grad_error(grad, s64.grad))
    if view == "column_slice":
        assert torch.all(s_base.grad[:, 1::2] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 3), (13, 100), (3, 3001)], ids=str)
def test_kl_half_precision(shape, dtype, device):
    s = (2 * torch.randn(shape)).to(device, dtype).requires_grad_()
    t = (2 * torch.randn(shape)).to(device, dtype)
    loss = kl_div_loss(s, t, 2.0)
    assert loss.dtype == dtype and loss.shape == ()
    loss.backward()
    assert s.grad.dtype == dtype
    s64 = leaf64(s)  # the half inputs, exactly, in float64
    ref = kl64(s64, leaf64(t, False), 2.0)
    ref.backward()
    check("kl_div_loss", dtype, "value", value_error(loss, ref))
    check("kl_div_loss", dtype, "grad_student", grad_error(s.grad, s64.grad))


def test_kl_detached_teacher_gets_no_gradient():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    kl_div_loss(s, t.detach(), 4.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [
        ((4, 10), (4, 11)),
        ((4, 10), (5, 10)),
        ((10,), (10,)),
        ((2, 3, 4), (2, 3, 4)),
    ],
)
def test_kl_bad_shapes_raise(student_shape, teacher_shape):
    with pytest.raises(ValueError):
        kl_div_loss(torch.randn(student_shape), torch.randn(teacher_shape))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kl_module_equals_function(temperature):
    s, t = torch.randn(6, 20), torch.randn(6, 20)
    module = KLDivLoss(temperature=temperature)
    assert torch.equal(module(s, t), kl_div_loss(s, t, temperature))
    assert f"temperature={temperature}" in repr(module)
    assert torch.equal(KLDivLoss()(s, t), kl_div_loss(s, t))


def test_kl_identical_logits_give_zero():
    s = torch.randn(3, 50, dtype=torch.float64, requires_grad=True)
    loss = kl_div_loss(s, s.detach().clone(), 2.0)
    loss.backward()
    assert abs(loss.item()) < 1e-14
    assert s.grad.abs().max().item() < 1e-14


# ---------------------------------------------------------------------------------------------------------------
# attention_map / normalized_distance / attention_distance
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", MAP_SHAPES, ids=str)
def test_attention_map(shape, layout, dtype, device):
    x = make_map(shape, dtype, device, layout)
    a = attention_map(x)
    assert a.shape == (shape[0], 1, *shape[2:]) and a.dtype == dtype
    upstream = torch.randn(a.shape, dtype=torch.float64)
    a.backward(upstream.to(device, dtype))
    x64 = leaf64(x)
    a64 = attention_map64(x64)
    a64.backward(upstream)
    check("attention_map", dtype, "value", elementwise_error(a, a64))
    check("attention_map", dtype, "grad", grad_error(x.grad, x64.grad))


def compare_distance(name, op, op64, x, y):
    """Value and both gradients of a two-argument loss against its float64 formula."""
    d = op(x, y)
    assert d.shape == () and d.dtype == x.dtype
    d.backward()
    x64, y64 = leaf64(x), leaf64(y)
    d64 = op64(x64, y64)
    d64.backward()
    check(name, x.dtype, "value", value_error(d, d64))
    check(name, x.dtype, "grad_x", grad_error(x.grad, x64.grad))
    check(name, x.dtype, "grad_y", grad_error(y.grad, y64.grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", MAP_SHAPES, ids=str)
def test_normalized_distance(shape, layout, dtype, device):
    x = make_map(shape, dtype, device, layout)
    y = make_map(shape, dtype, device, layout)
    compare_distance("normalized_distance", normalized_distance, normalized_distance64, x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("extra_channels", [0, 3], ids=["same-C", "C+3"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", MAP_SHAPES, ids=str)
def test_attention_distance(shape, layout, extra_channels, dtype, device):
    x = make_map(shape, dtype, device, layout)
    y = make_map((shape[0], shape[1] + extra_channels, *shape[2:]), dtype, device, layout)
    compare_distance("attention_distance", attention_distance, attention_distance64, x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_upstream_gradient_not_one(layout, dtype, device):
    x = make_map((3, 6, 4, 5), dtype, device, layout)
    y = make_map((3, 2, 4, 5), dtype, device, layout)
    (attention_distance(x, y) * 3.7).backward()
    x64, y64 = leaf64(x), leaf64(y)
    (attention_distance64(x64, y64) * 3.7).backward()
    check("attention_distance", dtype, "grad_x", grad_error(x.grad, x64.grad))
    check("attention_distance", dtype, "grad_y", grad_error(y.grad, y64.grad))

    u = make_map((3, 1, 4, 5), dtype, device)
    v = make_map((3, 1, 4, 5), dtype, device)
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
    x = make_map((3, 4, 5, 6), dtype, device, layout, requires_grad=False)
    x[1] = 0
    x.requires_grad_()
    y = make_map((3, 2, 5, 6), dtype, device, layout)
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
    x = make_map((4, 16, 8, 8), dtype, device, layout)
    y = make_map((4, 8, 8, 8), dtype, device, layout)
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


@pytest.mark.parametrize(
    "op, args",
    [
        (attention_map, [(2, 3, 4)]),
        (attention_map, [(2, 3, 4, 5, 6)]),
        (normalized_distance, [(2, 3, 4, 5), (2, 3, 4, 6)]),
        (normalized_distance, [(2, 1, 4, 5), (3, 1, 4, 5)]),
        (attention_distance, [(2, 3, 4, 5), (3, 3, 4, 5)]),
        (attention_distance, [(2, 3, 4, 5), (2, 3, 5, 4)]),
        (attention_distance, [(2, 3, 4, 5), (2, 3, 4, 6)]),
        (attention_distance, [(2, 3, 20), (2, 3, 20)]),
        (attention_distance, [(2, 3, 4, 5), (2, 12, 5)]),
    ],
    ids=lambda v: v.__name__ if callable(v) else str(v),
)
def test_attention_bad_shapes_raise(op, args):
    with pytest.raises(ValueError):
        op(*[torch.randn(shape) for shape in args])


def test_attention_module_equals_function():
    x = torch.randn(3, 8, 4, 4)
    y = torch.randn(3, 5, 4, 4)
    assert torch.equal(AttentionDistance()(x, y), attention_distance(x, y))
    xc, yc = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    assert torch.equal(AttentionDistance()(xc, yc), attention_distance(xc, yc))


# ---------------------------------------------------------------------------------------------------------------
# diversity_loss / diversity_shift
# ---------------------------------------------------------------------------------------------------------------

# [B, 1, H, W]: N = 1, 2, 3 (θ = the smallest), 2×2 (⌊4/3⌋ = 1), 7×9 (the 21st smallest).
DIVERSITY_SHAPES = [(3, 1, 1, 1), (2, 1, 1, 2), (4, 1, 3, 1), (2, 1, 2, 2), (5, 1, 7, 9)]


def positive_map(shape, dtype, device, requires_grad=False) -> torch.Tensor:
    """A random attention-like map (non-negative)."""
    return torch.rand(shape, dtype=torch.float64).add(0.05).to(device, dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["nonneg", "signed"])
@pytest.mark.parametrize("shape", DIVERSITY_SHAPES, ids=str)
def test_diversity_loss(shape, signed, dtype, device):
    if signed:
        x = torch.randn(shape, dtype=torch.float64).to(device, dtype).requires_grad_()
        y = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    else:
        x = positive_map(shape, dtype, device, requires_grad=True)
        y = positive_map(shape, dtype, device)
    loss = diversity_loss(x, y)
    assert loss.shape == () and loss.dtype == dtype
    (loss * 1.9).backward()
    x64 = leaf64(x)
    ref = diversity_loss64(x64, leaf64(y, False))
    (ref * 1.9).backward()
    check("diversity_loss", dtype, "value", value_error(loss, ref))
    check("diversity_loss", dtype, "grad_x", grad_error(x.grad, x64.grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 1, 1, 1), (2, 4, 1, 2), (4, 3, 3, 1), (2, 6, 2, 2), (5, 16, 7, 9)], ids=str)
def test_diversity_shift(shape, layout, dtype, device):
    y = make_map(shape, dtype, device, layout, requires_grad=False)
    out = diversity_shift(y)
    assert out.shape == y.shape and out.dtype == dtype
    check("diversity_shift", dtype, "value", value_error(out, diversity_shift64(leaf64(y, False))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_diversity_shift_channels_last_equals_nchw(dtype, device):
    y = make_map((4, 16, 7, 9), dtype, device, requires_grad=False)
    y_cl = y.contiguous(memory_format=torch.channels_last)
    out, out_cl = diversity_shift(y), diversity_shift(y_cl)
    assert out_cl.shape == out.shape and out_cl.dtype == dtype
    # Same values; only the order of the channel sum may differ.
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(out_cl, out, rtol=tol, atol=tol * out.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_diversity_ties(dtype, device):
    # Quantised maps: many entries equal each other and equal θ. sign(ŷ − θ) = 0 there, so the target is ν/2.
    y = torch.randint(0, 4, (6, 1, 6, 6)).to(device, dtype)
    y[0] = 2  # a constant map: every entry is tied with θ
    x = positive_map((6, 1, 6, 6), dtype, device, requires_grad=True)
    loss = diversity_loss(x, y)
    loss.backward()
    x64 = leaf64(x)
    ref = diversity_loss64(x64, leaf64(y, False))
    ref.backward()
    check("diversity_loss", dtype, "value", value_error(loss, ref))
    check("diversity_loss", dtype, "grad_x", grad_error(x.grad, x64.grad))

    # Shift on C = 1 maps of ±1, 0, ±2: a = y² has values {0, 1, 4} with many ties.
    z = torch.tensor([[[[1.0, -1.0, 2.0], [0.0, 1.0, -2.0], [1.0, 0.0, 1.0]]]], dtype=torch.float64)
    # a = [1, 1, 4, 0, 1, 4, 1, 0, 1] (five 1s, two 4s, two 0s), ν = sqrt(5·1 + 2·16) = sqrt(37), N = 9 → θ = the
    # 3rd smallest of â = 1/ν, shared by five entries.
    # Entry (0, 0): â = θ, so the target is ν/2 and the shift is (ν/2 − 1/ν)·ν / 1 = 18.5 − 1 = 17.5: output 1 + 17.5.
    # Entry (1, 0): â = 0 < θ keeps ŷ, shift 0: output 0.  Entry (0, 2): â = 4/ν > θ, target ν − 4/ν,
    # shift (ν − 8/ν)·ν = 37 − 8 = 29: output 2 + 29.
    out = diversity_shift(z.to(device, dtype))
    assert out[0, 0, 0, 0].item() == pytest.approx(18.5, rel=TOL[dtype])
    assert out[0, 0, 1, 0].item() == pytest.approx(0.0, abs=TOL[dtype])
    assert out[0, 0, 0, 2].item() == pytest.approx(31.0, rel=TOL[dtype])
    check("diversity_shift", dtype, "value", value_error(out, diversity_shift64(z)))
    ties = torch.randint(-2, 3, (3, 2, 5, 5)).to(device, dtype)
    check("diversity_shift", dtype, "value", value_error(diversity_shift(ties), diversity_shift64(leaf64(ties, False))))


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_diversity_hand_computed(dtype):
    # diversity_loss, B = 1, N = 3 (θ = the smallest entry of ŷ):
    #   y = [3, 0, 4]: ν = 5, ŷ = [0.6, 0, 0.8], θ = 0.
    #   ỹ = [ν − 0.6, ν/2 (tie), ν − 0.8] = [4.4, 2.5, 4.2].
    #   x = [1, 2, 2]: ‖x‖ = 3, n(x) = [1/3, 2/3, 2/3].
    #   loss = ((1/3 − 4.4)² + (2/3 − 2.5)² + (2/3 − 4.2)²) / 3 = (3721/225 + 121/36 + 2809/225) / 3 = 1943/180.
    x = torch.tensor([[[[1.0, 2.0, 2.0]]]], dtype=dtype, requires_grad=True)
    y = torch.tensor([[[[3.0, 0.0, 4.0]]]], dtype=dtype)
    loss = diversity_loss(x, y)
    assert loss.item() == pytest.approx(1943 / 180, rel=TOL[dtype])
    # d loss / d x = J_n(x)ᵀ · 2 (n(x) − ỹ) / 3, with J_n(x) = (I − n nᵀ) / ‖x‖:
    #   r = 2/3 · (n − ỹ) = 2/3 · [−61/15, −11/6, −53/15];  nᵀr = 2/3 · (−61/45 − 11/9 − 106/45) = 2/3 · (−222/45)
    #   grad = (r − n · nᵀr) / 3.
    n = torch.tensor([1 / 3, 2 / 3, 2 / 3], dtype=torch.float64)
    r = 2 / 3 * torch.tensor([-61 / 15, -11 / 6, -53 / 15], dtype=torch.float64)
    expected = (r - n * (2 / 3 * -222 / 45)) / 3
    loss.backward()
    check("diversity_loss", dtype, "grad_x", grad_error(x.grad.flatten(), expected))

    # diversity_shift, B = 1, C = 1, 2×2: y = [1, 2, 2, 4] → a = y² = [1, 4, 4, 16], ν = sqrt(289) = 17,
    #   â = [1, 4, 4, 16]/17, N = 4 → θ = the smallest = 1/17.
    #   ỹ = [ν/2 (tie), ν − 4/17, ν − 4/17, ν − 16/17]; shift = (ỹ − â)·ν / C
    #     = [17·8.5 − 1, 289 − 8, 289 − 8, 289 − 32] = [143.5, 281, 281, 257];
    #   output y + shift = [144.5, 283, 283, 261].
    y = torch.tensor([[[[1.0, 2.0], [2.0, 4.0]]]], dtype=dtype)
    out = diversity_shift(y)
    expected = torch.tensor([[[[144.5, 283.0], [283.0, 261.0]]]], dtype=torch.float64)
    check("diversity_shift", dtype, "value", value_error(out, expected))
    # With C = 2 channels of equal magnitude the attention map is the same but the shift per channel halves.
    y2 = torch.cat([y, -y], dim=1)
    out2 = diversity_shift(y2)
    half_shift = (expected - y.double()) / 2
    check(
        "diversity_shift",
        dtype,
        "value",
        value_error(out2, torch.cat([y.double() + half_shift, -y.double() + half_shift], dim=1)),
    )


def test_diversity_bad_shapes_raise():
    with pytest.raises(ValueError):
        diversity_loss(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 5))
    with pytest.raises(ValueError):
        diversity_loss(torch.rand(2, 1, 4, 4), torch.rand(3, 1, 4, 4))
    with pytest.raises(ValueError):
        diversity_shift(torch.rand(2, 16, 4))
    with pytest.raises(ValueError):
        diversity_shift(torch.rand(2, 3, 4, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# The switch point: on fp32 CPU input without the interpreter every public function is its reference, bit for bit;
# with it, the Triton kernels agree with the reference to fp32 precision.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "interpreter",
    [False, pytest.param(True, marks=pytest.mark.skipif(not _dispatch.INTERPRETER, reason="needs TRITON_INTERPRET=1"))],
    ids=["reference", "interpreted"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_against_reference_on_fp32_cpu(layout, interpreter, monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRETER", interpreter)
    s, t = torch.randn(6, 40), torch.randn(6, 40)
    labels = torch.randint(0, 40, (6,))
    x = make_map((3, 8, 5, 7), torch.float32, "cpu", layout, requires_grad=False)
    y = make_map((3, 4, 5, 7), torch.float32, "cpu", layout, requires_grad=False)
    a, b = attention_map(x), attention_map(y)
    pairs = [
        (ffsd_kernels.kl_div_loss(s, t, 3.0), ffsd_kernels.kl_div_loss_reference(s, t, 3.0)),
        (KLDivLoss(3.0)(s, t), ffsd_kernels.kl_div_loss_reference(s, t, 3.0)),
        (ffsd_kernels.kl_div_loss(s, [t, s], 3.0), ffsd_kernels.kl_div_loss_reference(s, [t, s], 3.0)),
        (
            torch.stack(ffsd_kernels.cross_entropy_kl_loss(s, t, labels, 3.0)),
            torch.stack(ffsd_kernels.cross_entropy_kl_loss_reference(s, t, labels, 3.0)),
        ),
        (ffsd_kernels.mutual_kl_loss([s, t], 3.0), ffsd_kernels.mutual_kl_loss_reference([s, t], 3.0)),
        (ffsd_kernels.attention_map(x), ffsd_kernels.attention_map_reference(x)),
        (ffsd_kernels.normalized_distance(a, b), ffsd_kernels.normalized_distance_reference(a, b)),
        (ffsd_kernels.attention_distance(x, y), ffsd_kernels.attention_distance_reference(x, y)),
        (AttentionDistance()(x, y), ffsd_kernels.attention_distance_reference(x, y)),
        (ffsd_kernels.diversity_loss(a, b), ffsd_kernels.diversity_loss_reference(a, b)),
        (ffsd_kernels.diversity_shift(x), ffsd_kernels.diversity_shift_reference(x)),
    ]
    for i, (public, reference) in enumerate(pairs):
        assert public.dtype == reference.dtype, i
        if interpreter:
            torch.testing.assert_close(public, reference, rtol=1e-5, atol=1e-7, msg=f"pair {i}")
        else:
            assert torch.equal(public, reference), i
