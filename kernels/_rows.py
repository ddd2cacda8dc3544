"""What the row-wise losses (``kl_div``, ``jsd``, ``fused_linear``) share: logits of any leading shape as rows, the
``labels`` / ``ignore_index`` mask, and the one reduction of per-row values to a loss, on the device.

Every such op computes one value per row of ``[..., V]`` logits (a row: one sample, or one token of ``[B, T, V]``).
``reduction="none"`` returns them in the leading shape; ``"sum"`` their sum; ``"batchmean"`` their mean over the rows
kept. A row whose label equals ``ignore_index`` is kept out of the sum and out of the count, and its gradient is 0.
The count is taken on the device by :func:`reduce_rows` (one program per output) and saved for the backward pass as
``1 / max(count, 1)``: no host synchronisation, and a batch of padding alone gives a loss of 0 and zero gradients
rather than the 0/0 of ``F.cross_entropy(..., ignore_index=-100)``, which would put NaN into the weights.
"""

import torch

from ffsd_kernels._dispatch import tl, triton

REDUCTIONS = ("batchmean", "sum", "none")


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
        rows_ptr=rows if rows is not None else norm,
        y_ptr=labels if labels is not None else norm,
        out_ptr=out if out is not None else norm,
        norm_ptr=norm,
        stride_rk=rows.stride(0) if rows is not None else 0,
        num_rows=num_rows,
        ignore_index=ignore_index,
        scale=scale,
        HAS_ROWS=rows is not None,
        COUNT=labels is not None,
        BLOCK=1024,
        num_warps=4,
    )
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


def check_label_range(op: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError unless every (CPU) label is in ``[0, C)`` or ``ignore_index``: reading them is free on the CPU, a
    host sync on CUDA (where an out-of-range label makes its row's cross-entropy NaN instead)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        raise ValueError(
            f"{op} expects labels in [0, {num_classes}) or ignore_index={ignore_index}, got {bad[0].item()}"
        )


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
