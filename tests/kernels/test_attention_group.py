"""``attention_maps`` against float64 formulas (``tests.helpers.attention_map64`` of each group of channels).

Every kernel test runs where the Triton kernels run (the CPU under ``TRITON_INTERPRET=1``, CUDA), with the references
patched to raise so that a silent fallback fails. Each call takes several tensors at once: mixed shapes (one pixel,
odd sizes, one sample, a 56×56 map of several pixel blocks), layouts (NCHW, channels-last, a slice along C, windows
along H, W), dtypes (fp32, fp16, bf16, mixed between tensors), groups (1, 2, 3), tensors with and without a gradient,
and an upstream gradient that differs per map, with some maps left unused (None gradients), all the maps of one
tensor among them. Small launch configurations are forced in one test so that every loop (the tensor search, the
channel tiles, the pixel and channel blocks) runs more than once.

Tolerances (relative, per tensor's dtype): as ``test_attention.py``, fp32 1e-5, fp16 3e-3, bf16 2e-2 (the
interpreter converts fp32 to bf16 by truncation).
"""

import pytest
import torch

from ffsd_kernels import AttentionMaps, attention_map, attention_maps, attention_maps_reference
from ffsd_kernels import attention_group as group_module
from ffsd_kernels import reference as reference_ops
from tests.helpers import (
    DEVICES,
    TRITON_DEVICES,
    attention_map64,
    check,
    elementwise_error,
    feature,
    grad_error,
    leaf64,
    value_error,
)
from tests.helpers.kernel_launches import AtenKernels, forbid_host_syncs, kernels_launched, recorded_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 3e-3, torch.bfloat16: 2e-2}
OP = "attention_maps"

# (shape, view, groups, needs a gradient, which maps are used downstream)
ENTRIES = [
    ((1, 1, 1, 1), "nchw", 1, True, [True]),  # one pixel, one channel
    ((2, 6, 7, 9), "channels_last", 3, True, [True, False, True]),  # the middle map unused: its channels get 0
    ((1, 4, 5, 3), "slice_c", 2, True, [False, True]),  # one sample, every other channel of a wider map
    ((2, 3, 4, 5), "slice_hw", 1, False, [True]),  # no gradient: no backward programs, never written
    ((1, 2, 9, 11), "nchw", 2, True, [False, False]),  # every map unused: no gradient at all
    ((2, 6, 3, 3), "slice_hw_cl", 3, True, [True, True, True]),
    ((3, 4, 1, 9), "channels_last", 2, True, [True, True]),
    ((1, 2, 56, 56), "nchw", 1, True, [True]),  # several pixel blocks
]


def _raise(*args, **kwargs):
    raise AssertionError("the reference ran instead of the Triton kernels")


@pytest.fixture
def no_reference(monkeypatch):
    monkeypatch.setattr(group_module, "attention_maps_reference", _raise)
    monkeypatch.setattr(group_module, "attention_map_reference", _raise)


def _inputs(entries, dtypes, device):
    return [
        feature(shape, dtype, view, requires_grad=grad, device=device)
        for (shape, view, _, grad, _), dtype in zip(entries, dtypes, strict=True)
    ]


def _compare(xs, entries, tol=None):
    """Values of every map and gradients of every input against float64, with a different upstream gradient per
    used map (rounded to the map's dtype first, so that the float64 side sees the same one)."""
    groups = [g for _, _, g, _, _ in entries]
    maps = attention_maps(xs, groups)
    assert [len(row) for row in maps] == groups
    outputs, upstreams = [], []
    for x, row, (_, _, _, grad, used) in zip(xs, maps, entries, strict=True):
        for k, m in enumerate(row):
            assert m.shape == (x.shape[0], 1, *x.shape[2:]) and m.dtype == x.dtype and m.is_contiguous()
            assert m.requires_grad == grad
            if used[k] and grad:
                u = (torch.randn(m.shape, dtype=torch.float64) * (k + 1)).to(m.dtype)
                outputs.append(m)
                upstreams.append(u)
    if outputs:
        torch.autograd.backward(outputs, [u.to(xs[0].device) for u in upstreams])
    upstream = iter(upstreams)  # in the order of the used maps
    for x, row, (_, _, g, grad, used) in zip(xs, maps, entries, strict=True):
        limit = TOL[x.dtype] if tol is None else tol
        # Entry by entry (sums of squares: no cancellation), but fp16 relative to the map's largest value: the
        # smallest squares of a 56×56 map fall in fp16's subnormal range, where it keeps few significant bits.
        value_kind = value_error if x.dtype == torch.float16 else elementwise_error
        x64 = leaf64(x)
        cg = x.shape[1] // g
        loss = 0.0
        for k, m in enumerate(row):
            a64 = attention_map64(x64[:, k * cg : (k + 1) * cg])
            check(OP, x.dtype, "value", value_kind(m, a64), limit)
            if used[k] and grad:
                loss = loss + (a64 * next(upstream).double()).sum()
        if not (grad and any(used)):
            assert x.grad is None
            continue
        loss.backward()
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        check(OP, x.dtype, "grad", grad_error(x.grad, x64.grad), limit)
    return maps


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_shapes_layouts_and_groups(dtype, device, no_reference):
    _compare(_inputs(ENTRIES, [dtype] * len(ENTRIES), device), ENTRIES)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_mixed_dtypes_in_one_call(device, no_reference):
    """fp32, fp16 and bf16 tensors together: still one launch each way (the launch test below counts them)."""
    dtypes = [DTYPES[i % 3] for i in range(len(ENTRIES))]
    _compare(_inputs(ENTRIES, dtypes, device), ENTRIES)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("inner", [False, True], ids=["pixels-inner", "channels-inner"])
def test_small_blocks(inner, device, monkeypatch, no_reference):
    """Tiny tiles and tensor-search chunks, so that every loop of both kernels runs several times; both tile
    orientations on every layout."""
    monkeypatch.setattr(group_module, "_maps_config", lambda entries: (2, 32, 1, inner))
    monkeypatch.setattr(group_module, "_pair_block", lambda tensors: 2)
    entries = [e for e in ENTRIES if e[0][2] < 56]  # a 56×56 map would be 196 programs each way here
    entries.append(((2, 6, 3, 5), "nchw", 2, True, [True, True]))  # 3 channels per group: a partial channel tile
    _compare(_inputs(entries, [torch.float32] * len(entries), device), entries)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equals_attention_map_per_group(dtype, device):
    """The same fp32 sums as attention_map: each map agrees with its group's map, and so does each gradient."""
    views = ["nchw", "channels_last", "slice_c", "slice_hw"]
    shapes, groups = [(2, 6, 5, 3), (2, 9, 4, 4), (1, 4, 3, 7), (3, 2, 6, 5)], [3, 3, 2, 1]
    xs = [feature(s, dtype, v, device=device) for s, v in zip(shapes, views, strict=True)]
    maps = attention_maps(xs, groups)
    upstreams = [[torch.randn_like(m) for m in row] for row in maps]
    torch.autograd.backward([m for row in maps for m in row], [u for row in upstreams for u in row])
    for x, row, us, g in zip(xs, maps, upstreams, groups, strict=True):
        single = x.detach().clone().requires_grad_()
        expected = attention_map(single, groups=g)
        expected.backward(torch.cat(us, dim=1))
        for k, m in enumerate(row):
            torch.testing.assert_close(m, expected[:, k : k + 1], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(x.grad, single.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_every_map_is_its_own_output(device, no_reference):
    """Each map is a plain tensor (no view of a shared buffer), an output of the one Function node; the maps of a
    tensor that needs no gradient are not differentiable."""
    xs = [feature((2, 4, 3, 3), torch.float32, device=device), feature((2, 2, 3, 3), torch.float32, device=device)]
    xs[1].requires_grad_(False)
    maps = attention_maps(xs, [2, 1])
    nodes = {m.grad_fn for m in maps[0]}
    assert len(nodes) == 1 and None not in nodes and all(m._base is None for row in maps for m in row)
    assert len({m.data_ptr() for row in maps for m in row}) == 3
    assert not maps[1][0].requires_grad
    maps[0][1].mul_(2)  # in place on a map: allowed, as on any output (not a view made inside the Function)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_one_tensor_twice(device, no_reference):
    """One tensor in two places with different groups: its gradient is the sum of both (autograd adds them)."""
    x = feature((2, 6, 4, 3), torch.float32, "channels_last", device=device)
    maps = attention_maps([x, x], [1, 3])
    us = [torch.randn(2, 1, 4, 3, dtype=torch.float64) for _ in range(4)]
    torch.autograd.backward([maps[0][0], *maps[1]], [u.float().to(device) for u in us])
    x64 = leaf64(x)
    loss = (attention_map64(x64) * us[0]).sum()
    for k in range(3):
        loss = loss + (attention_map64(x64[:, 2 * k : 2 * k + 2]) * us[k + 1]).sum()
    loss.backward()
    check(OP, torch.float32, "grad", grad_error(x.grad, x64.grad))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_upstream_gradient_of_a_sum(device, no_reference):
    """``m.sum().backward()`` hands the backward an expanded (stride-0) upstream gradient per map."""
    xs = [
        feature((2, 4, 3, 5), torch.float32, "slice_hw_cl", device=device),
        feature((1, 3, 2, 2), torch.float16, device=device),
    ]
    maps = attention_maps(xs, [2, 3])
    sum(m.float().sum() for row in maps for m in row).backward()
    for x, g in zip(xs, [2, 3], strict=True):
        x64, cg = leaf64(x), x.shape[1] // g
        sum(attention_map64(x64[:, k * cg : (k + 1) * cg]).sum() for k in range(g)).backward()
        check(OP, x.dtype, "grad", grad_error(x.grad, x64.grad), TOL[x.dtype])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_gradients_are_laid_out_as_empty_like(device, no_reference):
    xs = [
        feature((2, 4, 3, 5), torch.float32, "channels_last", device=device),
        feature((2, 4, 3, 5), torch.bfloat16, "slice_hw_cl", device=device),
        feature((2, 3, 3, 5), torch.float16, "slice_c", device=device),
    ]
    maps = attention_maps(xs, 1)
    grads = torch.autograd.grad(sum(row[0].float().sum() for row in maps), xs)
    for x, g in zip(xs, grads, strict=True):
        assert g.stride() == torch.empty_like(x).stride() and g.dtype == x.dtype


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_one_launch_each_way_and_no_torch_kernels(device, monkeypatch):
    """Forward: one launch for every map of every tensor and dtype; backward: one launch for every gradient. No other
    kernel either way and no host synchronisation: besides allocations, one host-built table per pass (what
    ``torch.tensor`` of a list records, and on CUDA its copy)."""
    shapes = [(4, 48, 8, 8), (4, 96, 4, 4), (4, 32, 8, 8), (4, 16, 4, 4), (4, 1, 2, 2)]
    groups = [3, 3, 2, 1, 1]
    dtypes = [torch.bfloat16, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    xs = [
        feature(s, d, "channels_last" if s[1] > 1 else "nchw", requires_grad=i != 3, device=device)
        for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))
    ]
    with AtenKernels() as aten:
        group_module._device_table([1, 2, 3], torch.device(device))
    table_ops = aten.ops
    forbid_host_syncs(monkeypatch)
    with kernels_launched(monkeypatch) as forward:
        maps = attention_maps(xs, groups)
    assert forward.triton == ["_maps_forward_kernel"] and forward.aten == table_ops
    used = [maps[0][0], maps[0][2], maps[1][1], maps[2][0], maps[4][0]]  # none of xs[2]'s second map
    upstream = [torch.ones_like(m) for m in used]
    with kernels_launched(monkeypatch) as backward:
        grads = torch.autograd.grad(used, [xs[0], xs[1], xs[2], xs[4]], upstream)
    assert backward.triton == ["_maps_backward_kernel"] and backward.aten == table_ops
    monkeypatch.undo()
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_no_gradient_needed_launches_only_the_forward(device, monkeypatch):
    xs = [torch.randn(2, 3, 4, 4, device=device), torch.randn(3, 4, 2, 5, device=device)]
    with recorded_launches(monkeypatch) as launches:
        maps = attention_maps(xs, [3, 2])
    assert len(launches) == 1 and not any(m.requires_grad for row in maps for m in row)
    for row, expected in zip(maps, attention_maps_reference(xs, [3, 2]), strict=True):
        for m, e in zip(row, expected, strict=True):
            torch.testing.assert_close(m, e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_runs_the_reference(device):
    f64 = {"dtype": torch.float64, "device": device}
    xs = [torch.randn(2, 4, 3, 5, **f64, requires_grad=True), torch.randn(1, 3, 2, 2, **f64)]
    maps = attention_maps(xs, [2, 1])
    # One float64 tensor among float32 ones sends the whole call to the reference.
    mixed = attention_maps([xs[0], xs[1].float()], [2, 1])
    assert mixed[0][0].dtype == torch.float64 and mixed[1][0].dtype == torch.float32
    for x, row, g in zip(xs, maps, [2, 1], strict=True):
        cg = x.shape[1] // g
        for k, m in enumerate(row):
            assert m.dtype == torch.float64 and m.is_contiguous()
            check(
                OP, torch.float64, "value", elementwise_error(m, attention_map64(leaf64(x[:, k * cg : (k + 1) * cg])))
            )
    sum(m.sum() for row in maps for m in row).backward()
    assert xs[0].grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_reference_is_attention_map_per_group(device):
    xs = [torch.randn(2, 6, 4, 5, device=device), torch.randn(3, 2, 2, 2, device=device).half()]
    maps = attention_maps_reference(xs, [3, 1])
    assert reference_ops.attention_maps is attention_maps_reference
    assert [len(row) for row in maps] == [3, 1] and maps[1][0].dtype == torch.float16
    for x, row, g in zip(xs, maps, [3, 1], strict=True):
        cg = x.shape[1] // g
        for k, m in enumerate(row):
            assert m.shape == (x.shape[0], 1, *x.shape[2:]) and m.is_contiguous()
            check(OP, x.dtype, "value", elementwise_error(m, attention_map64(leaf64(x[:, k * cg : (k + 1) * cg]))))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_autocast_returns_fp32(device):
    x = torch.randn(2, 4, 3, 5, device=device).to(torch.bfloat16).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        maps = attention_maps([x], 2)
    assert all(m.dtype == torch.float32 for m in maps[0])
    sum(m.sum() for m in maps[0]).backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_module_equals_function(device):
    xs = [torch.randn(3, 4, 5, 6, device=device), torch.randn(3, 1, 5, 6, device=device)]
    out, expected = AttentionMaps([2, 1])(iter(xs)), attention_maps(xs, (2, 1))
    assert all(torch.equal(a, b) for ra, rb in zip(out, expected, strict=True) for a, b in zip(ra, rb, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shapes, groups",
    [
        ([], 1),  # no tensor
        ([(2, 3, 4)], 1),  # not 4-D
        ([(2, 6, 4, 4)], 4),  # groups not dividing C
        ([(2, 6, 4, 4)], 0),
        ([(2, 6, 4, 4), (2, 4, 4, 4)], [3]),  # one groups value for two tensors
    ],
    ids=["empty", "rank", "divisor", "zero", "lengths"],
)
def test_bad_inputs_raise(shapes, groups, device):
    with pytest.raises(ValueError):
        attention_maps([torch.randn(shape, device=device) for shape in shapes], groups)


def test_different_devices_raise():
    with pytest.raises(ValueError, match="one device"):
        attention_maps([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, device="meta")])


def test_integer_inputs_raise():
    with pytest.raises(TypeError, match=r"xs\[1\]"):
        attention_maps([torch.randn(2, 3, 4, 4), torch.ones(2, 3, 4, 4, dtype=torch.int64)])
