"""FFSD's diversity target: push a student to attend where the previous student did not.

With ``N = H·W``, per sample: ``ν = ‖y‖₂``, ``ŷ = n(y)``, ``θ`` = the ``⌊N/3⌋``-th smallest entry of ``ŷ``
(the smallest when ``N < 3``, where the reference fails), and the reflected target
``ỹ = ν/2 + (ν/2 − ŷ)·sign(ŷ − θ)``: entries below ``θ`` keep ``ŷ``, entries above get ``ν − ŷ``, ties get ``ν/2``.
``sign`` rather than a comparison is the reference's choice, and it matters on maps with many equal entries.

The kernels select ``θ`` exactly, without sorting: a bitwise binary search over order-preserving integer keys of
the fp32 values of ``ŷ`` (32 counting passes over the row). Layout of this file: Triton helpers and kernels, launch
configuration, host launchers, autograd Functions, functional API, ``nn.Module``, plain-PyTorch references.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, result_dtype, tl, triton, use_triton
from ffsd_kernels.attention import EPS, _channel_broadcast, _channel_reduce

# ---------------------------------------------------------------------------------------------------------------
# Kernels: helpers, order-preserving keys and the exact k-th smallest entry of a row
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _order_key(v):
    """An int64 key in [0, 2³²) with ``key(a) < key(b)`` iff ``a < b`` for fp32 ``a, b`` (no NaNs); −0 keys as +0.

    Non-negative floats (sign bit clear) map to bits + 2³¹, negative ones to the bitwise complement of their 32 bits
    (−1 − bits as a signed int32), which reverses their order.
    """
    bits = v.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    return tl.where(bits == -2147483648, 2147483648, key)


@triton.jit
def _row_sum_squares(ptr, stride, N, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        j = start + tl.arange(0, BLOCK)
        v = tl.load(ptr + j.to(tl.int64) * stride, mask=j < N, other=0.0).to(tl.float32)
        acc += v * v
    return tl.sum(acc, axis=0)


@triton.jit
def _kth_smallest_key(ptr, stride, N, k, norm, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """The key of the k-th smallest (1-based) of ``v / norm`` over the row ``v`` (N entries at ``ptr``, ``stride``).

    Builds, from the top bit down, the smallest key K with count(key ≤ K) ≥ k: at each bit, if at least k keys lie
    at or below (prefix with this bit 0, all lower bits 1), the bit stays 0, else it is set. After 32 passes K is the
    key of an entry of the row. ONE_CHUNK: the row fits in one BLOCK and its keys stay in registers; otherwise each
    pass re-reads the row.
    """
    offs = tl.arange(0, BLOCK)
    if ONE_CHUNK:
        mask = offs < N
        v = tl.load(ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)
        keys = tl.where(mask, _order_key(v / norm), 8589934592)  # padding above every key (2³³)
    prefix = tl.full([], 0, tl.int64)
    step = tl.full([], 2147483648, tl.int64)
    for _ in range(32):
        candidate = prefix + (step - 1)
        if ONE_CHUNK:
            count = tl.sum((keys <= candidate).to(tl.int32), axis=0)
        else:
            count = tl.full([], 0, tl.int32)
            for start in range(0, N, BLOCK):
                j = start + offs
                mask = j < N
                v = tl.load(ptr + j.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)
                count += tl.sum(((_order_key(v / norm) <= candidate) & mask).to(tl.int32), axis=0)
        prefix = tl.where(count >= k, prefix, prefix + step)
        step = step >> 1
    return prefix


@triton.jit
def _key_sign(key, theta_key):
    """``sign(ŷ − θ)`` as fp32, from the keys (the key order is the float order)."""
    return (key > theta_key).to(tl.float32) - (key < theta_key).to(tl.float32)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


# Forward of div, one program per sample: Sxx = Σx², Syy = Σy² (pass 1); ν = √Syy, ny = max(ν, 1e-12),
# nx = max(√Sxx, 1e-12); θ's key K (32 counting passes over ŷ = y / ny); then with u = x / nx and
# ỹ = ν/2 + (ν/2 − ŷ)·sign(ŷ − θ): loss_b = Σ (u − ỹ)² and u·ỹ = Σ u·ỹ (last pass). Writes
# stats[b] = (loss_b, u·ỹ, nx, ny, ν, Sxx) and keys[b] = K; the host forms div = Σ_b loss_b / (B·N).
@triton.jit
def _diversity_forward_kernel(
    x_ptr,  # [B, N], strides (sx_b, sx_n)
    y_ptr,  # [B, N], strides (sy_b, sy_n)
    stats_ptr,  # [B, 6] fp32, contiguous
    keys_ptr,  # [B] int64
    N,
    k,
    sx_b,
    sx_n,
    sy_b,
    sy_n,
    BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + pid_b * sx_b
    y_row = y_ptr + pid_b * sy_b
    sxx = _row_sum_squares(x_row, sx_n, N, BLOCK)
    syy = _row_sum_squares(y_row, sy_n, N, BLOCK)
    nx = tl.maximum(tl.sqrt(sxx), 1e-12)
    nu = tl.sqrt(syy)
    ny = tl.maximum(nu, 1e-12)
    theta_key = _kth_smallest_key(y_row, sy_n, N, k, ny, BLOCK, ONE_CHUNK)
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    ut = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        j = start + tl.arange(0, BLOCK)
        mask = j < N
        xv = tl.load(x_row + j.to(tl.int64) * sx_n, mask=mask, other=0.0).to(tl.float32)
        yv = tl.load(y_row + j.to(tl.int64) * sy_n, mask=mask, other=0.0).to(tl.float32)
        u = xv / nx
        y_hat = yv / ny
        target = nu / 2 + (nu / 2 - y_hat) * _key_sign(_order_key(y_hat), theta_key)
        diff = u - target
        loss += tl.where(mask, diff * diff, 0.0)
        ut += tl.where(mask, u * target, 0.0)
    out = stats_ptr + pid_b * 6
    tl.store(out, tl.sum(loss, axis=0))
    tl.store(out + 1, tl.sum(ut, axis=0))
    tl.store(out + 2, nx)
    tl.store(out + 3, ny)
    tl.store(out + 4, nu)
    tl.store(out + 5, sxx)
    tl.store(keys_ptr + pid_b, theta_key)


# Forward of div, second pass (one program, a fixed order: deterministic): div = (1/M) Σ_b loss_b, M = B·N, stored
# in the output's dtype.
@triton.jit
def _diversity_finish_kernel(
    stats_ptr,  # [B, 6] fp32, contiguous: loss_b first
    out_ptr,  # [] the loss (written, in its dtype)
    B,
    inv_count,  # 1 / (B·N)
    BLOCK_B: tl.constexpr,
):
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        total += tl.load(stats_ptr + b * 6, mask=b < B, other=0.0)
    tl.store(out_ptr, tl.sum(total, axis=0) * inv_count)


# Backward of div (gradient to x only; ỹ is a function of the detached y). With M = B·N, u = n(x),
# div = (1/M) Σ (u − ỹ)², ∂div/∂u = 2(u − ỹ)/M, and ∂u/∂x = (I − u uᵀ)/nx where ‖x‖ > 1e-12 (I/nx where clamped):
#   grad_x = (2g/(M·nx)) · [(u − ỹ) − f · u · (u·u − u·ỹ)] = c · (u − ỹ) − e · u,
# c = 2g/(M·nx), e = c · f · (u·u − u·ỹ), f = [‖x‖ > 1e-12], u·u = Sxx/nx². The kernel forms c and e per sample from
# the forward's stats and the upstream gradient g, read from device memory (no host sync: capturable), and
# recomputes ỹ elementwise from the saved ny, ν and θ's key, with the forward's exact expression for ŷ.
@triton.jit
def _diversity_backward_kernel(
    x_ptr,  # [B, N], strides (sx_b, sx_n)
    y_ptr,  # [B, N], strides (sy_b, sy_n)
    stats_ptr,  # [B, 6] fp32: (loss_b, u·ỹ, nx, ny, ν, Sxx)
    keys_ptr,  # [B] int64
    grad_out_ptr,  # [] the upstream gradient of div
    grad_ptr,  # [B, N], contiguous, x's dtype
    N,
    inv_count,  # 1 / (B·N)
    sx_b,
    sx_n,
    sy_b,
    sy_n,
    EPS_: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    j = pid_j * BLOCK + tl.arange(0, BLOCK)
    mask = j < N
    ut = tl.load(stats_ptr + pid_b * 6 + 1)
    nx = tl.load(stats_ptr + pid_b * 6 + 2)
    ny = tl.load(stats_ptr + pid_b * 6 + 3)
    nu = tl.load(stats_ptr + pid_b * 6 + 4)
    sxx = tl.load(stats_ptr + pid_b * 6 + 5)
    theta_key = tl.load(keys_ptr + pid_b)
    c = 2.0 * tl.load(grad_out_ptr).to(tl.float32) * inv_count / nx
    e = tl.where(tl.sqrt(sxx) > EPS_, c * (sxx / (nx * nx) - ut), 0.0)
    xv = tl.load(x_ptr + pid_b * sx_b + j.to(tl.int64) * sx_n, mask=mask, other=0.0).to(tl.float32)
    yv = tl.load(y_ptr + pid_b * sy_b + j.to(tl.int64) * sy_n, mask=mask, other=0.0).to(tl.float32)
    u = xv / nx
    y_hat = yv / ny
    target = nu / 2 + (nu / 2 - y_hat) * _key_sign(_order_key(y_hat), theta_key)
    tl.store(grad_ptr + pid_b * N + j.to(tl.int64), c * (u - target) - e * u, mask=mask)


# Forward of shift's per-pixel term, one program per sample of the fp32 map a = A(y) ([B, N], N = H·W):
# ν = ‖a‖₂, â = a / max(ν, 1e-12), θ's key (32 counting passes), t = ν/2 + (ν/2 − â)·s with s = sign(â − θ);
# writes shift_p = (t − â)·ν / C and s_p (for the backward). The host adds shift to every channel of y.
@triton.jit
def _shift_target_kernel(
    a_ptr,  # [B, N] fp32, contiguous
    shift_ptr,  # [B, N] fp32, contiguous
    sign_ptr,  # [B, N] fp32, contiguous
    nu_ptr,  # [B] fp32
    N,
    k,
    inv_c,
    BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + pid_b * N
    nu = tl.sqrt(_row_sum_squares(a_row, 1, N, BLOCK))
    na = tl.maximum(nu, 1e-12)
    theta_key = _kth_smallest_key(a_row, 1, N, k, na, BLOCK, ONE_CHUNK)
    for start in range(0, N, BLOCK):
        j = (start + tl.arange(0, BLOCK)).to(tl.int64)
        mask = j < N
        a_hat = tl.load(a_row + j, mask=mask, other=0.0) / na
        s = _key_sign(_order_key(a_hat), theta_key)
        target = nu / 2 + (nu / 2 - a_hat) * s
        tl.store(shift_ptr + pid_b * N + j, (target - a_hat) * nu * inv_c, mask=mask)
        tl.store(sign_ptr + pid_b * N + j, s, mask=mask)
    tl.store(nu_ptr + pid_b, nu)


# Backward of shift (derivation for the kernels it reuses). Where ν > 1e-12, â = a/ν and t − â = (1 + s)(ν/2 − â),
# so (t − â)·ν = (1 + s)(ν²/2 − a) with ν² = Σ_q a_q² and s piecewise constant (zero derivative). With
# out_{c,p} = y_{c,p} + shift_p, shift_p = (1 + s_p)(Σ_q a_q²/2 − a_p)/C and ∂a_q/∂y_{c,p} = δ_qp · 2y_{c,p}/C:
#   grad_y_{c,p} = g_{c,p} + Σ_p' G_p' ∂shift_p'/∂y_{c,p} = g_{c,p} + (2y_{c,p}/C) · (a_p · Σ_p' w_p' − w_p),
# G_p = Σ_c g_{c,p} (the channel sum: _channel_reduce without squaring), w_p = (1 + s_p)·G_p / C. Where
# ν ≤ 1e-12 the shift's gradient is taken as 0 (for a = 0 exactly, as autograd of the formula gives).
# The final elementwise pass is _channel_broadcast with base = g and coef = (2/C)(a·Σw − w).


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def _select_config(n: int) -> tuple[int, bool, int]:
    """``(BLOCK, ONE_CHUNK, num_warps)`` for the row kernels: rows up to 4096 entries (56·56 maps and below) are held
    in registers through the 32 selection passes; longer rows are streamed in BLOCKs of 4096 per pass."""
    block = min(triton.next_power_of_2(max(n, 1)), 4096)
    num_warps = 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1
    return block, n <= block, num_warps


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _rank(n: int) -> int:
    """θ's rank, 1-based: ⌊N/3⌋, or 1 when N < 3."""
    return max(n // 3, 1)


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _DiversityLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        batch, n = x.shape
        block, one_chunk, num_warps = _select_config(n)
        stats = torch.empty((batch, 6), dtype=torch.float32, device=x.device)
        keys = torch.empty((batch,), dtype=torch.int64, device=x.device)
        _diversity_forward_kernel[(batch,)](
            x_ptr=x, y_ptr=y, stats_ptr=stats, keys_ptr=keys, N=n, k=_rank(n), sx_b=x.stride(0), sx_n=x.stride(1),
            sy_b=y.stride(0), sy_n=y.stride(1), BLOCK=block, ONE_CHUNK=one_chunk, num_warps=num_warps,
        )  # fmt: skip
        ctx.save_for_backward(x, y, stats, keys)
        loss = torch.empty((), dtype=out_dtype, device=x.device)
        _diversity_finish_kernel[(1,)](
            stats_ptr=stats, out_ptr=loss, B=batch, inv_count=1.0 / (batch * n),
            BLOCK_B=min(triton.next_power_of_2(batch), 1024), num_warps=4,
        )  # fmt: skip
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        x, y, stats, keys = ctx.saved_tensors
        batch, n = x.shape
        grad = torch.empty((batch, n), dtype=x.dtype, device=x.device)
        block, _, num_warps = _select_config(n)
        _diversity_backward_kernel[(triton.cdiv(n, block), batch)](
            x_ptr=x, y_ptr=y, stats_ptr=stats, keys_ptr=keys, grad_out_ptr=grad_out, grad_ptr=grad, N=n,
            inv_count=1.0 / (batch * n), sx_b=x.stride(0), sx_n=x.stride(1), sy_b=y.stride(0), sy_n=y.stride(1),
            EPS_=EPS, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        return grad, None, None


class _DiversityShiftFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = y.shape
        n = height * width
        a = torch.empty((batch, n), dtype=torch.float32, device=y.device)
        _channel_reduce(y, a, 1.0 / channels, square=True)
        shift = torch.empty_like(a)
        sign = torch.empty_like(a)
        nu = torch.empty((batch,), dtype=torch.float32, device=y.device)
        block, one_chunk, num_warps = _select_config(n)
        _shift_target_kernel[(batch,)](
            a_ptr=a, shift_ptr=shift, sign_ptr=sign, nu_ptr=nu, N=n, k=_rank(n), inv_c=1.0 / channels, BLOCK=block,
            ONE_CHUNK=one_chunk, num_warps=num_warps,
        )  # fmt: skip
        out = _channel_broadcast(torch.empty_like(y), shift.view(batch, 1, height, width), 1.0, base=y)
        ctx.save_for_backward(y, a, sign, nu)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, a, sign, nu = ctx.saved_tensors
        batch, channels, height, width = y.shape
        g_sum = torch.empty_like(a)
        _channel_reduce(grad_out, g_sum, 1.0, square=False)
        w = (1 + sign) * g_sum * ((nu > EPS).float() / channels)[:, None]
        coef = (2.0 / channels) * (a * w.sum(dim=1, keepdim=True) - w)
        grad = torch.empty_like(y)
        return _channel_broadcast(grad, coef.view(batch, 1, height, width), 1.0, x=y, base=grad_out)


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def diversity_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FFSD's diversity loss ``div(x, y) = mean((n(x) − ỹ)²)`` on two attention maps.

    Per sample (``N`` entries): ``ν = ‖y‖₂``, ``ŷ = y / max(ν, 1e-12)``, ``θ`` = the ``⌊N/3⌋``-th smallest entry of
    ``ŷ`` (the smallest when ``N < 3``), ``ỹ = ν/2 + (ν/2 − ŷ)·sign(ŷ − θ)``; the mean is over all ``B·N`` entries.

    Args:
        x: ``[B, 1, H, W]`` (or any ``[B, ...]``): the student's attention map; receives the gradient.
        y: the previous student's attention map, same shape. It receives no gradient: detach it (FFSD does).
            fp32/fp16/bf16 run the Triton kernels (``θ`` selected exactly on the fp32 ``ŷ``), fp64 the reference.

    Returns:
        A scalar, accumulated in fp32, in ``result_dtype(x)``.
    """
    if x.shape != y.shape or x.dim() < 1:
        raise ValueError(f"diversity_loss expects two maps of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    check_dtypes("diversity_loss", x=x, y=y)
    if not use_triton(x, y):
        return diversity_loss_reference(x, y)
    batch = x.shape[0]
    return _DiversityLossFunction.apply(x.reshape(batch, -1), y.detach().reshape(batch, -1), result_dtype(x))


def diversity_shift(y: torch.Tensor) -> torch.Tensor:
    """FFSD's ``shift(y)``: the diversity target for a feature map.

    ``a = A(y)`` (fp32), ``ν = ‖a‖₂``, ``â = n(a)``, ``θ`` = the ``⌊N/3⌋``-th smallest of ``â`` (``N = H·W``),
    ``t = ν/2 + (ν/2 − â)·sign(â − θ)``; returns ``y + (t − â)·ν / C``, the ``[B, 1, H, W]`` term broadcast over
    channels. Differentiable (``sign`` has zero derivative), though FFSD calls it on detached maps.

    Args:
        y: ``[B, C, H, W]``, NCHW, channels-last or strided views; fp32/fp16/bf16 (Triton) or fp64 (reference).

    Returns:
        ``[B, C, H, W]`` in ``y``'s dtype and memory format.
    """
    if y.dim() != 4:
        raise ValueError(f"diversity_shift expects [B, C, H, W], got shape {tuple(y.shape)}")
    check_dtypes("diversity_shift", y=y)
    if not use_triton(y):
        return diversity_shift_reference(y)
    return _DiversityShiftFunction.apply(y)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class DiversityLoss(nn.Module):
    """``nn.Module`` form of :func:`diversity_loss`."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return diversity_loss(x, y)


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def _reflected_target(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``y`` of shape ``[B, N]``: ``(ỹ, ŷ, ν)`` as in the module docstring."""
    norm = y.norm(dim=1, keepdim=True)
    unit = F.normalize(y, dim=1, eps=EPS)
    k = _rank(y.shape[1])
    threshold = unit.kthvalue(k, dim=1, keepdim=True).values
    target = norm / 2 + (norm / 2 - unit) * torch.sign(unit - threshold)
    return target, unit, norm


def diversity_loss_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean((n(x) − ỹ)²)`` over all ``B·N`` entries, ``ỹ`` the reflected target of ``y``.

    ``n(x)`` has unit norm while ``ỹ`` keeps the scale of ``ν``: this is the reference's formula.
    """
    check_dtypes("diversity_loss_reference", x=x, y=y)
    dtype, out_dtype = compute_dtype(x.dtype), result_dtype(x)
    x = x.to(dtype).reshape(x.shape[0], -1)
    y = y.to(dtype).reshape(y.shape[0], -1)
    target, _, _ = _reflected_target(y)
    return (F.normalize(x, dim=1, eps=EPS) - target).pow(2).mean().to(out_dtype)


def diversity_shift_reference(y: torch.Tensor) -> torch.Tensor:
    """``y + (t − â)·ν / C``: the feature map ``y`` moved so that its attention map points at the reflected target.

    ``a = A(y)``, ``â = n(a)``, ``ν = ‖a‖₂``, ``t`` = the reflected target of ``a``; the ``[B, 1, H, W]`` shift is
    broadcast over the ``C`` channels.
    """
    check_dtypes("diversity_shift_reference", y=y)
    batch, channels = y.shape[:2]
    a = _attention_map_fp(y)
    target, unit, norm = _reflected_target(a.reshape(batch, -1))
    shift = ((target - unit) * norm / channels).reshape(a.shape)
    return (y + shift).to(y.dtype)


def _attention_map_fp(y: torch.Tensor) -> torch.Tensor:
    """``A(y)`` in the compute dtype (fp32, or fp64 for fp64 inputs), as the reference shift uses it."""
    return y.to(compute_dtype(y.dtype)).pow(2).mean(dim=1, keepdim=True)
