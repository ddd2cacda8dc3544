"""``--kernels``: which loss library the method's losses call."""

import ffsd_kernels
import ffsd_kernels.reference
from ffsd_fast.method.base import kernel_ops


def test_kernels_flag_picks_the_loss_library():
    assert kernel_ops("triton") is ffsd_kernels
    assert kernel_ops("torch") is ffsd_kernels.reference
    assert ffsd_kernels.reference.kl_div_loss is ffsd_kernels.kl_div_loss_reference
