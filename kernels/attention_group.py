"""Many attention maps in one go: ``attention_maps(xs, groups)[i][g] = A(group g of xs[i])`` for ``P`` tensors.

``A`` is :func:`ffsd_kernels.attention_map`'s: ``A(x) = mean_c(x²)`` over a group of ``C_i/G_i`` consecutive
channels of ``xs[i]`` (``[B_i, C_i, H_i, W_i]``), one ``[B_i, 1, H_i, W_i]`` map per group. The tensors may differ in
shape, in groups, in layout (NCHW, channels-last, channel slices, H/W windows: read through their strides, never
copied), in dtype (fp32, fp16, bf16) and in whether they need a gradient. A training step of FFSD takes some ten such
maps (the taps of stacked networks, the decoder outputs, single maps); this op takes all of them in one launch
forward and one backward instead of one each per tensor, and each map is an output of its own, so that the backward
pass needs no ``cat`` of per-network gradients (as it would after a ``split`` of ``attention_map(x, groups)``).

Forward, per map ``(i, g)`` with ``CG = C_i/G_i``: ``a[b, p] = (1/CG) Σ_c x[b, g·CG + c, p]²``, squares summed in fp32
and the mean rounded once to the map's dtype. Backward, with ``u_{i,g}`` the upstream gradient of map ``(i, g)``:
``dx[b, c, p] = u_{i,g(c)}[b, p] · 2·x[b, c, p] / CG``, and 0 for the channels of a map that received no gradient.

Launches. Forward: ONE launch, programs over (tensor, group, sample, pixel block), each summing a [BLOCK_C, BLOCK_P]
tile over the group's channels and writing one block of one map. Backward: ONE launch, programs over (tensor, sample,
channel block, pixel block) of the tensors that need a gradient and received one for at least one of their maps; a
channel block lies within one group, so it reads one block of one upstream gradient. Dtypes are mixed within each
launch (a per-tensor dtype code in the table picks the load and the store), so the count does not grow with the
dtypes: 1 + 1 launches for any ``P``. The kernels find their tensor in a small int64 table (data addresses, sizes,
strides, program offsets, the maps' addresses) built on the host and copied to the device once per forward pass; the
upstream gradients, whose addresses are only known in the backward pass, are described by a second small table built
and copied there (gradient addresses and strides, program offsets of the backward pass).

Everything runs without a host sync, so the op can be captured in a CUDA graph (see ``_device_table``).
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, result_dtype, tl, triton, use_triton
from ffsd_kernels.attention import attention_map_reference
from ffsd_kernels.distance_group import _CODES, _device_table, _find_pair, _load_f32, _pair_block, _store_f32

# The forward table is [P + P·ROW + M] (M = Σ G_i maps): the first forward program of each tensor, a row per tensor
# (int64 fields, in this order; addresses in bytes, strides in elements):
#   0 x address   1 x dtype code   2 maps' dtype code   3 B   4 CG (channels per group)   5 G   6 W   7 H·W
#   8 pixel blocks   9 first map (index into the addresses)   10-13 x strides (b, c, h, w)   14 channel blocks per group
# then the address of each map, tensor by tensor, group by group.
_ROW = 15
# The backward table is [P + P·GROW + M·MROW]: the first backward program of each tensor, a row per tensor
#   0 dx address (0: not written)   1-4 dx strides (b, c, h, w)
# then a row per map: 0 upstream gradient address (0: none, its channels' dx is 0)   1 its dtype code   2-4 its
# strides (b, h, w).
_GROW = 5
_MROW = 5


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _along_channels(v, CHANNELS_INNER: tl.constexpr):
    """``v`` [BLOCK_C] as the channel axis of a tile: its last axis when the channels are inner in memory."""
    if CHANNELS_INNER:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _along_pixels(v, CHANNELS_INNER: tl.constexpr):
    """``v`` [BLOCK_P] as the pixel axis of a tile: its last axis when the pixels are inner in memory."""
    if CHANNELS_INNER:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _sum_squares(
    x_ptr, x_base, s_c, p_off, p_mask, cg, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_INNER: tl.constexpr
):
    """``Σ_c x[x_base + c·s_c + p_off]²`` over ``cg`` channels, in fp32 ([BLOCK_P]), through a typed pointer."""
    if CHANNELS_INNER:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    p_off, p_mask = _along_pixels(p_off, CHANNELS_INNER), _along_pixels(p_mask, CHANNELS_INNER)
    for c0 in range(0, cg, BLOCK_C):
        c = _along_channels(c0 + tl.arange(0, BLOCK_C), CHANNELS_INNER)
        v = tl.load(x_ptr + x_base + c.to(tl.int64) * s_c + p_off, mask=(c < cg) & p_mask, other=0.0)
        v = v.to(tl.float32)
        acc += v * v
    if CHANNELS_INNER:
        total = tl.sum(acc, axis=1)
    else:
        total = tl.sum(acc, axis=0)
    return total


# Forward: program ``pid`` of tensor i (found in the table) takes pixel block pb of sample b of group g (programs
# start_i + (g·B + b)·blocks + pb: consecutive programs write one map) and sums x² over the group's CG channels in
# [BLOCK_C, BLOCK_P] tiles, in fp32. The strides are read from the table, so the compiler cannot see which axis is
# contiguous: CHANNELS_INNER (the largest tensor's layout) makes the channels the tile's last axis, the one that is
# spread over consecutive threads, so that a warp reads consecutive addresses of channels-last tensors. The pixel
# offsets are formed once per program, outside the channel loop, from h = p // W and w = p % W (windows need no
# variant), and the dtype is branched on once per program, outside the loop (a branch per load, inside it, kept the
# three address computations live: 120 registers against 48 on a 16×256 tile).
@triton.jit
def _maps_forward_kernel(
    table_ptr,  # [P + P·ROW + M] int64, the forward table above
    P,
    ROW: tl.constexpr,
    PAIR_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CHANNELS_INNER: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    entry = _find_pair(table_ptr, pid, P, PAIR_BLOCK)
    row = table_ptr + P + entry * ROW
    x_addr, x_code, out_code = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    batch, cg = tl.load(row + 3), tl.load(row + 4).to(tl.int32)
    width, pixels, blocks = tl.load(row + 6).to(tl.int32), tl.load(row + 7).to(tl.int32), tl.load(row + 8)
    s_b, s_c, s_h, s_w = tl.load(row + 10), tl.load(row + 11), tl.load(row + 12), tl.load(row + 13)
    local = pid - tl.load(table_ptr + entry)
    map_index = local // blocks  # g·B + b
    group, b = map_index // batch, map_index % batch
    p = (local % blocks).to(tl.int32) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < pixels
    p_off = (p // width).to(tl.int64) * s_h + (p % width).to(tl.int64) * s_w
    x_base = b * s_b + group * cg * s_c
    # One typed pointer per branch (a variable shared by the branches would need one type).
    if x_code == 0:
        f32 = x_addr.to(tl.pointer_type(tl.float32))
        total = _sum_squares(f32, x_base, s_c, p_off, p_mask, cg, BLOCK_C, BLOCK_P, CHANNELS_INNER)
    elif x_code == 1:
        f16 = x_addr.to(tl.pointer_type(tl.float16))
        total = _sum_squares(f16, x_base, s_c, p_off, p_mask, cg, BLOCK_C, BLOCK_P, CHANNELS_INNER)
    else:
        bf16 = x_addr.to(tl.pointer_type(tl.bfloat16))
        total = _sum_squares(bf16, x_base, s_c, p_off, p_mask, cg, BLOCK_C, BLOCK_P, CHANNELS_INNER)
    total = total * (1.0 / cg.to(tl.float32))
    out_addr = tl.load(table_ptr + P + P * ROW + tl.load(row + 9) + group)
    _store_f32(out_addr, b * pixels + p.to(tl.int64), total, p_mask, out_code)  # the map is contiguous [B, 1, H, W]


@triton.jit
def _scale_tile(x_addr, dx_addr, dtype: tl.constexpr, x_off, d_off, coef, mask, has_grad):
    """``dx[d_off] = coef · x[x_off]`` on a tile of ``dtype``; x is not read where the map received no gradient."""
    v = tl.load(x_addr.to(tl.pointer_type(dtype)) + x_off, mask=mask & has_grad, other=0.0).to(tl.float32)
    tl.store(dx_addr.to(tl.pointer_type(dtype)) + d_off, (coef * v).to(dtype), mask=mask)


# Backward: program ``pid`` of tensor i takes pixel block pb of channel block cb of sample b (programs
# start_i + (b·G·CB + cb)·blocks + pb, CB channel blocks per group, only for tensors that get a gradient). A channel
# block lies within one group g = cb // CB, so it reads one block of one upstream gradient, u_{i,g}, and writes
# dx = (u · 2/CG) · x in x's dtype; where map (i, g) received no gradient, it writes 0 without reading x (the gradient
# is uninitialised memory). The tile's orientation and the dtype branch are the forward's.
@triton.jit
def _maps_backward_kernel(
    table_ptr,  # [P + P·ROW + M] int64, the forward table
    grad_table_ptr,  # [P + P·GROW + M·MROW] int64, the backward table
    P,
    ROW: tl.constexpr,
    GROW: tl.constexpr,
    MROW: tl.constexpr,
    PAIR_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CHANNELS_INNER: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    entry = _find_pair(grad_table_ptr, pid, P, PAIR_BLOCK)
    row = table_ptr + P + entry * ROW
    grow = grad_table_ptr + P + entry * GROW
    x_addr, x_code = tl.load(row), tl.load(row + 1)
    cg, groups = tl.load(row + 4).to(tl.int32), tl.load(row + 5)
    width, pixels, blocks = tl.load(row + 6).to(tl.int32), tl.load(row + 7).to(tl.int32), tl.load(row + 8)
    channel_blocks = tl.load(row + 14)
    local = pid - tl.load(grad_table_ptr + entry)
    rest = local // blocks
    cb, b = rest % (groups * channel_blocks), rest // (groups * channel_blocks)
    group = cb // channel_blocks
    c_in = (cb % channel_blocks).to(tl.int32) * BLOCK_C + tl.arange(0, BLOCK_C)  # channels within the group
    c = _along_channels((group * cg + c_in).to(tl.int64), CHANNELS_INNER)
    p = (local % blocks).to(tl.int32) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < pixels
    mask = _along_channels(c_in < cg, CHANNELS_INNER) & _along_pixels(p_mask, CHANNELS_INNER)
    h, w = (p // width).to(tl.int64), (p % width).to(tl.int64)
    grad_row = grad_table_ptr + P + P * GROW + (tl.load(row + 9) + group) * MROW
    g_addr = tl.load(grad_row)
    has_grad = g_addr != 0
    sg_b, sg_h, sg_w = tl.load(grad_row + 2), tl.load(grad_row + 3), tl.load(grad_row + 4)
    coef = _load_f32(g_addr, b * sg_b + h * sg_h + w * sg_w, p_mask & has_grad, tl.load(grad_row + 1))
    coef = _along_pixels(coef * (2.0 / cg.to(tl.float32)), CHANNELS_INNER)  # 0 where the map received no gradient
    s_b, s_c, s_h, s_w = tl.load(row + 10), tl.load(row + 11), tl.load(row + 12), tl.load(row + 13)
    x_off = b * s_b + c * s_c + _along_pixels(h * s_h + w * s_w, CHANNELS_INNER)
    d_b, d_c, d_h, d_w = tl.load(grow + 1), tl.load(grow + 2), tl.load(grow + 3), tl.load(grow + 4)
    d_off = b * d_b + c * d_c + _along_pixels(h * d_h + w * d_w, CHANNELS_INNER)
    dx_addr = tl.load(grow)
    if x_code == 0:
        _scale_tile(x_addr, dx_addr, tl.float32, x_off, d_off, coef, mask, has_grad)
    elif x_code == 1:
        _scale_tile(x_addr, dx_addr, tl.float16, x_off, d_off, coef, mask, has_grad)
    else:
        _scale_tile(x_addr, dx_addr, tl.bfloat16, x_off, d_off, coef, mask, has_grad)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def _maps_config(entries: list[tuple[int, int, int, bool]]) -> tuple[int, int, int, bool]:
    """``(BLOCK_C, BLOCK_P, num_warps, CHANNELS_INNER)`` of both launches from ``(elements, channels per group,
    pixels, channels inner)`` per tensor, for the tensor of the most elements (it carries most of the traffic; the
    others run masked lanes where they are smaller, less coalesced reads where their layout differs).

    As ``attention_map``'s tile, wide along the dimension that is contiguous in memory, but of at most 1024 entries,
    4 per thread: the strides being read from the table, every entry is a load of its own with its own int64
    address (no vectorisation), and 16 entries per thread took 128 (forward) and 204 (backward) registers on sm_90
    against 64 and 62 with 4."""
    _, channels, pixels, inner = max(entries, key=lambda entry: entry[0])
    channels, pixels = triton.next_power_of_2(max(channels, 1)), triton.next_power_of_2(max(pixels, 1))
    if inner:
        block_c = min(channels, 64)
        block_p = min(pixels, max(1024 // block_c, 1))
    else:
        block_p = min(pixels, 256)
        block_c = min(channels, max(1024 // block_p, 1))
    return block_c, block_p, max(min(block_c * block_p // 128, 8), 1), inner


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


class _Plan:
    """What the backward pass needs besides the saved tensors: the launch configuration, and per tensor its groups,
    its first map and its backward program count."""

    def __init__(self, block_c, block_p, num_warps, inner, pair_block, groups, first_maps, programs):
        self.block_c, self.block_p, self.num_warps, self.inner = block_c, block_p, num_warps, inner
        self.pair_block = pair_block
        self.groups, self.first_maps, self.programs = groups, first_maps, programs


def _maps_forward(
    xs: Sequence[torch.Tensor], groups: Sequence[int], out_dtypes: Sequence[torch.dtype]
) -> tuple[list[torch.Tensor], torch.Tensor, _Plan]:
    """``(maps, table, plan)``: every map (tensor by tensor, group by group, each its own contiguous allocation) in
    one launch for any number of tensors, groups and dtypes."""
    device = xs[0].device
    entries = [
        (x.numel(), x.shape[1] // g, x.shape[2] * x.shape[3], x.stride(1) == 1 and x.shape[1] // g > 1)
        for x, g in zip(xs, groups, strict=True)
    ]
    block_c, block_p, num_warps, inner = _maps_config(entries)
    starts, rows, addresses, maps, first_maps, programs_bwd = [], [], [], [], [], []
    programs = 0
    for x, g, dtype in zip(xs, groups, out_dtypes, strict=True):
        batch, channels, height, width = x.shape
        cg, pixels = channels // g, height * width
        blocks, channel_blocks = triton.cdiv(pixels, block_p), triton.cdiv(cg, block_c)
        # Separate allocations rather than views of one buffer: each map is a plain tensor (in-place use allowed,
        # freed on its own).
        outs = [torch.empty((batch, 1, height, width), dtype=dtype, device=device) for _ in range(g)]
        starts.append(programs)
        first_maps.append(len(addresses))
        rows += [x.data_ptr(), _CODES[x.dtype], _CODES[dtype], batch, cg, g, width, pixels, blocks, len(addresses)]
        rows += [*x.stride(), channel_blocks]
        addresses += [out.data_ptr() for out in outs]
        maps += outs
        programs += g * batch * blocks
        programs_bwd.append(batch * g * channel_blocks * blocks)
    # The one host-built tensor of the forward pass, copied once (see _device_table: capturable, no host sync).
    table = _device_table(starts + rows + addresses, device)
    pair_block = _pair_block(len(xs))
    if programs:
        _maps_forward_kernel[(programs,)](
            table_ptr=table, P=len(xs), ROW=_ROW, PAIR_BLOCK=pair_block, BLOCK_C=block_c, BLOCK_P=block_p,
            CHANNELS_INNER=inner, num_warps=num_warps,
        )  # fmt: skip
    plan = _Plan(block_c, block_p, num_warps, inner, pair_block, list(groups), first_maps, programs_bwd)
    return maps, table, plan


def _maps_backward(
    xs: Sequence[torch.Tensor],
    table: torch.Tensor,
    plan: _Plan,
    grads: Sequence[torch.Tensor | None],
    need: Sequence[bool],
) -> list[torch.Tensor | None]:
    """The gradients of ``xs``: ``torch.empty_like(x)`` for each one that needs a gradient and received one for at
    least one of its maps (None for the others, never written), filled by one launch."""
    starts, rows, map_rows, dxs = [], [], [], []
    programs = 0
    for i, x in enumerate(xs):
        first, g = plan.first_maps[i], plan.groups[i]
        upstream = grads[first : first + g]
        starts.append(programs)
        if need[i] and any(u is not None for u in upstream):
            dx = torch.empty_like(x)
            rows += [dx.data_ptr(), *dx.stride()]
            programs += plan.programs[i]
        else:
            dx = None
            rows += [0] * _GROW
        dxs.append(dx)
        for u in upstream:
            # An upstream gradient may be any strided [B, 1, H, W] tensor (expanded, of stride 0, after a .sum()).
            map_rows += [0] * _MROW if u is None else [u.data_ptr(), _CODES[u.dtype], u.stride(0), *u.stride()[2:]]
    if programs:
        # The backward pass's one host-built tensor (capturable, as the forward's).
        grad_table = _device_table(starts + rows + map_rows, table.device)
        _maps_backward_kernel[(programs,)](
            table_ptr=table, grad_table_ptr=grad_table, P=len(xs), ROW=_ROW, GROW=_GROW, MROW=_MROW,
            PAIR_BLOCK=plan.pair_block, BLOCK_C=plan.block_c, BLOCK_P=plan.block_p, CHANNELS_INNER=plan.inner,
            num_warps=plan.num_warps,
        )  # fmt: skip
    return dxs


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _AttentionMapsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, groups: tuple[int, ...], out_dtypes: tuple[torch.dtype, ...], *xs: torch.Tensor):
        maps, table, plan = _maps_forward(xs, groups, out_dtypes)
        # The inputs are saved although the kernels reach them through the table: saving keeps them alive and
        # checks that nothing modified them in place before the backward pass.
        ctx.save_for_backward(*xs, table)
        ctx.plan = plan
        # Unused maps arrive as None (no zero tensor is made for them); their channels' gradient is written as 0.
        ctx.set_materialize_grads(False)
        need = ctx.needs_input_grad[2:]
        ctx.mark_non_differentiable(
            *[m for i, first in enumerate(plan.first_maps) if not need[i] for m in maps[first : first + groups[i]]]
        )
        return tuple(maps)

    @staticmethod
    @once_differentiable  # the backward kernel is not itself differentiated
    def backward(ctx, *grads: torch.Tensor | None):
        *xs, table = ctx.saved_tensors
        return None, None, *_maps_backward(xs, table, ctx.plan, grads, ctx.needs_input_grad[2:])


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _check_maps(op: str, xs: Sequence[torch.Tensor], groups: int | Sequence[int]) -> list[int]:
    """The groups of each tensor, after the checks of ``op``'s arguments."""
    if not xs:
        raise ValueError(f"{op} expects a non-empty sequence of [B, C, H, W] tensors")
    per_tensor = [groups] * len(xs) if isinstance(groups, int) else list(groups)
    if len(per_tensor) != len(xs):
        raise ValueError(f"{op} expects one groups value per tensor, got {len(per_tensor)} for {len(xs)} tensors")
    for i, (x, g) in enumerate(zip(xs, per_tensor, strict=True)):
        if x.dim() != 4:
            raise ValueError(f"{op} expects xs[{i}] of shape [B, C, H, W], got {tuple(x.shape)}")
        if not isinstance(g, int) or g < 1 or x.shape[1] % g:
            raise ValueError(f"{op}: groups={g!r} of xs[{i}] must divide its {x.shape[1]} channels")
        if x.device != xs[0].device:
            raise ValueError(f"{op} expects every tensor on one device, got {xs[0].device} and {x.device}")
        check_dtypes(op, **{f"xs[{i}]": x})
    return per_tensor


def attention_maps(xs: Sequence[torch.Tensor], groups: int | Sequence[int] = 1) -> list[list[torch.Tensor]]:
    """The attention map of every channel group of every tensor, ``maps[i][g]``, in one launch for any number.

    ``maps[i][g] = A(xs[i][:, g·C_i/G_i : (g+1)·C_i/G_i])`` with ``A(x) = mean_c(x²)``: exactly
    ``attention_map(xs[i], groups=G_i)[:, g:g+1]`` (squares summed in fp32, the mean rounded once).

    Args:
        xs: ``P ≥ 1`` tensors ``[B_i, C_i, H_i, W_i]`` on one device (shapes may differ), NCHW, channels-last or any
            strided view (read where they lie, never copied); fp32/fp16/bf16 each (Triton; the dtypes may differ
            between tensors) or fp64 (reference).
        groups: one divisor of every ``C_i``, or one per tensor.

    Returns:
        ``maps[i][g]``: ``[B_i, 1, H_i, W_i]``, contiguous, in ``result_dtype(xs[i])`` (``xs[i]``'s dtype, or fp32 for
        half inputs under autocast). Each map is an output of its own: a map left unused costs its gradient nothing
        (its channels' gradient is 0), a tensor none of whose maps is used gets no gradient, and a tensor that does
        not require one is never written. The forward pass is one launch, the backward pass one; the only torch work
        besides allocations is one small host-built table per pass (no host synchronisation: capturable in a CUDA
        graph).
    """
    xs = list(xs)
    per_tensor = _check_maps("attention_maps", xs, groups)
    if not use_triton(*xs):
        return attention_maps_reference(xs, per_tensor)
    flat = _AttentionMapsFunction.apply(tuple(per_tensor), tuple(result_dtype(x) for x in xs), *xs)
    maps, first = [], 0
    for g in per_tensor:
        maps.append(list(flat[first : first + g]))
        first += g
    return maps


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class AttentionMaps(nn.Module):
    """``nn.Module`` form of :func:`attention_maps`, with its ``groups`` fixed at construction."""

    def __init__(self, groups: int | Sequence[int] = 1) -> None:
        super().__init__()
        self.groups = groups if isinstance(groups, int) else tuple(groups)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        return attention_maps(xs, self.groups)


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def attention_maps_reference(xs: Sequence[torch.Tensor], groups: int | Sequence[int] = 1) -> list[list[torch.Tensor]]:
    """``attention_map_reference(xs[i], G_i)`` cut into its ``G_i`` maps, each ``[B_i, 1, H_i, W_i]`` and contiguous
    (in ``xs[i]``'s dtype)."""
    xs = list(xs)
    per_tensor = _check_maps("attention_maps_reference", xs, groups)
    maps = []
    for x, g in zip(xs, per_tensor, strict=True):
        a = attention_map_reference(x, g)
        maps.append([a[:, k : k + 1].contiguous() for k in range(g)])
    return maps
