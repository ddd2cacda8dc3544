"""Distillation through the lm_head without the logits: the head matmuls and the loss, chunked over rows.

An LLM's student and teacher heads map hidden states ``h_s [N, H_s]``, ``h_t [N, H_t]`` to logits ``s = h_s W_sᵀ``,
``t = h_t W_tᵀ`` over a vocabulary of ``V`` (128256 for Llama 3): at ``N = 8192`` bf16 each ``[N, V]`` is 2.1 GB, and
an unfused loss keeps the student's logits, the teacher's and the gradient alive together. Here the rows go in chunks
of ``n`` (``chunk_size``); per chunk

    s_c = h_s,c W_sᵀ,  t_c = h_t,c W_tᵀ                          (two GEMMs, [n, V] each)
    loss rows and ∂/∂s_c, ∂/∂t_c                                  (jsd.py's forward and backward kernels)
    ∂/∂h_s,c = (∂/∂s_c) W_s,   ∂/∂W_s += (∂/∂s_c)ᵀ h_s,c         (and the teacher's when it requires grad)

so the largest temporaries are a chunk's logits and their gradients, ``[n, V]``; the full ``[N, V]`` never exists.
The loss per row is ``kd_weight · JSD_β(s/T, t/T) + ce_weight · CE(s, y)`` (``jsd.py``: ``β = 0`` forward KL,
``β = 1`` reverse KL; the CE at temperature 1 on ``labels``), reduced by ``batchmean`` (over rows whose label is not
``ignore_index``, counted on the device before the first chunk) or ``sum``. As in Liger-Kernel's fused-linear losses,
the gradients are computed during the forward pass (that is what lets each chunk's logits go at once) and the
backward pass only scales them by the upstream gradient, which it reads from device memory: there is no host
synchronisation (no ``grad_output == 1`` test), so the op can be captured in a CUDA graph. The cost: the gradients of
``h_s``, ``W_s`` (and the teacher's) are allocated in the forward pass, and an evaluation forward (no gradient
wanted) skips them.

Where the Triton kernels do not run (CPU without the interpreter, float64), each chunk's loss and logit gradients
come from the plain PyTorch definition (``jsd_rows_reference``) by autograd, chunk by chunk: the same memory bound.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import check_dtypes, compute_dtype, use_triton
from ffsd_kernels._rows import (
    batchmean_scale,
    check_label_range,
    check_reduction,
    check_temperature,
    flat_labels,
    reduce_rows,
    reduce_rows_reference,
)
from ffsd_kernels.jsd import NUM_STATS, JSDOptions, check_beta, jsd_backward, jsd_forward, jsd_rows_reference

REDUCTIONS = ("batchmean", "sum")

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

# No kernel of its own: the GEMMs are cuBLAS's, the loss and its logit gradients are jsd.py's two kernels, and the
# reduction is _rows.reduce_rows.

# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


def check_chunk_size(op: str, chunk_size: int | None) -> None:
    """ValueError unless ``chunk_size`` is None (the default below) or at least 1 (the fused-linear losses and
    their modules, which check it at construction)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op} expects chunk_size >= 1, got {chunk_size}")


def default_chunk_size(num_rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: the power of two nearest ``N / ⌈V / H⌉`` from above, so that a chunk's logits ``[n, V]`` are
    about as large as the hidden states ``[N, H]`` (Liger-Kernel's rule): 256 rows at ``[8192, 4096 → 128256]``."""
    chunks = max(1, -(-vocab // max(hidden, 1)))
    rows = -(-num_rows // chunks)
    return max(1, min(num_rows, 1 << (rows - 1).bit_length()))


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _chunk_kernels(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    rows: torch.Tensor,
    ones: torch.Tensor,
    norm: torch.Tensor | None,
    options: JSDOptions,
    *,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One chunk on the Triton kernels: its rows of the loss into ``rows``, and ``(∂/∂s, ∂/∂t)``."""
    stats = torch.empty(NUM_STATS, s.shape[0], device=s.device, dtype=torch.float32)
    jsd_forward(s, t, labels, rows, stats, options)
    return jsd_backward(s, t, labels, stats, norm, ones, options, student_grad=student_grad, teacher_grad=teacher_grad)


def _chunk_reference(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    rows: torch.Tensor,
    norm: torch.Tensor | None,
    options: JSDOptions,
    *,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One chunk by autograd through the plain definition: the same outputs as :func:`_chunk_kernels`."""
    ce_weight = options.ce_weight
    with torch.enable_grad():
        s = s.detach().requires_grad_(student_grad)
        t = t.detach().requires_grad_(teacher_grad)
        values = options.kd_weight * jsd_rows_reference(s, t, options.beta, options.temperature)
        if ce_weight is not None:
            num_classes = s.shape[1]
            ce = F.cross_entropy(s.to(values.dtype), labels.clamp(0, num_classes - 1), reduction="none")
            values = values + ce_weight * torch.where((labels >= 0) & (labels < num_classes), ce, torch.nan)
        if labels is not None:
            values = torch.where(
                labels != options.ignore_index, values, torch.zeros((), dtype=values.dtype, device=values.device)
            )
        rows.copy_(values.detach())
        wanted = [x for x, w in ((s, student_grad), (t, teacher_grad)) if w]
        grads = iter(torch.autograd.grad(values.sum(), wanted) if wanted else [])
    scale = norm if norm is not None else options.host_scale
    ds = next(grads) * scale if student_grad else None
    dt = next(grads) * scale if teacher_grad else None
    return ds, dt


def _forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    options: JSDOptions,
    *,
    reduction: str,
    chunk_size: int,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``(loss, grads)``: the scalar loss and the gradients of the four inputs (None where not wanted)."""
    ignore_index = options.ignore_index
    num_rows = student_hidden.shape[0]
    device = student_hidden.device
    kernels = use_triton(student_hidden, student_weight, teacher_hidden, teacher_weight) and num_rows > 0
    count_labels = labels if reduction == "batchmean" else None
    norm = None
    if count_labels is not None:  # the normaliser, on the device, before the first chunk needs it
        if kernels:
            _, norm = reduce_rows(None, count_labels, ignore_index, 1.0)
        else:
            norm = 1.0 / (count_labels != ignore_index).sum().clamp_min(1).to(compute_dtype(student_hidden.dtype))
    dtype = torch.float32 if kernels else compute_dtype(student_hidden.dtype)
    rows = torch.empty(1, num_rows, device=device, dtype=dtype)
    grads = []
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    for i, (x, wanted) in enumerate(zip(inputs, needs, strict=True)):
        # Hidden-state gradients are written chunk by chunk; head gradients accumulate over the chunks.
        make = torch.empty if i % 2 == 0 else torch.zeros
        grads.append(make(x.shape, device=x.device, dtype=x.dtype) if wanted else None)
    student_grad, teacher_grad = needs[0] or needs[1], needs[2] or needs[3]
    ones = torch.ones((), device=device, dtype=torch.float32)
    for c0 in range(0, num_rows, chunk_size):
        c1 = min(c0 + chunk_size, num_rows)
        h_s, h_t = student_hidden[c0:c1], teacher_hidden[c0:c1]
        s = h_s @ student_weight.t()
        t = h_t @ teacher_weight.t()
        chunk_labels = labels[c0:c1] if labels is not None else None
        wanted = dict(student_grad=student_grad, teacher_grad=teacher_grad)
        if kernels:
            ds, dt = _chunk_kernels(s, t, chunk_labels, rows[0, c0:c1], ones, norm, options, **wanted)
        else:
            ds, dt = _chunk_reference(s, t, chunk_labels, rows[0, c0:c1], norm, options, **wanted)
        del s, t  # this chunk's logits go before the next chunk's come
        for d, h, w, g_h, g_w in ((ds, h_s, student_weight, *grads[:2]), (dt, h_t, teacher_weight, *grads[2:])):
            if d is None:
                continue
            d = d.to(w.dtype)
            if g_h is not None:
                torch.mm(d, w, out=g_h[c0:c1])
            if g_w is not None:
                g_w.addmm_(d.t(), h)
    if kernels:
        loss, _ = reduce_rows(rows, count_labels, ignore_index, options.host_scale)
        return loss[0], grads
    return reduce_rows_reference(rows[0], labels, ignore_index, reduction), grads


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _FusedLinearDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor | None,
        options: JSDOptions,
        reduction: str,
        chunk_size: int,
    ) -> torch.Tensor:
        needs = tuple(ctx.needs_input_grad[:4])
        loss, grads = _forward(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, options,
            reduction=reduction, chunk_size=chunk_size, needs=needs,
        )  # fmt: skip
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.has = [g is not None for g in grads]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        # The gradients were computed in the forward pass; the upstream gradient scales them, read on the device.
        grads = [g * grad.to(g.dtype) if has else None for g, has in zip(ctx.saved_tensors, ctx.has, strict=True)]
        return (*grads, None, None, None, None)  # labels, options, reduction, chunk_size


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(op, student_hidden, student_weight, teacher_hidden, teacher_weight):
    check_dtypes(
        op,
        student_hidden=student_hidden,
        student_weight=student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
    )
    ok = (
        student_hidden.dim() >= 2
        and student_weight.dim() == 2
        and teacher_weight.dim() == 2
        and teacher_hidden.shape[:-1] == student_hidden.shape[:-1]
        and student_weight.shape[1] == student_hidden.shape[-1]
        and teacher_weight.shape[1] == teacher_hidden.shape[-1]
        and student_weight.shape[0] == teacher_weight.shape[0]
    )
    if not ok:
        raise ValueError(
            f"{op} expects hidden states [..., H_s] and [..., H_t] of one leading shape and heads [V, H_s], [V, H_t], "
            f"got {tuple(student_hidden.shape)}, {tuple(student_weight.shape)}, {tuple(teacher_hidden.shape)}, "
            f"{tuple(teacher_weight.shape)}"
        )


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``kd_weight · jsd_loss(h_s W_sᵀ, h_t W_tᵀ, beta, temperature) + ce_weight · CE(h_s W_sᵀ, labels)``, the logits
    made and dropped chunk by chunk (the module docstring).

    Args:
        student_hidden: ``[..., H_s]``, the student's last hidden states (``[B, T, H]`` as they come; shift them
            as for the lm loss first), fp32/fp16/bf16/fp64.
        student_weight: ``[V, H_s]``, the student's lm_head weight (no bias).
        teacher_hidden: ``[..., H_t]``, the teacher's, of the student's leading shape.
        teacher_weight: ``[V, H_t]``. The teacher's tensors receive gradients only when they require them.
        labels: optional integers of the leading shape: rows labelled ``ignore_index`` are left out of both terms
            and of the count; the targets of the CE (required when ``ce_weight != 0``; CPU labels are checked).
        beta: ``β`` of :func:`ffsd_kernels.jsd_loss`: 0 forward KL, 1 reverse KL, between the generalised JSD.
        temperature: ``T > 0`` of the distillation term (no ``T²``, as in TRL and Liger).
        kd_weight, ce_weight: the weights of the two terms.
        reduction: ``batchmean`` (mean over the rows kept, counted on the device) or ``sum``.
        chunk_size: rows per chunk; default :func:`default_chunk_size`. The peak memory of the op is about a few
            ``[chunk_size, V]`` tensors beyond the gradients of its inputs.

    Returns:
        A scalar, fp32 (fp64 for fp64 inputs).
    """
    op = "fused_linear_distillation_loss"
    _check_inputs(op, student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_reduction(op, reduction, REDUCTIONS)
    beta = check_beta(op, beta)
    temperature = check_temperature(op, temperature)
    lead, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    flat = flat_labels(op, labels, lead)
    if ce_weight != 0 and flat is None:
        raise ValueError(f"{op} expects labels when ce_weight != 0")
    if ce_weight != 0:
        check_label_range(op, flat, vocab, ignore_index)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    num_rows = h_s.shape[0]
    check_chunk_size(op, chunk_size)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_rows, vocab, h_s.shape[1])
    options = JSDOptions(
        beta=beta,
        temperature=temperature,
        ignore_index=ignore_index,
        host_scale=batchmean_scale(reduction, flat, max(num_rows, 1)),
        kd_weight=float(kd_weight),
        ce_weight=float(ce_weight) if ce_weight else None,
    )
    return _FusedLinearDistillationFunction.apply(
        h_s, student_weight, h_t, teacher_weight, flat, options, reduction, chunk_size
    )


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class FusedLinearDistillationLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_distillation_loss`, holding its options; called as Liger-Kernel's
    ``LigerFusedLinearJSD``: ``(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None)``."""

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        # Checked at construction (ValueError), so that a bad option fails where it is written.
        op = type(self).__name__
        beta, temperature = check_beta(op, beta), check_temperature(op, temperature)
        check_reduction(op, reduction, REDUCTIONS)
        check_chunk_size(op, chunk_size)
        self.options = dict(
            beta=beta,
            temperature=temperature,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            ignore_index=ignore_index,
            reduction=reduction,
            chunk_size=chunk_size,
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def fused_linear_distillation_loss_reference(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *, beta: float = 0.5, temperature: float = 1.0,
    kd_weight: float = 1.0, ce_weight: float = 0.0, ignore_index: int = -100, reduction: str = "batchmean",
    chunk_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Unfused: the full logits ``h W ᵀ``, then ``kd_weight · JSD rows + ce_weight · CE rows``, ignored rows zeroed,
    reduced. ``chunk_size`` is accepted and unused (a drop-in signature)."""
    op = "fused_linear_distillation_loss_reference"
    _check_inputs(op, student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_reduction(op, reduction, REDUCTIONS)
    beta = check_beta(op, beta)
    vocab = student_weight.shape[0]
    s = (student_hidden @ student_weight.t()).reshape(-1, vocab)
    t = (teacher_hidden @ teacher_weight.t()).reshape(-1, vocab)
    flat = flat_labels(op, labels, student_hidden.shape[:-1])
    rows = kd_weight * jsd_rows_reference(s, t, beta, float(temperature))
    if ce_weight != 0:
        if flat is None:
            raise ValueError(f"{op} expects labels when ce_weight != 0")
        check_label_range(op, flat, vocab, ignore_index)
        ce = F.cross_entropy(s.to(rows.dtype), flat.clamp(0, vocab - 1), reduction="none")
        rows = rows + ce_weight * torch.where((flat >= 0) & (flat < vocab), ce, torch.nan)
    return reduce_rows_reference(rows, flat, ignore_index, reduction)
