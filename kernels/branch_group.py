"""Every branch's cross-entropy and softened KL to its teacher in one forward launch pair and one backward launch.

The branch methods (ONE, CL-ILR, OKDDip: ``M`` branches on one trunk, each distilled from a teacher built out of the
branches' logits) take ``2M`` losses from the logits alone, per branch ``i`` of ``z`` ``[M, B, C]``:

    out[i]     = CE_i = (1/B) Σ_b (lse(z_i) − z_i,y)                               temperature 1
    out[M + i] = KL_i = T² · (1/B) Σ_b Σ_c q_i,c (log q_i,c − log p_i,c)

with ``p_i = softmax(z_i / T)`` and ``q_i = softmax(t_i / T) + ε``, not renormalised (the public codes add ``ε`` to the
softened target before its log: ONE's ``cifar_one.py``, CL-ILR's ``train_one.py``, OKDDip's ``train_GL.py``; ``ε = 0``
is the plain KL). The teacher ``t`` is ``[B, C]``, one for every branch (ONE's gated ensemble; read with a zero
branch stride), or ``[M, B, C]``, one per branch (CL-ILR's mean of the others, OKDDip's attention mix).

Notation, per row ``b`` and branch ``i``: ``a = z / T``, ``u = t / T``, ``s = softmax(u)``, ``q = s + ε``,
``c = log q − log p`` (``log q = u − lse(u)`` exactly when ``ε = 0``), ``W = Σ_c s_c c_c``.

Forward. One program per row reads the row of every branch and of its teacher (in chunks of ``BLOCK_C`` classes; one
chunk, held in registers, up to ``_MAX_TILE / M_PAD`` classes) and computes, first, the log-sum-exps ``lse(z)``,
``lse(a)`` and ``lse(u)`` (an online softmax: running maxima, sums rescaled when a maximum grows), then, with the
exact ones, ``Σ_c q c`` (the row's KL, before ``T²``) and ``W``; with several chunks that second pass reads the row
again. It writes the ``2M`` per-row values and the per-row stats (the three log-sum-exps and ``W``); the second
launch (``_rows.reduce_rows``: one program per value, each summing its rows in a fixed order, no atomics:
deterministic) gives the batch means.

Backward. With ``g`` the upstream gradient ``[2M]``, read from device memory (no host sync, capturable in a CUDA
graph; the caller weights each term through it), per row and class, ``[c = y]`` the one-hot label:

    ∂/∂z_i = (1/B) [ g[i] (softmax(z_i) − [c = y]) + g[M+i] · T · ((1 + Cε) p_i − q_i) ]
    ∂/∂t_i = (1/B) g[M+i] · T · s_i (c_i − W_i)                       (summed over i for a shared teacher)

(``∂(−Σ_c q_c log p_c)/∂a_k = (Σ_c q_c) p_k − q_k`` and ``Σ_c q_c = 1 + Cε``; for the teacher,
``∂ Σ_j q_j c_j / ∂s_j = c_j + 1`` and ``∂s_j/∂u_k = s_j (δ_jk − s_k)`` give ``s_k (c_k − W)``, the ``+1`` cancelling
since ``Σ s = 1``; ``∂a/∂z = ∂u/∂t = 1/T`` and the ``T²`` leave ``T``.) The teacher's gradient is computed only when
autograd asks for it (a teacher that requires grad: CL-ILR's and OKDDip's code leave it undetached; detach it for a
fixed target, as ONE does). One launch, one program per row, writes both gradients whole, in the inputs' dtypes.

Inputs are read through their strides (the stacked branches' logits are a view of one ``baddbmm``, separate networks'
a ``torch.stack``: never copied), in fp32, fp16 or bf16 (``logits`` and ``teacher_logits`` may differ); the maths is
fp32 and so are the losses.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, tl, triton, use_triton
from ffsd_kernels._row_kernels import weighted

# _check_label_range by this name: the tests switch this op's CPU label check off where CUDA has none.
from ffsd_kernels._rows import check_label_range as _check_label_range
from ffsd_kernels._rows import check_temperature, reduce_rows

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tiles(z_rows, t_rows, cols, col_mask, net_mask, stride_zc, stride_tc):
    """One chunk in fp32: the branches' logits and their teachers', ``[M_PAD, BLOCK_C]`` each (padded branches and
    masked classes load 0: finite, kept out of every sum by the masks)."""
    mask = net_mask[:, None] & col_mask[None, :]
    z = tl.load(z_rows + cols[None, :] * stride_zc, mask=mask, other=0.0)
    t = tl.load(t_rows + cols[None, :] * stride_tc, mask=mask, other=0.0)
    return z.to(tl.float32), t.to(tl.float32)


@triton.jit
def _lse_step(z, t, col_mask, inv_t, m_z, s_zt, s_z1, m_t, s_tt):
    """One chunk of the online softmaxes, per branch: running maxima ``m`` of the raw logits (student and teacher)
    and sums ``S`` at temperature T (``s_*t``) and, for the student's CE, 1 (``s_z1``), rescaled when a maximum
    grows."""
    m_z_new = tl.maximum(m_z, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
    s_zt = s_zt * tl.exp((m_z - m_z_new) * inv_t) + tl.sum(
        tl.where(col_mask[None, :], tl.exp((z - m_z_new[:, None]) * inv_t), 0.0), axis=1
    )
    s_z1 = s_z1 * tl.exp(m_z - m_z_new) + tl.sum(tl.where(col_mask[None, :], tl.exp(z - m_z_new[:, None]), 0.0), axis=1)
    m_t_new = tl.maximum(m_t, tl.max(tl.where(col_mask[None, :], t, float("-inf")), axis=1))
    s_tt = s_tt * tl.exp((m_t - m_t_new) * inv_t) + tl.sum(
        tl.where(col_mask[None, :], tl.exp((t - m_t_new[:, None]) * inv_t), 0.0), axis=1
    )
    return m_z_new, s_zt, s_z1, m_t_new, s_tt


@triton.jit
def _target_terms(z, t, col_mask, inv_t, lse_zt, lse_tt, epsilon):
    """``(s, q, c)`` of a chunk: the teacher's softmax ``s`` (0 on masked classes), ``q = s + ε`` (0 there too) and
    ``c = log q − log p``. Where ``r = ε / s`` is small, ``log q = log s + log1p(r)`` by its series (error ``r⁴/4``):
    ``log(s + ε)`` in fp32 would round ``ε`` away against ``s`` (with one class, the whole KL is that ``ε``), and with
    ``ε = 0`` ``log q`` is ``u − lse(u)`` itself."""
    log_p = z * inv_t - lse_zt[:, None]
    log_s = t * inv_t - lse_tt[:, None]
    s = tl.where(col_mask[None, :], tl.exp(log_s), 0.0)
    # Where s = 0 (a masked class, or an underflow) log q = log ε; with ε = 0 too, q = 0 weighs it out, and the
    # clamped log keeps every lane finite (no 0/0 or 0·(−inf) NaN to mask).
    positive = s > 0.0
    r = epsilon / tl.where(positive, s, 1.0)
    series = log_s + r * (1.0 - r * (0.5 - r / 3.0))
    log_q = tl.where(positive & (r < 1e-3), series, tl.log(tl.maximum(s + epsilon, 1e-30)))
    q = tl.where(col_mask[None, :], s + epsilon, 0.0)
    return s, q, log_q - log_p


@triton.jit
def _kl_step(z, t, col_mask, inv_t, lse_zt, lse_tt, epsilon, kl, w):
    """One chunk of the cross terms, with the exact log-sum-exps: ``Σ_c q c`` and ``W = Σ_c s c`` per branch (a
    class of ``q = 0`` or ``s = 0`` adds 0, whatever its ``c``: ``xlogy``'s convention)."""
    s, q, c = _target_terms(z, t, col_mask, inv_t, lse_zt, lse_tt, epsilon)
    return kl + tl.sum(weighted(q, c), axis=1), w + tl.sum(weighted(s, c), axis=1)


# Forward, first launch: program b takes row b of every branch and of its teacher, and writes that row's 2M values
# (the losses before the mean over B) and its stats.
@triton.jit
def _branch_rows_kernel(
    z_ptr,  # [M, B, C] logits
    t_ptr,  # [M, B, C] teachers' logits (stride_tm = 0: one [B, C] teacher for every branch)
    y_ptr,  # [B] integer labels in [0, C)
    rows_ptr,  # [2M, B] fp32 out: per-row CE (M rows), then per-row KL (M rows)
    stats_ptr,  # [4M, B] fp32 out: lse(z) (M rows), lse(z / T) (M), lse(t / T) (M), W (M)
    stride_zm,
    stride_zb,
    stride_zc,
    stride_tm,
    stride_tb,
    stride_tc,
    stride_y,
    num_branches,
    num_classes,
    inv_t,  # 1 / T
    epsilon,
    kl_scale,  # T²
    M_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # C ≤ BLOCK_C: the row is read once and kept in registers for both passes
):
    row = tl.program_id(0).to(tl.int64)
    num_rows = tl.num_programs(0).to(tl.int64)
    nets = tl.arange(0, M_PAD)
    net_mask = nets < num_branches
    nets = nets.to(tl.int64)
    z_rows = z_ptr + row * stride_zb + nets[:, None] * stride_zm  # [M_PAD, 1]
    t_rows = t_ptr + row * stride_tb + nets[:, None] * stride_tm

    m_z = tl.full([M_PAD], float("-inf"), dtype=tl.float32)
    m_t = tl.full([M_PAD], float("-inf"), dtype=tl.float32)
    s_zt = tl.zeros([M_PAD], dtype=tl.float32)
    s_z1 = tl.zeros([M_PAD], dtype=tl.float32)
    s_tt = tl.zeros([M_PAD], dtype=tl.float32)
    kl = tl.zeros([M_PAD], dtype=tl.float32)
    w = tl.zeros([M_PAD], dtype=tl.float32)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < num_classes
        z, t = _load_tiles(z_rows, t_rows, cols.to(tl.int64), col_mask, net_mask, stride_zc, stride_tc)
        m_z, s_zt, s_z1, m_t, s_tt = _lse_step(z, t, col_mask, inv_t, m_z, s_zt, s_z1, m_t, s_tt)
        lse_zt = m_z * inv_t + tl.log(s_zt)
        lse_tt = m_t * inv_t + tl.log(s_tt)
        kl, w = _kl_step(z, t, col_mask, inv_t, lse_zt, lse_tt, epsilon, kl, w)
    else:
        for c0 in range(0, num_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < num_classes
            z, t = _load_tiles(z_rows, t_rows, cols.to(tl.int64), col_mask, net_mask, stride_zc, stride_tc)
            m_z, s_zt, s_z1, m_t, s_tt = _lse_step(z, t, col_mask, inv_t, m_z, s_zt, s_z1, m_t, s_tt)
        lse_zt = m_z * inv_t + tl.log(s_zt)
        lse_tt = m_t * inv_t + tl.log(s_tt)
        for c0 in range(0, num_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < num_classes
            z, t = _load_tiles(z_rows, t_rows, cols.to(tl.int64), col_mask, net_mask, stride_zc, stride_tc)
            kl, w = _kl_step(z, t, col_mask, inv_t, lse_zt, lse_tt, epsilon, kl, w)

    # Cross-entropies: lse(z) − z_y. An out-of-range label (CUDA labels are not checked: a host sync) reads nothing
    # and makes its row's CE NaN.
    y = tl.load(y_ptr + row * stride_y).to(tl.int64)
    in_range = (y >= 0) & (y < num_classes)
    z_label = z_ptr + row * stride_zb + nets * stride_zm + y * stride_zc  # [M_PAD]
    z_y = tl.load(z_label, mask=net_mask & in_range, other=float("nan"))
    lse_z1 = m_z + tl.log(s_z1)
    tl.store(rows_ptr + nets * num_rows + row, lse_z1 - z_y.to(tl.float32), mask=net_mask)
    tl.store(rows_ptr + (num_branches + nets) * num_rows + row, kl * kl_scale, mask=net_mask)
    tl.store(stats_ptr + nets * num_rows + row, lse_z1, mask=net_mask)
    tl.store(stats_ptr + (num_branches + nets) * num_rows + row, lse_zt, mask=net_mask)
    tl.store(stats_ptr + (2 * num_branches + nets) * num_rows + row, lse_tt, mask=net_mask)
    tl.store(stats_ptr + (3 * num_branches + nets) * num_rows + row, w, mask=net_mask)


# Backward: program b writes row b of both gradients, every class, from the saved stats and the upstream gradient
# [2M] read from device memory.
@triton.jit
def _branch_backward_kernel(
    z_ptr,  # [M, B, C] logits
    t_ptr,  # [M, B, C] teachers' logits (stride_tm = 0 when shared)
    y_ptr,  # [B] labels
    stats_ptr,  # [4M, B] fp32, as the forward pass wrote them
    grad_ptr,  # [2M] upstream gradient
    dz_ptr,  # [M, B, C] out (written when LOGITS_GRAD)
    dt_ptr,  # [M, B, C] out, or [B, C] when TEACHER_SHARED (written when TEACHER_GRAD)
    stride_zm,
    stride_zb,
    stride_zc,
    stride_tm,
    stride_tb,
    stride_tc,
    stride_y,
    stride_grad,  # 0 for an expanded upstream gradient
    stride_dzm,
    stride_dzb,
    stride_dzc,
    stride_dtm,  # unused when TEACHER_SHARED
    stride_dtb,
    stride_dtc,
    num_branches,
    num_classes,
    inv_t,  # 1 / T
    epsilon,
    target_mass,  # Σ_c q_c = 1 + C·ε
    kl_grad_scale,  # T / B
    inv_rows,  # 1 / B
    M_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOGITS_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    TEACHER_SHARED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    num_rows = tl.num_programs(0).to(tl.int64)
    nets = tl.arange(0, M_PAD)
    net_mask = nets < num_branches
    nets = nets.to(tl.int64)
    z_rows = z_ptr + row * stride_zb + nets[:, None] * stride_zm
    t_rows = t_ptr + row * stride_tb + nets[:, None] * stride_tm
    dz_rows = dz_ptr + row * stride_dzb + nets[:, None] * stride_dzm
    dt_rows = dt_ptr + row * stride_dtb + nets[:, None] * stride_dtm
    dt_row = dt_ptr + row * stride_dtb
    y = tl.load(y_ptr + row * stride_y).to(tl.int64)

    lse_z1 = tl.load(stats_ptr + nets * num_rows + row, mask=net_mask, other=0.0)
    lse_zt = tl.load(stats_ptr + (num_branches + nets) * num_rows + row, mask=net_mask, other=0.0)
    lse_tt = tl.load(stats_ptr + (2 * num_branches + nets) * num_rows + row, mask=net_mask, other=0.0)
    w = tl.load(stats_ptr + (3 * num_branches + nets) * num_rows + row, mask=net_mask, other=0.0)
    # Per branch: the weight of its CE (g[i]) and of its KL (g[M + i]), the formulas' factors (1/B, T/B) folded in.
    g_ce = tl.load(grad_ptr + nets * stride_grad, mask=net_mask, other=0.0).to(tl.float32) * inv_rows
    g_kl = tl.load(grad_ptr + (num_branches + nets) * stride_grad, mask=net_mask, other=0.0).to(tl.float32)
    g_kl = g_kl * kl_grad_scale

    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < num_classes
        cols = cols.to(tl.int64)
        z, t = _load_tiles(z_rows, t_rows, cols, col_mask, net_mask, stride_zc, stride_tc)
        store_mask = net_mask[:, None] & col_mask[None, :]
        s, q, c = _target_terms(z, t, col_mask, inv_t, lse_zt, lse_tt, epsilon)
        if LOGITS_GRAD:
            one_hot = tl.where(cols == y, 1.0, 0.0)
            p = tl.exp(z * inv_t - lse_zt[:, None])
            kl_grad = target_mass * p - q
            dz = g_ce[:, None] * (tl.exp(z - lse_z1[:, None]) - one_hot[None, :]) + g_kl[:, None] * kl_grad
            tl.store(dz_rows + cols[None, :] * stride_dzc, dz.to(dz_ptr.dtype.element_ty), mask=store_mask)
        if TEACHER_GRAD:
            dt = tl.where(net_mask[:, None], g_kl[:, None] * weighted(s, c - w[:, None]), 0.0)
            if TEACHER_SHARED:
                shared = tl.sum(dt, axis=0)
                tl.store(dt_row + cols * stride_dtc, shared.to(dt_ptr.dtype.element_ty), mask=col_mask)
            else:
                tl.store(dt_rows + cols[None, :] * stride_dtc, dt.to(dt_ptr.dtype.element_ty), mask=store_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

# The most logits (branches × classes) one chunk of a tile holds, per tensor (the branches' and the teachers': two
# tiles): CIFAR-100's 100 classes of up to 16 branches are one chunk, ImageNet's 1000 of M ≤ 2.
_MAX_TILE = 2048


def _row_config(num_branches: int, num_classes: int) -> tuple[int, int, int]:
    """``(M_PAD, BLOCK_C, num_warps)`` of the row kernels (forward and backward), grid ``(B,)``: the branches padded
    to a power of two, chunks of at most ``_MAX_TILE // M_PAD`` classes (the next power of two of C when smaller),
    and about 8 logits of each tile per thread, up to 8 warps (``tests/kernels/test_compile.py`` checks that ptxas
    spills nothing at these sizes)."""
    m_pad = triton.next_power_of_2(num_branches)
    block_c = min(triton.next_power_of_2(num_classes), max(_MAX_TILE // m_pad, 16))
    num_warps = max(1, min(8, m_pad * block_c // 256))
    return m_pad, block_c, num_warps


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _teacher_strides(teacher: torch.Tensor) -> tuple[int, int, int]:
    """``(stride over branches, over rows, over classes)``: a ``[B, C]`` teacher is every branch's (stride 0)."""
    if teacher.dim() == 2:
        return 0, teacher.stride(0), teacher.stride(1)
    return teacher.stride(0), teacher.stride(1), teacher.stride(2)


def _branch_forward(
    logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [2M], stats [4M, B])``, fp32: two launches, no host synchronisation."""
    num_branches, num_rows, num_classes = logits.shape
    rows = torch.empty(2 * num_branches, num_rows, device=logits.device, dtype=torch.float32)
    stats = torch.empty(4 * num_branches, num_rows, device=logits.device, dtype=torch.float32)
    stride_tm, stride_tb, stride_tc = _teacher_strides(teacher)
    m_pad, block_c, num_warps = _row_config(num_branches, num_classes)
    _branch_rows_kernel[(num_rows,)](
        z_ptr=logits, t_ptr=teacher, y_ptr=labels, rows_ptr=rows, stats_ptr=stats, stride_zm=logits.stride(0),
        stride_zb=logits.stride(1), stride_zc=logits.stride(2), stride_tm=stride_tm, stride_tb=stride_tb,
        stride_tc=stride_tc, stride_y=labels.stride(0), num_branches=num_branches, num_classes=num_classes,
        inv_t=1.0 / temperature, epsilon=epsilon, kl_scale=temperature * temperature, M_PAD=m_pad, BLOCK_C=block_c,
        ONE_CHUNK=num_classes <= block_c, num_warps=num_warps,
    )  # fmt: skip
    out, _ = reduce_rows(rows, None, 0, 1.0 / num_rows)
    return out, stats


def _branch_backward(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
    epsilon: float,
    logits_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂logits, ∂/∂teacher)`` in the inputs' dtypes and layouts (``empty_like``: a dense input's strides, else
    contiguous), each None unless asked for: one launch."""
    if not (logits_grad or teacher_grad):
        return None, None
    num_branches, num_rows, num_classes = logits.shape
    dz = torch.empty_like(logits) if logits_grad else None
    dt = torch.empty_like(teacher) if teacher_grad else None
    dz_arg = dz if dz is not None else logits  # placeholders, never written
    dt_arg = dt if dt is not None else teacher
    stride_tm, stride_tb, stride_tc = _teacher_strides(teacher)
    stride_dtm, stride_dtb, stride_dtc = _teacher_strides(dt_arg)
    m_pad, block_c, num_warps = _row_config(num_branches, num_classes)
    _branch_backward_kernel[(num_rows,)](
        z_ptr=logits, t_ptr=teacher, y_ptr=labels, stats_ptr=stats, grad_ptr=grad, dz_ptr=dz_arg, dt_ptr=dt_arg,
        stride_zm=logits.stride(0), stride_zb=logits.stride(1), stride_zc=logits.stride(2), stride_tm=stride_tm,
        stride_tb=stride_tb, stride_tc=stride_tc, stride_y=labels.stride(0), stride_grad=grad.stride(0),
        stride_dzm=dz_arg.stride(0), stride_dzb=dz_arg.stride(1), stride_dzc=dz_arg.stride(2), stride_dtm=stride_dtm,
        stride_dtb=stride_dtb, stride_dtc=stride_dtc, num_branches=num_branches, num_classes=num_classes,
        inv_t=1.0 / temperature, epsilon=epsilon, target_mass=1.0 + num_classes * epsilon,
        kl_grad_scale=temperature / num_rows, inv_rows=1.0 / num_rows, M_PAD=m_pad, BLOCK_C=block_c,
        LOGITS_GRAD=logits_grad, TEACHER_GRAD=teacher_grad, TEACHER_SHARED=teacher.dim() == 2, num_warps=num_warps,
    )  # fmt: skip
    return dz, dt


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _BranchDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, epsilon: float
    ) -> torch.Tensor:
        out, stats = _branch_forward(logits, teacher, labels, temperature, epsilon)
        ctx.save_for_backward(logits, teacher, labels, stats)
        ctx.temperature, ctx.epsilon = temperature, epsilon
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        logits, teacher, labels, stats = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:2]
        dz, dt = _branch_backward(logits, teacher, labels, stats, grad, ctx.temperature, ctx.epsilon, *wanted)
        return dz, dt, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _check_labels(op: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if (
        labels.shape != logits.shape[1:2]
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
    ):
        raise ValueError(
            f"{op} expects integer labels of shape ({logits.shape[1]},), got {labels.dtype} {tuple(labels.shape)}"
        )


def _check_inputs(
    op: str, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, epsilon: float
) -> tuple[float, float]:
    """``(temperature, epsilon)`` as floats; TypeError on bad dtypes, ValueError on bad shapes, devices,
    temperatures, epsilons or CPU labels outside ``[0, C)``."""
    check_dtypes(op, logits=logits, teacher_logits=teacher)
    if logits.dim() != 3:
        raise ValueError(f"{op} expects logits of shape [M, B, C] (M branches), got {tuple(logits.shape)}")
    if teacher.shape not in (logits.shape, logits.shape[1:]):
        raise ValueError(
            f"{op} expects teacher_logits of shape {tuple(logits.shape[1:])} (one teacher) or {tuple(logits.shape)} "
            f"(one per branch), got {tuple(teacher.shape)}"
        )
    _check_labels(op, logits, labels)
    if teacher.device != logits.device or labels.device != logits.device:
        devices = f"{logits.device}, {teacher.device}, {labels.device}"
        raise ValueError(f"{op} expects every tensor on one device, got {devices}")
    temperature = check_temperature(op, temperature)
    epsilon = float(epsilon)
    if not epsilon >= 0:
        raise ValueError(f"{op} expects epsilon >= 0, got {epsilon}")
    # No ignore_index: every row is a sample with a class. CUDA labels are not read (a host sync).
    _check_label_range(op, labels, logits.shape[2], None)
    return temperature, epsilon


def branch_distillation_losses(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """Every branch's CE and softened KL to its teacher (ONE, CL-ILR, OKDDip): ``[2M]`` values in one forward
    launch pair and one backward launch.

    With ``z_i = logits[i]``, ``t_i`` the teacher of branch ``i`` (``teacher_logits`` itself when ``[B, C]``, else
    ``teacher_logits[i]``), ``p = softmax(z_i / T)``, ``q = softmax(t_i / T) + ε`` (not renormalised):

    * ``out[i] = F.cross_entropy(z_i, labels)``;
    * ``out[M + i] = T² · mean_b Σ_c q_c (log q_c − log p_c)`` (``T² · F.kl_div(log p, q, reduction='batchmean')``
      when ``ε = 0``).

    Weight the terms by weighting the output (``(out * weights).sum()``): the backward pass reads that upstream
    gradient from device memory. The teacher is used as given: its gradient (through the KL terms) is computed when
    it requires grad; detach it for a fixed target.

    Args:
        logits: ``[M, B, C]``, ``M ≥ 1``; fp32/fp16/bf16/fp64, any strides (read in place, never copied).
        teacher_logits: ``[B, C]`` (one teacher for every branch) or ``[M, B, C]`` (one per branch), of any of those
            dtypes (it may differ from ``logits``'s) and strides.
        labels: ``[B]`` integers in ``[0, C)``, on the logits' device. CPU labels are checked (ValueError); CUDA ones
            are not, since reading them would be a host sync: an out-of-range label makes the CE terms NaN.
        temperature: ``T > 0`` (for the KL terms; the CE terms are at temperature 1).
        epsilon: ``ε ≥ 0`` added to the teacher's softened probabilities (the public codes' 1e-7).

    Returns:
        ``[2M]`` float32 (float64 if an input is float64: the reference): the M CEs, then the M KLs. On CUDA (and on
        CPU tensors under ``TRITON_INTERPRET=1``) with fp32/fp16/bf16 inputs: one per-row launch and one fixed-order
        reduction launch (no atomics: deterministic) forward, one launch backward writing both gradients whole, no
        host synchronisation (capturable in a CUDA graph); anything else runs
        :func:`branch_distillation_losses_reference`.
    """
    op = "branch_distillation_losses"
    temperature, epsilon = _check_inputs(op, logits, teacher_logits, labels, temperature, epsilon)
    if not (use_triton(logits, teacher_logits) and logits.numel() > 0):
        return branch_distillation_losses_reference(logits, teacher_logits, labels, temperature, epsilon)
    return _BranchDistillationFunction.apply(logits, teacher_logits, labels, temperature, epsilon)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class BranchDistillationLosses(nn.Module):
    """``nn.Module`` form of :func:`branch_distillation_losses`:
    ``BranchDistillationLosses(temperature=3, epsilon=1e-7)(logits, teacher_logits, labels)`` gives ``[2M]``."""

    def __init__(self, temperature: float = 1.0, epsilon: float = 0.0) -> None:
        super().__init__()
        self.temperature = check_temperature(type(self).__name__, temperature)  # at construction: ValueError
        self.epsilon = float(epsilon)
        if not self.epsilon >= 0:
            raise ValueError(f"{type(self).__name__} expects epsilon >= 0, got {epsilon}")

    def forward(self, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return branch_distillation_losses(logits, teacher_logits, labels, self.temperature, self.epsilon)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, epsilon={self.epsilon}"


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def branch_distillation_losses_reference(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """``[2M]``: every branch's ``F.cross_entropy`` (one op over the ``[M·B, C]`` rows, then a mean per branch) and
    ``T² · mean_b Σ_c q (log q − log p)`` with ``q = softmax(t / T) + ε``, ``p = softmax(z / T)``, in float32 (half
    inputs upcast) or float64 if an input is float64: what the branch methods computed before this op, term for
    term, with a class of ``q = 0`` adding 0 (``KLDivLoss``'s convention, and the kernel's)."""
    op = "branch_distillation_losses_reference"
    temperature, epsilon = _check_inputs(op, logits, teacher_logits, labels, temperature, epsilon)
    # float64 if either input is, else float32 (not torch.promote_types: an aten call of its own in a trace).
    dtype = max(compute_dtype(logits.dtype), compute_dtype(teacher_logits.dtype), key=lambda d: d.itemsize)
    z, t = logits.to(dtype), teacher_logits.to(dtype)
    num_branches, batch = z.shape[0], labels.shape[0]
    ce = F.cross_entropy(z.flatten(0, 1), labels.repeat(num_branches), reduction="none").view(num_branches, batch)
    target = F.softmax(t / temperature, dim=-1)
    if epsilon == 0:
        # log q as log_softmax, not log(softmax): a teacher class whose softened probability underflows to 0 (a logit
        # ~104·T below the row's largest, in fp32) would give 0·(−inf) = NaN, value and gradients, where the KL (the
        # kernel, the codes' KLDivLoss) counts 0. With ε > 0, q ≥ ε and its log is finite.
        log_q = F.log_softmax(t / temperature, dim=-1)
    else:
        target = target + epsilon
        log_q = target.log()
    log_p = F.log_softmax(z / temperature, dim=-1)
    kl = temperature * temperature * (target * (log_q - log_p)).sum(-1).mean(-1)
    return torch.cat([ce.mean(1), kl])
