"""``--amp``: the autocast dtype and the gradient scaler it picks."""

import pytest
import torch

from ffsd_fast.step.precision import mixed_precision


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_amp_flag_picks_the_autocast_dtype_and_scaler(amp):
    dtype, scaler = mixed_precision(amp, torch.device("cpu"))
    assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    assert (scaler is not None) == (amp == "fp16")
