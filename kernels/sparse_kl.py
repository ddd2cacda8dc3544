"""Distillation from a sparse teacher: ``T² · KL`` against the teacher's top-k log-probabilities, stored offline.

Many LLM pipelines keep only the teacher's ``k`` largest log-probabilities per token and their vocabulary indices
(DistillKit, axolotl, NeMo-Aligner; Liger-Kernel#441 asks for it), so the student's ``[N, V]`` logits meet a teacher
of ``[N, k]``. The teacher's probability outside its top-k, the tail mass ``τ = 1 − Σ_k exp(ℓ_k)``, is unknown in
detail; what to do with it is the ``tail`` option:

* ``"zero"``: the tail gets no probability: the teacher is renormalised over its k entries and compared with the
  student's full softmax at those entries. DistillKit's ``missing_probability_handling="zero"`` (its default).
* ``"bucket"``: the tail is one more class, ``k + 1`` in all, for both: the teacher's ``τ`` and the student's
  ``1 − Σ_k q_k``. DistillKit's ``"symmetric_uniform"`` (the tail spread uniformly over the missing tokens in both,
  which gives this same KL) and NeMo-Aligner's ``use_k_add_1_logits``.
* ``"renormalize"``: both are renormalised over the teacher's k entries, the student's full softmax never formed.
  NeMo-Aligner's default (``_TopKLogitsCrossEntropy``, which softmaxes the student's logits gathered at the
  teacher's top-k ids).

(The DistillKit and NeMo-Aligner behaviour is read from their loss code as stored in the reference index: DistillKit's
``sparse_kl_div`` / ``get_target_logprobs``, NeMo-Aligner's ``megatron_gpt_knowledge_distillation.py`` and
``utils/distributed.py``; the code was read, not run.)

Notation. Per row: student logits ``s`` over ``V`` classes, ``a = s / T``; teacher entries ``(ℓ_j, i_j)``, ``j < k``,
``ℓ`` log-probabilities at temperature 1 (a ``log_softmax`` of the teacher's logits); an entry with ``ℓ = −inf`` is
padding and left out. The teacher at temperature ``T`` is ``u_j = ℓ_j / T`` (and ``u_τ = log τ / T`` with the
bucket), normalised over what the mode keeps: ``log p_j = u_j − Z_t``, ``Z_t = lse(u)``, as DistillKit re-tempers
its stored log-probabilities. The student: ``log q_j = a_{i_j} − lse(a)`` over the vocabulary (``zero``, ``bucket``),
or ``a_{i_j} − lse_j(a_{i_j})`` over the k (``renormalize``); ``q_τ = 1 − Σ_j q_j`` (clamped at 1e-30, as DistillKit
clamps). Per row

    KL_row = Σ_j p_j (log p_j − log q_j)  [+ p_τ (log p_τ − log q_τ)],   loss_row = T² · KL_row,

a term with ``p = 0`` being 0 (torch's ``xlogy``). Rows, ``labels`` / ``ignore_index`` and the reductions are those
of ``_rows.py``. The teacher gets no gradient (it is data). The student's, with ``P_c = Σ_{j: i_j = c} p_j``,
``Q_c = Σ_{j: i_j = c} q_j`` and ``r = p_τ / q_τ`` (0 without the bucket):

    zero, bucket:  ∂loss_row/∂s_c = T (q_c (1 − r) + r Q_c − P_c)     (q_c the full softmax of a)
    renormalize:   ∂loss_row/∂s_c = T (Q_c − P_c)                      (0 outside the top-k)

(from ``∂q_j/∂a_c = q_j (δ_{i_j c} − q_c)``, ``Σ_j p_j = 1 − p_τ`` and ``1 − p_τ − p_τ Σ_j q_j / q_τ = 1 − r``).

Kernels. One program per row. The forward pass reads the student's row once with an online softmax (not at all for
``renormalize``), then the k entries in chunks (two short passes: the normalisers, then the sums) and gathers the
student's logits at their indices; it saves per-row fp32 ``lse``, ``Z_t`` and ``r``. The backward pass writes the
dense part ``T q_c (1 − r)`` in one more pass over the row, then (after a barrier, so that its stores land after
the dense ones) the k entries' values, ``P`` and ``Q`` summed over duplicate indices chunk by chunk.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, tl, triton
from ffsd_kernels._row_kernels import online_lse_step, row_kept, weighted
from ffsd_kernels._rows import (
    RowOptions,
    check_logits,
    check_reduction,
    check_temperature,
    flat_labels,
    launch_config,
    reduce_losses,
    reduce_rows_reference,
    use_row_kernels,
    xlogy_terms,
)

TAILS = ("zero", "bucket", "renormalize")
TINY = 1e-30  # the floor of the student's tail mass q_τ, whose 1 − Σ q_j can round to 0 or below (the kernels' too)

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _topk_entries(s_row, lp_row, idx_row, ks, kept, stride_sc, stride_lk, stride_ik, num_classes, num_topk,
                  inv_temperature):  # fmt: skip
    """Entries ``ks`` of a row's top-k, fp32: ``(ℓ, a = s_i / T, index, valid, in_range)``. Padding
    (``ℓ = −inf``), lanes past k and ignored rows are not valid and read no student logit; a valid entry whose index
    is outside ``[0, V)`` reads nothing and makes its ``a`` NaN (CPU indices are checked on the host)."""
    in_k = (ks < num_topk) & kept
    lp = tl.load(lp_row + ks * stride_lk, mask=in_k, other=float("-inf")).to(tl.float32)
    idx = tl.load(idx_row + ks * stride_ik, mask=in_k, other=0).to(tl.int64)
    valid = in_k & (lp > float("-inf"))
    in_range = (idx >= 0) & (idx < num_classes)
    s = tl.load(s_row + idx * stride_sc, mask=valid & in_range, other=float("nan")).to(tl.float32)
    return lp, tl.where(valid, s * inv_temperature, 0.0), idx, valid, in_range


@triton.jit
def _sparse_kl_fwd_kernel(
    s_ptr,  # [N, V] student logits
    lp_ptr,  # [N, K] teacher top-k log-probabilities (temperature 1); −inf marks padding
    idx_ptr,  # [N, K] their vocabulary indices
    y_ptr,  # [N] integer labels (read when HAS_LABELS)
    loss_ptr,  # [N] fp32 out: T² KL_row, 0 on an ignored row
    lse_s_ptr,  # [N] fp32 out: the student's normaliser (lse(a) over V, or over the k for RENORMALIZE)
    lse_t_ptr,  # [N] fp32 out: Z_t, the teacher's normaliser
    ratio_ptr,  # [N] fp32 out: r = p_τ / q_τ (BUCKET), else 0
    stride_sb, stride_sc, stride_lb, stride_lk, stride_ib, stride_ik,
    num_classes, num_topk, inv_temperature,
    loss_scale,  # T²
    ignore_index,
    BUCKET: tl.constexpr,  # tail="bucket"
    RENORMALIZE: tl.constexpr,  # tail="renormalize" (neither: "zero")
    HAS_LABELS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    lp_row = lp_ptr + row * stride_lb
    idx_row = idx_ptr + row * stride_ib
    label, kept = row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)

    # The student's log-sum-exp over the vocabulary, by online softmax (RENORMALIZE takes it over the k below).
    m_a = float("-inf")
    d_a = 0.0
    if not RENORMALIZE:
        for c0 in range(0, num_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = (cols < num_classes) & kept  # an ignored row reads nothing
            s = tl.load(s_row + cols.to(tl.int64) * stride_sc, mask=mask, other=0.0).to(tl.float32)
            m_a, d_a = online_lse_step(m_a, d_a, s * inv_temperature, mask)

    # First pass over the k entries: the teacher's normaliser, its kept mass Σ exp(ℓ), the student's over the k.
    m_t = float("-inf")
    d_t = 0.0
    kept_mass = 0.0
    for k0 in range(0, num_topk, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        lp, a, idx, valid, in_range = _topk_entries(s_row, lp_row, idx_row, ks, kept, stride_sc, stride_lk, stride_ik,
                                                    num_classes, num_topk, inv_temperature)  # fmt: skip
        m_t, d_t = online_lse_step(m_t, d_t, lp * inv_temperature, valid)
        kept_mass += tl.sum(tl.where(valid, tl.exp(lp), 0.0), axis=0)
        if RENORMALIZE:
            m_a, d_a = online_lse_step(m_a, d_a, a, valid)
    lse_s = m_a + tl.log(d_a)
    u_tail = float("-inf")
    if BUCKET:
        # The bucket joins the teacher's normaliser as one more entry, u_τ = log τ / T (−inf when τ = 0; the
        # shift of 0 then keeps (−inf) − (−inf) out).
        u_tail = tl.log(tl.maximum(1.0 - kept_mass, 0.0)) * inv_temperature
        m_new = tl.maximum(m_t, u_tail)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d_t = d_t * tl.exp(m_t - shift) + tl.exp(u_tail - shift)
        m_t = m_new
    lse_t = m_t + tl.log(d_t)

    # Second pass: Σ_j p_j (log p_j − log q_j) and the student's top-k mass Σ_j q_j.
    kl = 0.0
    student_mass = 0.0
    for k0 in range(0, num_topk, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        lp, a, idx, valid, in_range = _topk_entries(s_row, lp_row, idx_row, ks, kept, stride_sc, stride_lk, stride_ik,
                                                    num_classes, num_topk, inv_temperature)  # fmt: skip
        log_p = lp * inv_temperature - lse_t
        log_q = a - lse_s
        p = tl.where(valid, tl.exp(log_p), 0.0)
        kl += tl.sum(weighted(p, log_p - log_q), axis=0)
        student_mass += tl.sum(tl.where(valid, tl.exp(log_q), 0.0), axis=0)
    ratio = 0.0
    if BUCKET:
        q_tail = tl.maximum(1.0 - student_mass, 1e-30)  # TINY
        log_p_tail = u_tail - lse_t
        p_tail = tl.exp(log_p_tail)
        kl += weighted(p_tail, log_p_tail - tl.log(q_tail))
        ratio = p_tail / q_tail
    tl.store(loss_ptr + row, tl.where(kept, kl * loss_scale, 0.0))
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(ratio_ptr + row, ratio)


@triton.jit
def _sparse_kl_bwd_kernel(
    s_ptr,  # [N, V] student logits
    lp_ptr,  # [N, K] teacher top-k log-probabilities
    idx_ptr,  # [N, K] their indices
    y_ptr,  # [N] integer labels (read when HAS_LABELS)
    lse_s_ptr,  # [N] fp32: the student's normaliser
    lse_t_ptr,  # [N] fp32: Z_t
    ratio_ptr,  # [N] fp32: r
    grad_ptr,  # [] or [N] upstream gradient
    norm_ptr,  # [1] fp32: 1 / max(#kept rows, 1) (read when HAS_NORM)
    ds_ptr,  # [N, V] out: gradient of the student
    stride_sb, stride_sc, stride_lb, stride_lk, stride_ib, stride_ik,
    stride_g,  # 0 for a scalar upstream gradient
    stride_dsb, stride_dsc,
    num_classes, num_topk, inv_temperature,
    grad_scale,  # T, times 1/N for an unlabelled batchmean
    ignore_index,
    BUCKET: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    lp_row = lp_ptr + row * stride_lb
    idx_row = idx_ptr + row * stride_ib
    ds_row = ds_ptr + row * stride_dsb
    label, kept = row_kept(y_ptr, row, ignore_index, HAS_LABELS=HAS_LABELS)
    g = tl.load(grad_ptr + row * stride_g).to(tl.float32) * grad_scale
    if HAS_NORM:
        g = g * tl.load(norm_ptr)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    ratio = tl.load(ratio_ptr + row)

    # The dense part, T q_c (1 − r) (0 for RENORMALIZE); an ignored row's statistics are NaN: tl.where writes 0.
    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        in_row = cols < num_classes
        cols = cols.to(tl.int64)
        ds = tl.zeros([BLOCK_C], dtype=tl.float32)
        if not RENORMALIZE:
            s = tl.load(s_row + cols * stride_sc, mask=in_row & kept, other=0.0).to(tl.float32)
            ds = g * tl.exp(s * inv_temperature - lse_s) * (1.0 - ratio)
        ds = tl.where(kept, ds, 0.0)
        tl.store(ds_row + cols * stride_dsc, ds.to(ds_ptr.dtype.element_ty), mask=in_row)
    # The top-k entries overwrite their classes' dense values: every thread's dense stores first.
    tl.debug_barrier()
    for k0 in range(0, num_topk, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        lp, a, idx, valid, in_range = _topk_entries(s_row, lp_row, idx_row, ks, kept, stride_sc, stride_lk, stride_ik,
                                                    num_classes, num_topk, inv_temperature)  # fmt: skip
        q = tl.exp(a - lse_s)
        # P and Q at these entries' classes, summed over every entry of the row with the same index.
        big_p = tl.zeros([BLOCK_K], dtype=tl.float32)
        big_q = tl.zeros([BLOCK_K], dtype=tl.float32)
        for j0 in range(0, num_topk, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            lp_j, a_j, idx_j, valid_j, in_range_j = _topk_entries(
                s_row, lp_row, idx_row, js, kept, stride_sc, stride_lk, stride_ik, num_classes, num_topk,
                inv_temperature)  # fmt: skip
            same = (idx[:, None] == idx_j[None, :]) & valid_j[None, :]
            big_p += tl.sum(tl.where(same, tl.exp(lp_j * inv_temperature - lse_t)[None, :], 0.0), axis=1)
            big_q += tl.sum(tl.where(same, tl.exp(a_j - lse_s)[None, :], 0.0), axis=1)
        if RENORMALIZE:
            ds = g * (big_q - big_p)
        else:
            ds = g * (q * (1.0 - ratio) + ratio * big_q - big_p)
        tl.store(ds_row + idx * stride_dsc, ds.to(ds_ptr.dtype.element_ty), mask=valid & in_range)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def _topk_block(num_topk: int) -> int:
    """Entries per chunk of the top-k: all of them up to 64 (the backward pass holds ``BLOCK_K²`` comparisons of
    duplicate indices, 4096 at 64), in chunks of 64 beyond. The row's chunks are ``_rows.launch_config``'s."""
    return min(triton.next_power_of_2(num_topk), 64)


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


# Rows of the per-row fp32 statistics that the forward pass saves.
_LSE_S, _LSE_T, _RATIO = range(3)


def _sparse_kl_forward(
    student: torch.Tensor,
    logprobs: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor | None,
    options: RowOptions,
    *,
    tail: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [1, N], stats [3, N])``, fp32: per-row ``T² KL_row``, and lse, Z_t, r indexed by ``_LSE_S`` …"""
    num_rows, num_classes = student.shape
    block_c, num_warps = launch_config(num_classes)
    rows = torch.empty(1, num_rows, device=student.device, dtype=torch.float32)
    stats = torch.empty(3, num_rows, device=student.device, dtype=torch.float32)
    _sparse_kl_fwd_kernel[(num_rows,)](
        s_ptr=student, lp_ptr=logprobs, idx_ptr=indices, y_ptr=labels if labels is not None else stats,
        loss_ptr=rows[0], lse_s_ptr=stats[_LSE_S], lse_t_ptr=stats[_LSE_T], ratio_ptr=stats[_RATIO],
        stride_sb=student.stride(0), stride_sc=student.stride(1), stride_lb=logprobs.stride(0),
        stride_lk=logprobs.stride(1), stride_ib=indices.stride(0), stride_ik=indices.stride(1), num_classes=num_classes,
        num_topk=logprobs.shape[1], inv_temperature=1.0 / options.temperature,
        loss_scale=options.temperature * options.temperature, ignore_index=options.ignore_index,
        BUCKET=tail == "bucket", RENORMALIZE=tail == "renormalize", HAS_LABELS=labels is not None, BLOCK_C=block_c,
        BLOCK_K=_topk_block(logprobs.shape[1]), num_warps=num_warps,
    )  # fmt: skip
    return rows, stats


def _sparse_kl_backward(
    student: torch.Tensor,
    logprobs: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    norm: torch.Tensor | None,
    grad: torch.Tensor,
    options: RowOptions,
    *,
    tail: str,
) -> torch.Tensor:
    """``∂/∂student`` in its dtype; ``grad`` is ``[]`` or ``[N]``, ``norm`` the device normaliser of a labelled
    batchmean (else None)."""
    num_rows, num_classes = student.shape
    block_c, num_warps = launch_config(num_classes)
    ds = torch.empty(student.shape, device=student.device, dtype=student.dtype)
    _sparse_kl_bwd_kernel[(num_rows,)](
        s_ptr=student, lp_ptr=logprobs, idx_ptr=indices, y_ptr=labels if labels is not None else stats,
        lse_s_ptr=stats[_LSE_S], lse_t_ptr=stats[_LSE_T], ratio_ptr=stats[_RATIO], grad_ptr=grad,
        norm_ptr=norm if norm is not None else stats, ds_ptr=ds, stride_sb=student.stride(0),
        stride_sc=student.stride(1), stride_lb=logprobs.stride(0), stride_lk=logprobs.stride(1),
        stride_ib=indices.stride(0), stride_ik=indices.stride(1), stride_g=grad.stride(0) if grad.dim() else 0,
        stride_dsb=ds.stride(0), stride_dsc=ds.stride(1), num_classes=num_classes, num_topk=logprobs.shape[1],
        inv_temperature=1.0 / options.temperature, grad_scale=options.temperature * options.host_scale,
        ignore_index=options.ignore_index, BUCKET=tail == "bucket", RENORMALIZE=tail == "renormalize",
        HAS_LABELS=labels is not None, HAS_NORM=norm is not None, BLOCK_C=block_c,
        BLOCK_K=_topk_block(logprobs.shape[1]), num_warps=num_warps,
    )  # fmt: skip
    return ds


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _SparseKLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        logprobs: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor | None,
        options: RowOptions,
        tail: str,
    ) -> torch.Tensor:
        rows, stats = _sparse_kl_forward(student, logprobs, indices, labels, options, tail=tail)
        out, norm = reduce_losses(rows, labels, options)
        ctx.save_for_backward(student, logprobs, indices, labels, stats, norm)
        ctx.options, ctx.tail = options, tail
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        student, logprobs, indices, labels, stats, norm = ctx.saved_tensors
        ds = None
        if ctx.needs_input_grad[0]:
            ds = _sparse_kl_backward(student, logprobs, indices, labels, stats, norm, grad, ctx.options, tail=ctx.tail)
        return ds, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def check_tail(op: str, tail: str) -> str:
    if tail not in TAILS:
        raise ValueError(f"{op} expects tail in {TAILS}, got {tail!r}")
    return tail


def _check_inputs(
    op: str, student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor, teacher_topk_indices: torch.Tensor
) -> None:
    """TypeError on bad dtypes; ValueError on bad shapes, devices, or CPU indices outside ``[0, V)``."""
    check_logits(op, student_logits, "student_logits")
    lead, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
    check_teacher(op, lead, num_classes, student_logits.device, teacher_topk_logprobs, teacher_topk_indices)


def check_teacher(
    op: str,
    lead: torch.Size,
    num_classes: int,
    device: torch.device,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
) -> None:
    """The sparse teacher's checks for a student of leading shape ``lead`` over ``num_classes`` on ``device``:
    TypeError on bad dtypes; ValueError on bad shapes, devices, or CPU indices outside ``[0, V)`` (CUDA indices are
    not read, a host sync: an out-of-range one makes its row NaN instead)."""
    check_dtypes(op, teacher_topk_logprobs=teacher_topk_logprobs)
    indices = teacher_topk_indices
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{op} expects integer teacher_topk_indices, got {indices.dtype}")
    shape = teacher_topk_logprobs.shape
    if shape[:-1] != lead or shape[-1] < 1 or indices.shape != shape:
        raise ValueError(
            f"{op} expects teacher_topk_logprobs and teacher_topk_indices of one shape [..., k] with the student's "
            f"leading shape {tuple(lead)}, got {tuple(shape)} and {tuple(indices.shape)}"
        )
    devices = {device, teacher_topk_logprobs.device, indices.device}
    if len(devices) > 1:
        raise ValueError(f"{op} expects every tensor on one device, got {sorted(map(str, devices))}")
    if indices.device.type == "cpu" and indices.numel():
        bad = indices[(teacher_topk_logprobs > float("-inf")) & ((indices < 0) | (indices >= num_classes))]
        if bad.numel():
            raise ValueError(f"{op} expects teacher_topk_indices in [0, {num_classes}), got {bad[0].item()}")


def sparse_kl_div_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    temperature: float = 1.0,
    *,
    tail: str = "zero",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``T² · KL(p_t ‖ p_s)`` with the teacher given as its top-k log-probabilities (the module docstring).

    Args:
        student_logits: ``[..., V]`` (``[B, T, V]`` as it comes), fp32/fp16/bf16/fp64; any strides. Receives the
            gradient.
        teacher_topk_logprobs: ``[..., k]``, the teacher's log-probabilities at temperature 1 (``log_softmax`` of
            its logits, then ``topk``), any float dtype of the student's set; ``−inf`` marks padding (fewer than k
            stored). No gradient reaches it.
        teacher_topk_indices: ``[..., k]`` integers in ``[0, V)``, the vocabulary indices of those entries.
        temperature: ``T > 0``: the student's logits and the teacher's log-probabilities are divided by it.
        tail: ``"zero"`` (DistillKit's default), ``"bucket"`` or ``"renormalize"`` (NeMo-Aligner's default): what
            the teacher's probability outside its top-k becomes (the module docstring).
        labels, ignore_index, reduction: as in :func:`ffsd_kernels.kl_div_loss`.

    Returns:
        fp32 (fp64 for fp64 inputs), for half inputs too: a scalar, or the leading shape for ``none``.

    fp32/fp16/bf16 tensors on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) run the fused Triton kernels, with
    no host synchronisation; anything else runs :func:`sparse_kl_div_loss_reference`.
    """
    op = "sparse_kl_div_loss"
    temperature = check_temperature(op, temperature)
    check_reduction(op, reduction)
    check_tail(op, tail)
    _check_inputs(op, student_logits, teacher_topk_logprobs, teacher_topk_indices)
    lead, num_classes, num_topk = student_logits.shape[:-1], student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    flat = flat_labels(op, labels, lead)
    if not use_row_kernels(flat, student_logits, teacher_topk_logprobs):
        return sparse_kl_div_loss_reference(
            student_logits, teacher_topk_logprobs, teacher_topk_indices, temperature, tail=tail, labels=labels,
            ignore_index=ignore_index, reduction=reduction,
        )  # fmt: skip
    student = student_logits.reshape(-1, num_classes)
    logprobs = teacher_topk_logprobs.detach().reshape(-1, num_topk)
    indices = teacher_topk_indices.reshape(-1, num_topk)
    options = RowOptions.of(temperature, reduction, ignore_index, flat, student.shape[0])
    loss = _SparseKLDivFunction.apply(student, logprobs, indices, flat, options, tail)
    return loss.view(lead) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class SparseKLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`sparse_kl_div_loss`, its options checked at construction:
    ``SparseKLDivLoss(temperature=1.0, tail="zero")(student_logits, topk_logprobs, topk_indices, labels=None)``."""

    def __init__(
        self, temperature: float = 1.0, tail: str = "zero", reduction: str = "batchmean", ignore_index: int = -100
    ) -> None:
        super().__init__()
        op = type(self).__name__
        self.temperature = check_temperature(op, temperature)
        self.tail = check_tail(op, tail)
        check_reduction(op, reduction)
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_topk_logprobs: torch.Tensor,
        teacher_topk_indices: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sparse_kl_div_loss(
            student_logits, teacher_topk_logprobs, teacher_topk_indices, self.temperature, tail=self.tail,
            labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, tail={self.tail!r}, reduction={self.reduction!r}"


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def sparse_kl_div_loss_reference(
    student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor, teacher_topk_indices: torch.Tensor,
    temperature: float = 1.0, *, tail: str = "zero", labels: torch.Tensor | None = None, ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:  # fmt: skip
    """The module docstring's ``T² · KL_row`` per row of ``[..., V]``, the student's full ``log_softmax`` gathered
    at the teacher's indices, then the rows labelled ``ignore_index`` zeroed and ``reduction`` applied. fp32 for
    half inputs, fp64 for fp64; the teacher detached. An out-of-range CUDA index makes its row NaN, as in the
    kernels."""
    op = "sparse_kl_div_loss_reference"
    temperature = check_temperature(op, temperature)
    check_reduction(op, reduction)
    check_tail(op, tail)
    _check_inputs(op, student_logits, teacher_topk_logprobs, teacher_topk_indices)
    dtype = compute_dtype(student_logits.dtype)
    lead, num_classes, num_topk = student_logits.shape[:-1], student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    a = student_logits.reshape(-1, num_classes).to(dtype) / temperature
    lp = teacher_topk_logprobs.detach().reshape(-1, num_topk).to(dtype)
    idx = teacher_topk_indices.reshape(-1, num_topk)
    valid = lp > float("-inf")
    in_range = (idx >= 0) & (idx < num_classes)
    a_k = torch.where(in_range, a.gather(1, idx.clamp(0, num_classes - 1)), torch.nan)
    a_k = torch.where(valid, a_k, torch.zeros((), dtype=dtype))
    u = lp / temperature
    if tail == "bucket":
        kept_mass = torch.where(valid, lp.exp(), torch.zeros((), dtype=dtype)).sum(dim=-1)
        u_tail = (1 - kept_mass).clamp_min(0).log() / temperature
        lse_t = torch.logsumexp(torch.cat([u, u_tail[:, None]], dim=-1), dim=-1, keepdim=True)
    else:
        lse_t = torch.logsumexp(u, dim=-1, keepdim=True)
    log_p = u - lse_t
    if tail == "renormalize":
        masked = torch.where(valid, a_k, torch.full((), float("-inf"), dtype=dtype))
        # A row with no teacher entry keeps a finite normaliser, so that its zero terms give zero gradients.
        lse_s = torch.where(valid.any(dim=-1, keepdim=True), torch.logsumexp(masked, dim=-1, keepdim=True), 0.0)
    else:
        lse_s = torch.logsumexp(a, dim=-1, keepdim=True)
    log_q = a_k - lse_s
    p = torch.where(valid, log_p.exp(), torch.zeros((), dtype=dtype))
    rows = xlogy_terms(p, log_p - log_q).sum(dim=-1)
    if tail == "bucket":
        student_mass = torch.where(valid, log_q.exp(), torch.zeros((), dtype=dtype)).sum(dim=-1)
        log_p_tail = u_tail - lse_t[:, 0]
        rows = rows + xlogy_terms(log_p_tail.exp(), log_p_tail - (1 - student_mass).clamp_min(TINY).log())
    rows = rows * temperature**2
    out = reduce_rows_reference(rows, flat_labels(op, labels, lead), ignore_index, reduction)
    return out.view(lead) if reduction == "none" else out
