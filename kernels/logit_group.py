"""Every logit loss of one online-distillation step in one forward launch and one backward launch.

An online-distillation step of ``M ≥ 2`` students, a fusion head and a leader (FFSD's; deep mutual learning plus an
ensemble-distilled fusion classifier plus a leader distilled from it) takes ``2M + 4`` losses from the logits alone:

    out[i]        = CE(z_i, y)                                  students i = 0 … M−1
    out[M + i]    = 1/(M−1) · Σ_{j≠i} KL_T(z_i ‖ sg(z_j))       mutual learning (``mutual_kl_loss``)
    out[2M]       = CE(f, y)                                    the fusion head
    out[2M + 1]   = KL_T(f ‖ sg(z̄)),   z̄ = (1/M) Σ_i z_i       its ensemble teacher (``cross_entropy_kl_loss``)
    out[2M + 2]   = CE(z_L, y)                                  the leader, z_L = logits[M]
    out[2M + 3]   = KL_T(z_L ‖ sg(f))                           its teacher, the fusion head

with ``sg`` the stop-gradient, ``CE`` the cross-entropy at temperature 1 (mean over the batch, no label smoothing) and
``KL_T(s ‖ t) = T² · (1/B) Σ_b Σ_c p_t (log p_t − log p_s)``, ``p = softmax(· / T)`` (``T² · F.kl_div(..., reduction=
'batchmean')``). ``logits`` is ``[M + 1, B, C]`` (the students, then the leader: the stacked networks' logits of one
batched forward), ``f`` the fusion head's ``[B, C]``.

Notation, per sample ``b`` (a row): ``a_i = z_i / T``, ``l = z_L / T``, ``φ = f / T``, ``ā = (1/M) Σ_i a_i`` (the
ensemble teacher, ``z̄ / T``), ``p_i = softmax(a_i)``, ``p_L = softmax(l)``, ``p_F = softmax(φ)``, ``p̄ = softmax(ā)``,
``q = softmax(z)`` at temperature 1, ``lse`` the log-sum-exp over the classes.

Forward. One program per row reads the ``M + 2`` rows of ``C`` logits (in chunks of ``BLOCK_C``; up to 1024 classes for
``M ≤ 3``, 512 for ``M ≤ 7``, are one chunk, held in registers) and computes, first, every log-sum-exp (an online
softmax: running maxima, sums rescaled by ``exp(m_old − m_new)``), then, with the exact ``p``, the cross terms

    D_j = Σ_c p_j,c δ_j,c,   Q_i = Σ_c P_c δ_i,c,   δ_i = a_i − ā,   P = Σ_j p_j,
    W_F = Σ_c p̄_c (ā_c − φ_c),   W_L = Σ_c p_F,c (φ_c − l_c),

from which, since ``KL(p_j ‖ p_i) = Σ_c p_j (a_j − a_i) − (lse_j − lse_i)`` and ``a_j − a_i = δ_j − δ_i``,

    Σ_{j≠i} KL(p_j ‖ p_i) = Σ_j D_j − Q_i − Σ_j (lse_j − lse_i),
    KL(p̄ ‖ p_F) = W_F − (lse(ā) − lse(φ)),   KL(p_F ‖ p_L) = W_L − (lse(φ) − lse(l)),
    CE_row = lse(z) − z_y.

(The ``j = i`` term is 0.) The deviations from the ensemble ``δ`` are small where the students agree, so their
rounding is too, and each lse difference is taken as ``(m_j − m_i) + log(S_j / S_i)`` (``S`` the sum of
``exp(a − m)``, ``m`` the running maximum) rather than as a difference of two ``O(log C)`` values: a small KL keeps its
precision, as in ``kl_div.py`` (with one class, where every KL is 0 analytically, the pieces cancel to about
``1e-7 · T²`` rather than exactly). When ``C`` spans several chunks, the cross terms take a second pass over the row
(its logits are then read twice; once otherwise). Each program writes its row's ``2M + 4`` values and per-row fp32
log-sum-exps (what the backward pass needs); a second launch, one program, sums the rows in a fixed order (no
atomics: deterministic) and divides by ``B``.

Backward. With ``g`` the upstream gradient ``[2M + 4]``, read from device memory (no host sync, capturable in a CUDA
graph; the caller weights each term through it), per row and class, ``[c = y]`` the one-hot label:

    ∂/∂z_i = (1/B) [ g[i] (q_i − [c = y]) + g[M+i] · T/(M−1) · (M p_i − P) ]          students
    ∂/∂z_L = (1/B) [ g[2M+2] (q_L − [c = y]) + g[2M+3] · T (p_L − p_F) ]               the leader
    ∂/∂f   = (1/B) [ g[2M] (q_F − [c = y]) + g[2M+1] · T (p_F − p̄) ]                   the fusion head

(``∂(T² KL(p_t ‖ p_s))/∂s = T (p_s − p_t)``; ``∂ Σ_{j≠i} KL(p_j ‖ p_i)/∂a_i = Σ_{j≠i} (p_i − p_j) = M p_i − P``; the
teachers are detached, so the leader's KL sends nothing to ``f``, the fusion KL nothing to the students, the mutual
terms nothing to the other students.) One launch, one program per row, writes both gradients whole, in the inputs'
dtypes.

Inputs are read through their strides (a slice of a bigger stack, a transposed ``baddbmm`` layout, ``torch.stack`` of
separate networks' logits: never copied), in fp32, fp16 or bf16 (``logits`` and ``fusion_logits`` may differ); the
maths is fp32 and so are the losses.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, tl, triton, use_triton

# _check_label_range by this name: the tests switch this op's CPU label check off where CUDA has none.
from ffsd_kernels._rows import check_label_range as _check_label_range
from ffsd_kernels._rows import check_temperature
from ffsd_kernels.kl_div import cross_entropy_kl_loss_reference
from ffsd_kernels.mutual_kl import mutual_kl_loss_reference

# A label no row can have (labels are checked or required to be in [0, C)): the existing references' ignore_index.
_NO_ROW_IGNORED = -(2**63)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(z_rows, f_row, cols, col_mask, net_mask, stride_zc, stride_fc):
    """One chunk in fp32: the networks' logits ``[G_PAD, BLOCK_C]`` (padded networks and masked classes load 0:
    finite, kept out of every sum by the masks) and the fusion head's ``[BLOCK_C]``."""
    z = tl.load(z_rows + cols[None, :] * stride_zc, mask=net_mask[:, None] & col_mask[None, :], other=0.0)
    f = tl.load(f_row + cols * stride_fc, mask=col_mask, other=0.0)
    return z.to(tl.float32), f.to(tl.float32)


@triton.jit
def _ensemble(z, is_student, teacher_scale):
    """``ā = (1/M) Σ_i z_i / T`` of a chunk (``teacher_scale = 1 / (T·M)``)."""
    return tl.sum(tl.where(is_student[:, None], z, 0.0), axis=0) * teacher_scale


@triton.jit
def _lse_step(z, f, col_mask, is_student, inv_t, teacher_scale, m_z, s_zt, s_z1, m_f, s_ft, s_f1, m_e, s_e):
    """One chunk of the online softmaxes: running maxima ``m`` (of the raw logits for the networks and the fusion
    head, of ``ā`` for the ensemble) and sums ``S`` at temperature T (``s_*t``) and 1 (``s_*1``), rescaled when a
    maximum grows."""
    m_z_new = tl.maximum(m_z, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
    s_zt = s_zt * tl.exp((m_z - m_z_new) * inv_t) + tl.sum(
        tl.where(col_mask[None, :], tl.exp((z - m_z_new[:, None]) * inv_t), 0.0), axis=1
    )
    s_z1 = s_z1 * tl.exp(m_z - m_z_new) + tl.sum(tl.where(col_mask[None, :], tl.exp(z - m_z_new[:, None]), 0.0), axis=1)
    m_f_new = tl.maximum(m_f, tl.max(tl.where(col_mask, f, float("-inf")), axis=0))
    s_ft = s_ft * tl.exp((m_f - m_f_new) * inv_t) + tl.sum(
        tl.where(col_mask, tl.exp((f - m_f_new) * inv_t), 0.0), axis=0
    )
    s_f1 = s_f1 * tl.exp(m_f - m_f_new) + tl.sum(tl.where(col_mask, tl.exp(f - m_f_new), 0.0), axis=0)
    e = _ensemble(z, is_student, teacher_scale)
    m_e_new = tl.maximum(m_e, tl.max(tl.where(col_mask, e, float("-inf")), axis=0))
    s_e = s_e * tl.exp(m_e - m_e_new) + tl.sum(tl.where(col_mask, tl.exp(e - m_e_new), 0.0), axis=0)
    return m_z_new, s_zt, s_z1, m_f_new, s_ft, s_f1, m_e_new, s_e


@triton.jit
def _cross_step(z, f, col_mask, is_student, is_leader, inv_t, teacher_scale, lse_zt, lse_ft, lse_e, d, q, w_f, w_l):
    """One chunk of the cross terms, with the exact log-sum-exps: ``D_j``, ``Q_i`` (``[G_PAD]``), ``W_F``, ``W_L``."""
    a = z * inv_t
    phi = f * inv_t
    e = _ensemble(z, is_student, teacher_scale)
    p = tl.where(is_student[:, None] & col_mask[None, :], tl.exp(a - lse_zt[:, None]), 0.0)
    big_p = tl.sum(p, axis=0)  # P = Σ_j p_j, over the students
    delta = a - e[None, :]  # 0 on masked classes, where p and P are 0 too
    d += tl.sum(p * delta, axis=1)
    q += tl.sum(big_p[None, :] * delta, axis=1)
    p_e = tl.where(col_mask, tl.exp(e - lse_e), 0.0)
    w_f += tl.sum(p_e * (e - phi), axis=0)
    p_f = tl.where(col_mask, tl.exp(phi - lse_ft), 0.0)
    leader = tl.sum(tl.where(is_leader[:, None], a, 0.0), axis=0)
    w_l += tl.sum(p_f * (phi - leader), axis=0)
    return d, q, w_f, w_l


@triton.jit
def _pick(v, which):
    """The entry of ``[G_PAD]`` vector ``v`` where ``which`` holds (one network), as a scalar."""
    return tl.sum(tl.where(which, v, 0.0), axis=0)


# Forward, first launch: program b takes row b of every network and of the fusion head, and writes that row's
# 2M + 4 values (the losses before the mean over B) and its log-sum-exps.
@triton.jit
def _online_rows_kernel(
    z_ptr,  # [G, B, C] logits: M students, then the leader (G = M + 1)
    f_ptr,  # [B, C] fusion head's logits
    y_ptr,  # [B] integer labels in [0, C)
    rows_ptr,  # [2M + 4, B] fp32 out: per-row values, in the order of the output
    stats_ptr,  # [2G + 3, B] fp32 out: lse(z_g / T) (G rows), lse(z_g) (G), lse(f / T), lse(f), lse(ā)
    stride_zg,
    stride_zb,
    stride_zc,
    stride_fb,
    stride_fc,
    stride_y,
    num_students,
    num_classes,
    inv_t,  # 1 / T
    teacher_scale,  # 1 / (T·M)
    kl_scale,  # T²
    mutual_scale,  # T² / (M − 1)
    G_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # C ≤ BLOCK_C: the row is read once and kept in registers for both passes
):
    row = tl.program_id(0).to(tl.int64)
    num_rows = tl.num_programs(0).to(tl.int64)
    nets = tl.arange(0, G_PAD)
    net_mask = nets < num_students + 1
    is_student = nets < num_students
    is_leader = nets == num_students
    z_rows = z_ptr + row * stride_zb + nets.to(tl.int64)[:, None] * stride_zg  # [G_PAD, 1]
    f_row = f_ptr + row * stride_fb

    m_z = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    s_zt = tl.zeros([G_PAD], dtype=tl.float32)
    s_z1 = tl.zeros([G_PAD], dtype=tl.float32)
    m_f = float("-inf")
    s_ft = 0.0
    s_f1 = 0.0
    m_e = float("-inf")
    s_e = 0.0
    d = tl.zeros([G_PAD], dtype=tl.float32)
    q = tl.zeros([G_PAD], dtype=tl.float32)
    w_f = 0.0
    w_l = 0.0
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < num_classes
        z, f = _load_rows(z_rows, f_row, cols.to(tl.int64), col_mask, net_mask, stride_zc, stride_fc)
        m_z, s_zt, s_z1, m_f, s_ft, s_f1, m_e, s_e = _lse_step(
            z, f, col_mask, is_student, inv_t, teacher_scale, m_z, s_zt, s_z1, m_f, s_ft, s_f1, m_e, s_e
        )
        lse_zt = m_z * inv_t + tl.log(s_zt)
        lse_ft = m_f * inv_t + tl.log(s_ft)
        lse_e = m_e + tl.log(s_e)
        d, q, w_f, w_l = _cross_step(
            z, f, col_mask, is_student, is_leader, inv_t, teacher_scale, lse_zt, lse_ft, lse_e, d, q, w_f, w_l
        )
    else:
        for c0 in range(0, num_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < num_classes
            z, f = _load_rows(z_rows, f_row, cols.to(tl.int64), col_mask, net_mask, stride_zc, stride_fc)
            m_z, s_zt, s_z1, m_f, s_ft, s_f1, m_e, s_e = _lse_step(
                z, f, col_mask, is_student, inv_t, teacher_scale, m_z, s_zt, s_z1, m_f, s_ft, s_f1, m_e, s_e
            )
        lse_zt = m_z * inv_t + tl.log(s_zt)
        lse_ft = m_f * inv_t + tl.log(s_ft)
        lse_e = m_e + tl.log(s_e)
        for c0 in range(0, num_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < num_classes
            z, f = _load_rows(z_rows, f_row, cols.to(tl.int64), col_mask, net_mask, stride_zc, stride_fc)
            d, q, w_f, w_l = _cross_step(
                z, f, col_mask, is_student, is_leader, inv_t, teacher_scale, lse_zt, lse_ft, lse_e, d, q, w_f, w_l
            )

    # Mutual: Σ_j D_j − Q_i − Σ_j (lse_j − lse_i), the lse differences as (m_j − m_i)/T + log(S_j / S_i), summed
    # over the students j (a [G_PAD, G_PAD] matrix of scalars, j on the rows).
    pair = is_student[:, None] & is_student[None, :]
    m_t = m_z * inv_t
    lse_diff = tl.where(pair, (m_t[:, None] - m_t[None, :]) + tl.log(s_zt[:, None] / s_zt[None, :]), 0.0)
    total_d = tl.sum(tl.where(is_student, d, 0.0), axis=0)
    mutual = (total_d - q - tl.sum(lse_diff, axis=0)) * mutual_scale
    # Fusion head from the ensemble, leader from the fusion head: W − (lse_t − lse_s), the difference as above.
    m_l, s_lt = _pick(m_z, is_leader) * inv_t, _pick(s_zt, is_leader)
    kl_fusion = (w_f - ((m_e - m_f * inv_t) + tl.log(s_e / s_ft))) * kl_scale
    kl_leader = (w_l - ((m_f * inv_t - m_l) + tl.log(s_ft / s_lt))) * kl_scale
    # Cross-entropies: lse(z) − z_y. An out-of-range label (CUDA labels are not checked: a host sync) reads nothing
    # and makes its row's CE NaN, as in cross_entropy_kl_loss.
    y = tl.load(y_ptr + row * stride_y).to(tl.int64)
    in_range = (y >= 0) & (y < num_classes)
    z_label = z_ptr + row * stride_zb + nets.to(tl.int64) * stride_zg + y * stride_zc  # [G_PAD]
    z_y = tl.load(z_label, mask=net_mask & in_range, other=float("nan")).to(tl.float32)
    f_y = tl.load(f_row + y * stride_fc, mask=in_range, other=float("nan")).to(tl.float32)
    lse_z1 = m_z + tl.log(s_z1)
    lse_f1 = m_f + tl.log(s_f1)

    num_nets = num_students + 1
    nets = nets.to(tl.int64)
    ce_index = tl.where(is_student, nets, 2 * num_students + 2)  # students' CE, then the leader's at 2M + 2
    tl.store(rows_ptr + ce_index * num_rows + row, lse_z1 - z_y, mask=net_mask)
    tl.store(rows_ptr + (num_students + nets) * num_rows + row, mutual, mask=is_student)
    tl.store(rows_ptr + (2 * num_students) * num_rows + row, lse_f1 - f_y)
    tl.store(rows_ptr + (2 * num_students + 1) * num_rows + row, kl_fusion)
    tl.store(rows_ptr + (2 * num_students + 3) * num_rows + row, kl_leader)
    tl.store(stats_ptr + nets * num_rows + row, lse_zt, mask=net_mask)
    tl.store(stats_ptr + (num_nets + nets) * num_rows + row, lse_z1, mask=net_mask)
    tl.store(stats_ptr + (2 * num_nets) * num_rows + row, lse_ft)
    tl.store(stats_ptr + (2 * num_nets + 1) * num_rows + row, lse_f1)
    tl.store(stats_ptr + (2 * num_nets + 2) * num_rows + row, lse_e)


# Forward, second launch: one program sums the rows of each of the 2M + 4 values in a fixed order (deterministic)
# and divides by B.
@triton.jit
def _online_finish_kernel(
    rows_ptr,  # [K, B] fp32 per-row values, K = 2M + 4
    out_ptr,  # [K] fp32 out
    num_values,
    num_rows,
    inv_rows,  # 1 / B
    K_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    k = tl.arange(0, K_PAD)
    k_mask = k < num_values
    total = tl.zeros([K_PAD, BLOCK_B], dtype=tl.float32)
    for b0 in range(0, num_rows, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = k_mask[:, None] & (b < num_rows)[None, :]
        total += tl.load(rows_ptr + k.to(tl.int64)[:, None] * num_rows + b[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + k, tl.sum(total, axis=1) * inv_rows, mask=k_mask)


# Backward: program b writes row b of both gradients, every class, from the saved log-sum-exps and the upstream
# gradient [2M + 4] read from device memory.
@triton.jit
def _online_backward_kernel(
    z_ptr,  # [G, B, C] logits
    f_ptr,  # [B, C] fusion head's logits
    y_ptr,  # [B] labels
    stats_ptr,  # [2G + 3, B] fp32, as the forward pass wrote them
    grad_ptr,  # [2M + 4] upstream gradient
    dz_ptr,  # [G, B, C] out (written when LOGITS_GRAD)
    df_ptr,  # [B, C] out (written when FUSION_GRAD)
    stride_zg,
    stride_zb,
    stride_zc,
    stride_fb,
    stride_fc,
    stride_y,
    stride_grad,  # 0 for an expanded upstream gradient
    stride_dzg,
    stride_dzb,
    stride_dzc,
    stride_dfb,
    stride_dfc,
    num_students,
    num_classes,
    inv_t,  # 1 / T
    teacher_scale,  # 1 / (T·M)
    temperature,  # T
    mutual_scale,  # T / (M − 1)
    inv_rows,  # 1 / B
    G_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOGITS_GRAD: tl.constexpr,
    FUSION_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    num_rows = tl.num_programs(0).to(tl.int64)
    nets = tl.arange(0, G_PAD)
    net_mask = nets < num_students + 1
    is_student = nets < num_students
    num_nets = num_students + 1
    nets = nets.to(tl.int64)
    z_rows = z_ptr + row * stride_zb + nets[:, None] * stride_zg
    dz_rows = dz_ptr + row * stride_dzb + nets[:, None] * stride_dzg
    f_row = f_ptr + row * stride_fb
    df_row = df_ptr + row * stride_dfb
    y = tl.load(y_ptr + row * stride_y).to(tl.int64)

    lse_zt = tl.load(stats_ptr + nets * num_rows + row, mask=net_mask, other=0.0)
    lse_z1 = tl.load(stats_ptr + (num_nets + nets) * num_rows + row, mask=net_mask, other=0.0)
    lse_ft = tl.load(stats_ptr + (2 * num_nets) * num_rows + row)
    lse_f1 = tl.load(stats_ptr + (2 * num_nets + 1) * num_rows + row)
    lse_e = tl.load(stats_ptr + (2 * num_nets + 2) * num_rows + row)
    # Per network: the weight of its CE (g[i], the leader's g[2M + 2]) and of its KL term (g[M + i], g[2M + 3]),
    # with the factors of the formulas (1/B; T/(M − 1) for a student, T for the leader) folded in.
    ce_index = tl.where(is_student, nets, 2 * num_students + 2)
    kl_index = tl.where(is_student, num_students + nets, 2 * num_students + 3)
    g_ce = tl.load(grad_ptr + ce_index * stride_grad, mask=net_mask, other=0.0).to(tl.float32) * inv_rows
    g_kl = tl.load(grad_ptr + kl_index * stride_grad, mask=net_mask, other=0.0).to(tl.float32) * inv_rows
    g_kl = g_kl * tl.where(is_student, mutual_scale, temperature)
    g_fce = tl.load(grad_ptr + (2 * num_students) * stride_grad).to(tl.float32) * inv_rows
    g_fkl = tl.load(grad_ptr + (2 * num_students + 1) * stride_grad).to(tl.float32) * (inv_rows * temperature)

    for c0 in range(0, num_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < num_classes
        cols = cols.to(tl.int64)
        z, f = _load_rows(z_rows, f_row, cols, col_mask, net_mask, stride_zc, stride_fc)
        one_hot = tl.where(cols == y, 1.0, 0.0)
        phi = f * inv_t
        p_f = tl.exp(phi - lse_ft)
        if LOGITS_GRAD:
            p = tl.exp(z * inv_t - lse_zt[:, None])  # [G_PAD, BLOCK_C]
            big_p = tl.sum(tl.where(is_student[:, None] & col_mask[None, :], p, 0.0), axis=0)
            # Students: M p_i − P; the leader: p_L − p_F.
            kl_grad = tl.where(is_student[:, None], num_students * p - big_p[None, :], p - p_f[None, :])
            dz = g_ce[:, None] * (tl.exp(z - lse_z1[:, None]) - one_hot[None, :]) + g_kl[:, None] * kl_grad
            store_mask = net_mask[:, None] & col_mask[None, :]
            tl.store(dz_rows + cols[None, :] * stride_dzc, dz.to(dz_ptr.dtype.element_ty), mask=store_mask)
        if FUSION_GRAD:
            p_e = tl.exp(_ensemble(z, is_student, teacher_scale) - lse_e)
            df = g_fce * (tl.exp(f - lse_f1) - one_hot) + g_fkl * (p_f - p_e)
            tl.store(df_row + cols * stride_dfc, df.to(df_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

# The most logits (networks × classes) one chunk of the row kernels holds: ImageNet's 1000 classes of M = 3 students
# and the leader (4 × 1024) are one chunk, read once.
_MAX_TILE = 4096


def _row_config(num_nets: int, num_classes: int) -> tuple[int, int, int]:
    """``(G_PAD, BLOCK_C, num_warps)`` of the row kernels (forward and backward), grid ``(B,)``: the networks padded
    to a power of two, chunks of at most ``_MAX_TILE // G_PAD`` classes (the next power of two of C when smaller),
    and about 16 logits of the tile per thread, up to 8 warps. ptxas (sm_90): 80 registers for M = 2, C = 100 (bf16,
    1 warp), 106 forward / 90 backward for M = 3, C = 1000 (fp32, 8 warps), 176 forward for M = 4 (G_PAD = 8,
    512-class chunks); no spills. Its timings: docs/gpu-results.md."""
    g_pad = triton.next_power_of_2(num_nets)
    block_c = min(triton.next_power_of_2(num_classes), max(_MAX_TILE // g_pad, 16))
    num_warps = max(1, min(8, g_pad * block_c // 512))
    return g_pad, block_c, num_warps


def _finish_config(num_values: int, num_rows: int) -> tuple[int, int, int]:
    """``(K_PAD, BLOCK_B, num_warps)`` of the finish: one program, a ``[K_PAD, BLOCK_B]`` tile of rows at a time. The
    order of the sums depends on B and M alone, so every run adds in the same order."""
    k_pad = triton.next_power_of_2(num_values)
    block_b = min(triton.next_power_of_2(num_rows), max(2048 // k_pad, 16))
    return k_pad, block_b, 4


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _online_forward(
    logits: torch.Tensor, fusion: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [2M + 4], stats [2G + 3, B])``, fp32: two launches, no host synchronisation."""
    num_nets, num_rows, num_classes = logits.shape
    num_students = num_nets - 1
    num_values = 2 * num_students + 4
    device = logits.device
    rows = torch.empty(num_values, num_rows, device=device, dtype=torch.float32)
    stats = torch.empty(2 * num_nets + 3, num_rows, device=device, dtype=torch.float32)
    out = torch.empty(num_values, device=device, dtype=torch.float32)
    g_pad, block_c, num_warps = _row_config(num_nets, num_classes)
    _online_rows_kernel[(num_rows,)](
        z_ptr=logits, f_ptr=fusion, y_ptr=labels, rows_ptr=rows, stats_ptr=stats, stride_zg=logits.stride(0),
        stride_zb=logits.stride(1), stride_zc=logits.stride(2), stride_fb=fusion.stride(0), stride_fc=fusion.stride(1),
        stride_y=labels.stride(0), num_students=num_students, num_classes=num_classes, inv_t=1.0 / temperature,
        teacher_scale=1.0 / (temperature * num_students), kl_scale=temperature * temperature,
        mutual_scale=temperature * temperature / (num_students - 1), G_PAD=g_pad, BLOCK_C=block_c,
        ONE_CHUNK=num_classes <= block_c, num_warps=num_warps,
    )  # fmt: skip
    k_pad, block_b, finish_warps = _finish_config(num_values, num_rows)
    _online_finish_kernel[(1,)](
        rows_ptr=rows, out_ptr=out, num_values=num_values, num_rows=num_rows, inv_rows=1.0 / num_rows, K_PAD=k_pad,
        BLOCK_B=block_b, num_warps=finish_warps,
    )  # fmt: skip
    return out, stats


def _online_backward(
    logits: torch.Tensor,
    fusion: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
    logits_grad: bool,
    fusion_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂logits, ∂/∂fusion)`` in the inputs' dtypes and layouts (``empty_like``: a dense input's strides, else
    contiguous), each None unless asked for: one launch."""
    if not (logits_grad or fusion_grad):
        return None, None
    num_nets, num_rows, num_classes = logits.shape
    num_students = num_nets - 1
    dz = torch.empty_like(logits) if logits_grad else None
    df = torch.empty_like(fusion) if fusion_grad else None
    dz_arg = dz if dz is not None else logits  # placeholders, never written
    df_arg = df if df is not None else fusion
    g_pad, block_c, num_warps = _row_config(num_nets, num_classes)
    _online_backward_kernel[(num_rows,)](
        z_ptr=logits, f_ptr=fusion, y_ptr=labels, stats_ptr=stats, grad_ptr=grad, dz_ptr=dz_arg, df_ptr=df_arg,
        stride_zg=logits.stride(0), stride_zb=logits.stride(1), stride_zc=logits.stride(2), stride_fb=fusion.stride(0),
        stride_fc=fusion.stride(1), stride_y=labels.stride(0), stride_grad=grad.stride(0), stride_dzg=dz_arg.stride(0),
        stride_dzb=dz_arg.stride(1), stride_dzc=dz_arg.stride(2), stride_dfb=df_arg.stride(0),
        stride_dfc=df_arg.stride(1), num_students=num_students, num_classes=num_classes, inv_t=1.0 / temperature,
        teacher_scale=1.0 / (temperature * num_students), temperature=temperature,
        mutual_scale=temperature / (num_students - 1), inv_rows=1.0 / num_rows, G_PAD=g_pad, BLOCK_C=block_c,
        LOGITS_GRAD=logits_grad, FUSION_GRAD=fusion_grad, num_warps=num_warps,
    )  # fmt: skip
    return dz, df


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _OnlineDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, fusion: torch.Tensor, labels: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        out, stats = _online_forward(logits, fusion, labels, temperature)
        ctx.save_for_backward(logits, fusion, labels, stats)
        ctx.temperature = temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        logits, fusion, labels, stats = ctx.saved_tensors
        dz, df = _online_backward(logits, fusion, labels, stats, grad, ctx.temperature, *ctx.needs_input_grad[:2])
        return dz, df, None, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(
    op: str, logits: torch.Tensor, fusion_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> float:
    """The temperature as a float; TypeError on bad dtypes, ValueError on bad shapes, devices, temperatures or CPU
    labels outside ``[0, C)``."""
    check_dtypes(op, logits=logits, fusion_logits=fusion_logits)
    if logits.dim() != 3 or logits.shape[0] < 3:
        raise ValueError(
            f"{op} expects logits of shape [M + 1, B, C] (M >= 2 students, then the leader), got {tuple(logits.shape)}"
        )
    if fusion_logits.shape != logits.shape[1:]:
        raise ValueError(
            f"{op} expects fusion_logits of shape {tuple(logits.shape[1:])} ([B, C]), got {tuple(fusion_logits.shape)}"
        )
    if (
        labels.shape != logits.shape[1:2]
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
    ):
        raise ValueError(
            f"{op} expects integer labels of shape ({logits.shape[1]},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if fusion_logits.device != logits.device or labels.device != logits.device:
        raise ValueError(
            f"{op} expects every tensor on one device, got {logits.device}, {fusion_logits.device}, {labels.device}"
        )
    temperature = check_temperature(op, temperature)
    # No ignore_index: every row is a sample with a class. CUDA labels are not read (a host sync): an out-of-range
    # one makes the CE terms NaN instead.
    _check_label_range(op, labels, logits.shape[2], None)
    return temperature


def online_distillation_losses(
    logits: torch.Tensor, fusion_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Every logit loss of an online-distillation step (FFSD's; DML, an ensemble-distilled fusion head, a leader):
    ``[2M + 4]`` values in one forward launch pair and one backward launch.

    With ``z_i = logits[i]`` (students ``i < M``), ``z_L = logits[M]`` (the leader), ``f = fusion_logits``, ``sg`` the
    stop-gradient and the batch means of :func:`ffsd_kernels.cross_entropy_kl_loss`:

    * ``out[i] = F.cross_entropy(z_i, labels)``, for each student;
    * ``out[M + i] = mutual_kl_loss(logits[:M], T)[i] = 1/(M−1) Σ_{j≠i} KL_T(z_i ‖ sg(z_j))``;
    * ``out[2M], out[2M + 1] = cross_entropy_kl_loss(f, logits[:M].detach(), labels, T)`` (the teacher is the mean of
      the students' logits);
    * ``out[2M + 2], out[2M + 3] = cross_entropy_kl_loss(z_L, f.detach(), labels, T)``,

    where ``KL_T(s ‖ t) = T² · (1/B) Σ_b Σ_c p_t (log p_t − log p_s)``, ``p = softmax(· / T)``. Weight the terms by
    weighting the output (``(out * weights).sum()``): the backward pass reads that upstream gradient from device
    memory. Gradients reach each student through its CE and mutual term, the leader through its CE and KL, the
    fusion head through its CE and KL; nothing else (every teacher is detached).

    Args:
        logits: ``[M + 1, B, C]``, ``M ≥ 2``: the students' logits, then the leader's; fp32/fp16/bf16/fp64, any
            strides (a slice of a bigger stack, a transposed layout, ``torch.stack`` of separate tensors: read in
            place, never copied).
        fusion_logits: ``[B, C]``, the fusion head's, of any of those dtypes (it may differ from ``logits``'s) and
            strides.
        labels: ``[B]`` integers in ``[0, C)``, on the logits' device. CPU labels are checked (ValueError); CUDA ones
            are not, since reading them would be a host sync: an out-of-range label makes the CE terms NaN.
        temperature: ``T > 0``, a Python float (for the KL terms; the CE terms are at temperature 1).

    Returns:
        ``[2M + 4]`` float32 (float64 if an input is float64: the reference), also for half inputs and under
        autocast. On CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``) with fp32/fp16/bf16 inputs: one per-row
        launch and one fixed-order finish launch (no atomics: deterministic) forward, one launch backward writing
        both gradients whole, no host synchronisation (capturable in a CUDA graph); anything else runs
        :func:`online_distillation_losses_reference`. C up to a few thousand is the intended range (any C runs).
    """
    op = "online_distillation_losses"
    temperature = _check_inputs(op, logits, fusion_logits, labels, temperature)
    if not (use_triton(logits, fusion_logits) and logits.numel() > 0):
        return online_distillation_losses_reference(logits, fusion_logits, labels, temperature)
    return _OnlineDistillationFunction.apply(logits, fusion_logits, labels, temperature)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class OnlineDistillationLosses(nn.Module):
    """``nn.Module`` form of :func:`online_distillation_losses`:
    ``OnlineDistillationLosses(temperature=2)(logits, fusion_logits, labels)`` gives ``[2M + 4]``."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(type(self).__name__, temperature)  # at construction: ValueError

    def forward(self, logits: torch.Tensor, fusion_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return online_distillation_losses(logits, fusion_logits, labels, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def online_distillation_losses_reference(
    logits: torch.Tensor, fusion_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``torch.cat`` of the students' ``F.cross_entropy``, ``mutual_kl_loss_reference(logits[:M], T)``,
    ``cross_entropy_kl_loss_reference(fusion_logits, logits[:M].detach(), labels, T)`` and
    ``cross_entropy_kl_loss_reference(logits[M], fusion_logits.detach(), labels, T)``: ``[2M + 4]``, float32 (float64
    if an input is float64). Labels as in :func:`online_distillation_losses` (a CUDA label outside ``[0, C)`` makes
    the CE terms NaN)."""
    op = "online_distillation_losses_reference"
    temperature = _check_inputs(op, logits, fusion_logits, labels, temperature)
    num_students, num_classes = logits.shape[0] - 1, logits.shape[2]
    dtype = torch.promote_types(compute_dtype(logits.dtype), compute_dtype(fusion_logits.dtype))
    students = logits[:num_students]
    in_range = (labels >= 0) & (labels < num_classes)
    clamped = labels.clamp(0, num_classes - 1)
    ce = [
        torch.where(in_range, F.cross_entropy(z.to(dtype), clamped, reduction="none"), torch.nan).mean()
        for z in students
    ]
    mutual = mutual_kl_loss_reference(students, temperature)
    fusion = cross_entropy_kl_loss_reference(
        fusion_logits, students.detach(), labels, temperature, ignore_index=_NO_ROW_IGNORED
    )
    leader = cross_entropy_kl_loss_reference(
        logits[num_students], fusion_logits.detach(), labels, temperature, ignore_index=_NO_ROW_IGNORED
    )
    return torch.cat([torch.stack(ce), mutual.to(dtype), torch.stack([*fusion, *leader]).to(dtype)])
