"""The ``@triton.jit`` helpers that every row-wise kernel (``kl_div``, ``mutual_kl``, ``jsd``, ``sparse_kl``) calls.

A row-wise kernel runs one program per row of ``[N, V]`` logits and loops over the row in chunks of ``BLOCK_C``
classes. Each program starts with the row preamble (:func:`row_kept`: is this row padding?), reads each chunk with
:func:`load_chunk` (fp32, the temperature applied, an optional mean over stacked teachers) and folds it into its
log-sum-exps with :func:`online_softmax_step` (running maxima, sums rescaled by ``exp(m_old − m_new)`` when a maximum
grows), so any vocabulary runs in fixed memory and the row is read once per pass.
"""

from ffsd_kernels._dispatch import tl, triton


@triton.jit
def row_kept(y_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    """``(label, kept)`` of a row: kept unless its label is ``ignore_index`` (always kept without labels)."""
    if HAS_LABELS:
        y = tl.load(y_ptr + row).to(tl.int64)
        return y, y != ignore_index
    return row, row >= 0


@triton.jit
def load_chunk(
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
def online_softmax_step(m, d, x, mask):
    """Fold one chunk ``x`` (``[BLOCK_C]``; lanes outside ``mask`` ignored) into a running maximum ``m`` and sum
    ``d = Σ exp(x − m)``. Returns ``(m_new, d_new, alpha, e)``: ``alpha = exp(m − m_new)`` rescales any other sum
    taken against the old maximum, ``e = exp(x − m_new)`` (0 outside ``mask``) weighs the chunk's terms.

    ``x`` may hold ``−inf`` (a masked vocabulary entry of a teacher, probability 0): while every entry so far is
    ``−inf`` the maximum stays ``−inf`` and the shift is 0 instead, so that no ``(−inf) − (−inf)`` makes a NaN; ``d``
    stays 0 and ``alpha`` 0 until a finite entry comes."""
    m_new = tl.maximum(m, tl.max(tl.where(mask, x, float("-inf")), axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    e = tl.where(mask, tl.exp(x - shift), 0.0)
    return m_new, d * alpha + tl.sum(e, axis=0), alpha, e


@triton.jit
def online_lse_step(m, d, x, mask):
    """:func:`online_softmax_step`'s running maximum and sum alone (its other results stay local here, so that a
    kernel's loop carries no unused variable whose type changes)."""
    m_new, d_new, _, _ = online_softmax_step(m, d, x, mask)
    return m_new, d_new


@triton.jit
def weighted(p, x):
    """``p · x``, 0 where ``p = 0``: torch's ``xlogy`` convention, so that a class of probability 0 contributes 0 to
    a divergence even where its log-probability (in ``x``) is ``−inf``."""
    return tl.where(p > 0.0, p * x, 0.0)
