"""The per-channel kernels on ``[B, C, H, W]`` maps that the fusion block (``fusion.py``) runs: the tile every kernel
on such a map cuts, BatchNorm's batch statistics (per-tile partials, then a fixed-order finish: Chan's parallel
formula, no float atomics), the running-statistics update, BN-apply + ReLU and its backward, with their launch
configuration and launchers. Private: ``fusion.py`` holds the op (its docstring gives the maths of each kernel)."""

import struct

import torch
from torch import nn

from ffsd_kernels._dispatch import tl, triton

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(C, H, W, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The [BLOCK_C, BLOCK_P] tile (channels × flattened pixels p = h·W + w of one sample) of program (pixel block,
    sample, channel block), as every kernel on [B, C, H, W] maps here cuts them: ``(sample (int64), h, w, pixel mask,
    channels (int64), channel mask, tile mask, tile index t = b·P + pid_p of the per-tile partials)``."""
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    full = c_mask[:, None] & p_mask[None, :]
    return pid_b, p // W, p % W, p_mask, c.to(tl.int64), c_mask, full, pid_b * tl.num_programs(0) + pid_p


# Per-tile statistics of a map y, for BN's batch statistics: per tile t = b·P + pid_p and channel, the sum
# s = Σ_p y and the centred sum of squares M2 = Σ_p (y − s/n)² over the tile's n valid pixels, to part[t, c, 0:2]
# (the depthwise forward kernel computes the same for its output). With COUNT, program (0, 0, 0) also increments
# num_batches_tracked: the finish kernel, launched after this one, reads the new value.
@triton.jit
def _channel_stats_kernel(
    y_ptr,  # [B, C, H, W], strides sy_*
    part_ptr,  # [T, C, 2] contiguous
    count_ptr,  # num_batches_tracked, int64 (incremented when COUNT)
    C,
    H,
    W,
    sy_b,
    sy_c,
    sy_h,
    sy_w,
    COUNT: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_b, h, w, p_mask, c64, c_mask, full, tile = _tile(C, H, W, BLOCK_C, BLOCK_P)
    h, w = h.to(tl.int64), w.to(tl.int64)
    y = tl.load(y_ptr + pid_b * sy_b + c64[:, None] * sy_c + (h * sy_h + w * sy_w)[None, :], mask=full, other=0.0)
    y = y.to(tl.float64 if F64 else tl.float32)
    n = tl.minimum(H * W - tl.program_id(0) * BLOCK_P, BLOCK_P)
    s = tl.sum(y, axis=1)
    d = tl.where(full, y - (s / n)[:, None], 0.0)
    tl.store(part_ptr + tile * (2 * C) + c64 * 2, s, mask=c_mask)
    tl.store(part_ptr + tile * (2 * C) + c64 * 2 + 1, tl.sum(d * d, axis=1), mask=c_mask)
    if COUNT:
        first = (tile == 0) & (tl.program_id(2) == 0)
        tl.store(count_ptr, tl.load(count_ptr) + 1, mask=first)


@triton.jit
def _finish_channels(C, BLOCK_C: tl.constexpr):
    """The ``BLOCK_C`` channels of a finish program (one program per block of channels): ``(channels (int64),
    mask)``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c.to(tl.int64), c < C


# The column sums of per-tile partials part[t, c, 0:2] over the T tiles, for BLOCK_C channels, BLOCK_T tiles at a
# time in a fixed order (deterministic, no atomics): the finish kernels' reduction.
@triton.jit
def _partial_sums(part_ptr, C, T, c64, c_mask, F64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    dtype = tl.float64 if F64 else tl.float32
    first = tl.zeros([BLOCK_C], dtype=dtype)
    second = tl.zeros([BLOCK_C], dtype=dtype)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < T)[:, None] & c_mask[None, :]
        off = t.to(tl.int64)[:, None] * (2 * C) + c64[None, :] * 2
        first += tl.sum(tl.load(part_ptr + off, mask=mask, other=0.0), axis=0)
        second += tl.sum(tl.load(part_ptr + off + 1, mask=mask, other=0.0), axis=0)
    return first, second


# BN's per-channel vectors from the per-tile partials part[t, c, 0:2] = (s_t, M2_t) over T tiles of n_t pixels
# (tile t covers pixels (t mod TILES_P)·TILE … of one sample), in a fixed order (deterministic, no atomics):
#   mean = Σ s_t / N,   var = (Σ M2_t + Σ n_t (s_t/n_t − mean)²) / N   (Chan et al.; biased, N = Σ n_t),
# or, without BATCH, the running statistics. Then rstd = 1/√(var + eps), a = γ·rstd, b = β − mean·a, stored to
# stats[0:4, c] = (mean, rstd, a, b); with UPDATE the running statistics move as nn.BatchNorm2d's do:
#   running ← (1 − f)·running + f·batch,   f = momentum, or 1/num_batches_tracked (CUMULATIVE),
# with the unbiased variance var·N/(N − 1). Triton passes a Python float as fp32, so eps and momentum come as fp32
# pairs (hi, lo) whose fp64 sum is exact to ~2⁻⁴⁸ (the fp64 path is checked to 1e-12).
@triton.jit
def _bn_forward_finish_kernel(
    part_ptr,  # [T, C, 2] contiguous (read when BATCH)
    gamma_ptr,  # [C] (read when AFFINE)
    beta_ptr,  # [C] (read when AFFINE)
    rmean_ptr,  # [C] running mean: read without BATCH, updated with UPDATE
    rvar_ptr,  # [C] running variance: likewise
    count_ptr,  # num_batches_tracked, int64 (read when CUMULATIVE)
    stats_ptr,  # [4, C] contiguous, fp32 (fp64 when F64): mean, rstd, a, b
    C,
    T,
    TILES_P,
    TILE,
    PIXELS,
    N,
    eps_hi,
    eps_lo,
    momentum_hi,
    momentum_lo,
    BATCH: tl.constexpr,
    UPDATE: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    AFFINE: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c64, c_mask = _finish_channels(C, BLOCK_C)
    dtype = tl.float64 if F64 else tl.float32
    if BATCH:
        total, m2 = _partial_sums(part_ptr, C, T, c64, c_mask, F64, BLOCK_T, BLOCK_C)  # Σ s_t, Σ M2_t
        mean = total / N
        # The second pass adds the spread of the tiles' means: Σ n_t (s_t/n_t − mean)².
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t < T)[:, None] & c_mask[None, :]
            off = t.to(tl.int64)[:, None] * (2 * C) + c64[None, :] * 2
            s = tl.load(part_ptr + off, mask=mask, other=0.0)
            n_t = tl.minimum(PIXELS - (t % TILES_P) * TILE, TILE).to(dtype)[:, None]
            d = s / n_t - mean[None, :]
            m2 += tl.sum(tl.where(mask, n_t * d * d, 0.0), axis=0)
        var = m2 / N
    else:
        mean = tl.load(rmean_ptr + c64, mask=c_mask, other=0.0).to(dtype)
        var = tl.load(rvar_ptr + c64, mask=c_mask, other=1.0).to(dtype)
    if F64:
        rstd = 1.0 / tl.sqrt(var + (tl.zeros([BLOCK_C], dtype) + eps_hi + eps_lo))  # IEEE-rounded in fp64
    else:
        rstd = 1.0 / tl.sqrt_rn(var + eps_hi)  # tl.sqrt is the approximate one in fp32
    a = rstd
    if AFFINE:
        a = a * tl.load(gamma_ptr + c64, mask=c_mask, other=0.0).to(dtype)
        b = tl.load(beta_ptr + c64, mask=c_mask, other=0.0).to(dtype) - mean * a
    else:
        b = -mean * a
    tl.store(stats_ptr + c64, mean, mask=c_mask)
    tl.store(stats_ptr + C + c64, rstd, mask=c_mask)
    tl.store(stats_ptr + 2 * C + c64, a, mask=c_mask)
    tl.store(stats_ptr + 3 * C + c64, b, mask=c_mask)
    if UPDATE:
        if CUMULATIVE:
            factor = 1.0 / tl.load(count_ptr).to(dtype)
        else:
            factor = tl.zeros([BLOCK_C], dtype) + momentum_hi + momentum_lo
        old_mean = tl.load(rmean_ptr + c64, mask=c_mask, other=0.0).to(dtype)
        old_var = tl.load(rvar_ptr + c64, mask=c_mask, other=0.0).to(dtype)
        new_mean = (1.0 - factor) * old_mean + factor * mean
        new_var = (1.0 - factor) * old_var + factor * (var * N / tl.maximum(N - 1, 1))
        tl.store(rmean_ptr + c64, new_mean.to(rmean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(rvar_ptr + c64, new_var.to(rvar_ptr.dtype.element_ty), mask=c_mask)


# BN-apply + ReLU, per channel c: z = relu(u), u = y·a_c + b_c (a, b from the finish kernel's stats). Backward with
# r = g·[u > 0] (torch's ReLU subgradient: 0 at u = 0):
#   ∂L/∂y = r·a (+ k1 + k2·y when the batch statistics pass their gradient on, HAS_K),   ga = Σ r·y,   gb = Σ r,
# the gradient elementwise (stored when STORE), ga, gb as per-tile partials part[t, c, 0:2] (NEED_AB).
@triton.jit
def _affine_relu_kernel(
    y_ptr,  # [B, C, H, W], strides sy_*
    stats_ptr,  # [4, C] contiguous: (mean, rstd, a, b), fp32 (fp64 when F64)
    g_ptr,  # [B, C, H, W], strides sg_* (read when BACKWARD)
    k_ptr,  # [C, 2] contiguous, (k1, k2) (read when HAS_K)
    out_ptr,  # [B, C, H, W], strides so_*: z (forward) or ∂L/∂y (BACKWARD and STORE)
    part_ptr,  # [T, C, 2] contiguous (written when NEED_AB)
    C,
    H,
    W,
    sy_b,
    sy_c,
    sy_h,
    sy_w,
    sg_b,
    sg_c,
    sg_h,
    sg_w,
    so_b,
    so_c,
    so_h,
    so_w,
    BACKWARD: tl.constexpr,
    STORE: tl.constexpr,
    NEED_AB: tl.constexpr,
    HAS_K: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_b, h, w, p_mask, c64, c_mask, full, tile = _tile(C, H, W, BLOCK_C, BLOCK_P)
    h, w = h.to(tl.int64), w.to(tl.int64)
    a = tl.load(stats_ptr + 2 * C + c64, mask=c_mask, other=0.0)[:, None]
    b = tl.load(stats_ptr + 3 * C + c64, mask=c_mask, other=0.0)[:, None]
    y_off = pid_b * sy_b + c64[:, None] * sy_c + (h * sy_h + w * sy_w)[None, :]
    y = tl.load(y_ptr + y_off, mask=full, other=0.0).to(a.dtype)
    u = y * a + b
    o_off = pid_b * so_b + c64[:, None] * so_c + (h * so_h + w * so_w)[None, :]
    if BACKWARD:
        g_off = pid_b * sg_b + c64[:, None] * sg_c + (h * sg_h + w * sg_w)[None, :]
        g = tl.load(g_ptr + g_off, mask=full, other=0.0).to(a.dtype)
        r = tl.where(full & (u > 0), g, 0.0)
        if STORE:
            grad = r * a
            if HAS_K:
                k1 = tl.load(k_ptr + c64 * 2, mask=c_mask, other=0.0)[:, None]
                k2 = tl.load(k_ptr + c64 * 2 + 1, mask=c_mask, other=0.0)[:, None]
                grad = grad + k1 + k2 * y
            tl.store(out_ptr + o_off, grad.to(out_ptr.dtype.element_ty), mask=full)
        if NEED_AB:
            tl.store(part_ptr + tile * (2 * C) + c64 * 2, tl.sum(r * y, axis=1), mask=c_mask)
            tl.store(part_ptr + tile * (2 * C) + c64 * 2 + 1, tl.sum(r, axis=1), mask=c_mask)
    else:
        tl.store(out_ptr + o_off, tl.maximum(u, 0.0).to(out_ptr.dtype.element_ty), mask=full)


# The backward's per-channel vectors, from the partials part[t, c, 0:2] = (Σ r·y, Σ r) of the tiles (fixed order)
# and the forward's stats. With u = y·a + b, a = γ·rstd, b = β − mean·a, ga = Σ r·y, gb = Σ r:
#   ∂L/∂γ = rstd·(ga − mean·gb),   ∂L/∂β = gb   (NEED_AFFINE; stored in the parameters' dtype),
# and, with BATCH (mean and var are the batch's: ∂mean/∂y = 1/N, ∂var/∂y = 2(y − mean)/N),
#   g_mean = −a·gb,   g_var = −½·γ·rstd³·(ga − mean·gb),   k2 = 2·g_var/N,   k1 = g_mean/N − k2·mean,
# so that the gradient reaching y is r·a + k1 + k2·y; k[c] = (k1, k2).
@triton.jit
def _bn_backward_finish_kernel(
    part_ptr,  # [T, C, 2] contiguous
    stats_ptr,  # [4, C] contiguous: (mean, rstd, a, b)
    gamma_ptr,  # [C] (read when AFFINE)
    ggamma_ptr,  # [C] (written when NEED_AFFINE)
    gbeta_ptr,  # [C] (written when NEED_AFFINE)
    k_ptr,  # [C, 2] contiguous, the stats' dtype (written when BATCH)
    C,
    T,
    N,
    BATCH: tl.constexpr,
    AFFINE: tl.constexpr,
    NEED_AFFINE: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c64, c_mask = _finish_channels(C, BLOCK_C)
    dtype = tl.float64 if F64 else tl.float32
    ga, gb = _partial_sums(part_ptr, C, T, c64, c_mask, F64, BLOCK_T, BLOCK_C)
    mean = tl.load(stats_ptr + c64, mask=c_mask, other=0.0)
    rstd = tl.load(stats_ptr + C + c64, mask=c_mask, other=0.0)
    centred = ga - mean * gb
    if NEED_AFFINE:
        tl.store(ggamma_ptr + c64, (rstd * centred).to(ggamma_ptr.dtype.element_ty), mask=c_mask)
        tl.store(gbeta_ptr + c64, gb.to(gbeta_ptr.dtype.element_ty), mask=c_mask)
    if BATCH:
        a = tl.load(stats_ptr + 2 * C + c64, mask=c_mask, other=0.0)
        if AFFINE:
            gamma = tl.load(gamma_ptr + c64, mask=c_mask, other=0.0).to(dtype)
        else:
            gamma = tl.full([BLOCK_C], 1.0, dtype)
        g_var = -0.5 * gamma * rstd * rstd * rstd * centred
        k2 = 2.0 * g_var / N
        k1 = -a * gb / N - k2 * mean
        tl.store(k_ptr + c64 * 2, k1, mask=c_mask)
        tl.store(k_ptr + c64 * 2 + 1, k2, mask=c_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def _dw_config(channels: int, pixels: int, channels_inner: bool, max_tile: int = 1024) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_P, num_warps)`` for the kernels on [B, C, H, W] tiles: at most ``max_tile`` entries, wide
    along the dimension contiguous in memory (pixels for NCHW, channels for channels-last). The launchers ask for
    1024 (forward, statistics, affine+ReLU) or 512 (depthwise backward: 9 taps of gy, y and x in flight), halved for
    fp64, which keeps every kernel free of register spills on sm_90."""
    if channels_inner:
        block_c = min(triton.next_power_of_2(channels), 32)
        block_p = min(triton.next_power_of_2(pixels), max(max_tile // block_c, 1))
    else:
        block_p = min(triton.next_power_of_2(pixels), 256)
        block_c = min(triton.next_power_of_2(channels), max(max_tile // block_p, 1))
    tile = block_c * block_p
    num_warps = 4 if tile >= 512 else 2 if tile >= 256 else 1
    return block_c, block_p, num_warps


def _finish_config(channels: int, tiles: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_C, num_warps)`` for the finish kernels: a program reduces the partials of 16 channels over
    every tile, 64 tiles at a time (a [C] vector: a handful of programs; the reduction is short)."""
    block_c = min(triton.next_power_of_2(channels), 16)
    block_t = min(triton.next_power_of_2(tiles), 64)
    return block_t, block_c, 4 if block_t * block_c >= 512 else 1


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout_config(y: torch.Tensor, channels: int, max_tile: int = 1024) -> tuple[int, int, int]:
    pixels = y.shape[2] * y.shape[3]
    if y.dtype == torch.float64:
        max_tile //= 2
    return _dw_config(channels, pixels, y.stride(1) == 1 and channels > 1, max_tile)


def _fp32_pair(x: float) -> tuple[float, float]:
    """``(hi, lo)``, fp32 numbers with ``hi + lo == x`` to ~2⁻⁴⁸ (a kernel's fp64 path adds them in fp64)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


class _Tiles:
    """How a statistics pass cut a ``[B, C, H, W]`` map: ``part`` ``[B·tiles_p, C, 2]`` holds per-tile sums of
    ``tile`` pixels each (the last tile of a sample may hold fewer)."""

    def __init__(self, part: torch.Tensor, tiles_p: int, tile: int) -> None:
        self.part, self.tiles_p, self.tile = part, tiles_p, tile


def _updates_running_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether this forward updates ``bn``'s running statistics (train mode, tracking them), as nn.BatchNorm2d."""
    return bn.training and bn.track_running_stats and bn.running_mean is not None


def _batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _channel_stats(y: torch.Tensor, count: torch.Tensor | None) -> _Tiles:
    """Per-tile statistics of ``y`` for BN's batch statistics; ``count`` is incremented when given."""
    batch, channels, height, width = y.shape
    block_c, block_p, num_warps = _layout_config(y, channels)
    tiles_p = triton.cdiv(height * width, block_p)
    part = torch.empty((batch * tiles_p, channels, 2), dtype=_acc_dtype(y.dtype), device=y.device)
    _channel_stats_kernel[(tiles_p, batch, triton.cdiv(channels, block_c))](
        y_ptr=y, part_ptr=part, count_ptr=part if count is None else count, C=channels, H=height, W=width,
        sy_b=y.stride(0), sy_c=y.stride(1), sy_h=y.stride(2), sy_w=y.stride(3), COUNT=count is not None,
        F64=part.dtype == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip
    return _Tiles(part, tiles_p, block_p)


def _bn_forward_finish(bn: nn.BatchNorm2d, tiles: _Tiles | None, y: torch.Tensor) -> torch.Tensor:
    """``[4, C]`` (mean, rstd, a, b) from the batch statistics in ``tiles`` (the running statistics when None),
    updating the running statistics in train mode as nn.BatchNorm2d does. One launch."""
    channels = y.shape[1]
    acc = _acc_dtype(y.dtype)
    stats = torch.empty((4, channels), dtype=acc, device=y.device)
    n = y.shape[0] * y.shape[2] * y.shape[3]
    update = tiles is not None and _updates_running_stats(bn)
    part = stats if tiles is None else tiles.part
    tiles_count = 1 if tiles is None else part.shape[0]
    block_t, block_c, num_warps = _finish_config(channels, tiles_count)
    affine = bn.weight is not None
    running = bn.running_mean is not None
    eps, momentum = _fp32_pair(bn.eps), _fp32_pair(bn.momentum or 0.0)
    _bn_forward_finish_kernel[(triton.cdiv(channels, block_c),)](
        part_ptr=part, gamma_ptr=bn.weight if affine else stats, beta_ptr=bn.bias if affine else stats,
        rmean_ptr=bn.running_mean if running else stats, rvar_ptr=bn.running_var if running else stats,
        count_ptr=bn.num_batches_tracked if update else stats, stats_ptr=stats, C=channels, T=tiles_count,
        TILES_P=1 if tiles is None else tiles.tiles_p, TILE=1 if tiles is None else tiles.tile,
        PIXELS=y.shape[2] * y.shape[3], N=n, eps_hi=eps[0], eps_lo=eps[1], momentum_hi=momentum[0],
        momentum_lo=momentum[1], BATCH=tiles is not None, UPDATE=update, CUMULATIVE=update and bn.momentum is None,
        AFFINE=affine, F64=acc == torch.float64, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return stats


def _affine_relu(
    y: torch.Tensor,
    stats: torch.Tensor,
    grad: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    store: bool = True,
    need_ab: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Forward (``grad`` None): ``relu(y·a + b)`` in ``y``'s dtype and memory format. Backward: ``(∂L/∂y or None
    without store, part)``, the gradient ``r·a [+ k1 + k2·y]``, ``part`` ``[T, C, 2]`` the per-tile partial sums of
    ``(Σ r·y, Σ r)`` when ``need_ab``."""
    batch, channels, height, width = y.shape
    store = store or grad is None
    out = torch.empty_like(y) if store else None
    block_c, block_p, num_warps = _layout_config(y, channels)
    tiles_p = triton.cdiv(height * width, block_p)
    need_ab = need_ab and grad is not None
    part = torch.empty((batch * tiles_p, channels, 2), dtype=stats.dtype, device=y.device) if need_ab else None
    g_arg, o_arg = (y if grad is None else grad), (y if out is None else out)
    _affine_relu_kernel[(tiles_p, batch, triton.cdiv(channels, block_c))](
        y_ptr=y, stats_ptr=stats, g_ptr=g_arg, k_ptr=stats if k is None else k, out_ptr=o_arg,
        part_ptr=stats if part is None else part, C=channels, H=height, W=width, sy_b=y.stride(0), sy_c=y.stride(1),
        sy_h=y.stride(2), sy_w=y.stride(3), sg_b=g_arg.stride(0), sg_c=g_arg.stride(1), sg_h=g_arg.stride(2),
        sg_w=g_arg.stride(3), so_b=o_arg.stride(0), so_c=o_arg.stride(1), so_h=o_arg.stride(2), so_w=o_arg.stride(3),
        BACKWARD=grad is not None, STORE=store, NEED_AB=need_ab, HAS_K=k is not None, F64=stats.dtype == torch.float64,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip
    return out, part


def _bn_backward_finish(
    part: torch.Tensor, stats: torch.Tensor, gamma: torch.Tensor | None, n: int, batch_stats: bool, need_affine: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(∂L/∂γ, ∂L/∂β, k)`` from the partials of ``(Σ r·y, Σ r)``: the parameters' gradients when ``need_affine``
    (in their dtype), ``k`` ``[C, 2]`` when the batch statistics normalised. One launch."""
    channels = stats.shape[1]
    need_affine = need_affine and gamma is not None
    g_gamma = torch.empty_like(gamma) if need_affine else None
    g_beta = torch.empty_like(gamma) if need_affine else None
    k = torch.empty((channels, 2), dtype=stats.dtype, device=stats.device) if batch_stats else None
    block_t, block_c, num_warps = _finish_config(channels, part.shape[0])
    _bn_backward_finish_kernel[(triton.cdiv(channels, block_c),)](
        part_ptr=part, stats_ptr=stats, gamma_ptr=stats if gamma is None else gamma,
        ggamma_ptr=stats if g_gamma is None else g_gamma, gbeta_ptr=stats if g_beta is None else g_beta,
        k_ptr=stats if k is None else k, C=channels, T=part.shape[0], N=n, BATCH=batch_stats, AFFINE=gamma is not None,
        NEED_AFFINE=need_affine, F64=stats.dtype == torch.float64, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return g_gamma, g_beta, k
