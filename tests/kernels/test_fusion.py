"""FusionBlock against the nn.Sequential it stands for, applied to torch.cat(inputs, 1).

The Triton path (depthwise conv over the strided inputs + BN1 statistics, and its backward) runs under Triton's
interpreter on CPU tensors, in float64 too, so outputs, gradients (inputs, both conv weights, both BN affine
parameters) and running statistics are compared to the Sequential at relative error 1e-8 in float64 and 1e-5 in
float32: NCHW and channels-last inputs (also mixed), m = 2, 3, 4, odd channel counts, 7×9, 1×1 and 1×W maps, train
and eval mode, momentum None.
"""

import pytest
import torch
from torch import nn

from ffsd_kernels import _batchnorm_relu as bn_module  # the tiles of every fusion kernel (_dw_config)
from ffsd_kernels import _dispatch
from ffsd_kernels import fusion as fb
from ffsd_kernels._dispatch import INTERPRETER
from ffsd_kernels.fusion import FusionBlock
from tests.helpers.kernel_launches import forbid_host_syncs, kernels_launched, recorded_launches

DEVICE = "cpu" if INTERPRETER else "cuda"
pytestmark = [
    pytest.mark.skipif(
        not (INTERPRETER or torch.cuda.is_available()), reason="needs Triton's interpreter or a CUDA device"
    )
]
pytestmark += [pytest.mark.cuda] if DEVICE == "cuda" else []
TOL = {torch.float64: 1e-8, torch.float32: 1e-5}
WORST: dict[str, float] = {}


def sequential(channels: int, num_inputs: int, out_channels: int) -> nn.Sequential:
    total = channels * num_inputs
    return nn.Sequential(
        nn.Conv2d(total, total, 3, padding=1, groups=total, bias=False),
        nn.BatchNorm2d(total),
        nn.ReLU(),
        nn.Conv2d(total, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def randomize(module: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so that every term is exercised."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.5 + (1.0 if name.endswith(("1.weight", "4.weight")) else 0.0))


def pair(channels, num_inputs, out_channels, dtype):
    ref = sequential(channels, num_inputs, out_channels)
    randomize(ref)
    ref = ref.to(DEVICE, dtype)
    block = FusionBlock(channels=channels, num_inputs=num_inputs, out_channels=out_channels).to(DEVICE, dtype)
    block.load_state_dict(ref.state_dict())
    return block, ref


def make_inputs(shape, num_inputs, dtype, layouts):
    xs = []
    for j in range(num_inputs):
        x = torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype)
        layout = layouts[j % len(layouts)]
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "slice":  # a view with gaps: every other channel of a wider map
            wide = torch.randn((shape[0], 2 * shape[1], *shape[2:]), dtype=dtype, device=DEVICE)
            x = wide[:, ::2]
        elif layout == "slice_hw":  # a window of a larger channels-last map
            big = torch.randn((shape[0], shape[1], shape[2] + 2, shape[3] + 3), dtype=dtype, device=DEVICE)
            x = big.contiguous(memory_format=torch.channels_last)[:, :, 1 : 1 + shape[2], 2 : 2 + shape[3]]
        xs.append(x.detach().requires_grad_(True))
    return xs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, name
    err = rel_err(got, want)
    key = f"{str(got.dtype).removeprefix('torch.')} {name}"
    WORST[key] = max(WORST.get(key, 0.0), err)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}"


def run_both(block, ref, xs, train: bool, grad_out_seed: int = 1):
    block.train(train)
    ref.train(train)
    out = block(xs)
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    want = ref(torch.cat(xr, 1))
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_out_seed))
    g = g.to(DEVICE, want.dtype)
    out.backward(g)
    want.backward(g)
    return out, want, xr


def compare(block, ref, xs, xr, out, want, tol):
    check("output", out, want, tol)
    for j, (x, x_ref) in enumerate(zip(xs, xr, strict=True)):
        check(f"grad input {j}", x.grad, x_ref.grad, tol)
    params = dict(ref.named_parameters())
    for name, p in block.named_parameters():
        check(f"grad {name}", p.grad, params[name].grad, tol)
    buffers = dict(ref.named_buffers())
    for name, b in block.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, buffers[name]), name
        else:
            check(name, b, buffers[name], tol)


CASES = [
    # (B, C, m, C_out, H, W, layouts)
    (2, 3, 2, 5, 7, 9, ["nchw"]),
    (3, 5, 3, 4, 7, 9, ["channels_last"]),
    (2, 1, 4, 3, 5, 6, ["nchw", "channels_last"]),
    (3, 7, 2, 2, 1, 1, ["nchw"]),
    (2, 3, 3, 6, 1, 9, ["slice", "channels_last", "nchw"]),
    (2, 2, 2, 3, 6, 5, ["slice_hw", "nchw"]),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}C{c[1]}m{c[2]}o{c[3]}_{c[4]}x{c[5]}_{'-'.join(c[6])}")
def test_matches_sequential_float64(case, train):
    batch, channels, m, out_channels, height, width, layouts = case
    block, ref = pair(channels, m, out_channels, torch.float64)
    xs = make_inputs((batch, channels, height, width), m, torch.float64, layouts)
    out, want, xr = run_both(block, ref, xs, train)
    assert out.shape == (batch, out_channels, height, width)
    compare(block, ref, xs, xr, out, want, TOL[torch.float64])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_sequential_float32(layout):
    block, ref = pair(5, 3, 4, torch.float32)
    xs = make_inputs((3, 5, 7, 9), 3, torch.float32, [layout])
    out, want, xr = run_both(block, ref, xs, True)
    compare(block, ref, xs, xr, out, want, TOL[torch.float32])


def test_running_stats_over_steps_and_momentum_none():
    block, ref = pair(3, 2, 4, torch.float64)
    for bn in (block[1], ref[1], block[4], ref[4]):
        bn.momentum = None
    for step in range(2):
        xs = make_inputs((2, 3, 5, 7), 2, torch.float64, ["nchw"])
        out, want, xr = run_both(block, ref, xs, True, grad_out_seed=step)
        check("output", out, want, 1e-8)
    for name, b in block.named_buffers():
        want = dict(ref.named_buffers())[name]
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, want) and b.item() == 5
        else:
            check(name, b, want, 1e-8)


def test_state_dict_matches_sequential():
    block = FusionBlock(channels=3, num_inputs=2, out_channels=5)
    ref = sequential(3, 2, 5)
    got = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert got == want
    assert list(got) == [
        "0.weight",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "3.weight",
        "4.weight",
        "4.bias",
        "4.running_mean",
        "4.running_var",
        "4.num_batches_tracked",
    ]
    ref.load_state_dict(block.state_dict())
    block.load_state_dict(ref.state_dict())


FORWARD = ["_bn_forward_finish_kernel", "_affine_relu_kernel"]  # after each BN's statistics pass


def test_triton_path_runs_without_host_syncs(monkeypatch):
    block, ref = pair(3, 2, 4, torch.float64)
    xs = make_inputs((2, 3, 7, 9), 2, torch.float64, ["nchw", "channels_last"])

    def refuse(*args):
        raise AssertionError("plain path")

    monkeypatch.setattr(fb, "fusion_block_reference", refuse)
    with recorded_launches(monkeypatch) as launches:
        forbid_host_syncs(monkeypatch)
        out = block(xs)
        out.backward(torch.ones_like(out))
        monkeypatch.undo()
    names = [launch.name for launch in launches]
    # forward: the depthwise conv per input, BN1 + ReLU, BN2's statistics + BN2 + ReLU; backward in reverse order:
    # BN2's partials, finish, map gradient; BN1's partials, finish; the depthwise backward per input.
    assert names == (
        ["_dw_forward_kernel"] * 2 + FORWARD + ["_channel_stats_kernel"] + FORWARD
        + ["_affine_relu_kernel", "_bn_backward_finish_kernel", "_affine_relu_kernel"]
        + ["_affine_relu_kernel", "_bn_backward_finish_kernel"] + ["_dw_backward_kernel"] * 2
    )  # fmt: skip
    for launch in launches:
        assert "num_warps" in launch.kwargs and "BLOCK_C" in launch.kwargs and "F64" in launch.kwargs


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_launches_and_torch_kernels_per_block(monkeypatch, train):
    # Maps side by side (a channel slice of stacked networks' channels-last taps) are one input: one depthwise launch
    # each way. Besides the Triton launches, the only torch kernels are the 1×1 conv and the weight partials' sum.
    block, ref = pair(3, 2, 4, torch.float64)
    block.train(train)
    stacked = torch.randn(2, 9, 5, 6, dtype=torch.float64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x = stacked[:, :6].detach().requires_grad_(True)
    params = list(block.parameters())
    with kernels_launched(monkeypatch) as forward:
        out = block(x)
    assert forward.triton == (
        ["_dw_forward_kernel"] + FORWARD + (["_channel_stats_kernel"] if train else []) + FORWARD
    ), forward.triton
    assert forward.aten == ["convolution"], forward.aten
    grad = torch.ones_like(out)
    with kernels_launched(monkeypatch) as backward:
        torch.autograd.grad(out, [x, *params], grad)
    # Train mode: BN2's map gradient needs every tile's sums first, a second pass; eval mode: one pass.
    bn2 = ["_affine_relu_kernel", "_bn_backward_finish_kernel"] + (["_affine_relu_kernel"] if train else [])
    assert backward.triton == bn2 + ["_affine_relu_kernel", "_bn_backward_finish_kernel", "_dw_backward_kernel"]
    assert backward.aten == ["convolution_backward", "sum"], backward.aten


def test_maps_side_by_side_match_the_sequential():
    block, ref = pair(3, 2, 4, torch.float64)
    wide = torch.randn(2, 9, 5, 6, dtype=torch.float64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x = wide[:, 3:].detach().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, want = block(x), ref(x_ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    compare(block, ref, [x], [x_ref], out, want, TOL[torch.float64])


@pytest.mark.slow  # ~3.5 s through the interpreter
def test_small_tiles_loop_over_blocks(monkeypatch):
    # Force tiny tiles so several pixel and channel blocks (and BN statistic tiles of unequal size) are combined.
    monkeypatch.setattr(bn_module, "_dw_config", lambda *args: (4, 16, 1))
    block, ref = pair(5, 2, 3, torch.float64)
    xs = make_inputs((2, 5, 7, 9), 2, torch.float64, ["nchw", "channels_last"])
    out, want, xr = run_both(block, ref, xs, True)
    compare(block, ref, xs, xr, out, want, 1e-8)


def test_plain_path_without_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRETER", False)
    block, ref = pair(2, 2, 3, torch.float64)
    xs = make_inputs((2, 2, 4, 5), 2, torch.float64, ["nchw"])
    with recorded_launches(monkeypatch) as launches:
        out, want, xr = run_both(block, ref, xs, True)
    if DEVICE == "cpu":
        assert launches == []
    compare(block, ref, xs, xr, out, want, 1e-12)


def test_rejects_wrong_inputs():
    block = FusionBlock(channels=3, num_inputs=2, out_channels=4)
    with pytest.raises(ValueError):
        block([torch.randn(1, 3, 4, 4)])
    with pytest.raises(ValueError):
        block([torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)])


def check_bn_relu(bn: nn.BatchNorm2d, bn_ref: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
    """``_BatchNormReLUFunction`` with ``bn`` against ``relu(bn_ref(t))``: the output, the map's gradient, the affine
    parameters' gradients (where there are parameters) and the buffers afterwards, at 1e-12; returns the output."""
    leaf, leaf_ref = t.detach().requires_grad_(True), t.detach().requires_grad_(True)
    got = fb._BatchNormReLUFunction.apply(bn, bn.weight, bn.bias, leaf)
    want = torch.relu(bn_ref(leaf_ref))
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    check("bn_relu output", got, want, 1e-12)
    check("bn_relu grad t", leaf.grad, leaf_ref.grad, 1e-12)
    for name, p in bn.named_parameters():
        check(f"bn_relu grad {name}", p.grad, dict(bn_ref.named_parameters())[name].grad, 1e-12)
    for name, buffer in bn.named_buffers():
        assert torch.allclose(buffer, dict(bn_ref.named_buffers())[name], rtol=1e-12, atol=0), name
    return got


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_relu_matches_torch_with_ties(train):
    # Channel 0 is all zeros and β₀ = 0: u = y·a + b is exactly 0 there (train: mean 0; eval: running mean 0), and
    # torch's ReLU passes no gradient at 0.
    bn = nn.BatchNorm2d(5).to(DEVICE, torch.float64)
    randomize(bn)
    with torch.no_grad():
        bn.bias[0] = 0.0
        bn.running_mean[0] = 0.0
    bn.train(train)
    bn_ref = nn.BatchNorm2d(5).to(DEVICE, torch.float64)
    bn_ref.load_state_dict(bn.state_dict())
    bn_ref.train(train)
    t = torch.randn(3, 5, 4, 3, dtype=torch.float64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    t[:, 0] = 0.0
    assert check_bn_relu(bn, bn_ref, t).is_contiguous(memory_format=torch.channels_last)


def test_batch_norm_without_affine_or_running_stats():
    # affine=False (no γ, β) and track_running_stats=False (batch statistics in eval mode too, nothing updated).
    for kwargs in ({"affine": False}, {"track_running_stats": False}):
        bn = nn.BatchNorm2d(4, **kwargs).to(DEVICE, torch.float64)
        bn_ref = nn.BatchNorm2d(4, **kwargs).to(DEVICE, torch.float64)
        for train in (True, False):
            bn.train(train)
            bn_ref.train(train)
            check_bn_relu(bn, bn_ref, torch.randn(2, 4, 3, 5, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_close_to_float64(dtype):
    # Half maps and parameters: the kernels accumulate in fp32 and round y, z and the output once each.
    block, ref = pair(3, 2, 4, torch.float64)
    block = block.to(dtype)
    ref.load_state_dict(block.state_dict())  # the half-rounded weights, in fp64
    xs = make_inputs((2, 3, 5, 6), 2, dtype, ["nchw", "channels_last"])
    block.train()
    ref.train()
    out = block(xs)
    want = ref(torch.cat([x.detach().double() for x in xs], 1))
    assert out.dtype == dtype
    check("half output", out, want, 3e-2)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == dtype for x in xs)


def test_inputs_without_grad_and_no_grad_mode():
    # Detached (teacher) maps: only the parameters get gradients; under no_grad the forward still matches.
    block, ref = pair(3, 2, 4, torch.float64)
    xs = [x.detach() for x in make_inputs((2, 3, 4, 5), 2, torch.float64, ["channels_last", "nchw"])]
    out = block(xs)
    want = ref(torch.cat(xs, 1))
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    check("output", out, want, 1e-8)
    params = dict(ref.named_parameters())
    for name, p in block.named_parameters():
        check(f"grad {name}", p.grad, params[name].grad, 1e-8)
    block.eval()
    ref.eval()
    with torch.no_grad():
        check("output", block(xs), ref(torch.cat(xs, 1)), 1e-8)


def test_zz_report_worst_errors():
    print("\nworst relative errors:", {k: f"{v:.1e}" for k, v in sorted(WORST.items())})


def test_unfused_module_and_single_input_function_equal_the_sequential():
    block, ref = pair(3, 1, 5, torch.float64)
    x = make_inputs((2, 3, 6, 5), 1, torch.float64, ["channels_last"])[0]
    torch.testing.assert_close(fb.fusion_block(x, block), ref(x), rtol=1e-12, atol=1e-12)
    block.fused = False
    torch.testing.assert_close(block(x), ref(x), rtol=1e-12, atol=1e-12)
    assert "fused=False" in repr(block)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_matches_the_sequential_under_autocast(input_dtype):
    block, ref = pair(4, 2, 4, torch.float32)
    xs = [x.to(input_dtype) for x in make_inputs((2, 4, 5, 6), 2, torch.float32, ["nchw", "channels_last"])]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = block(xs), ref(torch.cat(xs, 1))
    assert got.dtype == want.dtype
    assert (got.float() - want.float()).abs().max().item() <= 3e-2 * want.abs().max().item()
