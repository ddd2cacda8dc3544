"""The fusion block: depthwise 3×3 conv → BN → ReLU → 1×1 conv → BN → ReLU over the concatenation of m maps.

``FusionBlock(channels=C, num_inputs=m, out_channels=C_out)`` computes exactly

    nn.Sequential(Conv2d(mC, mC, 3, padding=1, groups=mC, bias=False), BatchNorm2d(mC), ReLU(),
                  Conv2d(mC, C_out, 1, bias=False), BatchNorm2d(C_out), ReLU())

applied to ``torch.cat(inputs, 1)``, without materialising the concatenation: the depthwise conv reads input ``j``
where it lies (NCHW, channels-last or any strided view) for channels ``j·C … (j+1)·C − 1``. The module *is* that
``nn.Sequential`` (a subclass), so its state_dict keys and shapes are the Sequential's and either loads the other's
weights.

What is fused and what is plain PyTorch:

* Triton ``_dw_forward_kernel``: the depthwise conv over the m strided inputs (one launch per input into its
  channel slice of the pre-BN map ``y``), with BN1's batch statistics reduced in the same pass (per-tile sum and
  centred sum of squares, combined deterministically with torch ``.sum``: Chan's parallel variance formula, no float
  atomics).
* Triton ``_dw_backward_kernel``: grad of every input (correlation with the flipped kernel) and per-tile partials of
  the weight grad (summed with torch ``.sum``), with BN1's statistics gradient (through mean and var) folded in.
* Triton ``_affine_relu_kernel``: BN-apply + ReLU in one pass, for BN1 and BN2, forward and backward (grad of the
  map, and per-tile partials of the per-channel scale/shift grads, from which autograd reaches γ, β, mean, var).
* Plain torch (on the device, no host syncs): the per-channel [C]-vector maths (scale = γ·rsqrt(var + eps),
  shift = β − mean·scale, running-statistics updates), the 1×1 conv (``F.conv2d`` through the Sequential's own
  ``Conv2d``; a matmul on tensor cores, left to cuDNN/cuBLAS) and BN2's batch statistics (``torch.var_mean`` of the
  1×1 output, accumulated in fp32, or fp64 for fp64).

Float64 runs the Triton path too (accumulating in fp64), so the kernels are checked to ~1e-12 under the interpreter.
CPU tensors without the interpreter (and other dtypes) run the plain Sequential on ``torch.cat(inputs, 1)``.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels import _dispatch
from ffsd_kernels._dispatch import tl, triton

FUSION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: depthwise 3×3 conv (padding 1) with BN statistics, and its backward
# ---------------------------------------------------------------------------------------------------------------


# Forward. With taps t = 3·i + j (i, j ∈ {0, 1, 2}), di = i − 1, dj = j − 1 and zero padding,
#   y[b, c, h, w] = Σ_t wt[c, t] · x[b, c, h + di, w + dj].
# A program computes a [BLOCK_C, BLOCK_P] tile (channels × flattened pixels p = h·W + w) of one sample, accumulating
# in fp32 (fp64 when F64). With STATS it also writes, per tile t = b·P + pid_p and channel, the tile's sum
# s = Σ_p y and centred sum of squares M2 = Σ_p (y − s/n)² over its n valid pixels to part[t, c, 0:2]; the host
# combines the tiles (Chan et al.): mean = Σ s / N, M2 = Σ M2_t + Σ n_t (s_t/n_t − mean)², var = M2 / N.
@triton.jit
def _dw_forward_kernel(
    x_ptr,  # [B, C, H, W], strides sx_*
    w_ptr,  # [C, 9], contiguous
    y_ptr,  # [B, C, H, W], strides sy_* (a channel slice of the [B, mC, H, W] pre-BN map)
    part_ptr,  # [T, C, 2] (a channel slice of [T, mC, 2]), strides (sp_t, sp_c, 1); written when STATS
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
    F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    h = p // W
    w = p % W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
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
    full = c_mask[:, None] & p_mask[None, :]
    y_off = pid_b * sy_b + c64[:, None] * sy_c + (h.to(tl.int64) * sy_h + w.to(tl.int64) * sy_w)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=full)
    if STATS:
        n = tl.minimum(H * W - pid_p * BLOCK_P, BLOCK_P)
        s = tl.sum(acc, axis=1)  # invalid lanes hold 0 (every load is masked by p_mask)
        d = tl.where(full, acc - (s / n)[:, None], 0.0)
        m2 = tl.sum(d * d, axis=1)
        tile = pid_b * tl.num_programs(0) + pid_p
        tl.store(part_ptr + tile * sp_t + c64 * sp_c, s, mask=c_mask)
        tl.store(part_ptr + tile * sp_t + c64 * sp_c + 1, m2, mask=c_mask)


# Backward. From y[h, w] = Σ_t wt[t] · x[h + di, w + dj] (per sample and channel):
#   dx[h, w] = Σ_t wt[t] · gy[h − di, w − dj]   (correlation with the flipped kernel; out-of-map gy are 0),
#   dwt[t]   = Σ_{b, h, w} gy[b, h, w] · x[b, h + di, w + dj]   (out-of-map x are 0).
# When the batch statistics (mean, biased var over N = B·H·W per channel) are outputs too, with upstream gradients
# g_mean, g_var: ∂mean/∂y = 1/N, ∂var/∂y = 2(y − mean)/N, so the gradient reaching y is (STATS_GRAD)
#   gy_total = gy + k1_c + k2_c · y,   k1 = g_mean/N − 2·g_var·mean/N,   k2 = 2·g_var/N   (k = [C, 2] from the host),
# formed in registers wherever gy is read (in-map positions only), never stored.
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
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    h = p // W
    w = p % W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
    full = c_mask[:, None] & p_mask[None, :]
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
    tile = pid_b * tl.num_programs(0) + pid_p
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


# BN-apply + ReLU, per channel c: z = relu(u), u = y·a_c + b_c (a = γ·rsqrt(var + eps), b = β − mean·a are formed by
# the host from the batch or running statistics, so autograd carries their gradients on to mean, var, γ, β).
# Backward with r = g·[u > 0] (torch's ReLU subgradient: 0 at u = 0):
#   gy = r·a_c,   ga_c = Σ_{b,h,w} r·y,   gb_c = Σ_{b,h,w} r,
# gy elementwise; ga, gb as per-tile partials part[tile, c, 0:2] (tile = b·P + pid_p), summed by the host.
@triton.jit
def _affine_relu_kernel(
    y_ptr,  # [B, C, H, W], strides sy_*
    a_ptr,  # [C], contiguous, fp32 (fp64 when F64)
    b_ptr,  # [C], contiguous, same dtype as a
    g_ptr,  # [B, C, H, W], strides sg_* (read when BACKWARD)
    out_ptr,  # [B, C, H, W], strides so_*: z (forward) or gy (BACKWARD)
    part_ptr,  # [T, C, 2], strides (sp_t, sp_c, 1) (written when BACKWARD and NEED_AB)
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
    sp_t,
    sp_c,
    BACKWARD: tl.constexpr,
    NEED_AB: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
    full = c_mask[:, None] & p_mask[None, :]
    a = tl.load(a_ptr + c64, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + c64, mask=c_mask, other=0.0)
    y_off = pid_b * sy_b + c64[:, None] * sy_c + (h * sy_h + w * sy_w)[None, :]
    y = tl.load(y_ptr + y_off, mask=full, other=0.0).to(a.dtype)
    u = y * a[:, None] + b[:, None]
    o_off = pid_b * so_b + c64[:, None] * so_c + (h * so_h + w * so_w)[None, :]
    if BACKWARD:
        g_off = pid_b * sg_b + c64[:, None] * sg_c + (h * sg_h + w * sg_w)[None, :]
        g = tl.load(g_ptr + g_off, mask=full, other=0.0).to(a.dtype)
        r = tl.where(full & (u > 0), g, 0.0)
        tl.store(out_ptr + o_off, (r * a[:, None]).to(out_ptr.dtype.element_ty), mask=full)
        if NEED_AB:
            tile = pid_b * tl.num_programs(0) + pid_p
            tl.store(part_ptr + tile * sp_t + c64 * sp_c, tl.sum(r * y, axis=1), mask=c_mask)
            tl.store(part_ptr + tile * sp_t + c64 * sp_c + 1, tl.sum(r, axis=1), mask=c_mask)
    else:
        tl.store(out_ptr + o_off, tl.maximum(u, 0.0).to(out_ptr.dtype.element_ty), mask=full)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def _dw_config(channels: int, pixels: int, channels_inner: bool, max_tile: int = 1024) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_P, num_warps)`` for the kernels on [B, C, H, W] tiles: at most ``max_tile`` entries, wide
    along the dimension contiguous in memory (pixels for NCHW, channels for channels-last). The launchers ask for
    1024 (forward, affine+ReLU) or 512 (depthwise backward: 9 taps of gy, y and x in flight), halved for fp64, which
    keeps every kernel free of register spills on sm_90."""
    if channels_inner:
        block_c = min(triton.next_power_of_2(channels), 32)
        block_p = min(triton.next_power_of_2(pixels), max(max_tile // block_c, 1))
    else:
        block_p = min(triton.next_power_of_2(pixels), 256)
        block_c = min(triton.next_power_of_2(channels), max(max_tile // block_p, 1))
    tile = block_c * block_p
    num_warps = 4 if tile >= 512 else 2 if tile >= 256 else 1
    return block_c, block_p, num_warps


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


def _depthwise_forward(
    inputs: list[torch.Tensor], weight: torch.Tensor, stats: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Pre-BN map ``y`` ``[B, mC, H, W]`` (memory format of ``inputs[0]``) and, with ``stats``, BN's batch mean and
    biased variance per channel (``[mC]``, fp32, or fp64 for fp64 inputs)."""
    batch, channels, height, width = inputs[0].shape
    total = channels * len(inputs)
    x0 = inputs[0]
    channels_last = x0.stride(1) == 1 and channels > 1 and x0.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
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
            x, w.narrow(0, lo, channels), y_j, part_j, channels, height, width,
            *_strides(x), *_strides(y_j), part_j.stride(0), part_j.stride(1),
            STATS=stats, F64=acc == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
        )  # fmt: skip
    if not stats:
        return y, None, None
    pixels = height * width
    counts = (pixels - torch.arange(tiles_p, device=x0.device, dtype=acc) * block_p).clamp(max=block_p)
    counts = counts.repeat(batch)[:, None]  # [T, 1], tile t = b·tiles_p + pid_p
    sums, m2 = part[..., 0], part[..., 1]
    n = batch * pixels
    mean = sums.sum(dim=0) / n
    var = (m2.sum(dim=0) + (counts * (sums / counts - mean) ** 2).sum(dim=0)) / n
    return y, mean, var


def _depthwise_backward(
    inputs: list[torch.Tensor],
    weight: torch.Tensor,
    grad_y: torch.Tensor,
    need_x: list[bool],
    need_w: bool,
    y: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """Grads of every input (in its dtype and memory format) and of the ``[mC, 1, 3, 3]`` weight, from the gradient
    ``grad_y + k[:, 0] + k[:, 1]·y`` of the pre-BN map (``k`` ``[mC, 2]``; only ``grad_y`` when ``k`` is None)."""
    batch, channels, height, width = inputs[0].shape
    total = channels * len(inputs)
    acc = _acc_dtype(inputs[0].dtype)
    w = weight.detach().reshape(total, 9).to(acc).contiguous()
    block_c, block_p, num_warps = _layout_config(inputs[0] if y is None else y, channels, max_tile=512)
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
        y_j = g_j if y is None else y.narrow(1, lo, channels)
        k_j = w if k is None else k.narrow(0, lo, channels)
        _dw_backward_kernel[grid](
            x, w.narrow(0, lo, channels), g_j, y_j, k_j, gx_arg, part_j, channels, height, width,
            *_strides(x), *_strides(g_j), *_strides(y_j), *_strides(gx_arg),
            part_j.stride(0), part_j.stride(1),
            NEED_X=need_x[j], NEED_W=need_w, STATS_GRAD=k is not None, F64=acc == torch.float64,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
        )  # fmt: skip
        grads.append(gx)
    grad_w = part.sum(dim=0).reshape(weight.shape).to(weight.dtype) if need_w else None
    return grads, grad_w


def _affine_relu(
    y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor | None = None, need_ab: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward (``grad`` None): ``relu(y·a + b)`` in ``y``'s dtype and memory format. Backward: ``(gy, part)``
    with ``part`` ``[T, C, 2]`` the per-tile partial sums of ``(ga, gb)`` when ``need_ab``."""
    batch, channels, height, width = y.shape
    acc = a.dtype
    out = torch.empty_like(y)
    block_c, block_p, num_warps = _layout_config(y, channels)
    tiles_p = triton.cdiv(height * width, block_p)
    need_ab = need_ab and grad is not None
    part = torch.empty((batch * tiles_p, channels, 2) if need_ab else (1, 1, 2), dtype=acc, device=y.device)
    g_arg = y if grad is None else grad
    _affine_relu_kernel[(tiles_p, batch, triton.cdiv(channels, block_c))](
        y, a, b, g_arg, out, part, channels, height, width,
        *_strides(y), *_strides(g_arg), *_strides(out), part.stride(0), part.stride(1),
        BACKWARD=grad is not None, NEED_AB=need_ab, F64=acc == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=num_warps,
    )  # fmt: skip
    return out, (part if need_ab else None)


def _batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _bn_relu(bn: nn.BatchNorm2d, y: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None) -> torch.Tensor:
    """``relu(bn(y))`` with the batch statistics ``mean``, ``var`` (biased; updating the running statistics in train
    mode) or, when they are None, the running statistics; the affine map and ReLU are one Triton pass."""
    acc = _acc_dtype(y.dtype)
    if mean is None:
        mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
    elif bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean.detach(), var.detach(), y.shape[0] * y.shape[2] * y.shape[3])
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.to(acc)
    b = -mean * a
    if bn.bias is not None:
        b = b + bn.bias.to(acc)
    return _AffineReLUFunction.apply(y, a, b)


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """As ``nn.BatchNorm2d`` in train mode: ``num_batches_tracked += 1``, then an exponential average with
    ``momentum`` (or the cumulative average, factor 1/num_batches_tracked, when ``momentum`` is None) of the batch
    mean and the unbiased batch variance. Tensor ops only: no host sync."""
    bn.num_batches_tracked.add_(1)
    unbiased = var * (n / max(n - 1, 1))
    with torch.no_grad():
        if bn.momentum is None:
            factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
            bn.running_mean.add_((mean.to(bn.running_mean.dtype) - bn.running_mean) * factor)
            bn.running_var.add_((unbiased.to(bn.running_var.dtype) - bn.running_var) * factor)
        else:
            bn.running_mean.mul_(1 - bn.momentum).add_(mean.to(bn.running_mean.dtype), alpha=bn.momentum)
            bn.running_var.mul_(1 - bn.momentum).add_(unbiased.to(bn.running_var.dtype), alpha=bn.momentum)


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions: BN+ReLU; the depthwise conv over the m inputs, BN1's batch statistics differentiable outputs
# ---------------------------------------------------------------------------------------------------------------


class _AffineReLUFunction(torch.autograd.Function):
    """``relu(y·a_c + b_c)`` per channel (BN-apply + ReLU in one pass); ``a``, ``b`` are ``[C]`` vectors of the
    accumulation dtype (fp32, fp64 for fp64 ``y``)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(y, a, b)
        return _affine_relu(y, a, b)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, a, b = ctx.saved_tensors
        need_ab = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        gy, part = _affine_relu(y, a, b, grad, need_ab)
        ga = gb = None
        if part is not None:
            ga, gb = part.sum(dim=0).unbind(dim=1)
        return gy if ctx.needs_input_grad[0] else None, ga, gb


class _DepthwiseConcatFunction(torch.autograd.Function):
    """``(y, mean, var) = f(weight, *inputs)`` (``stats``) or ``y`` alone. With N = B·H·W per channel,
    ∂mean/∂y = 1/N and ∂var/∂y = 2(y − mean)/N (biased variance): the backward kernel forms
    gy_total = gy + g_mean/N + 2·g_var·(y − mean)/N in registers from per-channel coefficients."""

    @staticmethod
    def forward(ctx, stats: bool, weight: torch.Tensor, *inputs: torch.Tensor):
        y, mean, var = _depthwise_forward(list(inputs), weight, stats)
        ctx.stats = stats
        if stats:
            ctx.save_for_backward(weight, y, mean, *inputs)
            return y, mean, var
        ctx.save_for_backward(weight, *inputs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        y = k = None
        if ctx.stats:
            weight, y, mean, *inputs = ctx.saved_tensors
            grad_y, grad_mean, grad_var = grads
            n = y.shape[0] * y.shape[2] * y.shape[3]
            if grad_y is None:
                grad_y = torch.zeros_like(y)
            if grad_mean is not None or grad_var is not None:
                k1 = torch.zeros_like(mean) if grad_mean is None else grad_mean.to(mean.dtype) / n
                k2 = torch.zeros_like(mean) if grad_var is None else (2.0 / n) * grad_var.to(mean.dtype)
                k = torch.stack([k1 - k2 * mean, k2], dim=1).contiguous()
        else:
            weight, *inputs = ctx.saved_tensors
            (grad_y,) = grads
        need_w = ctx.needs_input_grad[1]
        need_x = list(ctx.needs_input_grad[2:])
        if grad_y is None or not (need_w or any(need_x)):
            return (None, None, *([None] * len(inputs)))
        grad_x, grad_w = _depthwise_backward(inputs, weight, grad_y, need_x, need_w, y, k)
        return (None, grad_w, *grad_x)


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
        inputs: one ``[B, C, H, W]`` map (the leader's trans-fusion head) or a list of m of them (the fusion
            module), NCHW, channels-last or strided; fp32/fp16/bf16/fp64, one dtype, the block's parameters in it.
        block: its weights and BatchNorm state; in train mode the batch statistics normalise and the running
            statistics are updated as ``nn.BatchNorm2d`` does.

    Returns:
        ``[B, C_out, H, W]`` in the inputs' dtype. Gradients reach the inputs, both conv weights and both BN affine
        parameters. The Triton kernels run on CUDA (or on CPU tensors under ``TRITON_INTERPRET=1``), else the
        reference.
    """
    inputs = _as_list(inputs)
    _check(block, inputs)
    _check_dtypes("fusion_block", inputs)
    if not _use_fused(inputs):
        return fusion_block_reference(inputs, block)
    conv1, bn1, _, conv2, bn2, _ = block
    if _batch_stats(bn1):
        y, mean, var = _DepthwiseConcatFunction.apply(True, conv1.weight, *inputs)
    else:
        y = _DepthwiseConcatFunction.apply(False, conv1.weight, *inputs)
        mean = var = None
    z = _bn_relu(bn1, y, mean, var)
    t = conv2(z)
    mean = var = None
    if _batch_stats(bn2):
        var, mean = torch.var_mean(t.to(_acc_dtype(t.dtype)), dim=(0, 2, 3), unbiased=False)
    return _bn_relu(bn2, t, mean, var)


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
        inputs = list(inputs.chunk(self.num_inputs, dim=1)) if concatenated else _as_list(inputs)
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
