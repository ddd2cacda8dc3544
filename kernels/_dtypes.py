"""Precision policy shared by the ops: accumulate in at least fp32, return the input's dtype."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are upcast so that sums over classes or pixels keep fp32 accuracy; fp64 stays fp64 so
    # that the references can be checked to ~1e-12.
    return torch.float64 if dtype == torch.float64 else torch.float32
