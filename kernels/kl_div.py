"""KL divergences: the distillation loss of Hinton et al. and of every online-KD method, and ``torch.nn.functional.
kl_div`` itself.

Four forms, each a fused Triton forward kernel and a fused Triton backward kernel behind a functional API, an
``nn.Module`` and a plain PyTorch ``*_reference`` that defines it:

* :func:`kl_div` / :class:`KLDivLoss`: exactly ``F.kl_div`` / ``nn.KLDivLoss`` (log-probability input, a
  probability or log-probability target, every reduction of torch's), a drop-in;
* :func:`kl_div_loss` / :class:`DistillationKLLoss`: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` from raw logits; the
  teacher may be the mean of ``M`` teachers' logits (FFSD's fusion module distils from the mean of the students');
* :func:`cross_entropy_kl_loss`: the cross-entropy of the student and its ``KL_T`` in one pass over the logits;
* :func:`mutual_kl_loss`: deep mutual learning, every one of ``M`` students distilling from every other one.

Rows. The distillation forms take logits of any leading shape ``[..., V]`` (``[B, C]``, ``[B, T, V]``), flattened
to ``N`` rows by ``reshape`` (a view whenever the leading dimensions allow one). Each computes one fp32 value per row;
``labels=`` marks rows equal to ``ignore_index`` (padding) as left out, and ``reduction`` is ``batchmean`` (the mean
over the rows kept; the count is taken on the device), ``sum`` or ``none`` (per-row values), as ``_rows.py`` says.

Notation. ``C`` classes, ``T > 0`` the temperature, ``a = s / T``, ``b = t / T``, ``p = softmax(z / T)`` over the
classes, ``lse`` the log-sum-exp over the classes. Per row

    KL_row = Σ_c p_t,c (log p_t,c − log p_s,c) = Σ_c p_t,c (b_c − a_c) − lse(b) + lse(a),

and the loss of a row is ``T² · KL_row``.

Kernels. One program per row loops over the classes in chunks of ``BLOCK_C`` with an online softmax (running
maxima, sums rescaled by ``exp(m_old − m_new)`` when a maximum grows), so any ``C`` up to LLM vocabularies runs in
fixed memory and the forward pass reads every logit once:

    S_b = Σ_c exp(b_c − m_b),   W = Σ_c exp(b_c − m_b) (b_c − a_c),   Σ_c p_t,c (b_c − a_c) = W / S_b.

The forward pass saves only per-row fp32 statistics (log-sum-exps and ``KL_row``); a second launch reduces the
per-row values to the loss (``_rows.reduce_rows``). The backward pass reads the logits once more and writes the
gradients, scaled by the upstream gradient (a scalar, or one per row for ``none``) and the normaliser, both loaded
from device memory (no host synchronisation anywhere, so the ops can be captured in a CUDA graph). An ignored row's
logits are never read (its loads are masked) and its gradient is 0. Gradients, per row:

    ∂(T² KL_row)/∂s_c = T (p_s,c − p_t,c)
    ∂(T² KL_row)/∂t_c = T p_t,c (log p_t,c − log p_s,c − KL_row)
    ∂CE_row/∂s_c      = softmax(s)_c − [c = y]

(from ``∂p_k/∂b_c = p_k (δ_kc − p_c)`` and ``Σ_k p_k ∂log p_k/∂b_c = 0``). A mean teacher ``t̄ = (1/M) Σ_m t_m``
passes ``1/M`` of ``∂/∂t̄`` to each ``t_m``.

torch's ``kl_div(x, y)`` is elementwise, ``ℓ = y (log y − x)`` (``xlogy``: 0 where ``y = 0``) or, with
``log_target``, ``ℓ = e^y (y − x)``, then ``none`` / ``sum`` / ``mean`` (over every element) / ``batchmean`` (the
sum over ``x.size(0)``). Its gradients: ``∂ℓ/∂x = −y`` (``−e^y``) and ``∂ℓ/∂y = log y + 1 − x`` (NaN where ``y = 0``,
as torch's autograd of ``xlogy`` gives) or ``e^y (y − x + 1)``. Its kernels go over rows of the last dimension.
"""

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, result_dtype, tl, triton, use_triton
from ffsd_kernels._rows import (
    check_label_range,
    check_reduction,
    flat_labels,
    reduce_rows,
    reduce_rows_reference,
)

TeacherLogits = torch.Tensor | Sequence[torch.Tensor]
TORCH_REDUCTIONS = ("none", "mean", "sum", "batchmean")
# torch's own warning for reduction="mean" (F.kl_div), so that the drop-in warns where torch does.
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_chunk(
    s_row,
    t_row,
    cols,
    mask,
    stride_sc,
    stride_tm,
    stride_tc,
    num_teachers,
    inv_temperature,
    teacher_scale,
    BLOCK_C: tl.constexpr,
):
    """One chunk of a row in fp32: the student logits ``s``, ``a = s / T`` and ``b = t̄ / T`` (``t̄`` the mean of the
    ``num_teachers`` teachers' logits; ``teacher_scale = 1 / (T·M)``). Masked lanes are 0 and read nothing."""
    s = tl.load(s_row + cols * stride_sc, mask=mask, other=0.0).to(tl.float32)
    t = tl.zeros([BLOCK_C], dtype=tl.float32)
    t_m = t_row
    for _ in range(0, num_teachers):
        t += tl.load(t_m + cols * stride_tc, mask=mask, other=0.0).to(tl.float32)
        t_m += stride_tm
    return s, s * inv_temperature, t * teacher_scale


@triton.jit
def _row_kept(y_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    """``(label, kept)`` of a row: kept unless its label is ``ignore_index`` (always kept without labels)."""
    if HAS_LABELS:
        y = tl.load(y_ptr + row).to(tl.int64)
        return y, y != ignore_index
    return row, row >= 0


@triton.jit
def _kl_fwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [M, N, C] teacher logits; the teacher is their mean over M
    y_ptr,  # [N] integer labels (read when HAS_LABELS)
    kl_ptr,  # [N] fp32 out: T² KL_row, 0 on an ignored row
    ce_ptr,  # [N] fp32 out: cross-entropy of s at temperature 1, 0 on an ignored row (when HAS_CE)
    lse_s_ptr,  # [N] fp32 out: lse(s / T)
    lse_t_ptr,  # [N] fp32 out: lse(t̄ / T)
    x_ptr,  # [N] fp32 out: X_row = Σ_c p_t,c (b_c − a_c) = KL_row + lse(b) − lse(a)
    lse_ce_ptr,  # [N] fp32 out: lse(s) (when HAS_CE)
    stride_sb,
    stride_sc,
    stride_tm,
    stride_tb,
    stride_tc,
    num_classes,
    num_teachers,
    inv_temperature,
    loss_scale,  # T²
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    t_row = t_ptr + row * stride_tb
    teacher_scale = inv_temperature / num_teachers
    y, kept = _row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)

    # Running maxima and rescaled sums of the online softmaxes: a = s / T, b = t̄ / T, z = s (for the CE).
    m_a = float("-inf")
    d_a = 0.0
    m_b = float("-inf")
    d_b = 0.0
    w = 0.0  # Σ exp(b − m_b) (b − a)
    m_z = float("-inf")
    d_z = 0.0
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = (cols < num_classes) & kept  # an ignored row reads nothing
        cols = cols.to(tl.int64)
        # Masked lanes load 0 (finite, so no (−inf) − (−inf)); they are kept out of maxima and sums by tl.where.
        s, a, b = _load_chunk(
            s_row,
            t_row,
            cols,
            mask,
            stride_sc,
            stride_tm,
            stride_tc,
            num_teachers,
            inv_temperature,
            teacher_scale,
            BLOCK_C=BLOCK_C,
        )

        m_a_new = tl.maximum(m_a, tl.max(tl.where(mask, a, float("-inf")), axis=0))
        d_a = d_a * tl.exp(m_a - m_a_new) + tl.sum(tl.where(mask, tl.exp(a - m_a_new), 0.0), axis=0)
        m_a = m_a_new

        m_b_new = tl.maximum(m_b, tl.max(tl.where(mask, b, float("-inf")), axis=0))
        alpha = tl.exp(m_b - m_b_new)
        e_b = tl.where(mask, tl.exp(b - m_b_new), 0.0)
        d_b = d_b * alpha + tl.sum(e_b, axis=0)
        w = w * alpha + tl.sum(e_b * (b - a), axis=0)
        m_b = m_b_new

        if HAS_CE:
            m_z_new = tl.maximum(m_z, tl.max(tl.where(mask, s, float("-inf")), axis=0))
            d_z = d_z * tl.exp(m_z - m_z_new) + tl.sum(tl.where(mask, tl.exp(s - m_z_new), 0.0), axis=0)
            m_z = m_z_new

    # KL_row = X_row − (lse(b) − lse(a)), the lse difference taken as (m_b − m_a) + log(S_b / S_a): each lse is
    # O(log C) and their fp32 rounding (an ulp of ~10 is 1e-6) would swamp a small KL. An ignored row's statistics
    # are NaN (nothing was read); only its zeros are used.
    x_row = w / d_b
    tl.store(kl_ptr + row, tl.where(kept, (x_row - ((m_b - m_a) + tl.log(d_b / d_a))) * loss_scale, 0.0))
    tl.store(lse_s_ptr + row, m_a + tl.log(d_a))
    tl.store(lse_t_ptr + row, m_b + tl.log(d_b))
    tl.store(x_ptr + row, x_row)
    if HAS_CE:
        # An out-of-range label reads nothing and makes its row's loss NaN: the host checks CPU labels only, since on
        # CUDA that would be a sync (cross_entropy_kl_loss's docstring; the reference does the same).
        in_range = kept & (y >= 0) & (y < num_classes)
        s_y = tl.load(s_row + y * stride_sc, mask=in_range, other=float("nan")).to(tl.float32)
        lse_z = m_z + tl.log(d_z)
        tl.store(ce_ptr + row, tl.where(kept, lse_z - s_y, 0.0))
        tl.store(lse_ce_ptr + row, lse_z)


@triton.jit
def _kl_bwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [M, N, C] teacher logits
    y_ptr,  # [N] integer labels (read when HAS_LABELS)
    lse_s_ptr,  # [N] fp32: lse(s / T)
    lse_t_ptr,  # [N] fp32: lse(t̄ / T)
    x_ptr,  # [N] fp32: X_row = KL_row + lse(b) − lse(a)
    lse_ce_ptr,  # [N] fp32: lse(s) (read when HAS_CE)
    grad_kl_ptr,  # [] or [N] upstream gradient of the KL loss
    grad_ce_ptr,  # [] or [N] upstream gradient of the CE loss (read when HAS_CE)
    norm_ptr,  # [1] fp32: 1 / max(#kept rows, 1) (read when HAS_NORM)
    ds_ptr,  # [N, C] out: gradient of the student (written when STUDENT_GRAD)
    dt_ptr,  # [M, N, C] out: gradient of every teacher (written when TEACHER_GRAD)
    stride_sb,
    stride_sc,
    stride_tm,
    stride_tb,
    stride_tc,
    stride_gkl,  # 0 for a scalar upstream gradient
    stride_gce,
    stride_dsb,
    stride_dsc,
    stride_dtm,
    stride_dtb,
    stride_dtc,
    num_classes,
    num_teachers,
    inv_temperature,
    ignore_index,
    kl_scale,  # T, times 1/N for an unlabelled batchmean
    ce_scale,  # 1, or 1/N for an unlabelled batchmean
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    t_row = t_ptr + row * stride_tb
    teacher_scale = inv_temperature / num_teachers
    y, kept = _row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)
    norm = 1.0
    if HAS_NORM:
        norm = tl.load(norm_ptr)
    g_kl = tl.load(grad_kl_ptr + row * stride_gkl).to(tl.float32) * kl_scale * norm
    lse_a = tl.load(lse_s_ptr + row)
    lse_b = tl.load(lse_t_ptr + row)
    x_row = tl.load(x_ptr + row)
    if HAS_CE:
        g_ce = tl.load(grad_ce_ptr + row * stride_gce).to(tl.float32) * ce_scale * norm
        lse_z = tl.load(lse_ce_ptr + row)
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        in_row = cols < num_classes
        mask = in_row & kept
        cols = cols.to(tl.int64)
        s, a, b = _load_chunk(
            s_row,
            t_row,
            cols,
            mask,
            stride_sc,
            stride_tm,
            stride_tc,
            num_teachers,
            inv_temperature,
            teacher_scale,
            BLOCK_C=BLOCK_C,
        )
        p_t = tl.exp(b - lse_b)
        if STUDENT_GRAD:
            ds = g_kl * (tl.exp(a - lse_a) - p_t)
            if HAS_CE:
                ds += g_ce * (tl.exp(s - lse_z) - tl.where(cols == y, 1.0, 0.0))
            # An ignored row's statistics are NaN: tl.where writes its zeros.
            ds = tl.where(kept, ds, 0.0)
            tl.store(ds_ptr + row * stride_dsb + cols * stride_dsc, ds.to(ds_ptr.dtype.element_ty), mask=in_row)
        if TEACHER_GRAD:
            # log p_t − log p_s − KL_row = (b − a) − X_row: no lse in it, so no O(log C) rounding either.
            dt = tl.where(kept, (g_kl / num_teachers) * p_t * ((b - a) - x_row), 0.0)
            dt = dt.to(dt_ptr.dtype.element_ty)
            dt_m = dt_ptr + row * stride_dtb + cols * stride_dtc
            for _ in range(0, num_teachers):
                tl.store(dt_m, dt, mask=in_row)
                dt_m += stride_dtm


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
    _, kept = _row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)
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
    _, kept = _row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)
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


@triton.jit
def _torch_kl_fwd_kernel(
    x_ptr,  # [R, C] input: log-probabilities
    y_ptr,  # [R, C] target: probabilities, or log-probabilities when LOG_TARGET
    out_ptr,  # [R, C] elementwise loss (REDUCE False), or [R] fp32 row sums (REDUCE True)
    stride_xr,
    stride_xc,
    stride_yr,
    stride_yc,
    stride_or,
    stride_oc,
    num_cols,
    LOG_TARGET: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, num_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < num_cols
        cols = cols.to(tl.int64)
        x = tl.load(x_ptr + row * stride_xr + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * stride_yr + cols * stride_yc, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            loss = tl.exp(y) * (y - x)
        else:
            # torch's xlogy(y, y) − y·x: 0·log 0 is 0, and 0·(−inf) stays NaN as in torch.
            loss = tl.where(y == 0.0, 0.0, y * tl.log(y)) - y * x
        if REDUCE:
            acc += tl.where(mask, loss, 0.0)
        else:
            tl.store(out_ptr + row * stride_or + cols * stride_oc, loss.to(out_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _torch_kl_bwd_kernel(
    x_ptr,  # [R, C] input
    y_ptr,  # [R, C] target
    g_ptr,  # [R, C] upstream gradient (strides 0 for a scalar one)
    dx_ptr,  # [R, C] out: gradient of the input (when INPUT_GRAD)
    dy_ptr,  # [R, C] out: gradient of the target (when TARGET_GRAD)
    stride_xr,
    stride_xc,
    stride_yr,
    stride_yc,
    stride_gr,
    stride_gc,
    stride_dxr,
    stride_dxc,
    stride_dyr,
    stride_dyc,
    num_cols,
    scale,  # 1, 1/numel (mean) or 1/size(0) (batchmean)
    LOG_TARGET: tl.constexpr,
    INPUT_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    for c0 in range(0, num_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < num_cols
        cols = cols.to(tl.int64)
        x = tl.load(x_ptr + row * stride_xr + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * stride_yr + cols * stride_yc, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_gr + cols * stride_gc, mask=mask, other=0.0).to(tl.float32) * scale
        p = tl.exp(y) if LOG_TARGET else y
        if INPUT_GRAD:
            dx = -g * p
            tl.store(dx_ptr + row * stride_dxr + cols * stride_dxc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if TARGET_GRAD:
            if LOG_TARGET:
                dy = g * p * (y - x + 1.0)
            else:
                # NaN where y = 0, as torch's autograd of xlogy(y, y) gives (its ∂/∂other is y / y).
                dy = g * tl.where(y == 0.0, float("nan"), tl.log(y) + 1.0 - x)
            tl.store(dy_ptr + row * stride_dyr + cols * stride_dyc, dy.to(dy_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def _launch_config(num_classes: int, tile_rows: int = 1) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` for a kernel that holds ``tile_rows`` rows of ``BLOCK_C`` classes per chunk.

    The grid is one program per row, ``(N,)``. A chunk holds at most 2048 elements (``tile_rows · BLOCK_C``; small
    ``C`` takes one chunk, the next power of two), spread over up to 8 warps: 8 classes per thread, one or two
    16-byte vector loads per tensor. ptxas (sm_90) then gives at most ~80 registers and no spills for every kernel,
    fp32 or bf16, so several programs share an SM; 4096 bf16 classes per chunk at 8 warps needed ~150–190 registers
    in the same check, one program per SM. The mutual kernels hold ``M_PAD`` rows (``M_PAD²`` in the forward cross
    terms), so their chunk shrinks by ``tile_rows`` to keep the same footprint. The rule is the same for every dtype;
    it has not been tuned on a GPU yet.
    """
    block_c = min(triton.next_power_of_2(num_classes), max(2048 // tile_rows, 16))
    num_warps = max(1, min(8, block_c * tile_rows // 256))
    return block_c, num_warps


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


# Rows of the per-row fp32 statistics that the forward pass of kl_div_loss / cross_entropy_kl_loss saves.
_LSE_S, _LSE_T, _X, _LSE_CE = range(4)


def _batchmean_scale(reduction: str, labels: torch.Tensor | None, num_rows: int) -> float:
    """The host part of the normaliser: 1/N for a batchmean without labels (with labels the count is on the
    device), 1 otherwise."""
    return 1.0 / num_rows if reduction == "batchmean" and labels is None else 1.0


def _kl_forward(
    student: torch.Tensor,
    teachers: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    has_ce: bool,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [2, N], stats [4, N])``, fp32: per-row ``T² KL_row`` and ``CE_row`` (row 1 unwritten without CE), and
    lse(s/T), lse(t̄/T), X_row, lse(s), indexed by ``_LSE_S`` … ``_LSE_CE``."""
    num_rows, num_classes = student.shape
    block_c, num_warps = _launch_config(num_classes)
    rows = torch.empty(2, num_rows, device=student.device, dtype=torch.float32)
    stats = torch.empty(4, num_rows, device=student.device, dtype=torch.float32)
    _kl_fwd_kernel[(num_rows,)](
        s_ptr=student,
        t_ptr=teachers,
        y_ptr=labels if labels is not None else stats,
        kl_ptr=rows[0],
        ce_ptr=rows[1],
        lse_s_ptr=stats[_LSE_S],
        lse_t_ptr=stats[_LSE_T],
        x_ptr=stats[_X],
        lse_ce_ptr=stats[_LSE_CE],
        stride_sb=student.stride(0),
        stride_sc=student.stride(1),
        stride_tm=teachers.stride(0),
        stride_tb=teachers.stride(1),
        stride_tc=teachers.stride(2),
        num_classes=num_classes,
        num_teachers=teachers.shape[0],
        inv_temperature=1.0 / temperature,
        loss_scale=temperature * temperature,
        ignore_index=ignore_index,
        HAS_LABELS=labels is not None,
        HAS_CE=has_ce,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return rows, stats


def _kl_backward(
    student: torch.Tensor,
    teachers: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    norm: torch.Tensor | None,
    grad_kl: torch.Tensor,
    grad_ce: torch.Tensor | None,
    temperature: float,
    host_scale: float,
    ignore_index: int,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂student, ∂/∂teachers)``, each None unless asked for, in the inputs' dtypes. ``grad_kl`` / ``grad_ce``
    are ``[]`` or ``[N]``; ``norm`` is the device normaliser of a labelled batchmean, else None."""
    if not (student_grad or teacher_grad):
        return None, None
    num_rows, num_classes = student.shape
    has_ce = grad_ce is not None
    ds = torch.empty(student.shape, device=student.device, dtype=student.dtype) if student_grad else None
    dt = torch.empty(teachers.shape, device=teachers.device, dtype=teachers.dtype) if teacher_grad else None
    ds_arg = ds if ds is not None else student  # placeholders, never written
    dt_arg = dt if dt is not None else teachers
    grad_ce_arg = grad_ce if has_ce else grad_kl
    block_c, num_warps = _launch_config(num_classes)
    _kl_bwd_kernel[(num_rows,)](
        s_ptr=student,
        t_ptr=teachers,
        y_ptr=labels if labels is not None else stats,
        lse_s_ptr=stats[_LSE_S],
        lse_t_ptr=stats[_LSE_T],
        x_ptr=stats[_X],
        lse_ce_ptr=stats[_LSE_CE],
        grad_kl_ptr=grad_kl,
        grad_ce_ptr=grad_ce_arg,
        norm_ptr=norm if norm is not None else stats,
        ds_ptr=ds_arg,
        dt_ptr=dt_arg,
        stride_sb=student.stride(0),
        stride_sc=student.stride(1),
        stride_tm=teachers.stride(0),
        stride_tb=teachers.stride(1),
        stride_tc=teachers.stride(2),
        stride_gkl=grad_kl.stride(0) if grad_kl.dim() else 0,
        stride_gce=grad_ce_arg.stride(0) if grad_ce_arg.dim() else 0,
        stride_dsb=ds_arg.stride(0),
        stride_dsc=ds_arg.stride(1),
        stride_dtm=dt_arg.stride(0),
        stride_dtb=dt_arg.stride(1),
        stride_dtc=dt_arg.stride(2),
        num_classes=num_classes,
        num_teachers=teachers.shape[0],
        inv_temperature=1.0 / temperature,
        ignore_index=ignore_index,
        kl_scale=temperature * host_scale,
        ce_scale=host_scale,
        HAS_LABELS=labels is not None,
        HAS_CE=has_ce,
        HAS_NORM=norm is not None,
        STUDENT_GRAD=student_grad,
        TEACHER_GRAD=teacher_grad,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return ds, dt


def _mutual_forward(
    logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [M, N], lse [M, N])``, fp32: each row's ``loss_i`` and the log-sum-exps of ``z_i / T``."""
    num_models, num_rows, num_classes = logits.shape
    m_pad = triton.next_power_of_2(num_models)
    block_c, num_warps = _launch_config(num_classes, tile_rows=m_pad * m_pad)
    stats = torch.empty(2, num_models, num_rows, device=logits.device, dtype=torch.float32)
    rows, lse = stats[0], stats[1]
    _mutual_kl_fwd_kernel[(num_rows,)](
        z_ptr=logits,
        y_ptr=labels if labels is not None else lse,
        loss_ptr=rows,
        lse_ptr=lse,
        stride_zm=logits.stride(0),
        stride_zb=logits.stride(1),
        stride_zc=logits.stride(2),
        num_models=num_models,
        num_classes=num_classes,
        inv_temperature=1.0 / temperature,
        loss_scale=temperature * temperature / (num_models - 1),
        ignore_index=ignore_index,
        HAS_LABELS=labels is not None,
        M_PAD=m_pad,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return rows, lse


def _mutual_backward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    lse: torch.Tensor,
    norm: torch.Tensor | None,
    grad: torch.Tensor,
    temperature: float,
    host_scale: float,
    ignore_index: int,
) -> torch.Tensor:
    """``∂/∂logits`` for an upstream gradient ``grad`` of shape ``[M]`` or ``[M, N]``."""
    num_models, num_rows, num_classes = logits.shape
    m_pad = triton.next_power_of_2(num_models)
    block_c, num_warps = _launch_config(num_classes, tile_rows=m_pad)
    dz = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    _mutual_kl_bwd_kernel[(num_rows,)](
        z_ptr=logits,
        y_ptr=labels if labels is not None else lse,
        lse_ptr=lse,
        grad_ptr=grad,
        norm_ptr=norm if norm is not None else lse,
        dz_ptr=dz,
        stride_zm=logits.stride(0),
        stride_zb=logits.stride(1),
        stride_zc=logits.stride(2),
        stride_gm=grad.stride(0),
        stride_gn=grad.stride(1) if grad.dim() == 2 else 0,
        stride_dzm=dz.stride(0),
        stride_dzb=dz.stride(1),
        stride_dzc=dz.stride(2),
        num_models=num_models,
        num_classes=num_classes,
        inv_temperature=1.0 / temperature,
        ignore_index=ignore_index,
        grad_scale=temperature / (num_models - 1) * host_scale,
        HAS_LABELS=labels is not None,
        HAS_NORM=norm is not None,
        M_PAD=m_pad,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return dz


def _torch_kl_forward(x: torch.Tensor, y: torch.Tensor, log_target: bool, reduce: bool, dtype: torch.dtype):
    """``[R, C]`` elementwise losses in ``dtype``, or ``[1, R]`` fp32 row sums when ``reduce``."""
    num_rows, num_cols = x.shape
    block_c, num_warps = _launch_config(num_cols)
    if reduce:
        out = torch.empty(1, num_rows, device=x.device, dtype=torch.float32)
        out_strides = (1, 0)
    else:
        out = torch.empty(x.shape, device=x.device, dtype=dtype)
        out_strides = out.stride()
    _torch_kl_fwd_kernel[(num_rows,)](
        x_ptr=x,
        y_ptr=y,
        out_ptr=out,
        stride_xr=x.stride(0),
        stride_xc=x.stride(1),
        stride_yr=y.stride(0),
        stride_yc=y.stride(1),
        stride_or=out_strides[0],
        stride_oc=out_strides[1],
        num_cols=num_cols,
        LOG_TARGET=log_target,
        REDUCE=reduce,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def _torch_kl_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    grad: torch.Tensor,
    scale: float,
    log_target: bool,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    num_rows, num_cols = x.shape
    block_c, num_warps = _launch_config(num_cols)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if input_grad else None
    dy = torch.empty(y.shape, device=y.device, dtype=y.dtype) if target_grad else None
    dx_arg, dy_arg = (dx if dx is not None else x), (dy if dy is not None else y)
    grad_strides = grad.stride() if grad.dim() == 2 else (0, 0)  # a scalar upstream gradient: read at one place
    _torch_kl_bwd_kernel[(num_rows,)](
        x_ptr=x,
        y_ptr=y,
        g_ptr=grad,
        dx_ptr=dx_arg,
        dy_ptr=dy_arg,
        stride_xr=x.stride(0),
        stride_xc=x.stride(1),
        stride_yr=y.stride(0),
        stride_yc=y.stride(1),
        stride_gr=grad_strides[0],
        stride_gc=grad_strides[1],
        stride_dxr=dx_arg.stride(0),
        stride_dxc=dx_arg.stride(1),
        stride_dyr=dy_arg.stride(0),
        stride_dyc=dy_arg.stride(1),
        num_cols=num_cols,
        scale=scale,
        LOG_TARGET=log_target,
        INPUT_GRAD=input_grad,
        TARGET_GRAD=target_grad,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return dx, dy


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


def _reduce(rows: torch.Tensor, labels: torch.Tensor | None, reduction: str, ignore_index: int):
    """``(loss, norm)``: the per-row values as they are for ``none``, else their ``[K]`` reduction (one launch), and
    the device normaliser that the backward pass reads (None unless a labelled batchmean)."""
    if reduction == "none":
        return rows, None
    count_labels = labels if reduction == "batchmean" else None
    out, norm = reduce_rows(rows, count_labels, ignore_index, _batchmean_scale(reduction, labels, rows.shape[1]))
    return out, (norm if count_labels is not None else None)


class _KLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teachers: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float,
        reduction: str,
        ignore_index: int,
    ) -> torch.Tensor:
        rows, stats = _kl_forward(student, teachers, labels, temperature, False, ignore_index)
        out, norm = _reduce(rows[:1], labels, reduction, ignore_index)
        ctx.save_for_backward(student, teachers, labels, stats, norm)
        ctx.options = (temperature, _batchmean_scale(reduction, labels, student.shape[0]), ignore_index)
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: torch.Tensor) -> tuple:
        student, teachers, labels, stats, norm = ctx.saved_tensors
        temperature, host_scale, ignore_index = ctx.options
        ds, dt = _kl_backward(
            student,
            teachers,
            labels,
            stats,
            norm,
            grad_kl,
            None,
            temperature,
            host_scale,
            ignore_index,
            *ctx.needs_input_grad[:2],
        )
        return ds, dt, None, None, None, None


class _CrossEntropyKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teachers: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        reduction: str,
        ignore_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, stats = _kl_forward(student, teachers, labels, temperature, True, ignore_index)
        out, norm = _reduce(rows, labels, reduction, ignore_index)
        ctx.save_for_backward(student, teachers, labels, stats, norm)
        ctx.options = (temperature, _batchmean_scale(reduction, labels, student.shape[0]), ignore_index)
        return out[1], out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: torch.Tensor, grad_kl: torch.Tensor) -> tuple:
        student, teachers, labels, stats, norm = ctx.saved_tensors
        temperature, host_scale, ignore_index = ctx.options
        ds, dt = _kl_backward(
            student,
            teachers,
            labels,
            stats,
            norm,
            grad_kl,
            grad_ce,
            temperature,
            host_scale,
            ignore_index,
            *ctx.needs_input_grad[:2],
        )
        return ds, dt, None, None, None, None


class _MutualKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float,
        reduction: str,
        ignore_index: int,
    ) -> torch.Tensor:
        rows, lse = _mutual_forward(logits, labels, temperature, ignore_index)
        out, norm = _reduce(rows, labels, reduction, ignore_index)
        ctx.save_for_backward(logits, labels, lse, norm)
        ctx.options = (temperature, _batchmean_scale(reduction, labels, logits.shape[1]), ignore_index)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        logits, labels, lse, norm = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        temperature, host_scale, ignore_index = ctx.options
        dz = _mutual_backward(logits, labels, lse, norm, grad, temperature, host_scale, ignore_index)
        return dz, None, None, None, None


class _TorchKLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, y: torch.Tensor, scale: float | None, log_target: bool, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``scale`` None: the elementwise losses (``none``); else the factor of the sum (1, 1/numel, 1/size(0))."""
        ctx.save_for_backward(x, y)
        ctx.log_target, ctx.scale = log_target, 1.0 if scale is None else scale
        if scale is None:
            return _torch_kl_forward(x, y, log_target, False, out_dtype)
        rows = _torch_kl_forward(x, y, log_target, True, out_dtype)
        out, _ = reduce_rows(rows, None, 0, scale, out_dtype)
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, y = ctx.saved_tensors
        dx, dy = _torch_kl_backward(x, y, grad, ctx.scale, ctx.log_target, *ctx.needs_input_grad[:2])
        return dx, dy, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _check_temperature(op: str, temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"{op} expects a temperature > 0, got {temperature}")
    return temperature


def _check_logits(op: str, logits: torch.Tensor, what: str) -> None:
    """TypeError on a dtype other than fp32/fp16/bf16/fp64, ValueError unless ``[..., V]`` with a leading dim."""
    check_dtypes(op, **{what: logits})
    if logits.dim() < 2:
        raise ValueError(f"{op} expects {what} of shape [..., V] (at least 2-D), got {tuple(logits.shape)}")


def _stack_models(op: str, logits: TeacherLogits, what: str) -> torch.Tensor:
    """``[M, N, V]`` from an ``[M, ..., V]`` tensor (a view where ``reshape`` allows) or a sequence of M ``[..., V]``
    tensors of one shape (``torch.stack``, a copy); ValueError on bad shapes, TypeError on bad dtypes."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() < 3:
            shape = tuple(logits.shape)
            raise ValueError(f"{op} expects {what} as one [M, ..., V] tensor or M [..., V] tensors, got {shape}")
        check_dtypes(op, **{what: logits})
        return logits.reshape(logits.shape[0], -1, logits.shape[-1])
    logits = list(logits)
    if not logits or any(z.dim() < 2 or z.shape != logits[0].shape for z in logits):
        shapes = [tuple(z.shape) for z in logits]
        raise ValueError(f"{op} expects {what} as M [..., V] tensors of one shape, got {shapes}")
    # Each one before torch.stack, which would promote an integer tensor among float ones.
    check_dtypes(op, **{f"{what}[{i}]": z for i, z in enumerate(logits)})
    return torch.stack(logits).reshape(len(logits), -1, logits[0].shape[-1])


def _teacher_stack(op: str, student: torch.Tensor, teacher: TeacherLogits) -> torch.Tensor:
    """The teachers as ``[M, N, V]``: a teacher of the student's shape as ``[1, N, V]`` (a view), an ``[M, *shape]``
    tensor or a sequence of M such teachers as their stack; ValueError on bad shapes, TypeError on bad dtypes."""
    _check_logits(op, student, "student_logits")
    num_classes = student.shape[-1]
    if isinstance(teacher, torch.Tensor) and teacher.shape == student.shape:
        check_dtypes(op, teacher_logits=teacher)
        return teacher.reshape(1, -1, num_classes)
    if isinstance(teacher, torch.Tensor) and (teacher.dim() != student.dim() + 1 or teacher.shape[1:] != student.shape):
        raise ValueError(
            f"{op} expects teacher logits of the student's shape {tuple(student.shape)}, or M of them as [M, "
            f"{', '.join(map(str, student.shape))}], got {tuple(teacher.shape)}"
        )
    if not isinstance(teacher, torch.Tensor):
        teacher = list(teacher)
        if not teacher or any(t.shape != student.shape for t in teacher):
            raise ValueError(
                f"{op} expects M teacher logits of the student's shape {tuple(student.shape)}, got "
                f"{[tuple(t.shape) for t in teacher]}"
            )
    return _stack_models(op, teacher, "teacher_logits")


def _triton_ok(*tensors: torch.Tensor) -> bool:
    # Empty rows or classes run the reference (whose 0/0 gives PyTorch's answer); triton cannot launch a 0 grid.
    return use_triton(*tensors) and all(t.numel() > 0 for t in tensors)


def _labels_ok(labels: torch.Tensor | None, logits: torch.Tensor) -> bool:
    return labels is None or labels.device == logits.device


def kl_div(
    input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", log_target: bool = False
) -> torch.Tensor:
    """Exactly ``torch.nn.functional.kl_div(input, target, reduction=reduction, log_target=log_target)``.

    ``input`` holds log-probabilities, ``target`` probabilities (log-probabilities with ``log_target``); the
    elementwise loss is ``target · (log target − input)`` (0 where ``target`` is 0) or ``e^target · (target −
    input)``, broadcast as torch broadcasts. ``reduction``: ``none`` (that tensor, in the input's dtype), ``sum``,
    ``mean`` (over every element: not the KL; torch's warning is repeated) or ``batchmean`` (the sum over
    ``input.size(0)``: the KL). Gradients are torch's, NaN for a target of 0 included.

    fp32/fp16/bf16 tensors of one dtype on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) run a fused Triton
    forward (one pass over both tensors, fp32 accumulation, then one reduction launch) and backward (one pass, the
    upstream gradient read from device memory); anything else (float64, mixed dtypes, 0-d) runs ``F.kl_div``.
    Returns the input's dtype, or fp32 under autocast (whose policy runs ``kl_div`` in fp32).
    """
    check_reduction("kl_div", reduction, TORCH_REDUCTIONS)
    if not (_triton_ok(input, target) and input.dtype == target.dtype and input.dim() > 0 and target.dim() > 0):
        return kl_div_reference(input, target, reduction=reduction, log_target=log_target)
    if reduction == "mean":
        warnings.warn(MEAN_WARNING, stacklevel=2)
    x, y = torch.broadcast_tensors(input, target)
    scale = {"none": None, "sum": 1.0, "mean": 1.0 / x.numel(), "batchmean": 1.0 / input.shape[0]}[reduction]
    num_cols = x.shape[-1]
    out = _TorchKLDivFunction.apply(
        x.reshape(-1, num_cols), y.reshape(-1, num_cols), scale, log_target, result_dtype(input)
    )
    return out.view(x.shape) if reduction == "none" else out


def kl_div_loss(
    student_logits: torch.Tensor,
    teacher_logits: TeacherLogits,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Distillation loss ``T² · KL(p_t ‖ p_s)``, ``p = softmax(z / T)`` over the last dimension, from raw logits.

    Per row ``T² · Σ_c p_t,c (log p_t,c − log p_s,c)``, accumulated in fp32 (fp64 for fp64); ``batchmean`` is their
    mean over the rows kept (``T**2 * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1),
    reduction='batchmean')`` for ``[B, C]`` logits and no labels).

    Args:
        student_logits: ``[..., V]`` (``[B, C]``, ``[B, T, V]``), fp32/fp16/bf16/fp64; any strides. Receives the
            gradient.
        teacher_logits: the student's shape; or ``[M, ...]`` of them, or a sequence of M (stacked with
            ``torch.stack``, a copy), meaning the mean logits ``t = (1/M) Σ_m t_m`` (mean of logits, then softmax).
            Receives a gradient when it requires one (each of M teachers ``1/M`` of the gradient of the mean):
            detach it (as online KD does) to stop that.
        temperature: ``T > 0``, a Python float.
        labels: optional integers of the leading shape ``[...]``: rows labelled ``ignore_index`` leave the sum and
            the count, and get no gradient. Only compared with ``ignore_index`` here.
        ignore_index: the label of a row left out (padding), −100 as in ``F.cross_entropy``.
        reduction: ``batchmean`` (sum over the rows kept / their number, counted on the device; 0 if none is kept),
            ``sum``, or ``none`` (the per-row values, of the leading shape; 0 on ignored rows).

    Returns:
        fp32 (fp64 for fp64 inputs), for half inputs too: a scalar, or the leading shape for ``none``.

    fp32/fp16/bf16 tensors on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) run the fused Triton kernels, with
    no host synchronisation; anything else runs :func:`kl_div_loss_reference`.
    """
    op = "kl_div_loss"
    temperature = _check_temperature(op, temperature)
    check_reduction(op, reduction)
    teachers = _teacher_stack(op, student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    flat = flat_labels(op, labels, lead)
    if not (_triton_ok(student_logits, teachers) and _labels_ok(flat, student_logits)):
        return kl_div_loss_reference(
            student_logits, teacher_logits, temperature, labels=labels, ignore_index=ignore_index, reduction=reduction
        )
    student = student_logits.reshape(-1, student_logits.shape[-1])
    loss = _KLDivFunction.apply(student, teachers, flat, temperature, reduction, ignore_index)
    return loss.view(lead) if reduction == "none" else loss


def cross_entropy_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: TeacherLogits,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE, KL)`` of the student in one pass over its logits.

    ``CE`` per row is ``lse(s) − s_y`` (temperature 1, no label smoothing), reduced as the KL is: ``batchmean`` is
    ``F.cross_entropy(s, labels, ignore_index=ignore_index)`` (except that a batch with every row ignored gives 0,
    not NaN). ``KL`` is :func:`kl_div_loss` ``(student_logits, teacher_logits, temperature, labels=labels)``: the
    ignored rows leave both.

    Args:
        student_logits: ``[..., V]``, fp32/fp16/bf16/fp64; any strides. Receives both outputs' gradients, summed.
        teacher_logits: as in :func:`kl_div_loss`.
        labels: integers of the leading shape, in ``[0, V)`` or ``ignore_index``. Labels on the CPU are checked:
            ValueError. Labels on CUDA are not, since reading them would be a host sync: an out-of-range label makes
            its row's CE NaN instead, on the Triton path and the reference alike.
        temperature: ``T > 0``, a Python float, for the KL only.
        ignore_index, reduction: as in :func:`kl_div_loss`.

    Returns:
        ``(CE, KL)``, fp32 (fp64 for fp64 inputs): scalars, or the leading shape for ``none``.
    """
    op = "cross_entropy_kl_loss"
    temperature = _check_temperature(op, temperature)
    check_reduction(op, reduction)
    teachers = _teacher_stack(op, student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    flat = flat_labels(op, labels, lead)
    check_label_range(op, flat, student_logits.shape[-1], ignore_index)
    if not (_triton_ok(student_logits, teachers) and _labels_ok(flat, student_logits)):
        return cross_entropy_kl_loss_reference(
            student_logits, teacher_logits, labels, temperature, ignore_index=ignore_index, reduction=reduction
        )
    student = student_logits.reshape(-1, student_logits.shape[-1])
    ce, kl = _CrossEntropyKLFunction.apply(student, teachers, flat, temperature, reduction, ignore_index)
    return (ce.view(lead), kl.view(lead)) if reduction == "none" else (ce, kl)


def mutual_kl_loss(
    logits: TeacherLogits,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Deep mutual learning: ``loss_i = 1/(M−1) · Σ_{j≠i} KL_T(z_i ‖ sg(z_j))`` for each of M students.

    Every student distils from every other one's detached logits (``sg`` = stop-gradient), with ``KL_T`` as in
    :func:`kl_div_loss`; one kernel launch computes all M losses' rows. The gradient reaches each ``z_i`` through its
    own loss only: per row, ``∂loss_i/∂z_i = T/(M−1) · (M p_i − Σ_j p_j)`` (before the reduction).

    Args:
        logits: ``[M, ..., V]`` or a sequence of M ``[..., V]`` tensors (stacked with ``torch.stack``, a copy),
            ``M ≥ 2``, fp32/fp16/bf16/fp64; any strides.
        temperature: ``T > 0``, a Python float.
        labels, ignore_index, reduction: as in :func:`kl_div_loss`, for the rows ``[...]`` that all M share.

    Returns:
        ``[M]`` (``[M, ...]`` for ``none``), fp32 (fp64 for fp64); ``loss.sum()`` is the usual total.
    """
    op = "mutual_kl_loss"
    temperature = _check_temperature(op, temperature)
    check_reduction(op, reduction)
    z = _stack_models(op, logits, "logits")
    if z.shape[0] < 2:
        raise ValueError(f"{op} expects M >= 2 students, got {z.shape[0]}")
    per_model = logits.shape[1:] if isinstance(logits, torch.Tensor) else logits[0].shape
    flat = flat_labels(op, labels, per_model[:-1])
    if not (_triton_ok(z) and _labels_ok(flat, z)):
        return mutual_kl_loss_reference(
            logits, temperature, labels=labels, ignore_index=ignore_index, reduction=reduction
        )
    loss = _MutualKLFunction.apply(z, flat, temperature, reduction, ignore_index)
    return loss.view(z.shape[0], *per_model[:-1]) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class KLDivLoss(nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` on the fused kernels of :func:`kl_div`: the same constructor (``reduction``,
    ``log_target``, the legacy ``size_average`` / ``reduce``), the same call, ``(log-probabilities, target)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class _TemperatureLoss(nn.Module):
    """A distillation loss module holding its temperature ``T``, reduction and ``ignore_index``."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100) -> None:
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class DistillationKLLoss(_TemperatureLoss):
    """``nn.Module`` form of :func:`kl_div_loss` (raw logits, a temperature):
    ``DistillationKLLoss(temperature=4)(student_logits, teacher_logits, labels=None)``."""

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: TeacherLogits, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return kl_div_loss(
            student_logits,
            teacher_logits,
            self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


class CrossEntropyKLLoss(_TemperatureLoss):
    """``nn.Module`` form of :func:`cross_entropy_kl_loss`: ``ce, kl = CrossEntropyKLLoss(4)(s, t, labels)``."""

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: TeacherLogits, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_kl_loss(
            student_logits,
            teacher_logits,
            labels,
            self.temperature,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


class MutualKLLoss(_TemperatureLoss):
    """``nn.Module`` form of :func:`mutual_kl_loss`: ``MutualKLLoss(temperature=4)(logits)`` gives ``[M]``."""

    def forward(self, logits: TeacherLogits, labels: torch.Tensor | None = None) -> torch.Tensor:
        return mutual_kl_loss(
            logits, self.temperature, labels=labels, ignore_index=self.ignore_index, reduction=self.reduction
        )


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def kl_div_reference(
    input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", log_target: bool = False
) -> torch.Tensor:
    """``torch.nn.functional.kl_div`` itself: :func:`kl_div`'s definition."""
    return F.kl_div(input, target, reduction=reduction, log_target=log_target)


def _log_probs(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _kl_rows_reference(
    op: str, student_logits: torch.Tensor, teacher_logits: TeacherLogits, temperature: float
) -> torch.Tensor:
    """``[N]``: ``T² · Σ_c p_t (log p_t − log p_s)`` per row, in the accumulation dtype."""
    teachers = _teacher_stack(op, student_logits, teacher_logits)
    dtype = compute_dtype(student_logits.dtype)
    log_p_s = _log_probs(student_logits.reshape(-1, student_logits.shape[-1]), dtype, temperature)
    log_p_t = _log_probs(teachers.to(dtype).mean(dim=0), dtype, temperature)
    # xlogy-free form: p_t = exp(log p_t) is never 0 where it matters, since log_softmax is finite.
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * temperature**2


def kl_div_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: TeacherLogits,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``T² · Σ_c p_t · (log p_t − log p_s)`` per row of ``[..., V]``, ``p = softmax(z / T)`` over the last dim,
    then the rows labelled ``ignore_index`` zeroed and ``reduction`` applied (``_rows.reduce_rows_reference``). A
    stacked or listed teacher means their mean logits. fp32 for half inputs, fp64 for fp64."""
    op = "kl_div_loss_reference"
    check_reduction(op, reduction)
    rows = _kl_rows_reference(op, student_logits, teacher_logits, temperature)
    lead = student_logits.shape[:-1]
    out = reduce_rows_reference(rows, flat_labels(op, labels, lead), ignore_index, reduction)
    return out.view(lead) if reduction == "none" else out


def cross_entropy_kl_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: TeacherLogits,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE, kl_div_loss_reference(s, t, T, labels=labels))``, the CE rows ``F.cross_entropy(..., reduction=
    'none')`` reduced in the same way, accumulated in at least fp32.

    Labels as in :func:`cross_entropy_kl_loss`: CPU labels outside ``[0, V)`` (other than ``ignore_index``) raise
    ValueError; CUDA ones make their row's CE NaN, as the Triton kernel does (``F.cross_entropy`` would fail with a
    device-side assert, which ends the process's CUDA context).
    """
    op = "cross_entropy_kl_loss_reference"
    check_reduction(op, reduction)
    _check_logits(op, student_logits, "student_logits")
    lead, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
    flat = flat_labels(op, labels, lead)
    check_label_range(op, flat, num_classes, ignore_index)
    dtype = compute_dtype(student_logits.dtype)
    student = student_logits.reshape(-1, num_classes).to(dtype)
    ce_rows = F.cross_entropy(student, flat.clamp(0, num_classes - 1), reduction="none")
    in_range = (flat >= 0) & (flat < num_classes)
    ce_rows = torch.where(in_range, ce_rows, torch.nan)
    kl_rows = _kl_rows_reference(op, student_logits, teacher_logits, temperature)
    ce, kl = reduce_rows_reference(torch.stack([ce_rows, kl_rows]), flat, ignore_index, reduction)
    return (ce.view(lead), kl.view(lead)) if reduction == "none" else (ce, kl)


def mutual_kl_loss_reference(
    logits: TeacherLogits,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``loss_i = 1/(M−1) · Σ_{j≠i} KL_T(z_i ‖ sg(z_j))`` per row, ``sg`` being ``detach``, then reduced as in
    :func:`kl_div_loss_reference`: ``[M]``, or ``[M, ...]`` for ``none``."""
    op = "mutual_kl_loss_reference"
    check_reduction(op, reduction)
    z = _stack_models(op, logits, "logits")
    per_model = logits.shape[1:] if isinstance(logits, torch.Tensor) else logits[0].shape
    log_p = _log_probs(z, compute_dtype(z.dtype), temperature)
    log_q = log_p.detach()
    num_models = z.shape[0]
    rows = []
    for i in range(num_models):
        terms = [(log_q[j].exp() * (log_q[j] - log_p[i])).sum(dim=-1) for j in range(num_models) if j != i]
        rows.append(torch.stack(terms).sum(dim=0) * (temperature**2 / (num_models - 1)))
    out = reduce_rows_reference(torch.stack(rows), flat_labels(op, labels, per_model[:-1]), ignore_index, reduction)
    return out.view(num_models, *per_model[:-1]) if reduction == "none" else out
