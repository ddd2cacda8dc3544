"""The fusion block: depthwise 3×3 conv → BN → ReLU → 1×1 conv → BN → ReLU over the concatenation of m maps.

``FusionBlock(channels=C, num_inputs=m, out_channels=C_out)`` computes exactly

    nn.Sequential(Conv2d(mC, mC, 3, padding=1, groups=mC, bias=False), BatchNorm2d(mC), ReLU(),
                  Conv2d(mC, C_out, 1, bias=False), BatchNorm2d(C_out), ReLU())

applied to ``torch.cat(inputs, 1)``, without materialising the concatenation: the depthwise conv reads input ``j``
where it lies (NCHW, channels-last or any strided view) for channels ``j·C … (j+1)·C − 1``; maps already side by
side (``[B, m·C, H, W]``, a channel slice of stacked networks' taps) are read as one input. The module *is* that
``nn.Sequential`` (a subclass), so its state_dict keys and shapes are the Sequential's and either loads the other's
weights.

Two autograd Functions, with the 1×1 conv between them left to cuDNN through the Sequential's own ``Conv2d`` (a
matmul on tensor cores; autocast casts it as it casts any conv):

* ``_DepthwiseBatchNormReLUFunction``: ``relu(bn1(depthwise(cat(inputs))))``. Forward: ``_dw_forward_kernel`` (the
  depthwise conv, one launch per input into its channel slice of the pre-BN map ``y``, with per-tile partial sums
  and centred sums of squares of ``y``), ``_bn_forward_finish_kernel`` (BN's batch mean and variance from the
  partials in a fixed order — Chan's parallel formula, no float atomics — the affine coefficients
  ``a = γ·rstd``, ``b = β − mean·a`` and the running-statistics update), ``_affine_relu_kernel`` (``relu(y·a + b)``).
  Backward: ``_affine_relu_kernel`` (``r·a`` with ``r`` the gradient through the ReLU, and per-tile partials of
  ``Σ r·y``, ``Σ r``), ``_bn_backward_finish_kernel`` (the gradients of γ and β and the two per-channel
  coefficients through which the batch statistics pass the gradient on to ``y``), ``_dw_backward_kernel`` (the
  inputs' gradients and per-tile partials of the weight's, with the statistics' term formed in registers), and one
  torch ``sum`` of the weight partials.
* ``_BatchNormReLUFunction``: ``relu(bn2(t))`` on the 1×1 conv's output: ``_channel_stats_kernel``, the finish
  kernel and ``_affine_relu_kernel`` forward; backward the partials pass, the finish kernel and one elementwise
  pass that forms the whole input gradient.

So a block in train mode is m + 5 launches forward and m + 6 backward besides the 1×1 conv (m = 1 for maps side
by side; one fewer each way in eval mode): every per-channel vector of BatchNorm (statistics, coefficients, running
statistics, ``num_batches_tracked``, the parameters' gradients) is computed inside a kernel, on the device, without
host syncs.
``num_batches_tracked`` is incremented by the statistics pass, whose launch precedes the finish kernel that reads it
(momentum None: the cumulative average).

Float64 runs the Triton path too (accumulating in fp64), so the kernels are checked to ~1e-12 under the interpreter.
CPU tensors without the interpreter (and other dtypes) run the plain Sequential on ``torch.cat(inputs, 1)``.
"""

import struct

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels import _dispatch
from ffsd_kernels._dispatch import tl, triton

FUSION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: depthwise 3×3 conv (padding 1) with BN statistics, and its backward
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


# Forward. With taps t = 3·i + j (i, j ∈ {0, 1, 2}), di = i − 1, dj = j − 1 and zero padding,
#   y[b, c, h, w] = Σ_t wt[c, t] · x[b, c, h + di, w + dj].
# A program computes a [BLOCK_C, BLOCK_P] tile (channels × flattened pixels p = h·W + w) of one sample, accumulating
# in fp32 (fp64 when F64). With STATS it also writes, per tile t = b·P + pid_p and channel, the tile's sum
# s = Σ_p y and centred sum of squares M2 = Σ_p (y − s/n)² over its n valid pixels to part[t, c, 0:2], which
# ``_bn_forward_finish_kernel`` combines. With COUNT, program (0, 0, 0) increments num_batches_tracked.
@triton.jit
def _dw_forward_kernel(
    x_ptr,  # [B, C, H, W], strides sx_*
    w_ptr,  # [C, 9], contiguous
    y_ptr,  # [B, C, H, W], strides sy_* (a channel slice of the [B, mC, H, W] pre-BN map)
    part_ptr,  # [T, C, 2] (a channel slice of [T, mC, 2]), strides (sp_t, sp_c, 1); written when STATS
    count_ptr,  # num_batches_tracked, int64 (incremented when COUNT)
    C,
    H,
    W,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sy_b,
    sy_c,
    sy_h,
    sy_w,
    sp_t,
    sp_c,
    STATS: tl.constexpr,
    COUNT: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_b, h, w, p_mask, c64, c_mask, full, tile = _tile(C, H, W, BLOCK_C, BLOCK_P)
    x_base = x_ptr + pid_b * sx_b + c64[:, None] * sx_c
    if F64:
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for t in tl.static_range(9):
        hh = h + (t // 3 - 1)
        ww = w + (t % 3 - 1)
        m = p_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        off = hh.to(tl.int64) * sx_h + ww.to(tl.int64) * sx_w
        v = tl.load(x_base + off[None, :], mask=c_mask[:, None] & m[None, :], other=0.0)
        wt = tl.load(w_ptr + c64 * 9 + t, mask=c_mask, other=0.0)
        acc += v.to(acc.dtype) * wt.to(acc.dtype)[:, None]
    y_off = pid_b * sy_b + c64[:, None] * sy_c + (h.to(tl.int64) * sy_h + w.to(tl.int64) * sy_w)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=full)
    if STATS:
        n = tl.minimum(H * W - tl.program_id(0) * BLOCK_P, BLOCK_P)
        s = tl.sum(acc, axis=1)  # invalid lanes hold 0 (every load is masked by p_mask)
        d = tl.where(full, acc - (s / n)[:, None], 0.0)
        m2 = tl.sum(d * d, axis=1)
        tl.store(part_ptr + tile * sp_t + c64 * sp_c, s, mask=c_mask)
        tl.store(part_ptr + tile * sp_t + c64 * sp_c + 1, m2, mask=c_mask)
    if COUNT:  # num_batches_tracked += 1, before the finish kernel (the next launch) reads it
        first = (tile == 0) & (tl.program_id(2) == 0)
        tl.store(count_ptr, tl.load(count_ptr) + 1, mask=first)


# Backward. From y[h, w] = Σ_t wt[t] · x[h + di, w + dj] (per sample and channel):
#   dx[h, w] = Σ_t wt[t] · gy[h − di, w − dj]   (correlation with the flipped kernel; out-of-map gy are 0),
#   dwt[t]   = Σ_{b, h, w} gy[b, h, w] · x[b, h + di, w + dj]   (out-of-map x are 0).
# When BN normalises y with its batch statistics (mean, biased var over N = B·H·W per channel), with g_mean, g_var
# their gradients: ∂mean/∂y = 1/N, ∂var/∂y = 2(y − mean)/N, so the gradient reaching y is (STATS_GRAD)
#   gy_total = gy + k1_c + k2_c · y,   k1 = g_mean/N − 2·g_var·mean/N,   k2 = 2·g_var/N
# (k = [C, 2] from ``_bn_backward_finish_kernel``), formed in registers wherever gy is read (in-map positions only),
# never stored.
# A program handles one [BLOCK_C, BLOCK_P] tile: it writes dx for the tile (NEED_X) and, per tap, the tile's
# partial sum of dwt to part[tile, c, t] (NEED_W); the host sums the partials over the tiles with torch ``.sum``.
@triton.jit
def _dw_backward_kernel(
    x_ptr,  # [B, C, H, W], strides sx_* (read when NEED_W)
    w_ptr,  # [C, 9], contiguous
    gy_ptr,  # [B, C, H, W], strides sg_*
    y_ptr,  # [B, C, H, W], strides sy_* (the forward's pre-BN map; read when STATS_GRAD)
    k_ptr,  # [C, 2] contiguous, (k1, k2) in the accumulation dtype (read when STATS_GRAD)
    gx_ptr,  # [B, C, H, W], strides sgx_* (written when NEED_X)
    part_ptr,  # [T, C, 9] (a channel slice of [T, mC, 9]), strides (sp_t, sp_c, 1); written when NEED_W
    C,
    H,
    W,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sg_b,
    sg_c,
    sg_h,
    sg_w,
    sy_b,
    sy_c,
    sy_h,
    sy_w,
    sgx_b,
    sgx_c,
    sgx_h,
    sgx_w,
    sp_t,
    sp_c,
    NEED_X: tl.constexpr,
    NEED_W: tl.constexpr,
    STATS_GRAD: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_b, h, w, p_mask, c64, c_mask, full, tile = _tile(C, H, W, BLOCK_C, BLOCK_P)
    x_base = x_ptr + pid_b * sx_b + c64[:, None] * sx_c
    g_base = gy_ptr + pid_b * sg_b + c64[:, None] * sg_c
    y_base = y_ptr + pid_b * sy_b + c64[:, None] * sy_c
    if F64:
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    if STATS_GRAD:
        k1 = tl.load(k_ptr + c64 * 2, mask=c_mask, other=0.0).to(acc.dtype)[:, None]
        k2 = tl.load(k_ptr + c64 * 2 + 1, mask=c_mask, other=0.0).to(acc.dtype)[:, None]
    if NEED_W:
        g_off = h.to(tl.int64) * sg_h + w.to(tl.int64) * sg_w
        g_center = tl.load(g_base + g_off[None, :], mask=full, other=0.0).to(acc.dtype)
        if STATS_GRAD:
            y_off = h.to(tl.int64) * sy_h + w.to(tl.int64) * sy_w
            yv = tl.load(y_base + y_off[None, :], mask=full, other=0.0).to(acc.dtype)
            g_center = g_center + tl.where(full, k1 + k2 * yv, 0.0)
    for t in tl.static_range(9):
        if NEED_X:
            hh = h - (t // 3 - 1)
            ww = w - (t % 3 - 1)
            m = p_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            mk = c_mask[:, None] & m[None, :]
            off = hh.to(tl.int64) * sg_h + ww.to(tl.int64) * sg_w
            g = tl.load(g_base + off[None, :], mask=mk, other=0.0).to(acc.dtype)
            if STATS_GRAD:
                y_off = hh.to(tl.int64) * sy_h + ww.to(tl.int64) * sy_w
                yv = tl.load(y_base + y_off[None, :], mask=mk, other=0.0).to(acc.dtype)
                g = g + tl.where(mk, k1 + k2 * yv, 0.0)
            wt = tl.load(w_ptr + c64 * 9 + t, mask=c_mask, other=0.0)
            acc += g * wt.to(acc.dtype)[:, None]
        if NEED_W:
            hh = h + (t // 3 - 1)
            ww = w + (t % 3 - 1)
            m = p_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            off = hh.to(tl.int64) * sx_h + ww.to(tl.int64) * sx_w
            v = tl.load(x_base + off[None, :], mask=c_mask[:, None] & m[None, :], other=0.0)
            dw = tl.sum(g_center * v.to(acc.dtype), axis=1)
            tl.store(part_ptr + tile * sp_t + c64 * sp_c + t, dw, mask=c_mask)
    if NEED_X:
        gx_off = pid_b * sgx_b + c64[:, None] * sgx_c + (h.to(tl.int64) * sgx_h + w.to(tl.int64) * sgx_w)[None, :]
        tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=full)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: BatchNorm + ReLU, per channel
# ---------------------------------------------------------------------------------------------------------------


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
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
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
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
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


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


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


def _depthwise_forward(
    inputs: list[torch.Tensor], weight: torch.Tensor, stats: bool, count: torch.Tensor | None
) -> tuple[torch.Tensor, _Tiles | None]:
    """Pre-BN map ``y`` ``[B, mC, H, W]`` (channels-last when the inputs' channels are innermost, else NCHW) and,
    with ``stats``, its per-tile statistics; ``count`` (num_batches_tracked) is incremented when given."""
    batch, channels, height, width = inputs[0].shape
    total = channels * len(inputs)
    x0 = inputs[0]
    # A channel slice of a channels-last map is channels-last too, though not contiguous: keep its layout.
    fmt = torch.channels_last if x0.stride(1) == 1 and channels > 1 else torch.contiguous_format
    y = torch.empty((batch, total, height, width), dtype=x0.dtype, device=x0.device, memory_format=fmt)
    acc = _acc_dtype(x0.dtype)
    w = weight.detach().reshape(total, 9).to(acc).contiguous()
    block_c, block_p, num_warps = _layout_config(y, channels)
    tiles_p = triton.cdiv(height * width, block_p)
    part = torch.empty((batch * tiles_p, total, 2) if stats else (1, total, 2), dtype=acc, device=x0.device)
    grid = (tiles_p, batch, triton.cdiv(channels, block_c))
    for j, x in enumerate(inputs):
        lo = j * channels
        y_j = y.narrow(1, lo, channels)
        part_j = part.narrow(1, lo, channels)
        _dw_forward_kernel[grid](
            x_ptr=x, w_ptr=w.narrow(0, lo, channels), y_ptr=y_j, part_ptr=part_j,
            count_ptr=part if count is None else count, C=channels, H=height, W=width, sx_b=x.stride(0),
            sx_c=x.stride(1), sx_h=x.stride(2), sx_w=x.stride(3), sy_b=y_j.stride(0), sy_c=y_j.stride(1),
            sy_h=y_j.stride(2), sy_w=y_j.stride(3), sp_t=part_j.stride(0), sp_c=part_j.stride(1), STATS=stats,
            COUNT=count is not None and j == 0, F64=acc == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p,
            num_warps=num_warps,
        )  # fmt: skip
    return y, (_Tiles(part, tiles_p, block_p) if stats else None)


def _depthwise_backward(
    inputs: list[torch.Tensor],
    weight: torch.Tensor,
    grad_y: torch.Tensor,
    need_x: list[bool],
    need_w: bool,
    y: torch.Tensor,
    k: torch.Tensor | None,
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """Grads of every input (in its dtype and memory format) and of the ``[mC, 1, 3, 3]`` weight, from the gradient
    ``grad_y + k[:, 0] + k[:, 1]·y`` of the pre-BN map (``k`` ``[mC, 2]``; only ``grad_y`` when ``k`` is None)."""
    batch, channels, height, width = inputs[0].shape
    total = channels * len(inputs)
    acc = _acc_dtype(inputs[0].dtype)
    w = weight.detach().reshape(total, 9).to(acc).contiguous()
    block_c, block_p, num_warps = _layout_config(y, channels, max_tile=512)
    tiles_p = triton.cdiv(height * width, block_p)
    part = torch.empty((batch * tiles_p, total, 9) if need_w else (1, total, 9), dtype=acc, device=grad_y.device)
    grid = (tiles_p, batch, triton.cdiv(channels, block_c))
    grads: list[torch.Tensor | None] = []
    for j, x in enumerate(inputs):
        if not (need_x[j] or need_w):
            grads.append(None)
            continue
        lo = j * channels
        g_j = grad_y.narrow(1, lo, channels)
        gx = torch.empty_like(x) if need_x[j] else None
        gx_arg = x if gx is None else gx
        part_j = part.narrow(1, lo, channels)
        y_j = y.narrow(1, lo, channels)
        k_j = w if k is None else k.narrow(0, lo, channels)
        _dw_backward_kernel[grid](
            x_ptr=x, w_ptr=w.narrow(0, lo, channels), gy_ptr=g_j, y_ptr=y_j, k_ptr=k_j, gx_ptr=gx_arg, part_ptr=part_j,
            C=channels, H=height, W=width, sx_b=x.stride(0), sx_c=x.stride(1), sx_h=x.stride(2), sx_w=x.stride(3),
            sg_b=g_j.stride(0), sg_c=g_j.stride(1), sg_h=g_j.stride(2), sg_w=g_j.stride(3), sy_b=y_j.stride(0),
            sy_c=y_j.stride(1), sy_h=y_j.stride(2), sy_w=y_j.stride(3), sgx_b=gx_arg.stride(0), sgx_c=gx_arg.stride(1),
            sgx_h=gx_arg.stride(2), sgx_w=gx_arg.stride(3), sp_t=part_j.stride(0), sp_c=part_j.stride(1),
            NEED_X=need_x[j], NEED_W=need_w, STATS_GRAD=k is not None, F64=acc == torch.float64, BLOCK_C=block_c,
            BLOCK_P=block_p, num_warps=num_warps,
        )  # fmt: skip
        grads.append(gx)
    grad_w = part.sum(dim=0).reshape(weight.shape).to(weight.dtype) if need_w else None
    return grads, grad_w


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


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions: the depthwise conv + BN1 + ReLU over the m inputs; BN2 + ReLU
# ---------------------------------------------------------------------------------------------------------------


class _DepthwiseBatchNormReLUFunction(torch.autograd.Function):
    """``relu(bn(depthwise(cat(inputs))))`` for the depthwise ``weight`` and ``bn`` (its parameters passed as
    ``gamma``, ``beta`` so that autograd sees them): BatchNorm normalises with the batch statistics in train mode
    (updating the running statistics) and with the running statistics in eval mode, as nn.BatchNorm2d."""

    @staticmethod
    def forward(ctx, bn: nn.BatchNorm2d, weight: torch.Tensor, gamma, beta, *inputs: torch.Tensor) -> torch.Tensor:
        batch_stats = _batch_stats(bn)
        count = bn.num_batches_tracked if _updates_running_stats(bn) else None
        y, tiles = _depthwise_forward(list(inputs), weight, batch_stats, count)
        stats = _bn_forward_finish(bn, tiles, y)
        z, _ = _affine_relu(y, stats)
        ctx.batch_stats = batch_stats
        ctx.save_for_backward(weight, gamma, y, stats, *inputs)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: torch.Tensor):
        weight, gamma, y, stats, *inputs = ctx.saved_tensors
        need_w, need_gamma, need_beta = ctx.needs_input_grad[1:4]
        need_x = list(ctx.needs_input_grad[4:])
        need_y = need_w or any(need_x)
        batch_stats = ctx.batch_stats and need_y
        r, part = _affine_relu(y, stats, grad_z, store=need_y, need_ab=need_gamma or need_beta or batch_stats)
        g_gamma = g_beta = k = None
        if part is not None:
            n = y.shape[0] * y.shape[2] * y.shape[3]
            g_gamma, g_beta, k = _bn_backward_finish(part, stats, gamma, n, batch_stats, need_gamma or need_beta)
        grad_x, grad_w = [None] * len(inputs), None
        if need_y:
            grad_x, grad_w = _depthwise_backward(inputs, weight, r, need_x, need_w, y, k)
        return None, grad_w, g_gamma if need_gamma else None, g_beta if need_beta else None, *grad_x


class _BatchNormReLUFunction(torch.autograd.Function):
    """``relu(bn(t))``, BatchNorm as nn.BatchNorm2d's train (batch statistics, running statistics updated) or eval
    mode; three launches forward and three backward (two in eval mode)."""

    @staticmethod
    def forward(ctx, bn: nn.BatchNorm2d, gamma, beta, t: torch.Tensor) -> torch.Tensor:
        batch_stats = _batch_stats(bn)
        tiles = (
            _channel_stats(t, bn.num_batches_tracked if _updates_running_stats(bn) else None) if batch_stats else None
        )
        stats = _bn_forward_finish(bn, tiles, t)
        out, _ = _affine_relu(t, stats)
        ctx.batch_stats = batch_stats
        ctx.save_for_backward(gamma, t, stats)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        gamma, t, stats = ctx.saved_tensors
        need_gamma, need_beta, need_t = ctx.needs_input_grad[1:4]
        batch_stats = ctx.batch_stats and need_t
        if not (batch_stats or need_gamma or need_beta):  # eval mode, the map's gradient alone: one pass
            return None, None, None, _affine_relu(t, stats, grad_out)[0]
        # The batch statistics' term needs every tile's sums first, so the map's gradient is a second pass.
        grad_t, part = _affine_relu(t, stats, grad_out, store=need_t and not batch_stats, need_ab=True)
        n = t.shape[0] * t.shape[2] * t.shape[3]
        g_gamma, g_beta, k = _bn_backward_finish(part, stats, gamma, n, batch_stats, need_gamma or need_beta)
        if batch_stats:
            grad_t, _ = _affine_relu(t, stats, grad_out, k=k)
        return None, g_gamma if need_gamma else None, g_beta if need_beta else None, grad_t if need_t else None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _use_fused(inputs: list[torch.Tensor]) -> bool:
    return all(t.dtype == inputs[0].dtype for t in inputs) and _dispatch.use_triton(*inputs, dtypes=FUSION_DTYPES)


def _as_list(inputs: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)


def _check_dtypes(op: str, inputs: list[torch.Tensor]) -> None:
    _dispatch.check_dtypes(op, **{f"inputs[{i}]": t for i, t in enumerate(inputs)})


def _check(block: nn.Sequential, inputs: list[torch.Tensor]) -> None:
    conv1 = block[0]
    shape = inputs[0].shape
    channels = conv1.in_channels // max(len(inputs), 1)
    if (
        len(shape) != 4
        or channels * len(inputs) != conv1.in_channels
        or shape[1] != channels
        or any(t.shape != shape for t in inputs)
    ):
        raise ValueError(
            f"the fusion block takes maps [B, C, H, W] of one shape whose channels add up to "
            f"{conv1.in_channels}, got {[tuple(t.shape) for t in inputs]}"
        )


def fusion_block(
    inputs: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], block: nn.Sequential
) -> torch.Tensor:
    """``block(torch.cat(inputs, 1))`` for the Sequential ``block`` (depthwise 3×3 → BN → ReLU → 1×1 → BN → ReLU,
    laid out as :class:`FusionBlock`), without the concatenation.

    Args:
        inputs: one ``[B, C, H, W]`` map (the leader's trans-fusion head, or m maps already side by side) or a list
            of m of them (the fusion module), NCHW, channels-last or strided; fp32/fp16/bf16/fp64, one dtype.
        block: its weights and BatchNorm state; in train mode the batch statistics normalise and the running
            statistics are updated as ``nn.BatchNorm2d`` does.

    Returns:
        ``[B, C_out, H, W]`` in the inputs' dtype (the 1×1 conv's under autocast). Gradients reach the inputs, both
        conv weights and both BN affine parameters. The Triton kernels run on CUDA (or on CPU tensors under
        ``TRITON_INTERPRET=1``), else the reference: in train mode m + 5 launches forward and m + 6 backward
        besides the 1×1 conv, no host syncs.
    """
    inputs = _as_list(inputs)
    _check(block, inputs)
    _check_dtypes("fusion_block", inputs)
    if not _use_fused(inputs):
        return fusion_block_reference(inputs, block)
    conv1, bn1, _, conv2, bn2, _ = block
    z = _DepthwiseBatchNormReLUFunction.apply(bn1, conv1.weight, bn1.weight, bn1.bias, *inputs)
    return _BatchNormReLUFunction.apply(bn2, bn2.weight, bn2.bias, conv2(z))


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class FusionBlock(nn.Sequential):
    """The fusion block over ``num_inputs`` maps of ``channels`` channels (see the module docstring).

    It is the ``nn.Sequential`` ``[0] Conv2d(mC, mC, 3, padding=1, groups=mC, bias=False), [1] BatchNorm2d(mC),
    [2] ReLU, [3] Conv2d(mC, C_out, 1, bias=False), [4] BatchNorm2d(C_out), [5] ReLU``, so its state_dict is the
    Sequential's and either loads the other's weights. ``forward(inputs)`` takes the list of m ``[B, C, H, W]`` maps
    (or one map when ``num_inputs`` is 1, or the m maps already side by side, ``[B, m·C, H, W]``) and returns
    ``[B, C_out, H, W]``: :func:`fusion_block`, or with ``fused = False`` the reference (``cat`` and the modules in
    turn; the modules alone on maps already side by side).

    Train mode normalises with the batch statistics (biased variance) and updates the running statistics as
    ``nn.BatchNorm2d`` does (unbiased variance, momentum or the cumulative average when momentum is None,
    ``num_batches_tracked``), on the device without host syncs; eval mode uses the running statistics.
    """

    def __init__(self, channels: int, num_inputs: int, out_channels: int, fused: bool = True):
        total = channels * num_inputs
        super().__init__(
            nn.Conv2d(total, total, 3, padding=1, groups=total, bias=False),
            nn.BatchNorm2d(total),
            nn.ReLU(),
            nn.Conv2d(total, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.channels = channels
        self.num_inputs = num_inputs
        self.out_channels = out_channels
        self.fused = fused

    def forward(  # type: ignore[override]
        self, inputs: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        concatenated = (
            isinstance(inputs, torch.Tensor)
            and self.num_inputs > 1
            and inputs.dim() == 4
            and inputs.shape[1] == self.channels * self.num_inputs
        )
        if concatenated and not self.fused:
            # The maps already side by side (a channel slice of stacked networks' taps): no torch.cat to make.
            _check_dtypes("FusionBlock", [inputs])
            x = inputs
            for module in self:
                x = module(x)
            return x
        if concatenated:  # one map of m·C channels: the depthwise conv is per channel, so it is their concatenation
            return fusion_block([inputs], self)
        inputs = _as_list(inputs)
        if len(inputs) != self.num_inputs:
            raise ValueError(f"FusionBlock expects {self.num_inputs} inputs, got {len(inputs)}")
        if not self.fused:
            _check(self, inputs)
            return fusion_block_reference(inputs, self)
        return fusion_block(inputs, self)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_inputs={self.num_inputs}, out_channels={self.out_channels}, "
            f"fused={self.fused}"
        )


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def fusion_block_reference(
    inputs: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], block: nn.Sequential
) -> torch.Tensor:
    """The definition: the Sequential's own modules on ``torch.cat(inputs, 1)``."""
    inputs = _as_list(inputs)
    _check_dtypes("fusion_block_reference", inputs)  # before torch.cat, which would promote an integer map
    x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)  # one map: nothing to concatenate (a copy saved)
    for module in block:
        x = module(x)
    return x
