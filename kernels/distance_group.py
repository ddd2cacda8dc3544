"""Many normalised distances in one go: ``normalized_distances(xs, ys)[i] = d(xs[i], ys[i])`` for ``P`` pairs.

``d`` is :func:`ffsd_kernels.normalized_distance`'s: ``n(v) = v / max(‖v‖₂, 1e-12)`` per sample over its flattened
entries and ``d(x, y) = mean((n(x) − n(y))²)`` over all ``B·N`` entries of a pair. The pairs may differ in shape
(each pair one shape ``[B_i, ...]``), in layout (NCHW, channels-last, slices: read through their strides, never
copied), in dtype (fp32, fp16, bf16, even between the two sides of a pair) and in which side needs a gradient. A
training step of FFSD takes some fourteen such distances (attention maps and feature maps of every student against
the fused map, at three resolutions); this op takes all of them in three launches instead of three per pair.

Forward, per pair ``i`` with ``M_i = B_i·N_i`` and per sample ``b`` the sums ``Sxx = Σx²``, ``Syy = Σy²``,
``Sxy = Σxy`` (fp32), ``nx = max(√Sxx, 1e-12)``, ``ny = max(√Syy, 1e-12)``:

    d_i = (1/M_i) Σ_b [Sxx/nx² + Syy/ny² − 2·Sxy/(nx·ny)] = (1/M_i) Σ_b (u·u + v·v − 2·u·v),

with ``u = x_b/nx``, ``v = y_b/ny``. Backward, with ``g_i`` the upstream gradient of ``d_i``: ``∂d_i/∂u =
2(u − v)/M_i``; where ``‖x_b‖ > 1e-12``, ``∂u/∂x = (I − u uᵀ)/nx``, where it is clamped, ``nx`` is the constant 1e-12
and ``∂u/∂x = I/nx``. Hence, with ``f = [‖x_b‖ > 1e-12]``,

    ∂(g_i d_i)/∂x_b = (2 g_i/(M_i nx)) · [(u − v) − f · u · (u·u − u·v)] = cx · (u − v − ax · u),
    ∂(g_i d_i)/∂y_b = (2 g_i/(M_i ny)) · [(v − u) − f · v · (v·v − u·v)] = cy · (v − u − ay · v),

from the per-sample statistics ``(nx, ny, ax, ay)``, ``ax = f·(u·u − u·v)``, that the forward pass saves.

Launches. Forward: ONE partial-sums launch over every sample slice of every pair (``Sxx, Syy, Sxy`` per slice, no
atomics), then ONE finish launch (one program per pair, a fixed order: deterministic) that writes the statistics and
``d``. Backward: ONE elementwise launch over every pair that needs a gradient, which reads ``g`` ``[P]`` from device
memory. Dtypes are mixed within each launch (a per-tensor dtype code in the table picks the load and the store), so
the count does not grow with the dtypes: 2 + 1 launches for any ``P``. The kernels find their pair in a small
int64 table (data addresses, sizes, strides, program offsets) built on the host and copied to the device once per
forward pass; the backward pass reuses it (the gradients' places in one buffer are planned in the forward pass).

Everything runs without a host sync, so the op can be captured in a CUDA graph (see ``_device_table``).
"""

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, tl, triton, use_triton
from ffsd_kernels.attention import EPS, _sample_layout, normalized_distance_reference

# Dtype codes of the table (one per tensor): which element type a kernel loads and stores through an address.
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# A row of the table, one per pair (int64 fields, in this order; addresses in bytes, strides in elements):
#   0 x address   1 y address   2 x dtype code   3 y dtype code   4 B   5 N   6 D2   7 D3   8 FLAT (one strided run)
#   9 SPLITS (slices per sample)   10 CHUNK (entries per slice)   11 first partial row   12 first statistics row
#   13-16 x strides (b, 1, 2, 3)   17-20 y strides   21 backward blocks per sample   22 write gx   23 write gy
#   24 gx byte offset in the gradient buffer   25 gy byte offset   26-29 gx strides   30-33 gy strides
# The table is [2P + P·ROW]: the first forward program of each pair, the first backward program of each pair, rows.
_ROW = 34
_ALIGN = 16  # bytes: each gradient starts on a 16-byte boundary of the gradient buffer


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _find_pair(starts_ptr, pid, P, PAIR_BLOCK: tl.constexpr):
    """The pair a program belongs to: the last ``i`` with ``starts[i] <= pid`` (``starts`` non-decreasing, ``[P]``;
    a pair without programs has the start of the next one and is passed over)."""
    count = 0
    for p0 in range(0, P, PAIR_BLOCK):
        k = p0 + tl.arange(0, PAIR_BLOCK)
        starts = tl.load(starts_ptr + k, mask=k < P, other=0)
        count += tl.sum(((starts <= pid) & (k < P)).to(tl.int32), axis=0)
    return (count - 1).to(tl.int64)


@triton.jit
def _offsets(j, D2, D3, s1, s2, s3, flat):
    """Offsets (int64, elements) of flat indices ``j = (i1·D2 + i2)·D3 + i3`` (int32) in a sample of strides
    (s1, s2, s3); ``flat``: the sample is one strided run, ``j·s3``."""
    if flat != 0:
        off = j.to(tl.int64) * s3
    else:
        i3 = j % D3
        t = j // D3
        off = (t // D2).to(tl.int64) * s1 + (t % D2).to(tl.int64) * s2 + i3.to(tl.int64) * s3
    return off


@triton.jit
def _load_f32(addr, off, mask, code):
    """``tensor[off]`` as fp32 for the tensor at byte address ``addr`` (int64) of dtype ``code`` (0 fp32, 1 fp16,
    2 bf16)."""
    if code == 0:
        v = tl.load(addr.to(tl.pointer_type(tl.float32)) + off, mask=mask, other=0.0)
    elif code == 1:
        v = tl.load(addr.to(tl.pointer_type(tl.float16)) + off, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + off, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _store_f32(addr, off, value, mask, code):
    """``tensor[off] = value`` (fp32, rounded to the tensor's dtype ``code``)."""
    if code == 0:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + off, value, mask=mask)
    elif code == 1:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + off, value.to(tl.float16), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.bfloat16)) + off, value.to(tl.bfloat16), mask=mask)


# Forward, first pass: program ``pid`` of pair i (found in the table) takes slice s of sample b, CHUNK entries, and
# writes (Sxx, Syy, Sxy) of that slice to partial[pid, 0:3]; the programs of pair i are rows
# start_i + b·SPLITS + s. No atomics: the second pass sums over the slices, in order.
@triton.jit
def _distances_partial_kernel(
    table_ptr,  # [2P + P·ROW] int64, the table above
    partial_ptr,  # [programs, 3] fp32, contiguous (written)
    P,
    ROW: tl.constexpr,
    PAIR_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pair = _find_pair(table_ptr, pid, P, PAIR_BLOCK)
    row = table_ptr + 2 * P + pair * ROW
    x_addr, y_addr = tl.load(row), tl.load(row + 1)
    x_code, y_code = tl.load(row + 2), tl.load(row + 3)
    n = tl.load(row + 5).to(tl.int32)
    d2, d3, flat = tl.load(row + 6).to(tl.int32), tl.load(row + 7).to(tl.int32), tl.load(row + 8)
    splits, chunk = tl.load(row + 9), tl.load(row + 10).to(tl.int32)
    sx_b, sx_1, sx_2, sx_3 = tl.load(row + 13), tl.load(row + 14), tl.load(row + 15), tl.load(row + 16)
    sy_b, sy_1, sy_2, sy_3 = tl.load(row + 17), tl.load(row + 18), tl.load(row + 19), tl.load(row + 20)
    local = pid - tl.load(table_ptr + pair)
    b = local // splits
    start = (local % splits).to(tl.int32) * chunk
    sxx = tl.zeros([BLOCK], dtype=tl.float32)
    syy = tl.zeros([BLOCK], dtype=tl.float32)
    sxy = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, chunk, BLOCK):
        j = start + j0 + tl.arange(0, BLOCK)
        mask = j < n
        xv = _load_f32(x_addr, b * sx_b + _offsets(j, d2, d3, sx_1, sx_2, sx_3, flat), mask, x_code)
        yv = _load_f32(y_addr, b * sy_b + _offsets(j, d2, d3, sy_1, sy_2, sy_3, flat), mask, y_code)
        sxx += xv * xv
        syy += yv * yv
        sxy += xv * yv
    out = partial_ptr + pid * 3
    tl.store(out, tl.sum(sxx, axis=0))
    tl.store(out + 1, tl.sum(syy, axis=0))
    tl.store(out + 2, tl.sum(sxy, axis=0))


# Forward, second pass: one program per pair, a fixed order (deterministic). The per-sample sums out of the
# partials, the statistics stats[first_i + b] = (nx, ny, ax, ay) the backward needs, and d_i (fp32).
@triton.jit
def _distances_finish_kernel(
    table_ptr,  # [2P + P·ROW] int64
    partial_ptr,  # [programs, 3] fp32, contiguous
    stats_ptr,  # [Σ B_i, 4] fp32, contiguous (written)
    out_ptr,  # [P] fp32 (written)
    P,
    ROW: tl.constexpr,
    EPS_: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    row = table_ptr + 2 * P + pair * ROW
    batch, n = tl.load(row + 4), tl.load(row + 5)
    splits, first_partial, first_stat = tl.load(row + 9), tl.load(row + 11), tl.load(row + 12)
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    s = tl.arange(0, BLOCK_S)
    for b0 in range(0, batch, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        in_batch = b < batch
        mask = in_batch[:, None] & (s[None, :] < splits)
        base = partial_ptr + (first_partial + b[:, None] * splits + s[None, :]) * 3
        sxx = tl.sum(tl.load(base, mask=mask, other=0.0), axis=1)
        syy = tl.sum(tl.load(base + 1, mask=mask, other=0.0), axis=1)
        sxy = tl.sum(tl.load(base + 2, mask=mask, other=0.0), axis=1)
        root_x, root_y = tl.sqrt(sxx), tl.sqrt(syy)
        nx, ny = tl.maximum(root_x, EPS_), tl.maximum(root_y, EPS_)
        uu, vv, uv = sxx / (nx * nx), syy / (ny * ny), sxy / (nx * ny)
        ax = tl.where(root_x > EPS_, uu - uv, 0.0)
        ay = tl.where(root_y > EPS_, vv - uv, 0.0)
        stat = stats_ptr + (first_stat + b) * 4
        tl.store(stat, nx, mask=in_batch)
        tl.store(stat + 1, ny, mask=in_batch)
        tl.store(stat + 2, ax, mask=in_batch)
        tl.store(stat + 3, ay, mask=in_batch)
        total += tl.where(in_batch, uu + vv - 2 * uv, 0.0)
    tl.store(out_ptr + pair, tl.sum(total, axis=0) / (batch * n).to(tl.float32))


# Backward: program ``pid`` of pair i takes block jb of sample b (programs start_i + b·blocks + jb, only for pairs
# that need a gradient) and writes cx·(u − v − ax·u) and/or cy·(v − u − ay·v), each in its input's dtype, into the
# gradient buffer at the place the forward pass planned. g_i is read from device memory (capturable). u and v are
# formed first so that u − v is exactly 0 where the samples are proportional (one-pixel maps).
@triton.jit
def _distances_backward_kernel(
    table_ptr,  # [2P + P·ROW] int64
    stats_ptr,  # [Σ B_i, 4] fp32, contiguous: (nx, ny, ax, ay)
    grad_ptr,  # [P] the upstream gradient, stride grad_stride
    buffer_ptr,  # the gradients, each at its byte offset (written)
    grad_stride,
    P,
    ROW: tl.constexpr,
    PAIR_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pair = _find_pair(table_ptr + P, pid, P, PAIR_BLOCK)
    row = table_ptr + 2 * P + pair * ROW
    x_addr, y_addr = tl.load(row), tl.load(row + 1)
    x_code, y_code = tl.load(row + 2), tl.load(row + 3)
    batch, n = tl.load(row + 4), tl.load(row + 5)
    d2, d3, flat = tl.load(row + 6).to(tl.int32), tl.load(row + 7).to(tl.int32), tl.load(row + 8)
    blocks = tl.load(row + 21)
    local = pid - tl.load(table_ptr + P + pair)
    b = local // blocks
    j = (local % blocks).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    stat = stats_ptr + (tl.load(row + 12) + b) * 4
    nx, ny = tl.load(stat), tl.load(stat + 1)
    c = 2.0 * tl.load(grad_ptr + pair * grad_stride).to(tl.float32) / (batch * n).to(tl.float32)
    sx_b, sx_1, sx_2, sx_3 = tl.load(row + 13), tl.load(row + 14), tl.load(row + 15), tl.load(row + 16)
    sy_b, sy_1, sy_2, sy_3 = tl.load(row + 17), tl.load(row + 18), tl.load(row + 19), tl.load(row + 20)
    u = _load_f32(x_addr, b * sx_b + _offsets(j, d2, d3, sx_1, sx_2, sx_3, flat), mask, x_code) / nx
    v = _load_f32(y_addr, b * sy_b + _offsets(j, d2, d3, sy_1, sy_2, sy_3, flat), mask, y_code) / ny
    buffer = buffer_ptr.to(tl.int64)
    if tl.load(row + 22) != 0:
        ax = tl.load(stat + 2)
        s_b, s_1, s_2, s_3 = tl.load(row + 26), tl.load(row + 27), tl.load(row + 28), tl.load(row + 29)
        off = b * s_b + _offsets(j, d2, d3, s_1, s_2, s_3, flat)
        _store_f32(buffer + tl.load(row + 24), off, (c / nx) * (u - v - ax * u), mask, x_code)
    if tl.load(row + 23) != 0:
        ay = tl.load(stat + 3)
        s_b, s_1, s_2, s_3 = tl.load(row + 30), tl.load(row + 31), tl.load(row + 32), tl.load(row + 33)
        off = b * s_b + _offsets(j, d2, d3, s_1, s_2, s_3, flat)
        _store_f32(buffer + tl.load(row + 25), off, (c / ny) * (v - u - ay * v), mask, y_code)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def _warps(block: int) -> int:
    return 8 if block >= 1024 else 4 if block >= 512 else 2 if block >= 128 else 1


def _partial_config(batches: list[int], counts: list[int]) -> tuple[int, list[tuple[int, int]], int]:
    """``(BLOCK, [(SPLITS, CHUNK) per pair], num_warps)`` of the partial-sums launch. One BLOCK for all pairs (the
    largest sample's, at most 1024 entries); each pair's samples are cut into SPLITS slices of CHUNK entries (a
    multiple of BLOCK) so that a pair of few samples still has about 256 programs, as ``normalized_distance``."""
    block = min(triton.next_power_of_2(max(max(counts), 1)), 1024)
    cuts = []
    for batch, n in zip(batches, counts, strict=True):
        blocks = triton.cdiv(n, block)
        splits = max(min(blocks, triton.cdiv(256, max(batch, 1))), 1)
        chunk = triton.cdiv(blocks, splits) * block
        cuts.append((max(triton.cdiv(n, chunk), 1), chunk))
    return block, cuts, _warps(block)


def _backward_config(counts: list[int]) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the elementwise backward: one block of one sample per program."""
    block = min(triton.next_power_of_2(max(max(counts), 1)), 1024)
    return block, _warps(block)


def _pair_block(pairs: int) -> int:
    """How many program offsets a program compares at a time when it looks for its pair."""
    return min(triton.next_power_of_2(pairs), 64)


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------

# Host copies of the tables of captured steps: a host→device copy captured in a CUDA graph reads its source again at
# every replay, so that source must outlive the graph (a step's pointers and shapes are static, so its table is too).
_CAPTURED_TABLES: list[torch.Tensor] = []


def _device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """The int64 table on ``device``: one host-built tensor and one host→device copy, no host synchronisation.

    On CUDA the table is built in pinned memory and copied with ``non_blocking=True``: ``torch.tensor(values,
    device="cuda")`` copies from pageable memory with ``memcpy_and_sync`` (``cudaMemcpyAsync`` then
    ``cudaStreamSynchronize``: the host waits for the stream to drain, and under CUDA graph capture the synchronise
    is refused, ``cudaErrorStreamCaptureUnsupported``). The asynchronous copy from pinned memory is captured as a
    memcpy node whose source is the pinned buffer; the buffer is kept alive for the graph (``_CAPTURED_TABLES``) and,
    the pointers and shapes of a captured step being static, holds at every replay the values it held at capture.
    Outside capture, PyTorch's pinned-memory allocator keeps the buffer until the copy has run.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    host = torch.tensor(values, dtype=torch.int64, pin_memory=True)
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED_TABLES.append(host)
    return host.to(device, non_blocking=True)


class _Strides:
    """The strides of a tensor not yet allocated (a gradient), as ``_sample_layout`` reads them."""

    def __init__(self, strides: list[int]) -> None:
        self.strides = strides

    def stride(self, dim: int) -> int:
        return self.strides[dim]


def _gradient_strides(t: torch.Tensor) -> list[int]:
    """The strides of ``torch.empty_like(t)``: ``t``'s where ``t`` is dense (NCHW, channels-last, any permutation),
    else dense strides in ``t``'s memory order (a slice's gradient is laid out as its base)."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))  # outermost first
    dense, step = [0] * t.dim(), 1
    for d in reversed(order):
        dense[d] = step
        step *= t.shape[d]
    if all(t.shape[d] == 1 or t.stride(d) == dense[d] for d in range(t.dim())):
        return list(t.stride())
    return dense


class _Plan:
    """What the backward pass needs besides the saved tensors: its launch configuration and where each gradient
    lies in the one gradient buffer (``(byte offset, strides)`` per input, None for one that gets none)."""

    def __init__(self, pairs, block, num_warps, pair_block, programs, buffer_bytes, places):
        self.pairs, self.block, self.num_warps, self.pair_block = pairs, block, num_warps, pair_block
        self.programs, self.buffer_bytes, self.places = programs, buffer_bytes, places


def _distances_forward(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], need: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Plan]:
    """``(d [P] fp32, stats [Σ B_i, 4] fp32, table, plan)``: two launches for every pair and dtype. ``need`` holds
    whether each of ``(*xs, *ys)`` gets a gradient, so that the gradients' places are planned here."""
    pairs, device = len(xs), xs[0].device
    batches = [x.shape[0] for x in xs]
    counts = [math.prod(x.shape[1:]) for x in xs]
    block, cuts, num_warps = _partial_config(batches, counts)
    block_bwd, warps_bwd = _backward_config(counts)
    rows: list[int] = []
    forward_starts, backward_starts, places = [], [], [None] * (2 * pairs)
    programs = programs_bwd = samples = buffer_bytes = 0
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        batch, n, (splits, chunk) = batches[i], counts[i], cuts[i]
        sides = []
        for k, t in ((i, x), (pairs + i, y)):
            if need[k]:
                strides = _gradient_strides(t)
                places[k] = (buffer_bytes, strides)
                buffer_bytes += triton.cdiv(t.numel() * t.element_size(), _ALIGN) * _ALIGN
                sides.append(_Strides(strides))
            else:
                sides.append(t)
        sizes, (sx, sy, sgx, sgy) = _sample_layout(x.shape, [x, y, *sides])
        blocks = triton.cdiv(n, block_bwd)
        forward_starts.append(programs)
        backward_starts.append(programs_bwd)
        rows += [x.data_ptr(), y.data_ptr(), _CODES[x.dtype], _CODES[y.dtype], batch, n, sizes[1], sizes[2]]
        rows += [int(sizes[0] == 1 and sizes[1] == 1), splits, chunk, programs, samples]
        rows += [x.stride(0), *sx, y.stride(0), *sy, blocks, int(need[i]), int(need[pairs + i])]
        rows += [places[i][0] if need[i] else 0, places[pairs + i][0] if need[pairs + i] else 0]
        rows += [sides[0].stride(0), *sgx, sides[1].stride(0), *sgy]
        programs += batch * splits
        samples += batch
        if need[i] or need[pairs + i]:
            programs_bwd += batch * blocks
    # The one host-built tensor of the op, copied once (see _device_table: capturable, no host sync).
    table = _device_table(forward_starts + backward_starts + rows, device)
    partial = torch.empty((programs, 3), dtype=torch.float32, device=device)
    stats = torch.empty((samples, 4), dtype=torch.float32, device=device)
    out = torch.empty((pairs,), dtype=torch.float32, device=device)
    pair_block = _pair_block(pairs)
    if programs:
        _distances_partial_kernel[(programs,)](
            table_ptr=table, partial_ptr=partial, P=pairs, ROW=_ROW, PAIR_BLOCK=pair_block, BLOCK=block,
            num_warps=num_warps,
        )  # fmt: skip
    block_s = triton.next_power_of_2(max(splits for splits, _ in cuts))
    block_b = max(min(triton.next_power_of_2(max(batches)), max(1024 // block_s, 1)), 1)
    _distances_finish_kernel[(pairs,)](
        table_ptr=table, partial_ptr=partial, stats_ptr=stats, out_ptr=out, P=pairs, ROW=_ROW, EPS_=EPS,
        BLOCK_B=block_b, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    plan = _Plan(pairs, block_bwd, warps_bwd, pair_block, programs_bwd, buffer_bytes, places)
    return out, stats, table, plan


def _distances_backward(
    tensors: Sequence[torch.Tensor], stats: torch.Tensor, table: torch.Tensor, plan: _Plan, grad: torch.Tensor
) -> list[torch.Tensor | None]:
    """The gradients of ``(*xs, *ys)`` (None where none is needed): one buffer, views of it, one launch."""
    device = stats.device
    buffer = torch.empty((max(plan.buffer_bytes, 1),), dtype=torch.uint8, device=device)
    grads: list[torch.Tensor | None] = []
    for t, place in zip(tensors, plan.places, strict=True):
        if place is None:
            grads.append(None)
            continue
        offset, strides = place
        nbytes = t.numel() * t.element_size()
        grads.append(buffer[offset : offset + nbytes].view(t.dtype).as_strided(t.shape, strides))
    if plan.programs:
        _distances_backward_kernel[(plan.programs,)](
            table_ptr=table, stats_ptr=stats, grad_ptr=grad, buffer_ptr=buffer, grad_stride=grad.stride(0),
            P=plan.pairs, ROW=_ROW, PAIR_BLOCK=plan.pair_block, BLOCK=plan.block, num_warps=plan.num_warps,
        )  # fmt: skip
    return grads


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _NormalizedDistancesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pairs: int, *tensors: torch.Tensor) -> torch.Tensor:
        need = ctx.needs_input_grad[1:]
        out, stats, table, plan = _distances_forward(tensors[:pairs], tensors[pairs:], need)
        # The inputs are saved although the kernels reach them through the table: saving keeps them alive and
        # checks that nothing modified them in place before the backward pass.
        ctx.save_for_backward(*tensors, stats, table)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable  # the backward kernel is not itself differentiated
    def backward(ctx, grad_out: torch.Tensor):
        *tensors, stats, table = ctx.saved_tensors
        return None, *_distances_backward(tensors, stats, table, ctx.plan, grad_out)


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _check_pairs(op: str, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"{op} expects two equally long, non-empty sequences of tensors, got {len(xs)} and {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape != y.shape or x.dim() < 1:
            raise ValueError(
                f"{op} expects xs[{i}] and ys[{i}] of one shape [B, ...], got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.device != xs[0].device or y.device != xs[0].device:
            raise ValueError(f"{op} expects every tensor on one device, got {xs[0].device}, {x.device}, {y.device}")
        check_dtypes(op, **{f"xs[{i}]": x, f"ys[{i}]": y})


def normalized_distances(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """The normalised distances of ``P`` pairs, ``out[i] = d(xs[i], ys[i])``, in three launches for any ``P``.

    ``d(x, y) = mean((n(x) − n(y))²)`` with ``n(v) = v / max(‖v‖₂, 1e-12)`` per sample: exactly
    :func:`ffsd_kernels.normalized_distance` of each pair, computed as ``(1/(B·N)) Σ_b [Sxx/nx² + Syy/ny² −
    2·Sxy/(nx·ny)]`` from per-sample fp32 sums.

    Args:
        xs, ys: two sequences of ``P ≥ 1`` tensors on one device; ``xs[i]`` and ``ys[i]`` of one shape ``[B_i, ...]``
            (pairs may differ in shape), fp32/fp16/bf16 each (Triton; the dtypes may differ between pairs and between
            the two sides of a pair) or fp64 (reference). Up to 4-D they are read through their strides (NCHW,
            channels-last and slices, without copies); higher ranks are reshaped to ``[B, N]``.

    Returns:
        ``[P]`` float32 (float64 if any input is float64: the reference), also under autocast. The gradient reaches
        every tensor that requires one and no other: a detached side is never written. The forward pass is two
        launches (partial sums of every pair, then one finish), the backward pass one, reading the upstream
        gradient ``[P]`` from device memory; the only torch work besides allocations is one small host-built table
        copied to the device per forward pass (no host synchronisation: capturable in a CUDA graph).
    """
    xs, ys = list(xs), list(ys)
    _check_pairs("normalized_distances", xs, ys)
    if not use_triton(*xs, *ys):
        return normalized_distances_reference(xs, ys)
    xs = [x.reshape(x.shape[0], -1) if x.dim() > 4 else x for x in xs]
    ys = [y.reshape(y.shape[0], -1) if y.dim() > 4 else y for y in ys]
    return _NormalizedDistancesFunction.apply(len(xs), *xs, *ys)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class NormalizedDistances(nn.Module):
    """``nn.Module`` form of :func:`normalized_distances`."""

    def forward(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
        return normalized_distances(xs, ys)


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def normalized_distances_reference(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack([normalized_distance_reference(x, y) for x, y in zip(xs, ys)])`` in float32 (float64 if any
    input is float64): the pairs are cast to that dtype first (as the reference computes anyway), so that a half
    pair's distance is not rounded to its dtype."""
    xs, ys = list(xs), list(ys)
    _check_pairs("normalized_distances_reference", xs, ys)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in (*xs, *ys)) else torch.float32
    return torch.stack([normalized_distance_reference(x.to(dtype), y.to(dtype)) for x, y in zip(xs, ys, strict=True)])
