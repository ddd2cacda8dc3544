"""Where an op runs: its Triton kernels, or its plain PyTorch reference.

Triton runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` in the
environment before ``triton`` is first imported: that is how the kernels are tested without a GPU). Everything else
(CPU tensors without the interpreter, float64, which the kernels do not implement) runs the reference, so the
library works everywhere with one set of names.
"""

import os

import torch

# Read once: triton.jit decides at decoration time whether a kernel is compiled or interpreted.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> bool:
    """True when every tensor is of one of ``dtypes`` (the op's kernel dtypes) and on CUDA (or on the CPU under the
    interpreter)."""
    for t in tensors:
        if t.dtype not in dtypes:
            return False
        if not (t.is_cuda or (INTERPRETER and t.device.type == "cpu")):
            return False
    return True


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op returns: ``x``'s, except float32 for half inputs under autocast (autocast's policy for
    reductions and losses, which it runs in float32)."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype
