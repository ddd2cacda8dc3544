"""The distillation KL of Hinton et al. and of every online-KD method, alone or with the student's cross-entropy.

Two forms, each a fused Triton forward kernel and a fused Triton backward kernel (shared) behind a functional API,
an ``nn.Module`` and a plain PyTorch ``*_reference`` that defines it:

* :func:`kl_div_loss` / :class:`DistillationKLLoss`: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` from raw logits; the
  teacher may be the mean of ``M`` teachers' logits (FFSD's fusion module distils from the mean of the students');
* :func:`cross_entropy_kl_loss` / :class:`CrossEntropyKLLoss`: the cross-entropy of the student and its ``KL_T`` in
  one pass over the logits.

torch's own ``kl_div`` is ``torch_kl_div.py``; deep mutual learning (every student distilling from every other one)
is ``mutual_kl.py``; a teacher given as its top-k log-probabilities is ``sparse_kl.py``.

Rows. The distillation forms take logits of any leading shape ``[..., V]`` (``[B, C]``, ``[B, T, V]``), flattened
to ``N`` rows by ``reshape`` (a view whenever the leading dimensions allow one). Each computes one fp32 value per row;
``labels=`` marks rows equal to ``ignore_index`` (padding) as left out, and ``reduction`` is ``batchmean`` (the mean
over the rows kept; the count is taken on the device), ``sum`` or ``none`` (per-row values), as ``_rows.py`` says.

Notation. ``C`` classes, ``T > 0`` the temperature, ``a = s / T``, ``b = t / T``, ``p = softmax(z / T)`` over the
classes, ``lse`` the log-sum-exp over the classes. Per row

    KL_row = Σ_c p_t,c (log p_t,c − log p_s,c) = Σ_c p_t,c (b_c − a_c) − lse(b) + lse(a),

and the loss of a row is ``T² · KL_row``.

Kernels. One program per row loops over the classes in chunks of ``BLOCK_C`` with an online softmax
(``_row_kernels.py``), so any ``C`` up to LLM vocabularies runs in fixed memory and the forward pass reads every
logit once:

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
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import compute_dtype, tl, triton
from ffsd_kernels._row_kernels import load_chunk, online_softmax_step, row_kept, weighted
from ffsd_kernels._rows import (
    RowOptions,
    StackedLogits,
    TemperatureLoss,
    check_label_range,
    check_logits,
    check_reduction,
    check_temperature,
    flat_labels,
    launch_config,
    log_softmax_at,
    reduce_losses,
    reduce_rows_reference,
    stack_teachers,
    use_row_kernels,
    xlogy_terms,
)

# The teacher argument: one teacher of the student's shape, or M of them whose mean logits teach.
TeacherLogits = StackedLogits

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


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
    y, kept = row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)

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
        s, a, b = load_chunk(s_row, t_row, cols, mask, stride_sc, stride_tm, stride_tc, num_teachers, inv_temperature,
                             teacher_scale, BLOCK_C=BLOCK_C)  # fmt: skip

        m_a, d_a, _, _ = online_softmax_step(m_a, d_a, a, mask)
        m_b, d_b, alpha, e_b = online_softmax_step(m_b, d_b, b, mask)
        w = w * alpha + tl.sum(weighted(e_b, b - a), axis=0)  # a teacher's −inf entry adds 0, not 0 · (−inf)
        if HAS_CE:
            m_z, d_z, _, _ = online_softmax_step(m_z, d_z, s, mask)

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
    y, kept = row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)
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
        s, a, b = load_chunk(s_row, t_row, cols, mask, stride_sc, stride_tm, stride_tc, num_teachers, inv_temperature,
                             teacher_scale, BLOCK_C=BLOCK_C)  # fmt: skip
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
            dt = tl.where(kept, (g_kl / num_teachers) * weighted(p_t, (b - a) - x_row), 0.0)
            dt = dt.to(dt_ptr.dtype.element_ty)
            dt_m = dt_ptr + row * stride_dtb + cols * stride_dtc
            for _ in range(0, num_teachers):
                tl.store(dt_m, dt, mask=in_row)
                dt_m += stride_dtm


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

# One program per row, ``(N,)``; ``BLOCK_C`` and ``num_warps`` from ``_rows.launch_config``, shared by every row-wise
# kernel (its sm_90 check keeps them free of spills).

# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


# Rows of the per-row fp32 statistics that the forward pass saves.
_LSE_S, _LSE_T, _X, _LSE_CE = range(4)


def _kl_forward(
    student: torch.Tensor,
    teachers: torch.Tensor,
    labels: torch.Tensor | None,
    options: RowOptions,
    *,
    has_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [2, N], stats [4, N])``, fp32: per-row ``T² KL_row`` and ``CE_row`` (row 1 unwritten without CE), and
    lse(s/T), lse(t̄/T), X_row, lse(s), indexed by ``_LSE_S`` … ``_LSE_CE``."""
    num_rows, num_classes = student.shape
    temperature = options.temperature
    block_c, num_warps = launch_config(num_classes)
    rows = torch.empty(2, num_rows, device=student.device, dtype=torch.float32)
    stats = torch.empty(4, num_rows, device=student.device, dtype=torch.float32)
    _kl_fwd_kernel[(num_rows,)](
        s_ptr=student, t_ptr=teachers, y_ptr=labels if labels is not None else stats, kl_ptr=rows[0], ce_ptr=rows[1],
        lse_s_ptr=stats[_LSE_S], lse_t_ptr=stats[_LSE_T], x_ptr=stats[_X], lse_ce_ptr=stats[_LSE_CE],
        stride_sb=student.stride(0), stride_sc=student.stride(1), stride_tm=teachers.stride(0),
        stride_tb=teachers.stride(1), stride_tc=teachers.stride(2), num_classes=num_classes,
        num_teachers=teachers.shape[0], inv_temperature=1.0 / temperature, loss_scale=temperature * temperature,
        ignore_index=options.ignore_index, HAS_LABELS=labels is not None, HAS_CE=has_ce, BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return rows, stats


def _kl_backward(
    student: torch.Tensor,
    teachers: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    norm: torch.Tensor | None,
    options: RowOptions,
    *,
    grad_kl: torch.Tensor,
    grad_ce: torch.Tensor | None,
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
    block_c, num_warps = launch_config(num_classes)
    _kl_bwd_kernel[(num_rows,)](
        s_ptr=student, t_ptr=teachers, y_ptr=labels if labels is not None else stats, lse_s_ptr=stats[_LSE_S],
        lse_t_ptr=stats[_LSE_T], x_ptr=stats[_X], lse_ce_ptr=stats[_LSE_CE], grad_kl_ptr=grad_kl,
        grad_ce_ptr=grad_ce_arg, norm_ptr=norm if norm is not None else stats, ds_ptr=ds_arg, dt_ptr=dt_arg,
        stride_sb=student.stride(0), stride_sc=student.stride(1), stride_tm=teachers.stride(0),
        stride_tb=teachers.stride(1), stride_tc=teachers.stride(2),
        stride_gkl=grad_kl.stride(0) if grad_kl.dim() else 0,
        stride_gce=grad_ce_arg.stride(0) if grad_ce_arg.dim() else 0, stride_dsb=ds_arg.stride(0),
        stride_dsc=ds_arg.stride(1), stride_dtm=dt_arg.stride(0), stride_dtb=dt_arg.stride(1),
        stride_dtc=dt_arg.stride(2), num_classes=num_classes, num_teachers=teachers.shape[0],
        inv_temperature=1.0 / options.temperature, ignore_index=options.ignore_index,
        kl_scale=options.temperature * options.host_scale, ce_scale=options.host_scale, HAS_LABELS=labels is not None,
        HAS_CE=has_ce, HAS_NORM=norm is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return ds, dt


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _KLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor | None, options: RowOptions
    ) -> torch.Tensor:
        rows, stats = _kl_forward(student, teachers, labels, options, has_ce=False)
        out, norm = reduce_losses(rows[:1], labels, options)
        ctx.save_for_backward(student, teachers, labels, stats, norm)
        ctx.options = options
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: torch.Tensor) -> tuple:
        student, teachers, labels, stats, norm = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[:2]
        ds, dt = _kl_backward(
            student, teachers, labels, stats, norm, ctx.options,
            grad_kl=grad_kl, grad_ce=None, student_grad=student_grad, teacher_grad=teacher_grad,
        )  # fmt: skip
        return ds, dt, None, None


class _CrossEntropyKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor, options: RowOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, stats = _kl_forward(student, teachers, labels, options, has_ce=True)
        out, norm = reduce_losses(rows, labels, options)
        ctx.save_for_backward(student, teachers, labels, stats, norm)
        ctx.options = options
        return out[1], out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: torch.Tensor, grad_kl: torch.Tensor) -> tuple:
        student, teachers, labels, stats, norm = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[:2]
        ds, dt = _kl_backward(
            student, teachers, labels, stats, norm, ctx.options,
            grad_kl=grad_kl, grad_ce=grad_ce, student_grad=student_grad, teacher_grad=teacher_grad,
        )  # fmt: skip
        return ds, dt, None, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


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
    temperature = check_temperature(op, temperature)
    check_reduction(op, reduction)
    teachers = stack_teachers(op, student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    flat = flat_labels(op, labels, lead)
    if not use_row_kernels(flat, student_logits, teachers):
        return kl_div_loss_reference(
            student_logits, teacher_logits, temperature, labels=labels, ignore_index=ignore_index, reduction=reduction
        )
    student = student_logits.reshape(-1, student_logits.shape[-1])
    options = RowOptions.of(temperature, reduction, ignore_index, flat, student.shape[0])
    loss = _KLDivFunction.apply(student, teachers, flat, options)
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
    temperature = check_temperature(op, temperature)
    check_reduction(op, reduction)
    teachers = stack_teachers(op, student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    flat = flat_labels(op, labels, lead)
    check_label_range(op, flat, student_logits.shape[-1], ignore_index)
    if not use_row_kernels(flat, student_logits, teachers):
        return cross_entropy_kl_loss_reference(
            student_logits, teacher_logits, labels, temperature, ignore_index=ignore_index, reduction=reduction
        )
    student = student_logits.reshape(-1, student_logits.shape[-1])
    options = RowOptions.of(temperature, reduction, ignore_index, flat, student.shape[0])
    ce, kl = _CrossEntropyKLFunction.apply(student, teachers, flat, options)
    return (ce.view(lead), kl.view(lead)) if reduction == "none" else (ce, kl)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class DistillationKLLoss(TemperatureLoss):
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


class CrossEntropyKLLoss(TemperatureLoss):
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


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def _kl_rows_reference(
    op: str, student_logits: torch.Tensor, teacher_logits: TeacherLogits, temperature: float
) -> torch.Tensor:
    """``[N]``: ``T² · Σ_c p_t (log p_t − log p_s)`` per row, in the accumulation dtype."""
    teachers = stack_teachers(op, student_logits, teacher_logits)
    dtype = compute_dtype(student_logits.dtype)
    log_p_s = log_softmax_at(student_logits.reshape(-1, student_logits.shape[-1]), dtype, temperature)
    log_p_t = log_softmax_at(teachers.to(dtype).mean(dim=0), dtype, temperature)
    return xlogy_terms(log_p_t.exp(), log_p_t - log_p_s).sum(dim=-1) * temperature**2


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
    check_logits(op, student_logits, "student_logits")
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
