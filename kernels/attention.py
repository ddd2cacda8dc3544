"""Attention-transfer losses: the attention map ``A`` and the normalised distance ``d`` (Zagoruyko & Komodakis).

``A(x) = mean_c(x²)``, ``[B, C, H, W] → [B, 1, H, W]``; ``n(v) = v / max(‖v‖₂, 1e-12)`` per sample over its
flattened entries; ``d(x, y) = mean((n(x) − n(y))²)`` over all ``B·N`` entries.

Layout of this file: Triton kernels (``_channel_reduce_kernel``, ``_channel_broadcast_kernel`` for the maps;
``_distance_partial_kernel``, ``_distance_finish_kernel``, ``_distance_backward_kernel`` for ``d``), their launch
configurations and host launchers, the autograd Functions, the functional API, the ``nn.Module`` and the
plain-PyTorch references.

Strides are passed to every kernel: NCHW, channels-last and sliced inputs are read where they lie, never copied.
Everything runs without a host sync (no ``.item()``), so the ops can be captured in a CUDA graph.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, result_dtype, tl, triton, use_triton

EPS = 1e-12  # the clamp of ‖v‖₂ in n(v)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: channel reduction and channel broadcast on [B, C, H, W]
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _sample_block(limit, BLOCK: tl.constexpr):
    """Program (block i, sample b)'s ``BLOCK`` indices ``i·BLOCK + [0, BLOCK)`` within a sample of ``limit``
    elements (pixels, or every element): ``(indices, mask, b as int64)``."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return i, i < limit, tl.program_id(1).to(tl.int64)


@triton.jit
def _pixel_offsets(p, W, stride_h, stride_w, FLAT: tl.constexpr):
    """Memory offsets (int64) of pixels ``p = h·W + w``. FLAT: ``stride_h == W·stride_w``, one index suffices."""
    p = p.to(tl.int64)
    if FLAT:
        off = p * stride_w
    else:
        off = (p // W) * stride_h + (p % W) * stride_w
    return off


# Forward of A: out[b, g, p] = scale · Σ_c f(x[b, g·C + c, p]) with f(v) = v² (SQUARE) or v, accumulated in fp32
# on a [BLOCK_C, BLOCK_P] tile, looping over the C channels of group g (one group but for stacked networks, whose
# maps are all computed by one launch). A(x) is scale = 1/C with SQUARE; the channel sum of an upstream gradient
# (needed by diversity_shift's backward) is scale = 1 without it.
@triton.jit
def _channel_reduce_kernel(
    x_ptr,  # [B, GROUPS·C, H, W], strides (stride_b, stride_c, stride_h, stride_w)
    out_ptr,  # [B·GROUPS, H·W], row stride out_stride_b, pixels contiguous; any float dtype (stored with a cast)
    GROUPS,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    out_stride_b,
    scale,
    SQUARE: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p, p_mask, pid_bg = _sample_block(H * W, BLOCK_P)
    p_off = _pixel_offsets(p, W, stride_h, stride_w, FLAT)
    x_row = x_ptr + (pid_bg // GROUPS) * stride_b + (pid_bg % GROUPS) * C * stride_c
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & p_mask[None, :]
        v = tl.load(x_row + c.to(tl.int64)[:, None] * stride_c + p_off[None, :], mask=mask, other=0.0)
        v = v.to(tl.float32)
        if SQUARE:
            v = v * v
        acc += v
    total = tl.sum(acc, axis=0) * scale
    tl.store(out_ptr + pid_bg * out_stride_b + p.to(tl.int64), total, mask=p_mask)


# Backward of A: with a = A(x) = (1/C) Σ_c x_c², ∂a_p/∂x_{c,p} = 2·x_{c,p}/C, so dx_{c,p} = grad_a_p · 2·x_{c,p} / C:
# elementwise, out = scale · coef_p · x with coef = grad_a and scale = 2/C; grouped, channel c reads the coefficient
# of its group, c // CG.
# The same kernel adds a per-pixel map to every channel (out = base + coef_p: diversity_shift's forward) and
# computes diversity_shift's gradient g + coef_p · y (HAS_BASE and MUL_X): out = [base] + scale · coef_p · [x].
@triton.jit
def _channel_broadcast_kernel(
    x_ptr,  # [B, C, H, W], strides sx_* (read only when MUL_X)
    base_ptr,  # [B, C, H, W], strides sb_* (read only when HAS_BASE)
    coef_ptr,  # [B, C / CG, H, W], strides sk_* (any float dtype)
    out_ptr,  # [B, C, H, W], strides so_*
    C,
    CG,  # channels per coefficient map (C when there is one)
    H,
    W,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sb_b,
    sb_c,
    sb_h,
    sb_w,
    sk_b,
    sk_g,
    sk_h,
    sk_w,
    so_b,
    so_c,
    so_h,
    so_w,
    scale,
    MUL_X: tl.constexpr,
    HAS_BASE: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p, p_mask, pid_b = _sample_block(H * W, BLOCK_P)
    c = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (c < C)[:, None] & p_mask[None, :]
    k_off = pid_b * sk_b + (c // CG)[:, None] * sk_g + _pixel_offsets(p, W, sk_h, sk_w, FLAT)[None, :]
    coef = tl.load(coef_ptr + k_off, mask=mask, other=0.0)
    val = coef.to(tl.float32) * scale
    if MUL_X:
        x_off = pid_b * sx_b + c[:, None] * sx_c + _pixel_offsets(p, W, sx_h, sx_w, FLAT)[None, :]
        val = val * tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        b_off = pid_b * sb_b + c[:, None] * sb_c + _pixel_offsets(p, W, sb_h, sb_w, FLAT)[None, :]
        val = val + tl.load(base_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
    o_off = pid_b * so_b + c[:, None] * so_c + _pixel_offsets(p, W, so_h, so_w, FLAT)[None, :]
    tl.store(out_ptr + o_off, val, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: the normalised distance on [B, N] samples seen through up to three strided inner dimensions
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _sample_offsets(j, D2, D3, s1, s2, s3, FLAT: tl.constexpr):
    """Offsets (int64) of flat indices ``j = (i1·D2 + i2)·D3 + i3`` in a sample of strides (s1, s2, s3)."""
    j = j.to(tl.int64)
    if FLAT:
        off = j * s3
    else:
        i3 = j % D3
        t = j // D3
        off = (t // D2) * s1 + (t % D2) * s2 + i3 * s3
    return off


# Forward of d, first pass: per-sample sums Sxx = Σx², Syy = Σy², Sxy = Σxy over one slice (CHUNK entries) of
# sample b, written to partial[b, split, 0:3] (no atomics: the second pass sums over the splits, in order).
# That pass forms nx = max(√Sxx, 1e-12), ny likewise, u·u = Sxx/nx², v·v = Syy/ny², u·v = Sxy/(nx·ny) and
# d = (1/(B·N)) Σ_b (u·u + v·v − 2·u·v).
@triton.jit
def _distance_partial_kernel(
    x_ptr,  # [B, D1, D2, D3], strides (sx_b, sx_1, sx_2, sx_3)
    y_ptr,  # [B, D1, D2, D3], strides (sy_b, sy_1, sy_2, sy_3)
    partial_ptr,  # [B, SPLITS, 3] fp32, contiguous
    N,
    D2,
    D3,
    CHUNK,
    sx_b,
    sx_1,
    sx_2,
    sx_3,
    sy_b,
    sy_1,
    sy_2,
    sy_3,
    FLAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    start = pid_s * CHUNK
    sxx = tl.zeros([BLOCK], dtype=tl.float32)
    syy = tl.zeros([BLOCK], dtype=tl.float32)
    sxy = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, CHUNK, BLOCK):
        j = start + j0 + tl.arange(0, BLOCK)
        mask = j < N
        xv = tl.load(x_ptr + pid_b * sx_b + _sample_offsets(j, D2, D3, sx_1, sx_2, sx_3, FLAT), mask=mask, other=0.0)
        yv = tl.load(y_ptr + pid_b * sy_b + _sample_offsets(j, D2, D3, sy_1, sy_2, sy_3, FLAT), mask=mask, other=0.0)
        xv = xv.to(tl.float32)
        yv = yv.to(tl.float32)
        sxx += xv * xv
        syy += yv * yv
        sxy += xv * yv
    out = partial_ptr + (pid_b * tl.num_programs(0) + pid_s) * 3
    tl.store(out, tl.sum(sxx, axis=0))
    tl.store(out + 1, tl.sum(syy, axis=0))
    tl.store(out + 2, tl.sum(sxy, axis=0))


# Forward of d, second pass (one program, a fixed order: deterministic): the per-sample sums out of the partials,
# the per-sample statistics the backward needs, stats[b] = (nx, ny, ax, ay) with ax = fx·(u·u − u·v),
# ay = fy·(v·v − u·v) (fx = [‖x‖ > 1e-12]), and d itself, stored in the output's dtype.
@triton.jit
def _distance_finish_kernel(
    partial_ptr,  # [B, SPLITS, 3] fp32, contiguous
    stats_ptr,  # [B, 4] fp32, contiguous (written)
    out_ptr,  # [] the loss (written, in its dtype)
    B,
    SPLITS,
    inv_count,  # 1 / (B·N)
    EPS_: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    s = tl.arange(0, BLOCK_S)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = (b[:, None] < B) & (s[None, :] < SPLITS)
        base = partial_ptr + (b[:, None] * SPLITS + s[None, :]) * 3
        sxx = tl.sum(tl.load(base, mask=mask, other=0.0), axis=1)
        syy = tl.sum(tl.load(base + 1, mask=mask, other=0.0), axis=1)
        sxy = tl.sum(tl.load(base + 2, mask=mask, other=0.0), axis=1)
        root_x, root_y = tl.sqrt(sxx), tl.sqrt(syy)
        nx, ny = tl.maximum(root_x, EPS_), tl.maximum(root_y, EPS_)
        uu, vv, uv = sxx / (nx * nx), syy / (ny * ny), sxy / (nx * ny)
        ax = tl.where(root_x > EPS_, uu - uv, 0.0)
        ay = tl.where(root_y > EPS_, vv - uv, 0.0)
        in_batch = b < B
        tl.store(stats_ptr + b * 4, nx, mask=in_batch)
        tl.store(stats_ptr + b * 4 + 1, ny, mask=in_batch)
        tl.store(stats_ptr + b * 4 + 2, ax, mask=in_batch)
        tl.store(stats_ptr + b * 4 + 3, ay, mask=in_batch)
        total += tl.where(in_batch, uu + vv - 2 * uv, 0.0)
    tl.store(out_ptr, tl.sum(total, axis=0) * inv_count)


# Backward of d. With M = B·N, u = x/nx, v = y/ny and g the upstream gradient, d = (1/M) Σ (u − v)², so
# ∂d/∂u = 2(u − v)/M. Where ‖x‖ > 1e-12, nx = ‖x‖ and ∂u/∂x = (I − u uᵀ)/nx; where it is clamped, nx is the
# constant 1e-12 and ∂u/∂x = I/nx. Hence, with f = [‖x‖ > 1e-12],
#   grad_x = (2g/(M·nx)) · [(u − v) − f · u · (u·u − u·v)] = cx · (u − v − ax · u),   cx = 2g/(M·nx),
# and symmetrically grad_y = cy · (v − u − ay · v), with the forward's per-sample stats (nx, ny, ax, ay). g is read
# from device memory (no host sync: capturable). The kernel is elementwise, forms u and v (so that u − v is exactly
# 0 where the samples are proportional, e.g. one-pixel maps) and writes only the gradients asked for.
@triton.jit
def _distance_backward_kernel(
    x_ptr,  # [B, D1, D2, D3], strides sx_*
    y_ptr,  # [B, D1, D2, D3], strides sy_*
    gx_ptr,  # [B, D1, D2, D3], strides sgx_* (written when WRITE_X)
    gy_ptr,  # [B, D1, D2, D3], strides sgy_* (written when WRITE_Y)
    stats_ptr,  # [B, 4] fp32, contiguous: (nx, ny, ax, ay)
    grad_ptr,  # [] the upstream gradient of d
    N,
    inv_count,  # 1 / (B·N)
    D2,
    D3,
    sx_b,
    sx_1,
    sx_2,
    sx_3,
    sy_b,
    sy_1,
    sy_2,
    sy_3,
    sgx_b,
    sgx_1,
    sgx_2,
    sgx_3,
    sgy_b,
    sgy_1,
    sgy_2,
    sgy_3,
    WRITE_X: tl.constexpr,
    WRITE_Y: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    j, mask, pid_b = _sample_block(N, BLOCK)
    c = 2.0 * tl.load(grad_ptr).to(tl.float32) * inv_count
    nx = tl.load(stats_ptr + pid_b * 4)
    ny = tl.load(stats_ptr + pid_b * 4 + 1)
    xv = tl.load(x_ptr + pid_b * sx_b + _sample_offsets(j, D2, D3, sx_1, sx_2, sx_3, FLAT), mask=mask, other=0.0)
    yv = tl.load(y_ptr + pid_b * sy_b + _sample_offsets(j, D2, D3, sy_1, sy_2, sy_3, FLAT), mask=mask, other=0.0)
    u = xv.to(tl.float32) / nx
    v = yv.to(tl.float32) / ny
    if WRITE_X:
        ax = tl.load(stats_ptr + pid_b * 4 + 2)
        gx_off = pid_b * sgx_b + _sample_offsets(j, D2, D3, sgx_1, sgx_2, sgx_3, FLAT)
        tl.store(gx_ptr + gx_off, (c / nx) * (u - v - ax * u), mask=mask)
    if WRITE_Y:
        ay = tl.load(stats_ptr + pid_b * 4 + 3)
        gy_off = pid_b * sgy_b + _sample_offsets(j, D2, D3, sgy_1, sgy_2, sgy_3, FLAT)
        tl.store(gy_ptr + gy_off, (c / ny) * (v - u - ay * v), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration (one function per kernel family)
# ---------------------------------------------------------------------------------------------------------------


def _map_config(channels: int, pixels: int, channels_inner: bool) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_P, num_warps)`` for the channel kernels: a tile of at most 4096 entries, wide along the
    dimension that is contiguous in memory (pixels for NCHW, channels for channels-last)."""
    if channels_inner:
        block_c = min(triton.next_power_of_2(channels), 64)
        block_p = min(triton.next_power_of_2(pixels), max(4096 // block_c, 1))
    else:
        block_p = min(triton.next_power_of_2(pixels), 256)
        block_c = min(triton.next_power_of_2(channels), max(4096 // block_p, 1))
    tile = block_c * block_p
    num_warps = 8 if tile >= 4096 else 4 if tile >= 512 else 2 if tile >= 128 else 1
    return block_c, block_p, num_warps


def _distance_config(batch: int, n: int) -> tuple[int, int, int, int]:
    """``(BLOCK, CHUNK, SPLITS, num_warps)`` for the distance kernels: a sample is cut into SPLITS slices of CHUNK
    entries (a multiple of BLOCK) so that about 256 programs share the forward reduction even for small batches."""
    block = min(triton.next_power_of_2(max(n, 1)), 2048)
    blocks = triton.cdiv(n, block)
    splits = max(min(blocks, triton.cdiv(256, max(batch, 1))), 1)
    chunk = triton.cdiv(blocks, splits) * block
    splits = max(triton.cdiv(n, chunk), 1)
    num_warps = 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1
    return block, chunk, splits, num_warps


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _hw_strides(t: torch.Tensor) -> tuple[int, int]:
    """``(stride_h, stride_w)`` of a 4-D tensor, with the stride of a size-1 dimension made consistent with the
    other so that ``stride_h == W·stride_w`` holds whenever the H·W pixels form one strided run."""
    height, width = t.shape[2], t.shape[3]
    stride_h, stride_w = t.stride(2), t.stride(3)
    if width == 1:
        stride_w = stride_h
    if height == 1:
        stride_h = width * stride_w
    return stride_h, stride_w


def _is_flat(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        stride_h, stride_w = _hw_strides(t)
        if stride_h != t.shape[3] * stride_w:
            return False
    return True


def _channel_reduce(x: torch.Tensor, out: torch.Tensor, scale: float, square: bool, groups: int = 1) -> torch.Tensor:
    """``out[b·G + g, p] = scale · Σ_c x[b, g·C + c, p]^(2 if square else 1)`` for ``G = groups`` of ``C`` channels;
    ``out`` is ``[B·G, H·W]`` with unit pixel stride."""
    batch, channels, height, width = x.shape
    channels //= groups
    pixels = height * width
    block_c, block_p, num_warps = _map_config(channels, pixels, x.stride(1) == 1 and channels > 1)
    stride_h, stride_w = _hw_strides(x)
    grid = (triton.cdiv(pixels, block_p), batch * groups)
    _channel_reduce_kernel[grid](
        x_ptr=x, out_ptr=out, GROUPS=groups, C=channels, H=height, W=width, stride_b=x.stride(0), stride_c=x.stride(1),
        stride_h=stride_h, stride_w=stride_w, out_stride_b=out.stride(0), scale=scale, SQUARE=square, FLAT=_is_flat(x),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip
    return out


def _channel_broadcast(
    out: torch.Tensor, coef: torch.Tensor, scale: float, x: torch.Tensor | None = None, base: torch.Tensor | None = None
) -> torch.Tensor:
    """``out = [base] + scale · coef · [x]``, ``coef`` ``[B, G, H, W]`` broadcast over each of the ``G`` groups of
    channels of ``out`` (``G = 1``: over all of them)."""
    batch, channels, height, width = out.shape
    pixels = height * width
    x_arg = out if x is None else x
    base_arg = out if base is None else base
    block_c, block_p, num_warps = _map_config(channels, pixels, out.stride(1) == 1 and channels > 1)
    tensors = [t for t in (x, base, coef, out) if t is not None]
    (sx_h, sx_w), (sb_h, sb_w) = _hw_strides(x_arg), _hw_strides(base_arg)
    (sk_h, sk_w), (so_h, so_w) = _hw_strides(coef), _hw_strides(out)
    grid = (triton.cdiv(pixels, block_p), batch, triton.cdiv(channels, block_c))
    _channel_broadcast_kernel[grid](
        x_ptr=x_arg, base_ptr=base_arg, coef_ptr=coef, out_ptr=out, C=channels, CG=channels // coef.shape[1], H=height,
        W=width, sx_b=x_arg.stride(0), sx_c=x_arg.stride(1), sx_h=sx_h, sx_w=sx_w, sb_b=base_arg.stride(0),
        sb_c=base_arg.stride(1), sb_h=sb_h, sb_w=sb_w, sk_b=coef.stride(0), sk_g=coef.stride(1), sk_h=sk_h, sk_w=sk_w,
        so_b=out.stride(0), so_c=out.stride(1), so_h=so_h, so_w=so_w, scale=scale, MUL_X=x is not None,
        HAS_BASE=base is not None, FLAT=_is_flat(*tensors), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip
    return out


def _attention_map_forward(x: torch.Tensor, out_dtype: torch.dtype, groups: int) -> torch.Tensor:
    """``A`` of each group of channels as a contiguous ``[B, G, H, W]`` tensor of ``out_dtype`` (summed in fp32,
    rounded once)."""
    batch, channels, height, width = x.shape
    out = torch.empty((batch, groups, height, width), dtype=out_dtype, device=x.device)
    _channel_reduce(x, out.view(batch * groups, height * width), groups / channels, square=True, groups=groups)
    return out


def _attention_map_backward(x: torch.Tensor, grad_a: torch.Tensor, groups: int) -> torch.Tensor:
    """``dx = grad_a · 2x / C`` (``C`` channels per group), in ``x``'s dtype and memory format."""
    return _channel_broadcast(torch.empty_like(x), grad_a, 2.0 * groups / x.shape[1], x=x)


def _sample_layout(shape: torch.Size, tensors: list[torch.Tensor]) -> tuple[list[int], list[list[int]]]:
    """The inner (non-batch) dimensions of ``tensors`` (all of ``shape``) as at most three strided dimensions.

    Dimensions are put in the memory order of ``tensors[0]`` (outermost first, so the innermost is the stride-1
    one for a dense tensor: channels for channels-last), size-1 dimensions are dropped, and neighbours that are one
    strided run in every tensor are merged. Returns ``(sizes, strides per tensor)``, padded in front to three.
    """
    dims = [d for d in range(1, len(shape)) if shape[d] != 1]
    dims.sort(key=lambda d: -abs(tensors[0].stride(d)))
    sizes: list[int] = []
    strides: list[list[int]] = [[] for _ in tensors]
    for d in dims:
        if sizes and all(s[-1] == t.stride(d) * shape[d] for s, t in zip(strides, tensors, strict=True)):
            sizes[-1] *= shape[d]
            for s, t in zip(strides, tensors, strict=True):
                s[-1] = t.stride(d)
        else:
            sizes.append(shape[d])
            for s, t in zip(strides, tensors, strict=True):
                s.append(t.stride(d))
    if len(sizes) > 3:  # pragma: no cover - callers pass at most 4-D tensors
        raise ValueError("at most three inner dimensions")
    pad = 3 - len(sizes)
    return [1] * pad + sizes, [[0] * pad + s for s in strides]


def _distance_forward(x: torch.Tensor, y: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d in out_dtype, stats [B, 4] fp32)``: two launches, the partial sums and the one-program finish."""
    batch, n = x.shape[0], x[0].numel()
    sizes, (sx, sy) = _sample_layout(x.shape, [x, y])
    block, chunk, splits, num_warps = _distance_config(batch, n)
    partial = torch.empty((batch, splits, 3), dtype=torch.float32, device=x.device)
    _distance_partial_kernel[(splits, batch)](
        x_ptr=x, y_ptr=y, partial_ptr=partial, N=n, D2=sizes[1], D3=sizes[2], CHUNK=chunk, sx_b=x.stride(0), sx_1=sx[0],
        sx_2=sx[1], sx_3=sx[2], sy_b=y.stride(0), sy_1=sy[0], sy_2=sy[1], sy_3=sy[2],
        FLAT=sizes[0] == 1 and sizes[1] == 1, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    stats = torch.empty((batch, 4), dtype=torch.float32, device=x.device)
    loss = torch.empty((), dtype=out_dtype, device=x.device)
    block_s = triton.next_power_of_2(splits)
    block_b = max(min(triton.next_power_of_2(batch), max(1024 // block_s, 1)), 1)
    _distance_finish_kernel[(1,)](
        partial_ptr=partial, stats_ptr=stats, out_ptr=loss, B=batch, SPLITS=splits, inv_count=1.0 / (batch * n),
        EPS_=EPS, BLOCK_B=block_b, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    return loss, stats


def _distance_backward(
    x: torch.Tensor, y: torch.Tensor, stats: torch.Tensor, grad: torch.Tensor, need_x: bool, need_y: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    batch, n = x.shape[0], x[0].numel()
    grad_x = torch.empty_like(x) if need_x else None
    grad_y = torch.empty_like(y) if need_y else None
    gx_arg = x if grad_x is None else grad_x
    gy_arg = y if grad_y is None else grad_y
    sizes, (sx, sy, sgx, sgy) = _sample_layout(x.shape, [x, y, gx_arg, gy_arg])
    block, _, _, num_warps = _distance_config(batch, n)
    _distance_backward_kernel[(triton.cdiv(n, block), batch)](
        x_ptr=x, y_ptr=y, gx_ptr=gx_arg, gy_ptr=gy_arg, stats_ptr=stats, grad_ptr=grad, N=n,
        inv_count=1.0 / (batch * n), D2=sizes[1], D3=sizes[2], sx_b=x.stride(0), sx_1=sx[0], sx_2=sx[1], sx_3=sx[2],
        sy_b=y.stride(0), sy_1=sy[0], sy_2=sy[1], sy_3=sy[2], sgx_b=gx_arg.stride(0), sgx_1=sgx[0], sgx_2=sgx[1],
        sgx_3=sgx[2], sgy_b=gy_arg.stride(0), sgy_1=sgy[0], sgy_2=sgy[1], sgy_3=sgy[2], WRITE_X=need_x, WRITE_Y=need_y,
        FLAT=sizes[0] == 1 and sizes[1] == 1, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return grad_x, grad_y


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _AttentionMapFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_dtype: torch.dtype, groups: int = 1) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.groups = groups
        return _attention_map_forward(x, out_dtype, groups)

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _attention_map_backward(x, grad_a, ctx.groups), None, None


class _NormalizedDistanceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        loss, stats = _distance_forward(x, y, out_dtype)
        ctx.save_for_backward(x, y, stats)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, stats = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_y):
            return None, None, None
        grad_x, grad_y = _distance_backward(x, y, stats, grad_out, need_x, need_y)
        return grad_x, grad_y, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def attention_map(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Attention map ``A(x) = mean_c(x²)``; with ``groups = G``, one per group of ``C / G`` consecutive channels (the
    maps of ``G`` stacked networks' features, ``[B, G·C, H, W]``, in one launch).

    Args:
        x: ``[B, C, H, W]``, NCHW, channels-last or any strided view; fp32/fp16/bf16 (Triton) or fp64 (reference).
        groups: a divisor of ``C``.

    Returns:
        ``[B, G, H, W]`` (contiguous; ``[B, 1, H, W]`` by default) in ``result_dtype(x)``: ``x``'s dtype, or fp32 for
        half inputs under autocast. Squares are summed in fp32 and the mean rounded once. ``dA/dx = 2x/C``.
    """
    if x.dim() != 4:
        raise ValueError(f"attention_map expects [B, C, H, W], got shape {tuple(x.shape)}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"attention_map: groups={groups} must divide the {x.shape[1]} channels")
    check_dtypes("attention_map", x=x)
    if not use_triton(x):
        return attention_map_reference(x, groups)
    return _AttentionMapFunction.apply(x, result_dtype(x), groups)


def normalized_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Normalised distance ``d(x, y) = mean((n(x) − n(y))²)``, ``n(v) = v / max(‖v‖₂, 1e-12)`` per sample.

    Computed as ``(1/(B·N)) Σ_b [Sxx/nx² + Syy/ny² − 2·Sxy/(nx·ny)]`` from the per-sample sums ``Sxx = Σx²``,
    ``Syy = Σy²``, ``Sxy = Σxy`` (fp32), ``nx = max(√Sxx, 1e-12)``; ``N`` is the number of entries per sample.

    Args:
        x, y: tensors of one shape ``[B, ...]``, fp32/fp16/bf16 (Triton) or fp64 (reference). Up to 4-D they are read
            through their strides (channels-last and slices without copies); higher ranks are reshaped to ``[B, N]``.

    Returns:
        A scalar in ``result_dtype(x)``. The gradient reaches both arguments unless the caller detaches one.
    """
    if x.shape != y.shape or x.dim() < 1:
        raise ValueError(
            f"normalized_distance expects two tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    check_dtypes("normalized_distance", x=x, y=y)
    if not use_triton(x, y):
        return normalized_distance_reference(x, y)
    if x.dim() > 4:
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    return _NormalizedDistanceFunction.apply(x, y, result_dtype(x))


def attention_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Attention-transfer loss ``d(A(x), A(y))``.

    The two maps are kept in fp32 between the map kernels and the distance kernels, so the features are read once
    in the forward and once in the backward.

    Args:
        x: ``[B, C1, H, W]``; y: ``[B, C2, H, W]`` (channel counts may differ), NCHW, channels-last or strided views;
            fp32/fp16/bf16 (Triton) or fp64 (reference).

    Returns:
        A scalar in ``result_dtype(x)``. The gradient reaches both arguments unless the caller detaches one.
    """
    if x.dim() != 4 or y.dim() != 4 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
        raise ValueError(
            f"attention_distance expects [B, C, H, W] maps of one batch and size, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    check_dtypes("attention_distance", x=x, y=y)
    if not use_triton(x, y):
        return attention_distance_reference(x, y)
    a = _AttentionMapFunction.apply(x, torch.float32)
    b = _AttentionMapFunction.apply(y, torch.float32)
    return _NormalizedDistanceFunction.apply(a, b, result_dtype(x))


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class AttentionDistance(nn.Module):
    """``nn.Module`` form of :func:`attention_distance`."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return attention_distance(x, y)


class NormalizedDistance(nn.Module):
    """``nn.Module`` form of :func:`normalized_distance`."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return normalized_distance(x, y)


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def attention_map_reference(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``A(x) = mean over channels of x²``: ``[B, C, H, W] → [B, 1, H, W]``, in the input's dtype; with ``groups``,
    the mean over each group of consecutive channels, ``[B, groups, H, W]``."""
    check_dtypes("attention_map_reference", x=x)
    squares = x.to(compute_dtype(x.dtype)).pow(2)
    if groups == 1:
        return squares.mean(dim=1, keepdim=True).to(x.dtype)
    return squares.unflatten(1, (groups, -1)).mean(dim=2).to(x.dtype)


def normalized_distance_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d(x, y) = mean((n(x) − n(y))²)`` with ``n`` the per-sample L2 normalisation (eps 1e-12)."""
    check_dtypes("normalized_distance_reference", x=x, y=y)
    dtype = compute_dtype(x.dtype)
    nx = F.normalize(x.to(dtype).reshape(x.shape[0], -1), dim=1, eps=EPS)
    ny = F.normalize(y.to(dtype).reshape(y.shape[0], -1), dim=1, eps=EPS)
    return (nx - ny).pow(2).mean().to(x.dtype)


def attention_distance_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d(A(x), A(y))``."""
    check_dtypes("attention_distance_reference", x=x, y=y)
    return normalized_distance_reference(attention_map_reference(x), attention_map_reference(y))
