"""``torch.nn.functional.kl_div`` / ``nn.KLDivLoss`` on fused Triton kernels: a drop-in, every reduction of torch's.

torch's ``kl_div(x, y)`` is elementwise, ``ℓ = y (log y − x)`` (``xlogy``: 0 where ``y = 0``) or, with
``log_target``, ``ℓ = e^y (y − x)``, then ``none`` / ``sum`` / ``mean`` (over every element) / ``batchmean`` (the
sum over ``x.size(0)``). Its gradients: ``∂ℓ/∂x = −y`` (``−e^y``) and ``∂ℓ/∂y = log y + 1 − x`` (NaN where ``y = 0``,
as torch's autograd of ``xlogy`` gives) or ``e^y (y − x + 1)``.

Its kernels go over rows of the last dimension (after broadcasting), one program per row: the forward pass writes
the elementwise losses (``none``) or one fp32 sum per row, which ``_rows.reduce_rows`` reduces in one more launch;
the backward pass reads both inputs and the upstream gradient once. For the distillation loss from raw logits
(``T² · KL(softmax(t/T) ‖ softmax(s/T))``) see ``kl_div.py``.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ffsd_kernels._dispatch import result_dtype, tl, triton
from ffsd_kernels._rows import check_reduction, launch_config, reduce_rows, use_row_kernels

TORCH_REDUCTIONS = ("none", "mean", "sum", "batchmean")
# torch's own warning for reduction="mean" (F.kl_div), so that the drop-in warns where torch does.
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _torch_kl_fwd_kernel(
    x_ptr,  # [R, C] input: log-probabilities
    y_ptr,  # [R, C] target: probabilities, or log-probabilities when LOG_TARGET
    out_ptr,  # [R, C] elementwise loss (REDUCE False), or [R] fp32 row sums (REDUCE True)
    stride_xr,
    stride_xc,
    stride_yr,
    stride_yc,
    stride_or,
    stride_oc,
    num_cols,
    LOG_TARGET: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, num_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < num_cols
        cols = cols.to(tl.int64)
        x = tl.load(x_ptr + row * stride_xr + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * stride_yr + cols * stride_yc, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            loss = tl.exp(y) * (y - x)
        else:
            # torch's xlogy(y, y) − y·x: 0·log 0 is 0, and 0·(−inf) stays NaN as in torch.
            loss = tl.where(y == 0.0, 0.0, y * tl.log(y)) - y * x
        if REDUCE:
            acc += tl.where(mask, loss, 0.0)
        else:
            tl.store(out_ptr + row * stride_or + cols * stride_oc, loss.to(out_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _torch_kl_bwd_kernel(
    x_ptr,  # [R, C] input
    y_ptr,  # [R, C] target
    g_ptr,  # [R, C] upstream gradient (strides 0 for a scalar one)
    dx_ptr,  # [R, C] out: gradient of the input (when INPUT_GRAD)
    dy_ptr,  # [R, C] out: gradient of the target (when TARGET_GRAD)
    stride_xr,
    stride_xc,
    stride_yr,
    stride_yc,
    stride_gr,
    stride_gc,
    stride_dxr,
    stride_dxc,
    stride_dyr,
    stride_dyc,
    num_cols,
    scale,  # 1, 1/numel (mean) or 1/size(0) (batchmean)
    LOG_TARGET: tl.constexpr,
    INPUT_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    for c0 in range(0, num_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < num_cols
        cols = cols.to(tl.int64)
        x = tl.load(x_ptr + row * stride_xr + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * stride_yr + cols * stride_yc, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_gr + cols * stride_gc, mask=mask, other=0.0).to(tl.float32) * scale
        p = tl.exp(y) if LOG_TARGET else y
        if INPUT_GRAD:
            dx = -g * p
            tl.store(dx_ptr + row * stride_dxr + cols * stride_dxc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if TARGET_GRAD:
            if LOG_TARGET:
                dy = g * p * (y - x + 1.0)
            else:
                # NaN where y = 0, as torch's autograd of xlogy(y, y) gives (its ∂/∂other is y / y).
                dy = g * tl.where(y == 0.0, float("nan"), tl.log(y) + 1.0 - x)
            tl.store(dy_ptr + row * stride_dyr + cols * stride_dyc, dy.to(dy_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

# One program per row, ``(R,)``; ``BLOCK_C`` and ``num_warps`` from ``_rows.launch_config``.

# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _torch_kl_forward(
    x: torch.Tensor, y: torch.Tensor, *, log_target: bool, reduce: bool, dtype: torch.dtype
) -> torch.Tensor:
    """``[R, C]`` elementwise losses in ``dtype``, or ``[1, R]`` fp32 row sums when ``reduce``."""
    num_rows, num_cols = x.shape
    block_c, num_warps = launch_config(num_cols)
    if reduce:
        out = torch.empty(1, num_rows, device=x.device, dtype=torch.float32)
        out_strides = (1, 0)
    else:
        out = torch.empty(x.shape, device=x.device, dtype=dtype)
        out_strides = out.stride()
    _torch_kl_fwd_kernel[(num_rows,)](
        x_ptr=x, y_ptr=y, out_ptr=out, stride_xr=x.stride(0), stride_xc=x.stride(1), stride_yr=y.stride(0),
        stride_yc=y.stride(1), stride_or=out_strides[0], stride_oc=out_strides[1], num_cols=num_cols,
        LOG_TARGET=log_target, REDUCE=reduce, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return out


def _torch_kl_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    grad: torch.Tensor,
    *,
    scale: float,
    log_target: bool,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂input, ∂/∂target)``, each None unless asked for; ``grad`` is ``[R, C]`` (``none``) or a scalar."""
    num_rows, num_cols = x.shape
    block_c, num_warps = launch_config(num_cols)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if input_grad else None
    dy = torch.empty(y.shape, device=y.device, dtype=y.dtype) if target_grad else None
    dx_arg, dy_arg = (dx if dx is not None else x), (dy if dy is not None else y)
    grad_strides = grad.stride() if grad.dim() == 2 else (0, 0)  # a scalar upstream gradient: read at one place
    _torch_kl_bwd_kernel[(num_rows,)](
        x_ptr=x, y_ptr=y, g_ptr=grad, dx_ptr=dx_arg, dy_ptr=dy_arg, stride_xr=x.stride(0), stride_xc=x.stride(1),
        stride_yr=y.stride(0), stride_yc=y.stride(1), stride_gr=grad_strides[0], stride_gc=grad_strides[1],
        stride_dxr=dx_arg.stride(0), stride_dxc=dx_arg.stride(1), stride_dyr=dy_arg.stride(0),
        stride_dyc=dy_arg.stride(1), num_cols=num_cols, scale=scale, LOG_TARGET=log_target, INPUT_GRAD=input_grad,
        TARGET_GRAD=target_grad, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return dx, dy


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------


class _TorchKLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, y: torch.Tensor, scale: float | None, log_target: bool, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``scale`` None: the elementwise losses (``none``); else the factor of the sum (1, 1/numel, 1/size(0))."""
        ctx.save_for_backward(x, y)
        ctx.log_target, ctx.scale = log_target, 1.0 if scale is None else scale
        if scale is None:
            return _torch_kl_forward(x, y, log_target=log_target, reduce=False, dtype=out_dtype)
        rows = _torch_kl_forward(x, y, log_target=log_target, reduce=True, dtype=out_dtype)
        out, _ = reduce_rows(rows, None, 0, scale, out_dtype)
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, y = ctx.saved_tensors
        input_grad, target_grad = ctx.needs_input_grad[:2]
        dx, dy = _torch_kl_backward(
            x, y, grad, scale=ctx.scale, log_target=ctx.log_target, input_grad=input_grad, target_grad=target_grad
        )
        return dx, dy, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def kl_div(
    input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", log_target: bool = False
) -> torch.Tensor:
    """Exactly ``torch.nn.functional.kl_div(input, target, reduction=reduction, log_target=log_target)``.

    ``input`` holds log-probabilities, ``target`` probabilities (log-probabilities with ``log_target``); the
    elementwise loss is ``target · (log target − input)`` (0 where ``target`` is 0) or ``e^target · (target −
    input)``, broadcast as torch broadcasts. ``reduction``: ``none`` (that tensor, in the input's dtype), ``sum``,
    ``mean`` (over every element: not the KL; torch's warning is repeated) or ``batchmean`` (the sum over
    ``input.size(0)``: the KL). Gradients are torch's, NaN for a target of 0 included.

    fp32/fp16/bf16 tensors of one dtype on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) run a fused Triton
    forward (one pass over both tensors, fp32 accumulation, then one reduction launch) and backward (one pass, the
    upstream gradient read from device memory); anything else (float64, mixed dtypes, 0-d) runs ``F.kl_div``.
    Returns the input's dtype, or fp32 under autocast (whose policy runs ``kl_div`` in fp32).
    """
    check_reduction("kl_div", reduction, TORCH_REDUCTIONS)
    if not (
        use_row_kernels(None, input, target) and input.dtype == target.dtype and input.dim() > 0 and target.dim() > 0
    ):
        return kl_div_reference(input, target, reduction=reduction, log_target=log_target)
    if reduction == "mean":
        warnings.warn(MEAN_WARNING, stacklevel=2)
    x, y = torch.broadcast_tensors(input, target)
    scale = {"none": None, "sum": 1.0, "mean": 1.0 / x.numel(), "batchmean": 1.0 / input.shape[0]}[reduction]
    num_cols = x.shape[-1]
    out = _TorchKLDivFunction.apply(
        x.reshape(-1, num_cols), y.reshape(-1, num_cols), scale, log_target, result_dtype(input)
    )
    return out.view(x.shape) if reduction == "none" else out


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class KLDivLoss(nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` on the fused kernels of :func:`kl_div`: the same constructor (``reduction``,
    ``log_target``, the legacy ``size_average`` / ``reduce``), the same call, ``(log-probabilities, target)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: the definitions)
# ---------------------------------------------------------------------------------------------------------------


def kl_div_reference(
    input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", log_target: bool = False
) -> torch.Tensor:
    """``torch.nn.functional.kl_div`` itself: :func:`kl_div`'s definition."""
    return F.kl_div(input, target, reduction=reduction, log_target=log_target)
