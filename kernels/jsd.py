"""The generalised Jensen-Shannon divergence of LLM distillation (GKD): forward KL, reverse KL and everything between.

Notation. Per row of ``[..., V]`` logits, ``T > 0`` the temperature, ``a = s / T``, ``b = t / T``, ``Q = softmax(a)``
(student), ``P = softmax(b)`` (teacher), ``β ∈ [0, 1]``, ``M = β P + (1 − β) Q``. The loss of a row is

    β = 0:      KL(P ‖ Q) = Σ_c P_c (log P_c − log Q_c)            (forward KL, as kl_div_loss without the T²)
    β = 1:      KL(Q ‖ P) = Σ_c Q_c (log Q_c − log P_c)            (reverse KL)
    otherwise:  JSD_β = β KL(P ‖ M) + (1 − β) KL(Q ‖ M)

This is the definition of TRL's ``GKDTrainer.generalized_jsd_loss`` (huggingface/trl, ``trl/trainer/gkd_trainer.py``:
the mixture ``logsumexp([log Q + log(1 − β), log P + log β])``, ``β · KL(P ‖ M) + (1 − β) · KL(Q ‖ M)``, and the
``β == 0`` / ``β == 1`` cases as the two KLs) and of Liger-Kernel's ``LigerJSD`` (``liger_kernel/ops/jsd.py``:
``M = β P + (1 − β) Q``, forward KL at β = 0, reverse KL at β = 1), after Agarwal et al., *On-Policy Distillation of
Language Models*, arXiv 2306.13649, Eq. (1). As in both, the mixed form tends to 0 as β → 0 or 1; the endpoints are
the KLs by definition, and there is no ``T²`` factor (TRL has none). Rows, ``labels`` / ``ignore_index`` and the
reductions are those of ``_rows.py``; ``batchmean`` is the mean over the rows (tokens) kept, as TRL's with labels.

Gradients, per row (softmax Jacobian ``∂Q_k/∂a_c = Q_k (δ_kc − Q_c)``, with ``∂JSD_β/∂Q_c = (1 − β)(log Q_c −
log M_c)`` and ``∂JSD_β/∂P_c = β (log P_c − log M_c)``, the ``+1`` terms cancelling since ``Σ M = 1``):

    β = 0:      ∂/∂s_c = (Q_c − P_c) / T                      ∂/∂t_c = P_c (log P_c − log Q_c − KL(P ‖ Q)) / T
    β = 1:      ∂/∂s_c = Q_c (log Q_c − log P_c − KL(Q ‖ P)) / T   ∂/∂t_c = (P_c − Q_c) / T
    otherwise:  ∂/∂s_c = (1 − β) Q_c (log Q_c − log M_c − KL(Q ‖ M)) / T
                ∂/∂t_c = β P_c (log P_c − log M_c − KL(P ‖ M)) / T

Kernels. One program per row. The forward pass reads the row twice: once for the log-sum-exps of ``a`` and ``b``
(online softmax, ``_row_kernels.py``), once for the sums above (``log M`` needs both normalisers, so no single online
pass exists); it saves per-row fp32 statistics (the two lse's and ``KL(P ‖ ·)``, ``KL(Q ‖ ·)``). The backward pass
reads the row once more. An optional cross-entropy of the student on the labels (temperature 1), weighted in, serves
``fused_linear_distillation_loss``.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, tl, triton
from ffsd_kernels._row_kernels import load_chunk, online_softmax_step, row_kept, weighted
from ffsd_kernels._rows import (
    batchmean_scale,
    check_reduction,
    check_temperature,
    flat_labels,
    launch_config,
    reduce_rows,
    reduce_rows_reference,
    use_row_kernels,
    xlogy_terms,
)

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _log_mixture(log_p, log_q, log_beta, log_1m_beta):
    """``log(β P + (1 − β) Q)`` from the log-probabilities, without leaving log space (P, Q may underflow)."""
    u = log_beta + log_p
    v = log_1m_beta + log_q
    top = tl.maximum(u, v)
    return top + tl.log(tl.exp(u - top) + tl.exp(v - top))


@triton.jit
def _jsd_fwd_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    y_ptr,  # [N] integer labels (read when HAS_LABELS)
    loss_ptr,  # [N] fp32 out: kd_weight · JSD_row (+ ce_weight · CE_row when HAS_CE); 0 on an ignored row
    lse_s_ptr,  # [N] fp32 out: lse(s / T)
    lse_t_ptr,  # [N] fp32 out: lse(t / T)
    kl_p_ptr,  # [N] fp32 out: KL(P ‖ Q) when MODE 0, KL(P ‖ M) when MODE 2
    kl_q_ptr,  # [N] fp32 out: KL(Q ‖ P) when MODE 1, KL(Q ‖ M) when MODE 2
    lse_ce_ptr,  # [N] fp32 out: lse(s) (when HAS_CE)
    stride_sb,
    stride_sc,
    stride_tb,
    stride_tc,
    num_classes,
    inv_temperature,
    beta,
    log_beta,
    log_1m_beta,
    kd_weight,
    ce_weight,
    ignore_index,
    MODE: tl.constexpr,  # 0: β = 0 (forward KL), 1: β = 1 (reverse KL), 2: the mixture
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    t_row = t_ptr + row * stride_tb
    y, kept = row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)

    # Pass 1: the log-sum-exps of a = s / T, b = t / T and (for the CE) s, by online softmax.
    m_a = float("-inf")
    d_a = 0.0
    m_b = float("-inf")
    d_b = 0.0
    m_z = float("-inf")
    d_z = 0.0
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = (cols < num_classes) & kept  # an ignored row reads nothing
        cols = cols.to(tl.int64)
        s, a, b = load_chunk(
            s_row, t_row, cols, mask, stride_sc, 0, stride_tc, 1, inv_temperature, inv_temperature, BLOCK_C=BLOCK_C
        )
        m_a, d_a, _, _ = online_softmax_step(m_a, d_a, a, mask)
        m_b, d_b, _, _ = online_softmax_step(m_b, d_b, b, mask)
        if HAS_CE:
            m_z, d_z, _, _ = online_softmax_step(m_z, d_z, s, mask)
    lse_a = m_a + tl.log(d_a)
    lse_b = m_b + tl.log(d_b)
    # lse(b) − lse(a) as (m_b − m_a) + log(S_b / S_a): each lse is O(log V), and its fp32 rounding would swamp a
    # small KL in log P − log Q (see kl_div.py).
    d_lse = (m_b - m_a) + tl.log(d_b / d_a)

    # Pass 2: the divergences, with exact log-probabilities.
    acc_p = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = (cols < num_classes) & kept
        cols = cols.to(tl.int64)
        _, a, b = load_chunk(
            s_row, t_row, cols, mask, stride_sc, 0, stride_tc, 1, inv_temperature, inv_temperature, BLOCK_C=BLOCK_C
        )
        if MODE == 0:
            acc_p += tl.where(mask, weighted(tl.exp(b - lse_b), (b - a) - d_lse), 0.0)
        elif MODE == 1:
            acc_q += tl.where(mask, tl.exp(a - lse_a) * ((a - b) + d_lse), 0.0)
        else:
            log_p = b - lse_b
            log_q = a - lse_a
            log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
            acc_p += tl.where(mask, weighted(tl.exp(log_p), log_p - log_m), 0.0)
            acc_q += tl.where(mask, tl.exp(log_q) * (log_q - log_m), 0.0)
    kl_p = tl.sum(acc_p, axis=0)
    kl_q = tl.sum(acc_q, axis=0)
    if MODE == 0:
        value = kl_p
    elif MODE == 1:
        value = kl_q
    else:
        value = beta * kl_p + (1.0 - beta) * kl_q
    value = value * kd_weight
    if HAS_CE:
        # An out-of-range label reads nothing and makes its row NaN (CPU labels are checked on the host).
        s_y = tl.load(s_row + y * stride_sc, mask=kept & (y >= 0) & (y < num_classes), other=float("nan"))
        lse_z = m_z + tl.log(d_z)
        value += ce_weight * (lse_z - s_y.to(tl.float32))
        tl.store(lse_ce_ptr + row, lse_z)
    tl.store(loss_ptr + row, tl.where(kept, value, 0.0))
    tl.store(lse_s_ptr + row, lse_a)
    tl.store(lse_t_ptr + row, lse_b)
    tl.store(kl_p_ptr + row, kl_p)
    tl.store(kl_q_ptr + row, kl_q)


@triton.jit
def _jsd_bwd_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    y_ptr,  # [N] integer labels (read when HAS_LABELS)
    lse_s_ptr,  # [N] fp32: lse(s / T)
    lse_t_ptr,  # [N] fp32: lse(t / T)
    kl_p_ptr,  # [N] fp32: KL(P ‖ ·)
    kl_q_ptr,  # [N] fp32: KL(Q ‖ ·)
    lse_ce_ptr,  # [N] fp32: lse(s) (read when HAS_CE)
    grad_ptr,  # [] or [N] upstream gradient
    norm_ptr,  # [1] fp32: 1 / max(#kept rows, 1) (read when HAS_NORM)
    ds_ptr,  # [N, V] out: gradient of the student (written when STUDENT_GRAD)
    dt_ptr,  # [N, V] out: gradient of the teacher (written when TEACHER_GRAD)
    stride_sb,
    stride_sc,
    stride_tb,
    stride_tc,
    stride_g,  # 0 for a scalar upstream gradient
    stride_dsb,
    stride_dsc,
    stride_dtb,
    stride_dtc,
    num_classes,
    inv_temperature,
    beta,
    log_beta,
    log_1m_beta,
    kd_scale,  # kd_weight / T, times 1/N for an unlabelled batchmean
    ce_scale,  # ce_weight, times 1/N for an unlabelled batchmean
    ignore_index,
    MODE: tl.constexpr,
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
    y, kept = row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)
    g = tl.load(grad_ptr + row * stride_g).to(tl.float32)
    if HAS_NORM:
        g = g * tl.load(norm_ptr)
    g_kd = g * kd_scale
    lse_a = tl.load(lse_s_ptr + row)
    lse_b = tl.load(lse_t_ptr + row)
    kl_p = tl.load(kl_p_ptr + row)
    kl_q = tl.load(kl_q_ptr + row)
    if HAS_CE:
        g_ce = g * ce_scale
        lse_z = tl.load(lse_ce_ptr + row)
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        in_row = cols < num_classes
        mask = in_row & kept
        cols = cols.to(tl.int64)
        s, a, b = load_chunk(
            s_row, t_row, cols, mask, stride_sc, 0, stride_tc, 1, inv_temperature, inv_temperature, BLOCK_C=BLOCK_C
        )
        log_p = b - lse_b
        log_q = a - lse_a
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        if MODE == 0:
            ds = q - p
            dt = weighted(p, (log_p - log_q) - kl_p)
        elif MODE == 1:
            ds = q * ((log_q - log_p) - kl_q)
            dt = p - q
        else:
            log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
            ds = (1.0 - beta) * q * ((log_q - log_m) - kl_q)
            dt = beta * weighted(p, (log_p - log_m) - kl_p)
        if STUDENT_GRAD:
            ds = g_kd * ds
            if HAS_CE:
                ds += g_ce * (tl.exp(s - lse_z) - tl.where(cols == y, 1.0, 0.0))
            # An ignored row's statistics are NaN (nothing was read): tl.where writes its zeros.
            ds = tl.where(kept, ds, 0.0)
            tl.store(ds_ptr + row * stride_dsb + cols * stride_dsc, ds.to(ds_ptr.dtype.element_ty), mask=in_row)
        if TEACHER_GRAD:
            dt = tl.where(kept, g_kd * dt, 0.0)
            tl.store(dt_ptr + row * stride_dtb + cols * stride_dtc, dt.to(dt_ptr.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

# The grid is one program per row, ``(N,)``; ``BLOCK_C`` and ``num_warps`` follow ``_rows.launch_config``
# (at most 2048 classes per chunk), which its sm_90 check keeps free of spills for these kernels too.


def _mode(beta: float) -> tuple[int, float, float]:
    """``(MODE, log β, log(1 − β))``; the logs are unused (0) at the endpoints, where they are infinite."""
    if beta == 0.0:
        return 0, 0.0, 0.0
    if beta == 1.0:
        return 1, 0.0, 0.0
    return 2, math.log(beta), math.log1p(-beta)


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------

# Rows of the per-row fp32 statistics that the forward pass saves.
_LSE_S, _LSE_T, _KL_P, _KL_Q, _LSE_CE = range(5)
NUM_STATS = 5


@dataclass(frozen=True)
class JSDOptions:
    """The non-tensor arguments of the JSD kernels, by name (``fused_linear`` passes its own weights)."""

    beta: float
    temperature: float
    ignore_index: int
    host_scale: float = 1.0  # 1/N for an unlabelled batchmean, else 1 (the backward pass's part of the normaliser)
    kd_weight: float = 1.0
    ce_weight: float | None = None  # None: no cross-entropy term (its kernels' code is compiled out)


def jsd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    loss_rows: torch.Tensor,
    stats: torch.Tensor,
    options: JSDOptions,
) -> None:
    """Write each row's weighted loss into ``loss_rows`` ``[N]`` and its statistics into ``stats`` ``[5, N]`` (fp32,
    unit stride along N: a slice of larger buffers, as ``fused_linear`` passes). ``ce_weight`` adds the CE on
    ``labels``."""
    num_rows, num_classes = student.shape
    mode, log_beta, log_1m_beta = _mode(options.beta)
    block_c, num_warps = launch_config(num_classes)
    _jsd_fwd_kernel[(num_rows,)](
        s_ptr=student, t_ptr=teacher, y_ptr=labels if labels is not None else stats, loss_ptr=loss_rows,
        lse_s_ptr=stats[_LSE_S], lse_t_ptr=stats[_LSE_T], kl_p_ptr=stats[_KL_P], kl_q_ptr=stats[_KL_Q],
        lse_ce_ptr=stats[_LSE_CE], stride_sb=student.stride(0), stride_sc=student.stride(1),
        stride_tb=teacher.stride(0), stride_tc=teacher.stride(1), num_classes=num_classes,
        inv_temperature=1.0 / options.temperature, beta=options.beta, log_beta=log_beta, log_1m_beta=log_1m_beta,
        kd_weight=options.kd_weight, ce_weight=options.ce_weight or 0.0, ignore_index=options.ignore_index, MODE=mode,
        HAS_LABELS=labels is not None, HAS_CE=options.ce_weight is not None, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip


def jsd_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    norm: torch.Tensor | None,
    grad: torch.Tensor,
    options: JSDOptions,
    *,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂student, ∂/∂teacher)`` in the logits' dtypes, each None unless asked for; ``grad`` is ``[]`` or
    ``[N]``, ``norm`` the device normaliser of a labelled batchmean (else None, and ``options.host_scale`` is 1/N or
    1)."""
    if not (student_grad or teacher_grad):
        return None, None
    num_rows, num_classes = student.shape
    beta, host_scale, ce_weight = options.beta, options.host_scale, options.ce_weight
    mode, log_beta, log_1m_beta = _mode(beta)
    ds = torch.empty(student.shape, device=student.device, dtype=student.dtype) if student_grad else None
    dt = torch.empty(teacher.shape, device=teacher.device, dtype=teacher.dtype) if teacher_grad else None
    ds_arg = ds if ds is not None else student  # placeholders, never written
    dt_arg = dt if dt is not None else teacher
    block_c, num_warps = launch_config(num_classes)
    _jsd_bwd_kernel[(num_rows,)](
        s_ptr=student, t_ptr=teacher, y_ptr=labels if labels is not None else stats, lse_s_ptr=stats[_LSE_S],
        lse_t_ptr=stats[_LSE_T], kl_p_ptr=stats[_KL_P], kl_q_ptr=stats[_KL_Q], lse_ce_ptr=stats[_LSE_CE], grad_ptr=grad,
        norm_ptr=norm if norm is not None else stats, ds_ptr=ds_arg, dt_ptr=dt_arg, stride_sb=student.stride(0),
        stride_sc=student.stride(1), stride_tb=teacher.stride(0), stride_tc=teacher.stride(1),
        stride_g=grad.stride(0) if grad.dim() else 0, stride_dsb=ds_arg.stride(0), stride_dsc=ds_arg.stride(1),
        stride_dtb=dt_arg.stride(0), stride_dtc=dt_arg.stride(1), num_classes=num_classes,
        inv_temperature=1.0 / options.temperature, beta=beta, log_beta=log_beta, log_1m_beta=log_1m_beta,
        kd_scale=options.kd_weight * host_scale / options.temperature, ce_scale=(ce_weight or 0.0) * host_scale,
        ignore_index=options.ignore_index, MODE=mode, HAS_LABELS=labels is not None, HAS_CE=ce_weight is not None,
        HAS_NORM=norm is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return ds, dt


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _JSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        options: JSDOptions,
        reduction: str,
    ) -> torch.Tensor:
        num_rows = student.shape[0]
        rows = torch.empty(1, num_rows, device=student.device, dtype=torch.float32)
        stats = torch.empty(NUM_STATS, num_rows, device=student.device, dtype=torch.float32)
        jsd_forward(student, teacher, labels, rows[0], stats, options)
        norm = None
        if reduction == "none":
            out = rows[0]
        else:
            count_labels = labels if reduction == "batchmean" else None
            out, device_norm = reduce_rows(rows, count_labels, options.ignore_index, options.host_scale)
            out, norm = out[0], (device_norm if count_labels is not None else None)
        ctx.save_for_backward(student, teacher, labels, stats, norm)
        ctx.options = options
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        student, teacher, labels, stats, norm = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[:2]
        ds, dt = jsd_backward(
            student,
            teacher,
            labels,
            stats,
            norm,
            grad,
            ctx.options,
            student_grad=student_grad,
            teacher_grad=teacher_grad,
        )
        return ds, dt, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def check_beta(op: str, beta: float) -> float:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{op} expects 0 <= beta <= 1, got {beta}")
    return beta


def _check_pair(op: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> float:
    check_dtypes(op, student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.dim() < 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"{op} expects student and teacher logits of one shape [..., V] (at least 2-D), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    return check_temperature(op, temperature)


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Generalised JSD of GKD between ``softmax(t / T)`` (teacher) and ``softmax(s / T)`` (student), from logits.

    Per row: ``β = 0`` is ``KL(P ‖ Q)`` (forward KL), ``β = 1`` is ``KL(Q ‖ P)`` (reverse KL), in between
    ``β KL(P ‖ M) + (1 − β) KL(Q ‖ M)`` with ``M = β P + (1 − β) Q``: TRL's ``generalized_jsd_loss`` and
    Liger-Kernel's ``LigerJSD`` (which takes log-probabilities; this takes logits). No ``T²`` factor, as in TRL.

    Args:
        student_logits: ``[..., V]`` (``[B, T, V]`` as it comes), fp32/fp16/bf16/fp64; any strides.
        teacher_logits: the student's shape. Receives a gradient when it requires one (detach it to stop that).
        beta: ``β ∈ [0, 1]``.
        temperature: ``T > 0``.
        labels: optional integers of the leading shape; rows labelled ``ignore_index`` leave the sum and the count
            (taken on the device) and get no gradient.
        ignore_index: −100 as in TRL and ``F.cross_entropy``.
        reduction: ``batchmean`` (the mean over the rows kept; 0 if none is), ``sum``, or ``none`` (per row).

    Returns:
        fp32 (fp64 for fp64 inputs), for half inputs too: a scalar, or the leading shape for ``none``.
    """
    op = "jsd_loss"
    beta = check_beta(op, beta)
    temperature = _check_pair(op, student_logits, teacher_logits, temperature)
    check_reduction(op, reduction)
    lead, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
    flat = flat_labels(op, labels, lead)
    if not use_row_kernels(flat, student_logits, teacher_logits):
        return jsd_loss_reference(
            student_logits,
            teacher_logits,
            beta,
            temperature,
            labels=labels,
            ignore_index=ignore_index,
            reduction=reduction,
        )
    student = student_logits.reshape(-1, num_classes)
    teacher = teacher_logits.reshape(-1, num_classes)
    options = JSDOptions(beta, temperature, ignore_index, batchmean_scale(reduction, flat, student.shape[0]))
    loss = _JSDFunction.apply(student, teacher, flat, options, reduction)
    return loss.view(lead) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class JSDLoss(nn.Module):
    """``nn.Module`` form of :func:`jsd_loss`: ``JSDLoss(beta=0.5, temperature=1.0)(student_logits, teacher_logits,
    labels=None)``."""

    def __init__(
        self, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100
    ) -> None:
        super().__init__()
        # Checked at construction (ValueError), so that a bad option fails where it is written.
        op = type(self).__name__
        beta, temperature = check_beta(op, beta), check_temperature(op, temperature)
        check_reduction(op, reduction)
        self.beta, self.temperature, self.reduction, self.ignore_index = beta, temperature, reduction, ignore_index

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return jsd_loss(
            student_logits,
            teacher_logits,
            self.beta,
            self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}"


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def jsd_rows_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    """``[N]``: the divergence of each row of ``[N, V]`` logits, in at least fp32. Every temporary is ``[N, V]``
    (``logaddexp``, not TRL's ``stack``), which ``fused_linear``'s memory bound relies on."""
    dtype = compute_dtype(student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    # A teacher's −inf logit (P = 0) contributes 0 to KL(P ‖ ·) (xlogy_terms); KL(Q ‖ P) is then +inf, as it is.
    if beta == 0.0:
        return xlogy_terms(log_p.exp(), log_p - log_q).sum(dim=-1)
    if beta == 1.0:
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * xlogy_terms(log_p.exp(), log_p - log_m).sum(dim=-1) + (1 - beta) * (
        log_q.exp() * (log_q - log_m)
    ).sum(dim=-1)


def jsd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The rows of :func:`jsd_rows_reference` over ``[..., V]``, ignored rows zeroed, then ``reduction``."""
    op = "jsd_loss_reference"
    beta = check_beta(op, beta)
    temperature = _check_pair(op, student_logits, teacher_logits, temperature)
    check_reduction(op, reduction)
    lead, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
    rows = jsd_rows_reference(
        student_logits.reshape(-1, num_classes), teacher_logits.reshape(-1, num_classes), beta, temperature
    )
    out = reduce_rows_reference(rows, flat_labels(op, labels, lead), ignore_index, reduction)
    return out.view(lead) if reduction == "none" else out
