"""Temperature-scaled KL divergence, the distillation loss of Hinton et al. and of every online-KD method.

Three forms, each a fused Triton forward kernel and a fused Triton backward kernel behind a functional API, an
``nn.Module`` and a plain PyTorch ``*_reference`` that defines it:

* :func:`kl_div_loss`: ``KL_T(s ‖ t)``; the teacher may be the mean of ``M`` teachers' logits (FFSD's fusion
  module distils from the mean of the students' logits);
* :func:`cross_entropy_kl_loss`: the cross-entropy of the student and its ``KL_T`` in one pass over the logits;
* :func:`mutual_kl_loss`: deep mutual learning, every one of ``M`` students distilling from every other one.

Notation. ``B`` rows, ``C`` classes, ``T > 0`` the temperature, ``a = s / T``, ``b = t / T``,
``p = softmax(z / T)`` over the classes, ``lse`` the log-sum-exp over the classes. Per row

    KL_row = Σ_c p_t,c (log p_t,c − log p_s,c) = Σ_c p_t,c (b_c − a_c) − lse(b) + lse(a),

and ``KL_T(s ‖ t) = T² · (1/B) · Σ_b KL_row``.

Kernels. One program per row loops over the classes in chunks of ``BLOCK_C`` with an online softmax (running
maxima, sums rescaled by ``exp(m_old − m_new)`` when a maximum grows), so any ``C`` up to LLM vocabularies runs in
fixed memory and the forward pass reads every logit once:

    S_b = Σ_c exp(b_c − m_b),   W = Σ_c exp(b_c − m_b) (b_c − a_c),   Σ_c p_t,c (b_c − a_c) = W / S_b.

The forward pass saves only per-row fp32 statistics (log-sum-exps and ``KL_row``); the backward pass reads the
logits once more and writes the gradients, scaled by the upstream gradient that it loads from device memory (no host
synchronisation anywhere, so the ops can be captured in a CUDA graph). Gradients, per row and before the ``1/B``:

    ∂(T² KL_row)/∂s_c = T (p_s,c − p_t,c)
    ∂(T² KL_row)/∂t_c = T p_t,c (log p_t,c − log p_s,c − KL_row)
    ∂CE_row/∂s_c      = softmax(s)_c − [c = y]

(from ``∂p_k/∂b_c = p_k (δ_kc − p_c)`` and ``Σ_k p_k ∂log p_k/∂b_c = 0``). A mean teacher ``t̄ = (1/M) Σ_m t_m``
passes ``1/M`` of ``∂/∂t̄`` to each ``t_m``.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, result_dtype, tl, triton, use_triton

TeacherLogits = torch.Tensor | Sequence[torch.Tensor]


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
    ``num_teachers`` teachers' logits; ``teacher_scale = 1 / (T·M)``). Masked lanes are 0."""
    s = tl.load(s_row + cols * stride_sc, mask=mask, other=0.0).to(tl.float32)
    t = tl.zeros([BLOCK_C], dtype=tl.float32)
    t_m = t_row
    for _ in range(0, num_teachers):
        t += tl.load(t_m + cols * stride_tc, mask=mask, other=0.0).to(tl.float32)
        t_m += stride_tm
    return s, s * inv_temperature, t * teacher_scale


@triton.jit
def _kl_fwd_kernel(
    s_ptr,  # [B, C] student logits
    t_ptr,  # [M, B, C] teacher logits; the teacher is their mean over M
    y_ptr,  # [B] integer labels (read when HAS_LABELS)
    kl_ptr,  # [B] fp32 out: KL_row, at temperature T, without T² and 1/B
    lse_s_ptr,  # [B] fp32 out: lse(s / T)
    lse_t_ptr,  # [B] fp32 out: lse(t̄ / T)
    x_ptr,  # [B] fp32 out: X_row = Σ_c p_t,c (b_c − a_c) = KL_row + lse(b) − lse(a)
    ce_ptr,  # [B] fp32 out: cross-entropy of s at temperature 1 (when HAS_LABELS)
    lse_ce_ptr,  # [B] fp32 out: lse(s) (when HAS_LABELS)
    stride_sb,
    stride_sc,
    stride_tm,
    stride_tb,
    stride_tc,
    num_classes,
    num_teachers,
    inv_temperature,
    HAS_LABELS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    t_row = t_ptr + row * stride_tb
    teacher_scale = inv_temperature / num_teachers

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
        mask = cols < num_classes
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

        if HAS_LABELS:
            m_z_new = tl.maximum(m_z, tl.max(tl.where(mask, s, float("-inf")), axis=0))
            d_z = d_z * tl.exp(m_z - m_z_new) + tl.sum(tl.where(mask, tl.exp(s - m_z_new), 0.0), axis=0)
            m_z = m_z_new

    # KL_row = X_row − (lse(b) − lse(a)), the lse difference taken as (m_b − m_a) + log(S_b / S_a): each lse is
    # O(log C) and their fp32 rounding (an ulp of ~10 is 1e-6) would swamp a small KL.
    x_row = w / d_b
    tl.store(kl_ptr + row, x_row - ((m_b - m_a) + tl.log(d_b / d_a)))
    tl.store(lse_s_ptr + row, m_a + tl.log(d_a))
    tl.store(lse_t_ptr + row, m_b + tl.log(d_b))
    tl.store(x_ptr + row, x_row)
    if HAS_LABELS:
        y = tl.load(y_ptr + row).to(tl.int64)
        # An out-of-range label reads nothing and makes its row's loss NaN: the host checks CPU labels only, since on
        # CUDA that would be a sync (cross_entropy_kl_loss's docstring; the reference does the same).
        s_y = tl.load(s_row + y * stride_sc, mask=(y >= 0) & (y < num_classes), other=float("nan")).to(tl.float32)
        lse_z = m_z + tl.log(d_z)
        tl.store(ce_ptr + row, lse_z - s_y)
        tl.store(lse_ce_ptr + row, lse_z)


@triton.jit
def _kl_bwd_kernel(
    s_ptr,  # [B, C] student logits
    t_ptr,  # [M, B, C] teacher logits
    y_ptr,  # [B] integer labels (read when HAS_LABELS)
    lse_s_ptr,  # [B] fp32: lse(s / T)
    lse_t_ptr,  # [B] fp32: lse(t̄ / T)
    x_ptr,  # [B] fp32: X_row = KL_row + lse(b) − lse(a)
    lse_ce_ptr,  # [B] fp32: lse(s) (read when HAS_LABELS)
    grad_kl_ptr,  # [] upstream gradient of the KL loss
    grad_ce_ptr,  # [] upstream gradient of the CE loss (read when HAS_LABELS)
    ds_ptr,  # [B, C] out: gradient of the student (written when STUDENT_GRAD)
    dt_ptr,  # [M, B, C] out: gradient of every teacher (written when TEACHER_GRAD)
    stride_sb,
    stride_sc,
    stride_tm,
    stride_tb,
    stride_tc,
    stride_dsb,
    stride_dsc,
    stride_dtm,
    stride_dtb,
    stride_dtc,
    num_classes,
    num_teachers,
    inv_temperature,
    kl_scale,  # T / B
    ce_scale,  # 1 / B
    HAS_LABELS: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    t_row = t_ptr + row * stride_tb
    teacher_scale = inv_temperature / num_teachers
    g_kl = tl.load(grad_kl_ptr).to(tl.float32) * kl_scale
    lse_a = tl.load(lse_s_ptr + row)
    lse_b = tl.load(lse_t_ptr + row)
    x_row = tl.load(x_ptr + row)
    if HAS_LABELS:
        g_ce = tl.load(grad_ce_ptr).to(tl.float32) * ce_scale
        lse_z = tl.load(lse_ce_ptr + row)
        y = tl.load(y_ptr + row).to(tl.int64)
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < num_classes
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
            if HAS_LABELS:
                ds += g_ce * (tl.exp(s - lse_z) - tl.where(cols == y, 1.0, 0.0))
            tl.store(ds_ptr + row * stride_dsb + cols * stride_dsc, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            # log p_t − log p_s − KL_row = (b − a) − X_row: no lse in it, so no O(log C) rounding either.
            dt = (g_kl / num_teachers) * p_t * ((b - a) - x_row)
            dt = dt.to(dt_ptr.dtype.element_ty)
            dt_m = dt_ptr + row * stride_dtb + cols * stride_dtc
            for _ in range(0, num_teachers):
                tl.store(dt_m, dt, mask=mask)
                dt_m += stride_dtm


@triton.jit
def _mutual_kl_fwd_kernel(
    z_ptr,  # [M, B, C] logits of the M students
    loss_ptr,  # [M, B] fp32 out: row b's share of loss_i, T² / (B (M − 1)) · Σ_{j≠i} KL(p_j ‖ p_i)
    lse_ptr,  # [M, B] fp32 out: lse(z_i / T)
    stride_zm,
    stride_zb,
    stride_zc,
    num_models,
    num_classes,
    inv_temperature,
    loss_scale,  # T² / (B (M − 1))
    M_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    models = tl.arange(0, M_PAD)
    model_mask = models < num_models
    z_rows = z_ptr + row * stride_zb + models.to(tl.int64)[:, None] * stride_zm  # [M_PAD, 1]

    m = tl.full([M_PAD], float("-inf"), dtype=tl.float32)
    d = tl.zeros([M_PAD], dtype=tl.float32)
    # w[j, i] = Σ_c exp(b_j,c − m_j) (b_j,c − b_i,c): teacher j on the rows, student i on the columns.
    w = tl.zeros([M_PAD, M_PAD], dtype=tl.float32)
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < num_classes
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
    loss = tl.sum(kl, axis=0) * loss_scale  # [M_PAD], indexed by the student i
    out = models.to(tl.int64) * tl.num_programs(0) + row
    tl.store(loss_ptr + out, loss, mask=model_mask)
    tl.store(lse_ptr + out, m + tl.log(d), mask=model_mask)


@triton.jit
def _mutual_kl_bwd_kernel(
    z_ptr,  # [M, B, C] logits of the M students
    lse_ptr,  # [M, B] fp32: lse(z_i / T)
    grad_ptr,  # [M] upstream gradients of the M losses
    dz_ptr,  # [M, B, C] out: gradient of every student's logits
    stride_zm,
    stride_zb,
    stride_zc,
    stride_g,
    stride_dzm,
    stride_dzb,
    stride_dzc,
    num_models,
    num_classes,
    inv_temperature,
    grad_scale,  # T / (B (M − 1))
    M_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    models = tl.arange(0, M_PAD)
    model_mask = models < num_models
    models = models.to(tl.int64)
    z_rows = z_ptr + row * stride_zb + models[:, None] * stride_zm  # [M_PAD, 1]
    dz_rows = dz_ptr + row * stride_dzb + models[:, None] * stride_dzm  # [M_PAD, 1]
    g = tl.load(grad_ptr + models * stride_g, mask=model_mask, other=0.0).to(tl.float32) * grad_scale
    lse = tl.load(lse_ptr + models * tl.num_programs(0) + row, mask=model_mask, other=0.0)
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = model_mask[:, None] & (cols < num_classes)[None, :]
        cols = cols.to(tl.int64)
        b = tl.load(z_rows + cols[None, :] * stride_zc, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        p = tl.where(mask, tl.exp(b - lse[:, None]), 0.0)  # [M_PAD, BLOCK_C]
        # ∂loss_i/∂z_i = T / (B (M − 1)) · (M p_i − Σ_j p_j)
        dz = g[:, None] * (num_models * p - tl.sum(p, axis=0)[None, :])
        tl.store(dz_rows + cols[None, :] * stride_dzc, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def _launch_config(num_classes: int, tile_rows: int = 1) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` for a kernel that holds ``tile_rows`` rows of ``BLOCK_C`` classes per chunk.

    The grid is one program per row of the batch, ``(B,)``. A chunk holds at most 2048 elements (``tile_rows ·
    BLOCK_C``; small ``C`` takes one chunk, the next power of two), spread over up to 8 warps: 8 classes per thread,
    one or two 16-byte vector loads per tensor. ptxas (sm_90) then gives at most ~80 registers and no spills for
    every kernel, fp32 or bf16, so several programs share an SM; 4096 bf16 classes per chunk at 8 warps needed
    ~150–190 registers in the same check, one program per SM. The mutual kernels hold ``M_PAD`` rows (``M_PAD²``
    in the forward cross terms), so their chunk shrinks by ``tile_rows`` to keep the same footprint. The rule is
    the same for every dtype; it has not been tuned on a GPU yet.
    """
    block_c = min(triton.next_power_of_2(num_classes), max(2048 // tile_rows, 16))
    num_warps = max(1, min(8, block_c * tile_rows // 256))
    return block_c, num_warps


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


# Rows of the per-row fp32 statistics that the forward pass of kl_div_loss / cross_entropy_kl_loss saves.
_KL, _LSE_S, _LSE_T, _X, _CE, _LSE_CE = range(6)


def _kl_forward(
    student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Per-row fp32 statistics ``[6, B]`` (``[4, B]`` without labels): KL_row, lse(s/T), lse(t̄/T), X_row, CE_row,
    lse(s), indexed by ``_KL`` … ``_LSE_CE``."""
    batch, num_classes = student.shape
    has_labels = labels is not None
    block_c, num_warps = _launch_config(num_classes)
    stats = torch.empty(6 if has_labels else 4, batch, device=student.device, dtype=torch.float32)
    ce_row, lse_ce = (stats[_CE], stats[_LSE_CE]) if has_labels else (stats[_KL], stats[_KL])  # placeholders
    _kl_fwd_kernel[(batch,)](
        student,
        teachers,
        labels if has_labels else stats,
        stats[_KL],
        stats[_LSE_S],
        stats[_LSE_T],
        stats[_X],
        ce_row,
        lse_ce,
        student.stride(0),
        student.stride(1),
        teachers.stride(0),
        teachers.stride(1),
        teachers.stride(2),
        num_classes,
        teachers.shape[0],
        1.0 / temperature,
        HAS_LABELS=has_labels,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return stats


def _kl_backward(
    student: torch.Tensor,
    teachers: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    grad_kl: torch.Tensor,
    grad_ce: torch.Tensor | None,
    temperature: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂student, ∂/∂teachers)``, each None unless asked for, in the inputs' dtypes."""
    if not (student_grad or teacher_grad):
        return None, None
    batch, num_classes = student.shape
    has_labels = labels is not None
    ds = torch.empty(student.shape, device=student.device, dtype=student.dtype) if student_grad else None
    dt = torch.empty(teachers.shape, device=teachers.device, dtype=teachers.dtype) if teacher_grad else None
    ds_arg = ds if ds is not None else student  # placeholders, never written
    dt_arg = dt if dt is not None else teachers
    block_c, num_warps = _launch_config(num_classes)
    _kl_bwd_kernel[(batch,)](
        student,
        teachers,
        labels if has_labels else stats,
        stats[_LSE_S],
        stats[_LSE_T],
        stats[_X],
        stats[_LSE_CE] if has_labels else stats[_X],
        grad_kl,
        grad_ce if has_labels else grad_kl,
        ds_arg,
        dt_arg,
        student.stride(0),
        student.stride(1),
        teachers.stride(0),
        teachers.stride(1),
        teachers.stride(2),
        ds_arg.stride(0),
        ds_arg.stride(1),
        dt_arg.stride(0),
        dt_arg.stride(1),
        dt_arg.stride(2),
        num_classes,
        teachers.shape[0],
        1.0 / temperature,
        temperature / batch,
        1.0 / batch,
        HAS_LABELS=has_labels,
        STUDENT_GRAD=student_grad,
        TEACHER_GRAD=teacher_grad,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return ds, dt


def _mutual_forward(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss [M], lse [M, B])``: the M losses and the per-row log-sum-exps of ``z_i / T`` (fp32)."""
    num_models, batch, num_classes = logits.shape
    m_pad = triton.next_power_of_2(num_models)
    block_c, num_warps = _launch_config(num_classes, tile_rows=m_pad * m_pad)
    stats = torch.empty(2, num_models, batch, device=logits.device, dtype=torch.float32)
    loss_rows, lse = stats[0], stats[1]
    _mutual_kl_fwd_kernel[(batch,)](
        logits,
        loss_rows,
        lse,
        logits.stride(0),
        logits.stride(1),
        logits.stride(2),
        num_models,
        num_classes,
        1.0 / temperature,
        temperature * temperature / (batch * (num_models - 1)),
        M_PAD=m_pad,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return loss_rows.sum(dim=1), lse


def _mutual_backward(logits: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, temperature: float) -> torch.Tensor:
    num_models, batch, num_classes = logits.shape
    m_pad = triton.next_power_of_2(num_models)
    block_c, num_warps = _launch_config(num_classes, tile_rows=m_pad)
    dz = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    _mutual_kl_bwd_kernel[(batch,)](
        logits,
        lse,
        grad,
        dz,
        logits.stride(0),
        logits.stride(1),
        logits.stride(2),
        grad.stride(0),
        dz.stride(0),
        dz.stride(1),
        dz.stride(2),
        num_models,
        num_classes,
        1.0 / temperature,
        temperature / (batch * (num_models - 1)),
        M_PAD=m_pad,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return dz


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _KLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teachers: torch.Tensor, temperature: float) -> torch.Tensor:
        stats = _kl_forward(student, teachers, None, temperature)
        ctx.save_for_backward(student, teachers, stats)
        ctx.temperature = temperature
        return (stats[_KL].sum() * (temperature * temperature / student.shape[0])).to(result_dtype(student))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        student, teachers, stats = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[:2]
        ds, dt = _kl_backward(
            student, teachers, None, stats, grad_kl, None, ctx.temperature, student_grad, teacher_grad
        )
        return ds, dt, None


class _CrossEntropyKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stats = _kl_forward(student, teachers, labels, temperature)
        ctx.save_for_backward(student, teachers, labels, stats)
        ctx.temperature = temperature
        batch, dtype = student.shape[0], result_dtype(student)
        ce = (stats[_CE].sum() / batch).to(dtype)
        kl = (stats[_KL].sum() * (temperature * temperature / batch)).to(dtype)
        return ce, kl

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad_ce: torch.Tensor, grad_kl: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        student, teachers, labels, stats = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[:2]
        ds, dt = _kl_backward(
            student, teachers, labels, stats, grad_kl, grad_ce, ctx.temperature, student_grad, teacher_grad
        )
        return ds, dt, None, None


class _MutualKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        loss, lse = _mutual_forward(logits, temperature)
        ctx.save_for_backward(logits, lse)
        ctx.temperature = temperature
        return loss.to(result_dtype(logits))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        logits, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return _mutual_backward(logits, lse, grad, ctx.temperature), None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _check_temperature(op: str, temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"{op} expects a temperature > 0, got {temperature}")
    return temperature


def _stack_models(op: str, logits: TeacherLogits, what: str) -> torch.Tensor:
    """``[M, B, C]`` from a ``[M, B, C]`` tensor (as is) or a sequence of ``[B, C]`` tensors (``torch.stack``);
    ValueError on bad shapes, TypeError on a dtype other than fp32/fp16/bf16/fp64."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            shape = tuple(logits.shape)
            raise ValueError(f"{op} expects {what} as one [M, B, C] tensor or M [B, C] tensors, got {shape}")
        check_dtypes(op, **{what: logits})
        return logits
    logits = list(logits)
    if not logits or any(z.dim() != 2 or z.shape != logits[0].shape for z in logits):
        shapes = [tuple(z.shape) for z in logits]
        raise ValueError(f"{op} expects {what} as M [B, C] tensors of one shape, got {shapes}")
    # Each one before torch.stack, which would promote an integer tensor among float ones.
    check_dtypes(op, **{f"{what}[{i}]": z for i, z in enumerate(logits)})
    return torch.stack(logits)


def _teacher_stack(op: str, student: torch.Tensor, teacher: TeacherLogits) -> torch.Tensor:
    """The teachers as ``[M, B, C]`` (a ``[B, C]`` teacher as a ``[1, B, C]`` view); ValueError on bad shapes,
    TypeError on a dtype other than fp32/fp16/bf16/fp64."""
    check_dtypes(op, student_logits=student)
    if isinstance(teacher, torch.Tensor) and teacher.dim() == 2:
        check_dtypes(op, teacher_logits=teacher)
        teachers = teacher.unsqueeze(0)
    else:
        teachers = _stack_models(op, teacher, "teacher_logits")
    if student.dim() != 2 or teachers.shape[1:] != student.shape or teachers.shape[0] < 1:
        raise ValueError(
            f"{op} expects [B, C] student logits and [B, C] or [M, B, C] teacher logits of that [B, C], got "
            f"{tuple(student.shape)} and {tuple(teachers.shape)}"
        )
    return teachers


def _check_labels(op: str, student_logits: torch.Tensor, labels: torch.Tensor) -> None:
    """ValueError unless ``labels`` is an integer ``[B]`` tensor and, where it is on the CPU, every label is in
    ``[0, C)``. CUDA labels are not read: that would be a host sync (see :func:`cross_entropy_kl_loss`)."""
    batch, num_classes = student_logits.shape[:1], student_logits.shape[-1]
    if labels.shape != batch or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(
            f"{op} expects integer labels of shape [B] = {tuple(batch)}, got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.device.type == "cpu":
        _check_label_range(op, labels, num_classes)


def _check_label_range(op: str, labels: torch.Tensor, num_classes: int) -> None:
    """ValueError unless every (CPU) label is in ``[0, C)``: reading them is free on the CPU, a host sync on CUDA."""
    if labels.numel() > 0:
        low, high = labels.min().item(), labels.max().item()
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{op} expects labels in [0, {num_classes}) (there is no ignore_index), got {low if low < 0 else high}"
            )


def _triton_ok(*tensors: torch.Tensor) -> bool:
    # Empty batches or classes run the reference (whose 0/0 gives PyTorch's answer); triton cannot launch a 0 grid.
    return use_triton(*tensors) and all(t.numel() > 0 for t in tensors)


def kl_div_loss(student_logits: torch.Tensor, teacher_logits: TeacherLogits, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss ``T² · batchmean KL(p_t ‖ p_s)``, ``p = softmax(z / T)``.

    ``KL_T(s ‖ t) = T² · (1/B) · Σ_b Σ_c p_t,c (log p_t,c − log p_s,c)``, accumulated in fp32 (fp64 for fp64).

    Args:
        student_logits: ``[B, C]``, fp32/fp16/bf16/fp64; any strides. Receives the gradient.
        teacher_logits: ``[B, C]``; or ``[M, B, C]``, or a sequence of M ``[B, C]`` tensors (stacked with
            ``torch.stack``, a copy), meaning the mean logits ``t = (1/M) Σ_m t_m`` (mean of logits, then softmax).
            Same dtype as the student. Receives a gradient when it requires one (each of M teachers ``1/M`` of the
            gradient of the mean): detach it (as online KD does) to stop that.
        temperature: ``T > 0``, a Python float.

    Returns:
        A scalar of the student's dtype (fp32 for half inputs under autocast).

    fp32/fp16/bf16 tensors on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) run the fused Triton kernels, with
    no host synchronisation; anything else runs :func:`kl_div_loss_reference`.
    """
    temperature = _check_temperature("kl_div_loss", temperature)
    teachers = _teacher_stack("kl_div_loss", student_logits, teacher_logits)
    if not _triton_ok(student_logits, teachers):
        return kl_div_loss_reference(student_logits, teachers if teachers.shape[0] > 1 else teachers[0], temperature)
    return _KLDivFunction.apply(student_logits, teachers, temperature)


def cross_entropy_kl_loss(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE, KL)`` of the student in one pass over its logits.

    ``CE = (1/B) Σ_b (lse(s_b) − s_b,y_b)`` is ``F.cross_entropy(student_logits, labels)`` (temperature 1, mean over
    rows, no ``ignore_index``, no label smoothing); ``KL`` is :func:`kl_div_loss` ``(student_logits,
    teacher_logits, temperature)``.

    Args:
        student_logits: ``[B, C]``, fp32/fp16/bf16/fp64; any strides. Receives both outputs' gradients, summed.
        teacher_logits: as in :func:`kl_div_loss`: ``[B, C]``, ``[M, B, C]`` or a sequence of M ``[B, C]``.
        labels: int64 ``[B]`` with values in ``[0, C)``; there is no ``ignore_index`` (−100 is out of range, not a
            row left out). Labels on the CPU are checked: ValueError. Labels on CUDA are not, since reading them
            would be a host sync: an out-of-range label makes CE NaN instead, on the Triton path and the reference
            alike (the gradients of that row are then meaningless).
        temperature: ``T > 0``, a Python float, for the KL only.

    Returns:
        ``(CE, KL)``, two scalars of the student's dtype (fp32 for half inputs under autocast).
    """
    temperature = _check_temperature("cross_entropy_kl_loss", temperature)
    teachers = _teacher_stack("cross_entropy_kl_loss", student_logits, teacher_logits)
    _check_labels("cross_entropy_kl_loss", student_logits, labels)
    if not _triton_ok(student_logits, teachers) or labels.device != student_logits.device:
        teacher = teachers if teachers.shape[0] > 1 else teachers[0]
        return cross_entropy_kl_loss_reference(student_logits, teacher, labels, temperature)
    return _CrossEntropyKLFunction.apply(student_logits, teachers, labels, temperature)


def mutual_kl_loss(logits: TeacherLogits, temperature: float = 1.0) -> torch.Tensor:
    """Deep mutual learning: ``loss_i = 1/(M−1) · Σ_{j≠i} KL_T(z_i ‖ sg(z_j))`` for each of M students.

    Every student distils from every other one's detached logits (``sg`` = stop-gradient), with ``KL_T`` as in
    :func:`kl_div_loss`; one kernel launch computes all M losses. The gradient reaches each ``z_i`` through its own
    loss only: per row, ``∂loss_i/∂z_i = (T/B)/(M−1) · (M p_i − Σ_j p_j)``.

    Args:
        logits: ``[M, B, C]`` or a sequence of M ``[B, C]`` tensors (stacked with ``torch.stack``, a copy),
            ``M ≥ 2``, fp32/fp16/bf16/fp64; any strides.
        temperature: ``T > 0``, a Python float.

    Returns:
        ``[M]``, of the logits' dtype (fp32 for half inputs under autocast); ``loss.sum()`` is the usual total.
    """
    temperature = _check_temperature("mutual_kl_loss", temperature)
    z = _stack_models("mutual_kl_loss", logits, "logits")
    if z.shape[0] < 2:
        raise ValueError(f"mutual_kl_loss expects M >= 2 students, got logits of shape {tuple(z.shape)}")
    if not _triton_ok(z):
        return mutual_kl_loss_reference(z, temperature)
    return _MutualKLFunction.apply(z, temperature)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class _TemperatureLoss(nn.Module):
    """A loss module holding its temperature ``T``."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class KLDivLoss(_TemperatureLoss):
    """``nn.Module`` form of :func:`kl_div_loss`: ``KLDivLoss(temperature=4)(student_logits, teacher_logits)``."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits) -> torch.Tensor:
        return kl_div_loss(student_logits, teacher_logits, self.temperature)


class CrossEntropyKLLoss(_TemperatureLoss):
    """``nn.Module`` form of :func:`cross_entropy_kl_loss`: ``ce, kl = CrossEntropyKLLoss(4)(s, t, labels)``."""

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: TeacherLogits, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_kl_loss(student_logits, teacher_logits, labels, self.temperature)


class MutualKLLoss(_TemperatureLoss):
    """``nn.Module`` form of :func:`mutual_kl_loss`: ``MutualKLLoss(temperature=4)(logits)`` gives ``[M]``."""

    def forward(self, logits: TeacherLogits) -> torch.Tensor:
        return mutual_kl_loss(logits, self.temperature)


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def _mean_teacher(op: str, teacher_logits: TeacherLogits, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(teacher_logits, torch.Tensor) and teacher_logits.dim() == 2:
        check_dtypes(op, teacher_logits=teacher_logits)
        return teacher_logits.to(dtype)
    return _stack_models(op, teacher_logits, "teacher_logits").to(dtype).mean(dim=0)


def kl_div_loss_reference(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · (1/B) · Σ_b Σ_c p_t · (log p_t − log p_s)`` with ``p = softmax(z / T)`` over dim 1.

    The same as ``T**2 * F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction='batchmean')``. A
    ``[M, B, C]`` teacher or a sequence of M ``[B, C]`` teachers means their mean logits ``t = (1/M) Σ_m t_m``.
    """
    return _kl_reference("kl_div_loss_reference", student_logits, teacher_logits, temperature)


def _kl_reference(
    op: str, student_logits: torch.Tensor, teacher_logits: TeacherLogits, temperature: float
) -> torch.Tensor:
    check_dtypes(op, student_logits=student_logits)
    dtype = compute_dtype(student_logits.dtype)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(_mean_teacher(op, teacher_logits, dtype) / temperature, dim=1)
    # xlogy-free form: p_t = exp(log p_t) is never 0 where it matters, since log_softmax is finite.
    loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / student_logits.shape[0]
    return (loss * temperature**2).to(result_dtype(student_logits))


def cross_entropy_kl_loss_reference(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.cross_entropy(s, labels), kl_div_loss_reference(s, t, T))``, accumulated in at least fp32.

    Labels as in :func:`cross_entropy_kl_loss`: CPU labels outside ``[0, C)`` raise ValueError; CUDA ones make CE
    NaN, as the Triton kernel does (``F.cross_entropy`` alone would leave the rows labelled −100 out of the mean, and
    fail on other out-of-range labels: on CUDA with a device-side assert, which ends the process's CUDA context).
    """
    op = "cross_entropy_kl_loss_reference"
    check_dtypes(op, student_logits=student_logits)
    _check_labels(op, student_logits, labels)
    dtype = compute_dtype(student_logits.dtype)
    num_classes = student_logits.shape[1]
    rows = F.cross_entropy(student_logits.to(dtype), labels.clamp(0, num_classes - 1), reduction="none")
    in_range = (labels >= 0) & (labels < num_classes)
    ce = torch.where(in_range, rows, torch.nan).mean().to(result_dtype(student_logits))
    return ce, _kl_reference(op, student_logits, teacher_logits, temperature)


def mutual_kl_loss_reference(logits: TeacherLogits, temperature: float = 1.0) -> torch.Tensor:
    """``loss_i = 1/(M−1) · Σ_{j≠i} KL_T(z_i ‖ sg(z_j))``, an ``[M]`` tensor; ``sg`` is ``detach``."""
    z = _stack_models("mutual_kl_loss_reference", logits, "logits")
    dtype = compute_dtype(z.dtype)
    log_p = F.log_softmax(z.to(dtype) / temperature, dim=2)
    log_q = log_p.detach()
    num_models, batch = z.shape[:2]
    losses = []
    for i in range(num_models):
        terms = [(log_q[j].exp() * (log_q[j] - log_p[i])).sum() for j in range(num_models) if j != i]
        losses.append(torch.stack(terms).sum() / (num_models - 1))
    return (torch.stack(losses) * (temperature**2 / batch)).to(result_dtype(z))
