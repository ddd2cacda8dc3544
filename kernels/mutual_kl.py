"""Deep mutual learning (Zhang et al., 2018): every one of ``M`` students distils from every other one.

Per row of ``[..., V]`` logits shared by the M students, ``p_i = softmax(z_i / T)`` and

    loss_i = T² / (M − 1) · Σ_{j≠i} KL(p_j ‖ p_i),   p_j detached (a stop-gradient),

with rows, ``labels`` / ``ignore_index`` and the reductions of ``_rows.py``. One program per row reads the M rows
together, chunk by chunk, with an online softmax per student and the cross sums

    W[j, i] = Σ_c exp(b_j,c − m_j) (b_j,c − b_i,c),   KL(p_j ‖ p_i) = W[j, i] / S_j − (lse_j − lse_i),

so one launch writes every student's loss rows (and their log-sum-exps for the backward pass). The gradient reaches
each ``z_i`` through its own loss only: ``∂loss_i/∂z_i = T / (M − 1) · (M p_i − Σ_j p_j)`` per row (``Σ_{j≠i}
(p_i − p_j) = M p_i − Σ_j p_j``), scaled by the upstream gradient and the normaliser read from device memory.
"""

import torch
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import compute_dtype, tl, triton
from ffsd_kernels._row_kernels import row_kept
from ffsd_kernels._rows import (
    RowOptions,
    StackedLogits,
    TemperatureLoss,
    check_reduction,
    check_temperature,
    flat_labels,
    launch_config,
    log_softmax_at,
    reduce_losses,
    reduce_rows_reference,
    stack_models,
    use_row_kernels,
)

# The M students' logits: one [M, ..., V] tensor or M [..., V] tensors.
StudentLogits = StackedLogits

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _mutual_kl_fwd_kernel(
    z_ptr,  # [M, N, C] logits of the M students
    y_ptr,  # [N] integer labels (read when HAS_LABELS)
    loss_ptr,  # [M, N] fp32 out: row n's loss_i, T² / (M − 1) · Σ_{j≠i} KL(p_j ‖ p_i); 0 on an ignored row
    lse_ptr,  # [M, N] fp32 out: lse(z_i / T)
    stride_zm,
    stride_zb,
    stride_zc,
    num_models,
    num_classes,
    inv_temperature,
    loss_scale,  # T² / (M − 1)
    ignore_index,
    HAS_LABELS: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _, kept = row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)
    models = tl.arange(0, M_PAD)
    model_mask = models < num_models
    z_rows = z_ptr + row * stride_zb + models.to(tl.int64)[:, None] * stride_zm  # [M_PAD, 1]

    m = tl.full([M_PAD], float("-inf"), dtype=tl.float32)
    d = tl.zeros([M_PAD], dtype=tl.float32)
    # w[j, i] = Σ_c exp(b_j,c − m_j) (b_j,c − b_i,c): teacher j on the rows, student i on the columns.
    w = tl.zeros([M_PAD, M_PAD], dtype=tl.float32)
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = (cols < num_classes) & kept
        cols = cols.to(tl.int64)
        # Padded models load 0 everywhere: finite statistics that are never stored.
        b = tl.load(z_rows + cols[None, :] * stride_zc, mask=model_mask[:, None] & col_mask[None, :], other=0.0)
        b = b.to(tl.float32) * inv_temperature  # [M_PAD, BLOCK_C]
        m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], b, float("-inf")), axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.where(col_mask[None, :], tl.exp(b - m_new[:, None]), 0.0)
        d = d * alpha + tl.sum(e, axis=1)
        w = w * alpha[:, None] + tl.sum(e[:, None, :] * (b[:, None, :] - b[None, :, :]), axis=2)
        m = m_new

    # kl[j, i] = KL(p_j ‖ p_i) = W[j, i] / S_j − (lse_j − lse_i), the lse difference taken as
    # (m_j − m_i) + log(S_j / S_i) for accuracy (see _kl_fwd_kernel). The diagonal is exactly 0, as w[i, i] is.
    kl = w / d[:, None] - ((m[:, None] - m[None, :]) + tl.log(d[:, None] / d[None, :]))
    kl = tl.where(model_mask[:, None] & model_mask[None, :], kl, 0.0)
    loss = tl.where(kept, tl.sum(kl, axis=0) * loss_scale, 0.0)  # [M_PAD], indexed by the student i
    out = models.to(tl.int64) * tl.num_programs(0) + row
    tl.store(loss_ptr + out, loss, mask=model_mask)
    tl.store(lse_ptr + out, m + tl.log(d), mask=model_mask)


@triton.jit
def _mutual_kl_bwd_kernel(
    z_ptr,  # [M, N, C] logits of the M students
    y_ptr,  # [N] integer labels (read when HAS_LABELS)
    lse_ptr,  # [M, N] fp32: lse(z_i / T)
    grad_ptr,  # [M] or [M, N] upstream gradients of the M losses
    norm_ptr,  # [1] fp32: 1 / max(#kept rows, 1) (read when HAS_NORM)
    dz_ptr,  # [M, N, C] out: gradient of every student's logits
    stride_zm,
    stride_zb,
    stride_zc,
    stride_gm,
    stride_gn,  # 0 for one upstream gradient per model
    stride_dzm,
    stride_dzb,
    stride_dzc,
    num_models,
    num_classes,
    inv_temperature,
    ignore_index,
    grad_scale,  # T / (M − 1), times 1/N for an unlabelled batchmean
    HAS_LABELS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _, kept = row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)
    models = tl.arange(0, M_PAD)
    model_mask = models < num_models
    models = models.to(tl.int64)
    z_rows = z_ptr + row * stride_zb + models[:, None] * stride_zm  # [M_PAD, 1]
    dz_rows = dz_ptr + row * stride_dzb + models[:, None] * stride_dzm  # [M_PAD, 1]
    norm = 1.0
    if HAS_NORM:
        norm = tl.load(norm_ptr)
    g = tl.load(grad_ptr + models * stride_gm + row * stride_gn, mask=model_mask, other=0.0).to(tl.float32)
    g = g * (grad_scale * norm)
    lse = tl.load(lse_ptr + models * tl.num_programs(0) + row, mask=model_mask, other=0.0)
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        store_mask = model_mask[:, None] & (cols < num_classes)[None, :]
        mask = store_mask & kept
        cols = cols.to(tl.int64)
        b = tl.load(z_rows + cols[None, :] * stride_zc, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        p = tl.where(mask, tl.exp(b - lse[:, None]), 0.0)  # [M_PAD, BLOCK_C]
        # ∂loss_i/∂z_i = T / (M − 1) · (M p_i − Σ_j p_j), per row
        dz = g[:, None] * (num_models * p - tl.sum(p, axis=0)[None, :])
        tl.store(dz_rows + cols[None, :] * stride_dzc, dz.to(dz_ptr.dtype.element_ty), mask=store_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

# One program per row, ``(N,)``; ``_rows.launch_config`` with ``tile_rows = M_PAD²`` (forward) or ``M_PAD``
# (backward), since the kernels hold the M students' chunks together.

# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _mutual_forward(
    logits: torch.Tensor, labels: torch.Tensor | None, options: RowOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [M, N], lse [M, N])``, fp32: each row's ``loss_i`` and the log-sum-exps of ``z_i / T``."""
    num_models, num_rows, num_classes = logits.shape
    temperature = options.temperature
    m_pad = triton.next_power_of_2(num_models)
    block_c, num_warps = launch_config(num_classes, tile_rows=m_pad * m_pad)
    stats = torch.empty(2, num_models, num_rows, device=logits.device, dtype=torch.float32)
    rows, lse = stats[0], stats[1]
    _mutual_kl_fwd_kernel[(num_rows,)](
        z_ptr=logits, y_ptr=labels if labels is not None else lse, loss_ptr=rows, lse_ptr=lse,
        stride_zm=logits.stride(0), stride_zb=logits.stride(1), stride_zc=logits.stride(2), num_models=num_models,
        num_classes=num_classes, inv_temperature=1.0 / temperature,
        loss_scale=temperature * temperature / (num_models - 1), ignore_index=options.ignore_index,
        HAS_LABELS=labels is not None, M_PAD=m_pad, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return rows, lse


def _mutual_backward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    lse: torch.Tensor,
    norm: torch.Tensor | None,
    grad: torch.Tensor,
    options: RowOptions,
) -> torch.Tensor:
    """``∂/∂logits`` for an upstream gradient ``grad`` of shape ``[M]`` or ``[M, N]``."""
    num_models, num_rows, num_classes = logits.shape
    m_pad = triton.next_power_of_2(num_models)
    block_c, num_warps = launch_config(num_classes, tile_rows=m_pad)
    dz = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    _mutual_kl_bwd_kernel[(num_rows,)](
        z_ptr=logits, y_ptr=labels if labels is not None else lse, lse_ptr=lse, grad_ptr=grad,
        norm_ptr=norm if norm is not None else lse, dz_ptr=dz, stride_zm=logits.stride(0), stride_zb=logits.stride(1),
        stride_zc=logits.stride(2), stride_gm=grad.stride(0), stride_gn=grad.stride(1) if grad.dim() == 2 else 0,
        stride_dzm=dz.stride(0), stride_dzb=dz.stride(1), stride_dzc=dz.stride(2), num_models=num_models,
        num_classes=num_classes, inv_temperature=1.0 / options.temperature, ignore_index=options.ignore_index,
        grad_scale=options.temperature / (num_models - 1) * options.host_scale, HAS_LABELS=labels is not None,
        HAS_NORM=norm is not None, M_PAD=m_pad, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return dz


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _MutualKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor | None, options: RowOptions) -> torch.Tensor:
        rows, lse = _mutual_forward(logits, labels, options)
        out, norm = reduce_losses(rows, labels, options)
        ctx.save_for_backward(logits, labels, lse, norm)
        ctx.options = options
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        logits, labels, lse, norm = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _mutual_backward(logits, labels, lse, norm, grad, ctx.options), None, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def mutual_kl_loss(
    logits: StudentLogits,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Deep mutual learning: ``loss_i = 1/(M−1) · Σ_{j≠i} KL_T(z_i ‖ sg(z_j))`` for each of M students.

    Every student distils from every other one's detached logits (``sg`` = stop-gradient), with ``KL_T`` as in
    :func:`ffsd_kernels.kl_div_loss`; one kernel launch computes all M losses' rows. The gradient reaches each
    ``z_i`` through its own loss only: per row, ``∂loss_i/∂z_i = T/(M−1) · (M p_i − Σ_j p_j)`` (before the
    reduction).

    Args:
        logits: ``[M, ..., V]`` or a sequence of M ``[..., V]`` tensors (stacked with ``torch.stack``, a copy),
            ``M ≥ 2``, fp32/fp16/bf16/fp64; any strides.
        temperature: ``T > 0``, a Python float.
        labels, ignore_index, reduction: as in :func:`ffsd_kernels.kl_div_loss`, for the rows ``[...]`` that all M
            share.

    Returns:
        ``[M]`` (``[M, ...]`` for ``none``), fp32 (fp64 for fp64); ``loss.sum()`` is the usual total.
    """
    op = "mutual_kl_loss"
    temperature = check_temperature(op, temperature)
    check_reduction(op, reduction)
    z = stack_models(op, logits, "logits")
    if z.shape[0] < 2:
        raise ValueError(f"{op} expects M >= 2 students, got {z.shape[0]}")
    per_model = logits.shape[1:] if isinstance(logits, torch.Tensor) else logits[0].shape
    flat = flat_labels(op, labels, per_model[:-1])
    if not use_row_kernels(flat, z):
        return mutual_kl_loss_reference(
            logits, temperature, labels=labels, ignore_index=ignore_index, reduction=reduction
        )
    options = RowOptions.of(temperature, reduction, ignore_index, flat, z.shape[1])
    loss = _MutualKLFunction.apply(z, flat, options)
    return loss.view(z.shape[0], *per_model[:-1]) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class MutualKLLoss(TemperatureLoss):
    """``nn.Module`` form of :func:`mutual_kl_loss`: ``MutualKLLoss(temperature=4)(logits)`` gives ``[M]``."""

    def forward(self, logits: StudentLogits, labels: torch.Tensor | None = None) -> torch.Tensor:
        return mutual_kl_loss(
            logits, self.temperature, labels=labels, ignore_index=self.ignore_index, reduction=self.reduction
        )


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def mutual_kl_loss_reference(
    logits: StudentLogits,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``loss_i = 1/(M−1) · Σ_{j≠i} KL_T(z_i ‖ sg(z_j))`` per row, ``sg`` being ``detach``, then reduced as in
    :func:`ffsd_kernels.kl_div_loss_reference`: ``[M]``, or ``[M, ...]`` for ``none``."""
    op = "mutual_kl_loss_reference"
    check_reduction(op, reduction)
    z = stack_models(op, logits, "logits")
    per_model = logits.shape[1:] if isinstance(logits, torch.Tensor) else logits[0].shape
    log_p = log_softmax_at(z, compute_dtype(z.dtype), temperature)
    log_q = log_p.detach()
    num_models = z.shape[0]
    rows = []
    for i in range(num_models):
        terms = [(log_q[j].exp() * (log_q[j] - log_p[i])).sum(dim=-1) for j in range(num_models) if j != i]
        rows.append(torch.stack(terms).sum(dim=0) * (temperature**2 / (num_models - 1)))
    out = reduce_rows_reference(torch.stack(rows), flat_labels(op, labels, per_model[:-1]), ignore_index, reduction)
    return out.view(num_models, *per_model[:-1]) if reduction == "none" else out
