"""Sparse-teacher distillation through the student's lm_head without its logits: ``sparse_kl_div_loss`` chunked.

The student's head maps hidden states ``h [N, H]`` to logits ``s = h Wᵀ`` over a vocabulary of ``V``; the teacher is
its top-k log-probabilities ``[N, k]`` and their indices, stored offline (``sparse_kl.py``). As in
``fused_linear.py``, the rows go in chunks of ``n`` (``chunk_size``); per chunk

    s_c = h_c Wᵀ                                                  (one GEMM, [n, V])
    loss rows and ∂/∂s_c                                          (sparse_kl.py's forward and backward kernels)
    ∂/∂h_c = (∂/∂s_c) W,   ∂/∂W += (∂/∂s_c)ᵀ h_c

so the largest temporaries are a chunk's logits and their gradient; the student's ``[N, V]`` logits never exist. The
loss is :func:`ffsd_kernels.sparse_kl_div_loss` of the full logits (``T² · KL`` per row, the ``tail`` option),
reduced by ``batchmean`` (over the rows whose label is not ``ignore_index``, counted on the device before the first
chunk) or ``sum``. The gradients are computed in the forward pass, and the backward pass scales them by the upstream
gradient read from device memory (no host sync), as ``fused_linear_distillation_loss`` does; an evaluation forward
(no gradient wanted) skips them.

Where the Triton kernels do not run (CPU without the interpreter, float64), the op computes its reference, which
forms the full logits: the memory bound holds on the kernels' path only.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes
from ffsd_kernels._rows import (
    RowOptions,
    check_reduction,
    check_temperature,
    flat_labels,
    reduce_rows,
    use_row_kernels,
)
from ffsd_kernels.fused_linear import check_chunk_size, default_chunk_size
from ffsd_kernels.sparse_kl import (
    _sparse_kl_backward,
    _sparse_kl_forward,
    check_tail,
    check_teacher,
    sparse_kl_div_loss_reference,
)

REDUCTIONS = ("batchmean", "sum")

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

# No kernel of its own: the GEMMs are cuBLAS's, the loss and its logit gradient are sparse_kl.py's two kernels, and
# the reduction is _rows.reduce_rows.

# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

# Rows per chunk: fused_linear.default_chunk_size (a chunk's logits about as large as the hidden states).

# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    logprobs: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor | None,
    options: RowOptions,
    *,
    tail: str,
    chunk_size: int,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``(loss, [∂/∂hidden, ∂/∂weight])``, each gradient None where not wanted, on the kernels."""
    num_rows = hidden.shape[0]
    device = hidden.device
    count_labels = labels if options.reduction == "batchmean" else None
    norm = None
    if count_labels is not None:  # the normaliser, on the device, before the first chunk needs it
        _, norm = reduce_rows(None, count_labels, options.ignore_index, 1.0)
    rows = torch.empty(1, num_rows, device=device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = torch.zeros_like(weight) if needs[1] else None  # accumulated over the chunks
    ones = torch.ones((), device=device, dtype=torch.float32)
    for c0 in range(0, num_rows, chunk_size):
        c1 = min(c0 + chunk_size, num_rows)
        h = hidden[c0:c1]
        s = h @ weight.t()
        chunk_labels = labels[c0:c1] if labels is not None else None
        chunk_rows, stats = _sparse_kl_forward(s, logprobs[c0:c1], indices[c0:c1], chunk_labels, options, tail=tail)
        rows[0, c0:c1] = chunk_rows[0]
        if needs[0] or needs[1]:
            ds = _sparse_kl_backward(
                s, logprobs[c0:c1], indices[c0:c1], chunk_labels, stats, norm, ones, options, tail=tail
            ).to(weight.dtype)
            del s  # this chunk's logits go before the next chunk's come
            if grad_hidden is not None:
                torch.mm(ds, weight, out=grad_hidden[c0:c1])
            if grad_weight is not None:
                grad_weight.addmm_(ds.t(), h)
    loss, _ = reduce_rows(rows, count_labels, options.ignore_index, options.host_scale)
    return loss[0], [grad_hidden, grad_weight]


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _FusedLinearSparseKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        logprobs: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor | None,
        options: RowOptions,
        tail: str,
        chunk_size: int,
    ) -> torch.Tensor:
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        loss, grads = _forward(
            hidden, weight, logprobs, indices, labels, options, tail=tail, chunk_size=chunk_size, needs=needs
        )
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.wanted = needs
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        # The gradients were computed in the forward pass; the upstream gradient scales them, read on the device.
        grads = [g * grad.to(g.dtype) if want else None for g, want in zip(ctx.saved_tensors, ctx.wanted, strict=True)]
        return (*grads, None, None, None, None, None, None)  # logprobs, indices, labels, options, tail, chunk_size


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _check_head(op: str, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    check_dtypes(op, student_hidden=hidden, student_weight=weight)
    if hidden.dim() < 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op} expects student_hidden [..., H] and student_weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )


def fused_linear_sparse_kl_div_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    temperature: float = 1.0,
    *,
    tail: str = "zero",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`ffsd_kernels.sparse_kl_div_loss` of ``student_hidden @ student_weight.T``, the logits made and dropped
    chunk by chunk (the module docstring).

    Args:
        student_hidden: ``[..., H]``, the student's last hidden states, fp32/fp16/bf16/fp64.
        student_weight: ``[V, H]``, its lm_head weight (no bias).
        teacher_topk_logprobs, teacher_topk_indices: ``[..., k]`` of the hidden states' leading shape, as in
            :func:`ffsd_kernels.sparse_kl_div_loss` (no gradient reaches them).
        temperature, tail, labels, ignore_index: as there.
        reduction: ``batchmean`` (over the rows kept, counted on the device) or ``sum``.
        chunk_size: rows per chunk; default ``fused_linear.default_chunk_size``.

    Returns:
        A scalar, fp32 (fp64 for fp64 inputs).
    """
    op = "fused_linear_sparse_kl_div_loss"
    temperature = check_temperature(op, temperature)
    check_reduction(op, reduction, REDUCTIONS)
    check_tail(op, tail)
    _check_head(op, student_hidden, student_weight)
    check_chunk_size(op, chunk_size)
    lead, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    check_teacher(op, lead, vocab, student_hidden.device, teacher_topk_logprobs, teacher_topk_indices)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat = flat_labels(op, labels, lead)
    if not use_row_kernels(flat, hidden, student_weight, teacher_topk_logprobs):
        return fused_linear_sparse_kl_div_loss_reference(
            student_hidden, student_weight, teacher_topk_logprobs, teacher_topk_indices, temperature, tail=tail,
            labels=labels, ignore_index=ignore_index, reduction=reduction,
        )  # fmt: skip
    num_topk = teacher_topk_logprobs.shape[-1]
    logprobs = teacher_topk_logprobs.detach().reshape(-1, num_topk)
    indices = teacher_topk_indices.reshape(-1, num_topk)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], student_weight.shape[0], hidden.shape[1])
    options = RowOptions.of(temperature, reduction, ignore_index, flat, max(hidden.shape[0], 1))
    return _FusedLinearSparseKLFunction.apply(
        hidden, student_weight, logprobs, indices, flat, options, tail, max(chunk_size, 1)
    )


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class FusedLinearSparseKLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_sparse_kl_div_loss`, its options checked at construction:
    ``(student_hidden, student_weight, teacher_topk_logprobs, teacher_topk_indices, labels=None)``."""

    def __init__(
        self,
        temperature: float = 1.0,
        tail: str = "zero",
        ignore_index: int = -100,
        reduction: str = "batchmean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        op = type(self).__name__
        check_reduction(op, reduction, REDUCTIONS)
        check_chunk_size(op, chunk_size)
        self.options = {"temperature": check_temperature(op, temperature), "tail": check_tail(op, tail)}
        self.options.update(ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_topk_logprobs: torch.Tensor,
        teacher_topk_indices: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_sparse_kl_div_loss(
            student_hidden, student_weight, teacher_topk_logprobs, teacher_topk_indices, labels=labels,
            **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def fused_linear_sparse_kl_div_loss_reference(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor, temperature: float = 1.0, *, tail: str = "zero",
    labels: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "batchmean",
    chunk_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Unfused: the full logits ``h Wᵀ``, then :func:`ffsd_kernels.sparse_kl_div_loss_reference`. ``chunk_size`` is
    accepted and unused (a drop-in signature)."""
    op = "fused_linear_sparse_kl_div_loss_reference"
    check_reduction(op, reduction, REDUCTIONS)
    _check_head(op, student_hidden, student_weight)
    logits = student_hidden @ student_weight.t()
    return sparse_kl_div_loss_reference(
        logits, teacher_topk_logprobs, teacher_topk_indices, temperature, tail=tail, labels=labels,
        ignore_index=ignore_index, reduction=reduction,
    )  # fmt: skip
