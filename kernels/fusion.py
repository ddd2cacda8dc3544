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

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels import _dispatch
from ffsd_kernels._batchnorm_relu import (
    _acc_dtype,
    _affine_relu,
    _batch_stats,
    _bn_backward_finish,
    _bn_forward_finish,
    _channel_stats,
    _layout_config,
    _tile,
    _Tiles,
    _updates_running_stats,
)
from ffsd_kernels._dispatch import tl, triton

FUSION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: depthwise 3×3 conv (padding 1) with BN statistics, and its backward
# ---------------------------------------------------------------------------------------------------------------


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
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

# The tiles of every kernel: ``_batchnorm_relu._dw_config`` (via ``_layout_config``), shared with the BatchNorm
# kernels; the finish kernels' ``_finish_config`` is there too.

# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


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
