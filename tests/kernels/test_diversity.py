"""``diversity_loss`` and ``diversity_shift`` against float64 formulas written out in ``tests/helpers``.

The contract tests call the public functions on every device (the CPU always: the Triton kernels under the
interpreter, the reference without; CUDA where there is one), the kernel tests only where the Triton kernels run
(the CPU under ``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets where there is no GPU; CUDA). Values and
gradients are compared with float64 formulas (autograd on ``.double()`` copies): N = 1, 2, 3 (θ is then the
smallest), 56×56 maps, maps full of ties, hand-computed cases, θ a few ulps from its neighbours. Small launch
configurations are forced in some cases so that the θ selection streams rows longer than its block.

Tolerances (relative): fp32 1e-5, fp64 1e-12, fp16 3e-3, bf16 2e-2 (see ``test_attention.py``).
"""

import pytest
import torch

from ffsd_kernels import (
    DiversityLoss,
    attention_map,
    diversity_loss,
    diversity_shift,
)
from ffsd_kernels import attention as attention_module
from ffsd_kernels import diversity as diversity_module
from tests.helpers import (
    DEVICE_NAMES,
    DEVICES,
    EXACT_DTYPES,
    TOL,
    TRITON_DEVICE_NAMES,
    TRITON_DEVICES,
    check,
    compare,
    diversity_loss64,
    diversity_shift64,
    feature,
    grad_error,
    leaf64,
    params,
    positive,
    union,
    value_error,
)
from tests.helpers.kernel_launches import kernels_launched

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the kernels' dtypes
KERNEL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 3e-3, torch.bfloat16: 2e-2}
LAYOUTS = ["nchw", "channels_last"]


def signed(shape, dtype, requires_grad=False, device="cpu"):
    return feature(shape, dtype, requires_grad=requires_grad, device=device)


def relu_map(shape, dtype, requires_grad=False, device="cpu"):
    return feature(shape, dtype, fn=torch.relu, requires_grad=requires_grad, device=device)


def quantised(shape, dtype, requires_grad=False, device="cpu"):
    levels = lambda t: t.mul(1.5).round().clamp_min(0)  # values {0, 1, 2, ...}
    return feature(shape, dtype, fn=levels, requires_grad=requires_grad, device=device)


# ---------------------------------------------------------------------------------------------------------------
# diversity_loss
# ---------------------------------------------------------------------------------------------------------------

# (shape, make_x, make_y, dtype, device): the kernels' grid (ties, 56×56 maps, halves; where the kernels run) and the
# contract's ([B, 1, H, W] with N = 1, 2, 3 (θ = the smallest), 2×2 (⌊4/3⌋ = 1), 7×9 (the 21st smallest);
# non-negative or signed maps; float64 too; every device). Three cases are in both: non-negative maps of N = 1, 2, 3
# in float32.
DIVERSITY_CASES = union(
    [
        (shape, positive, make_y, dtype, device)
        for shape, make_y in [
            ((3, 1, 1, 1), positive),  # N = 1
            ((2, 1, 1, 2), positive),  # N = 2: θ is the smallest
            ((4, 1, 3, 1), positive),  # N = 3
            ((2, 1, 7, 9), relu_map),  # half the entries are 0 and tie with θ
            ((3, 1, 5, 5), quantised),  # values {0, 1, 2, ...}: many ties
            ((2, 1, 56, 56), relu_map),  # N = 3136
            ((2, 1, 56, 56), positive),
        ]
        for dtype in DTYPES
        for device in TRITON_DEVICE_NAMES
    ],
    [
        (shape, make, make, dtype, device)
        for shape in [(3, 1, 1, 1), (2, 1, 1, 2), (4, 1, 3, 1), (2, 1, 2, 2), (5, 1, 7, 9)]
        for make in (positive, signed)
        for dtype in EXACT_DTYPES
        for device in DEVICE_NAMES
    ],
)


@pytest.mark.parametrize("shape, make_x, make_y, dtype, device", params(DIVERSITY_CASES))
def test_diversity_loss(shape, make_x, make_y, dtype, device):
    x = make_x(shape, dtype, requires_grad=True, device=device)
    y = make_y(shape, dtype, device=device)
    loss = compare(
        "diversity_loss",
        dtype,
        diversity_loss,
        diversity_loss64,
        [x, y],
        ["grad_x", None],
        upstream=1.9,
        tol=KERNEL_TOL[dtype],
    )
    assert loss.shape == () and loss.dtype == dtype


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_diversity_loss_layouts_and_signs(device):
    # Signed maps, a [B, C, H, W] map that is channels-last, a slice, and zero samples (ν = 0; ‖x‖ clamped).
    x = feature((2, 3, 4, 5), torch.float32, "channels_last", device=device)
    y = feature((2, 3, 4, 5), torch.float32, "slice_hw", requires_grad=False, device=device)
    compare("diversity_loss", torch.float32, diversity_loss, diversity_loss64, [x, y], ["grad_x", None])
    x = feature((3, 1, 6, 4), torch.float32, requires_grad=False, device=device)
    y = relu_map((3, 1, 6, 4), torch.float32, device=device)
    x[1] = 0
    y[2] = 0
    x.requires_grad_()
    compare("diversity_loss", torch.float32, diversity_loss, diversity_loss64, [x, y], ["grad_x", None])
    x = torch.randn(4, 17, device=device, requires_grad=True)  # a [B, N] input
    y = torch.randn(4, 17, device=device).round()
    compare("diversity_loss", torch.float32, diversity_loss, diversity_loss64, [x, y], ["grad_x", None], upstream=-3.0)


@pytest.mark.slow  # ~3 s through the interpreter
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_diversity_loss_streamed_rows(small_blocks, device):
    # Rows longer than BLOCK: the selection re-reads the row in chunks on every pass.
    for make_y in (positive, relu_map, quantised):
        x = positive((2, 1, 7, 9), torch.float32, requires_grad=True, device=device)
        compare(
            "diversity_loss",
            torch.float32,
            diversity_loss,
            diversity_loss64,
            [x, make_y((2, 1, 7, 9), torch.float32, device=device)],
            ["grad_x", None],
            upstream=0.7,
        )


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_diversity_loss_y_gets_no_gradient(device):
    x = positive((2, 1, 4, 4), torch.float32, requires_grad=True, device=device)
    y = positive((2, 1, 4, 4), torch.float32, requires_grad=True, device=device)
    diversity_loss(x, y).backward()
    assert x.grad is not None and y.grad is None


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_diversity_theta_is_exact(device):
    # θ must be the ⌊N/3⌋-th smallest exactly, on rows whose entries are a few fp32 ulps apart (8 ulps: far enough
    # that dividing by ν keeps them distinct in fp32 as in float64), all positive, all negative, or around zero; and
    # −0 ties with +0.
    ulps = (torch.randperm(30, dtype=torch.int32) * 8).view(1, 1, 1, 30)
    near_one = (torch.ones(1, 1, 1, 30).view(torch.int32) + ulps).view(torch.float32)
    around_zero = near_one - (1.0 + 15 * 8 * 2**-23)
    zeros = torch.tensor([0.0, -0.0, 1.0, -0.0, 2.0, 0.0] * 5).view(1, 1, 1, 30)
    y = torch.cat([near_one, -near_one, around_zero, zeros], dim=0).to(device)
    assert (around_zero == 0).sum() == 1 and (zeros == 0).sum() == 20
    x = positive((4, 1, 1, 30), torch.float32, requires_grad=True, device=device)
    compare("diversity_loss", torch.float32, diversity_loss, diversity_loss64, [x, y], ["grad_x", None])


# ---------------------------------------------------------------------------------------------------------------
# diversity_shift
# ---------------------------------------------------------------------------------------------------------------

# (shape, view, kind of map, dtype, device): the kernels' grid (slices, ties, a 56×56 map, halves; where the kernels
# run) and the contract's (one pixel, 2×2, more channels; float64 too; every device). Two cases are in both:
# (3, 1, 1, 1) NCHW and (2, 4, 1, 2) channels-last in float32. Every case checks the value, the gradient and that a
# channels-last input gives a channels-last output.
SHIFT_CASES = union(
    [
        (shape, view, kind, dtype, device)
        for shape, view, kind in [
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
        for dtype in DTYPES
        for device in TRITON_DEVICE_NAMES
    ],
    [
        (shape, layout, None, dtype, device)
        for shape in [(3, 1, 1, 1), (2, 4, 1, 2), (4, 3, 3, 1), (2, 6, 2, 2), (5, 16, 7, 9)]
        for layout in LAYOUTS
        for dtype in EXACT_DTYPES
        for device in DEVICE_NAMES
    ],
)


@pytest.mark.parametrize("shape, view, kind, dtype, device", params(SHIFT_CASES))
def test_diversity_shift(shape, view, kind, dtype, device):
    fn = {None: None, "ties": lambda t: t.mul(1.2).round().clamp(-2, 2), "relu": torch.relu}[kind]
    y = feature(shape, dtype, view, fn=fn, device=device)
    upstream = torch.randn(shape, dtype=torch.float64)
    out = compare(
        "diversity_shift", dtype, diversity_shift, diversity_shift64, [y], ["grad"], upstream, tol=KERNEL_TOL[dtype]
    )
    assert out.shape == y.shape and out.dtype == dtype
    if view == "channels_last" and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # ~3 s through the interpreter
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_diversity_shift_zero_sample_and_small_blocks(small_blocks, device):
    y = feature((3, 5, 3, 7), torch.float32, "channels_last", requires_grad=False, device=device)
    y[1] = 0
    y.requires_grad_()
    upstream = torch.randn(y.shape, dtype=torch.float64)
    compare("diversity_shift", torch.float32, diversity_shift, diversity_shift64, [y], ["grad"], upstream)
    y = feature((2, 3, 7, 5), torch.float32, "slice_hw", fn=lambda t: t.round(), device=device)
    compare(
        "diversity_shift",
        torch.float32,
        diversity_shift,
        diversity_shift64,
        [y],
        ["grad"],
        torch.randn(y.shape, dtype=torch.float64),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_diversity_shift_channels_last_equals_nchw(dtype, device):
    y = feature((4, 16, 7, 9), dtype, requires_grad=False, device=device)
    y_cl = y.contiguous(memory_format=torch.channels_last)
    out, out_cl = diversity_shift(y), diversity_shift(y_cl)
    assert out_cl.shape == out.shape and out_cl.dtype == dtype
    # Same values; only the order of the channel sum may differ.
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(out_cl, out, rtol=tol, atol=tol * out.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# Ties and hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_diversity_ties(dtype, device):
    # Quantised maps: many entries equal each other and equal θ. sign(ŷ − θ) = 0 there, so the target is ν/2.
    y = torch.randint(0, 4, (6, 1, 6, 6)).to(device, dtype)
    y[0] = 2  # a constant map: every entry is tied with θ
    x = positive((6, 1, 6, 6), dtype, requires_grad=True, device=device)
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
    for module, name in [*REFERENCES, (diversity_module, "_reflected_target")]:
        monkeypatch.setattr(module, name, _raise)
    monkeypatch.setattr(torch.Tensor, "kthvalue", _raise)
    x = feature((2, 3, 4, 5), dtype, "channels_last", device=device)
    y = feature((2, 6, 4, 5), dtype, device=device)
    a, b = attention_map(x), attention_map(y)
    diversity_loss(a, b.detach()).backward()
    diversity_shift(x).sum().backward()


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
        (diversity_loss, (y, y.flip(0)), "diversity_loss_reference"),
        (diversity_shift, (x,), "diversity_shift_reference"),
    ]:
        calls.clear()
        assert op(*args).dtype == torch.float64
        assert calls[:1] == [name]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_autocast_returns_fp32_for_half_inputs(device):
    x = torch.randn(2, 3, 4, 5, device=device).to(torch.bfloat16).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        a = attention_map(x)
        v = diversity_loss(a, a.detach().flip(0))
        s = diversity_shift(x)
    assert v.dtype == torch.float32
    assert s.dtype == torch.bfloat16
    v.backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_modules_equal_functions(device):
    x = feature((3, 4, 5, 6), torch.float32, "channels_last", requires_grad=False, device=device)
    y = feature((3, 2, 5, 6), torch.float32, requires_grad=False, device=device)
    a, b = attention_map(x), attention_map(y)
    assert torch.equal(DiversityLoss()(a, b), diversity_loss(a, b))


# (op, argument shapes, dtype, device): the kernels' cases in float32 and float64 where the kernels run, and the
# contract's in float32 on the CPU. Two are in both on the CPU under the interpreter: diversity_loss of [2, 1, 4, 4]
# against [2, 1, 4, 5], and diversity_shift of a 3-d map, in float32.
BAD_SHAPES = union(
    [
        (op, shapes, dtype, device)
        for device in TRITON_DEVICE_NAMES
        for dtype in EXACT_DTYPES
        for op, shapes in [
            (diversity_loss, [(2, 1, 4, 4), (2, 1, 4, 5)]),
            (diversity_loss, [(), ()]),
            (diversity_shift, [(2, 16, 4)]),
        ]
    ],
    [
        (op, shapes, torch.float32, "cpu")
        for op, shapes in [
            (diversity_loss, [(2, 1, 4, 4), (2, 1, 4, 5)]),
            (diversity_loss, [(2, 1, 4, 4), (3, 1, 4, 4)]),
            (diversity_shift, [(2, 16, 4)]),
            (diversity_shift, [(2, 3, 4, 4, 4)]),
        ]
    ],
)


@pytest.mark.parametrize("op, shapes, dtype, device", params(BAD_SHAPES))
def test_diversity_bad_shapes_raise(op, shapes, dtype, device):
    with pytest.raises(ValueError):
        op(*[torch.rand(shape, dtype=dtype, device=device) for shape in shapes])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_diversity_loss_is_two_forward_launches_and_one_backward(device, monkeypatch):
    """No torch epilogue: the per-sample pass and the finish forward, one backward that forms its coefficients from
    the forward's statistics and the upstream gradient in device memory."""
    x = torch.rand(5, 1, 4, 6, device=device, requires_grad=True)
    y = torch.rand(5, 1, 4, 6, device=device)
    with kernels_launched(monkeypatch) as forward:
        loss = diversity_loss(x, y)
    assert forward.triton == ["_diversity_forward_kernel", "_diversity_finish_kernel"] and forward.aten == []
    grad = torch.tensor(0.5, device=device)
    with kernels_launched(monkeypatch) as backward:
        torch.autograd.grad(loss, [x], grad)
    assert backward.triton == ["_diversity_backward_kernel"] and backward.aten == []
