"""Where an op runs (its Triton kernels, or its plain PyTorch reference) and in what precision it accumulates.

Triton runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` in the
environment before ``triton`` is first imported: that is how the kernels are tested without a GPU). Everything else
(CPU tensors without the interpreter, dtypes an op's kernels do not implement, a platform without triton) runs the
reference, so the library works everywhere with one set of names.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform (torch's marker: Linux only): every op runs its reference

    class _NoTriton:
        """Stands in for ``triton`` and ``triton.language`` so that the op files still define their kernels
        (decorated, annotated with ``tl.constexpr``); ``use_triton`` is then False, so none is ever launched."""

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name: str) -> None:
            return None

    triton = tl = _NoTriton()
    HAS_TRITON = False

# Read once: triton.jit decides at decoration time whether a kernel is compiled or interpreted.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What every public entry accepts for logits and feature maps: the kernels' dtypes, and fp64 (its reference).
ACCEPTED_DTYPES = (*KERNEL_DTYPES, torch.float64)

__all__ = [
    "ACCEPTED_DTYPES",
    "HAS_TRITON",
    "INTERPRETER",
    "KERNEL_DTYPES",
    "check_dtypes",
    "compute_dtype",
    "result_dtype",
    "tl",
    "triton",
    "use_triton",
]


def check_dtypes(op: str, **tensors: torch.Tensor) -> None:
    """TypeError naming ``op``, the argument and its dtype unless every tensor is fp32, fp16, bf16 or fp64.

    Called first by every public entry, on whichever path it then takes: an integer or bool tensor would otherwise
    reach the reference, which computes in fp32 and casts the result back (``kl_div_loss`` of int64 logits gave
    ``tensor(1)`` for 1.8), and other dtypes (complex, fp8) are not implemented either way."""
    for name, t in tensors.items():
        if t.dtype not in ACCEPTED_DTYPES:
            raise TypeError(
                f"{op} expects {name} of a floating-point dtype (torch.float32, torch.float16, torch.bfloat16 or "
                f"torch.float64), got {t.dtype}"
            )


def use_triton(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> bool:
    """True when triton is installed and every tensor is of one of ``dtypes`` (the op's kernel dtypes) and on CUDA
    (or on the CPU under the interpreter)."""
    if not HAS_TRITON:
        return False
    for t in tensors:
        if t.dtype not in dtypes:
            return False
        if not (t.is_cuda or (INTERPRETER and t.device.type == "cpu")):
            return False
    return True


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the references: half-precision inputs are upcast so that sums over classes or
    pixels keep fp32 accuracy; fp64 stays fp64 so that the kernels can be checked against it to ~1e-12."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op returns: ``x``'s, except float32 for half inputs under autocast (autocast's policy for
    reductions and losses, which it runs in float32)."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype
