"""What the row-wise losses (``kl_div``, ``jsd``, ``fused_linear``) share: logits of any leading shape as rows, the
``labels`` / ``ignore_index`` mask, and the one reduction of per-row values to a loss, on the device.

Every such op computes one value per row of ``[..., V]`` logits (a row: one sample, or one token of ``[B, T, V]``).
``reduction="none"`` returns them in the leading shape; ``"sum"`` their sum; ``"batchmean"`` their mean over the rows
kept. A row whose label equals ``ignore_index`` is kept out of the sum and out of the count, and its gradient is 0.
The count is taken on the device by :func:`reduce_rows` (one program per output) and saved for the backward pass as
``1 / max(count, 1)``: no host synchronisation, and a batch of padding alone gives a loss of 0 and zero gradients
rather than the 0/0 of ``F.cross_entropy(..., ignore_index=-100)``, which would put NaN into the weights.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ffsd_kernels._dispatch import check_dtypes, tl, triton, use_triton

REDUCTIONS = ("batchmean", "sum", "none")
# Logits of M models: one [M, ..., V] tensor, or a sequence of M [..., V] tensors (stacked with torch.stack).
StackedLogits = torch.Tensor | Sequence[torch.Tensor]


@triton.jit
def _reduce_rows_kernel(
    rows_ptr,  # [K, N] fp32 per-row values (read when HAS_ROWS); ignored rows already hold 0
    y_ptr,  # [N] integer labels (read when COUNT)
    out_ptr,  # [K] out: Σ_n rows[k, n] · norm, in out_ptr's dtype
    norm_ptr,  # [1] fp32 out: scale / max(count of kept rows, 1) when COUNT, else scale
    stride_rk,
    num_rows,
    ignore_index,
    scale,
    HAS_ROWS: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, num_rows, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        mask = n < num_rows
        if HAS_ROWS:
            total += tl.load(rows_ptr + k * stride_rk + n, mask=mask, other=0.0)
        if COUNT:
            y = tl.load(y_ptr + n, mask=mask, other=ignore_index)
            count += tl.where(y != ignore_index, 1.0, 0.0)
    norm = scale
    if COUNT:
        norm = scale / tl.maximum(tl.sum(count, axis=0), 1.0)
    if HAS_ROWS:
        tl.store(out_ptr + k, (tl.sum(total, axis=0) * norm).to(out_ptr.dtype.element_ty))
    if k == 0:
        tl.store(norm_ptr, norm)


def reduce_rows(
    rows: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(out [K], norm [1])``: ``out[k] = Σ_n rows[k, n] · norm`` and ``norm = scale / max(#kept, 1)`` when
    ``labels`` is given (the batchmean of labelled rows), else ``scale``. ``rows`` is ``[K, N]`` fp32 with unit
    stride along N, or None for the normaliser alone (``out`` is then None). One launch, ``K`` programs."""
    device = (rows if rows is not None else labels).device
    num_rows = rows.shape[1] if rows is not None else labels.shape[0]
    num_outputs = rows.shape[0] if rows is not None else 1
    norm = torch.empty(1, device=device, dtype=torch.float32)
    out = torch.empty(num_outputs, device=device, dtype=out_dtype) if rows is not None else None
    _reduce_rows_kernel[(num_outputs,)](
        rows_ptr=rows if rows is not None else norm, y_ptr=labels if labels is not None else norm,
        out_ptr=out if out is not None else norm, norm_ptr=norm, stride_rk=rows.stride(0) if rows is not None else 0,
        num_rows=num_rows, ignore_index=ignore_index, scale=scale, HAS_ROWS=rows is not None, COUNT=labels is not None,
        BLOCK=1024, num_warps=4,
    )  # fmt: skip
    return out, norm


def check_reduction(op: str, reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"{op} expects reduction in {allowed}, got {reduction!r}")


def flat_labels(op: str, labels: torch.Tensor | None, lead_shape: torch.Size) -> torch.Tensor | None:
    """``labels`` as a contiguous ``[N]``, after checking that it is an integer tensor of the logits' leading shape;
    ValueError otherwise. The kernels index labels by row alone, so a strided view (``labels[:, 1:]``) is copied:
    ``N`` integers, where the logits are ``N · V``."""
    if labels is None:
        return None
    if (
        labels.shape != lead_shape
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
    ):
        raise ValueError(
            f"{op} expects integer labels of the logits' leading shape {tuple(lead_shape)}, got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    return labels.reshape(-1).contiguous()


def check_label_range(op: str, labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> None:
    """ValueError unless every (CPU) label is in ``[0, C)`` or ``ignore_index`` (None: no label is ignored): reading
    them is free on the CPU, a host sync on CUDA (where an out-of-range label makes its row's cross-entropy NaN
    instead)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    out_of_range = (labels < 0) | (labels >= num_classes)
    bad = labels[out_of_range & (labels != ignore_index) if ignore_index is not None else out_of_range]
    if bad.numel():
        allowed = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{op} expects labels in [0, {num_classes}){allowed}, got {bad[0].item()}")


def check_temperature(op: str, temperature: float) -> float:
    """The temperature as a Python float; ValueError unless ``T > 0`` (every distillation loss and module calls
    this one check, the modules at construction)."""
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"{op} expects a temperature > 0, got {temperature}")
    return temperature


def check_logits(op: str, logits: torch.Tensor, what: str) -> None:
    """TypeError on a dtype other than fp32/fp16/bf16/fp64, ValueError unless ``[..., V]`` with a leading dim."""
    check_dtypes(op, **{what: logits})
    if logits.dim() < 2:
        raise ValueError(f"{op} expects {what} of shape [..., V] (at least 2-D), got {tuple(logits.shape)}")


def stack_models(op: str, logits: StackedLogits, what: str) -> torch.Tensor:
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


def stack_teachers(op: str, student: torch.Tensor, teacher: StackedLogits) -> torch.Tensor:
    """The teachers as ``[M, N, V]``: a teacher of the student's shape as ``[1, N, V]`` (a view), an ``[M, *shape]``
    tensor or a sequence of M such teachers as their stack; ValueError on bad shapes, TypeError on bad dtypes."""
    check_logits(op, student, "student_logits")
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
    return stack_models(op, teacher, "teacher_logits")


def use_row_kernels(labels: torch.Tensor | None, *tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels take these tensors: ``_dispatch.use_triton``, no empty tensor (the reference's 0/0
    gives PyTorch's answer there, and triton cannot launch a 0 grid) and the labels on the logits' device."""
    return (
        use_triton(*tensors)
        and all(t.numel() > 0 for t in tensors)
        and (labels is None or labels.device == tensors[0].device)
    )


def launch_config(num_classes: int, tile_rows: int = 1) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` for a row-wise kernel that holds ``tile_rows`` rows of ``BLOCK_C`` classes per chunk.

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


def batchmean_scale(reduction: str, labels: torch.Tensor | None, num_rows: int) -> float:
    """The host part of the normaliser: 1/N for a batchmean without labels (with labels the count is on the
    device), 1 otherwise."""
    return 1.0 / num_rows if reduction == "batchmean" and labels is None else 1.0


@dataclass(frozen=True)
class RowOptions:
    """The non-tensor arguments of a row-wise loss, fixed at the call and kept on the autograd context for the
    backward pass (by name: a swapped positional tuple would corrupt gradients silently)."""

    temperature: float
    reduction: str
    ignore_index: int
    host_scale: float  # batchmean_scale(...): 1/N for an unlabelled batchmean, else 1

    @classmethod
    def of(
        cls, temperature: float, reduction: str, ignore_index: int, labels: torch.Tensor | None, num_rows: int
    ) -> "RowOptions":
        return cls(temperature, reduction, ignore_index, batchmean_scale(reduction, labels, num_rows))


def reduce_losses(
    rows: torch.Tensor, labels: torch.Tensor | None, options: RowOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, norm)``: the per-row values ``[K, N]`` as they are for ``none``, else their ``[K]`` reduction (one
    launch), and the device normaliser that the backward pass reads (None unless a labelled batchmean)."""
    if options.reduction == "none":
        return rows, None
    count_labels = labels if options.reduction == "batchmean" else None
    out, norm = reduce_rows(rows, count_labels, options.ignore_index, options.host_scale)
    return out, (norm if count_labels is not None else None)


class TemperatureLoss(nn.Module):
    """A distillation loss module holding its temperature ``T``, reduction and ``ignore_index``, checked here, at
    construction, so that a bad one fails where it is written rather than at the first call (ValueError)."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100) -> None:
        super().__init__()
        op = type(self).__name__
        self.temperature = check_temperature(op, temperature)
        check_reduction(op, reduction)
        self.reduction = reduction
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


def log_softmax_at(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """The references' ``log softmax(z / T)`` over the last dimension, computed in ``dtype``."""
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def xlogy_terms(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """The references' ``p · log_ratio``, 0 where ``p = 0`` whatever ``log_ratio`` is there (torch's ``xlogy``
    convention: a class of probability 0, a ``−inf`` logit, contributes 0). ``torch.where`` rather than a product,
    whose ``0 · (−inf)`` would be NaN in the value and, through autograd, in the gradients; ``log_ratio`` is zeroed
    there first, since the product's gradient with respect to ``p`` is ``log_ratio`` itself."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    keep = p > 0
    return torch.where(keep, p * torch.where(keep, log_ratio, zero), zero)


def reduce_rows_reference(
    rows: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, reduction: str
) -> torch.Tensor:
    """The definition of the reduction: ``rows`` is ``[K, N]`` (or ``[N]``); ignored rows become 0, then ``none``
    returns them, ``sum`` sums over N, ``batchmean`` divides that sum by ``max(#kept, 1)``."""
    if labels is not None:
        keep = labels != ignore_index
        rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        count = keep.sum().clamp_min(1).to(rows.dtype)
    else:
        count = rows.shape[-1]
    if reduction == "none":
        return rows
    total = rows.sum(dim=-1)
    return total / count if reduction == "batchmean" else total
