"""``--amp``: the autocast dtype of the forward passes and, for fp16, the gradient scaler."""

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def mixed_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``--amp``'s autocast dtype and, for fp16, the gradient scaler (kept in the checkpoint)."""
    return AMP_DTYPES[amp], torch.amp.GradScaler(device.type) if amp == "fp16" else None
