"""``ffsd_kernels.integrations.torchdistill``: the registered ``FusedKDLoss`` equals torchdistill's own ``KDLoss``
(values and gradients), and every key resolves through torchdistill's registry. Skipped where torchdistill is not
installed (it is pinned in the ``dev`` extra)."""

import pytest
import torch

pytest.importorskip("torchdistill")

from torchdistill.losses.mid_level import KDLoss  # noqa: E402
from torchdistill.losses.registry import get_low_level_loss, get_mid_level_loss  # noqa: E402

import ffsd_kernels  # noqa: E402
from ffsd_kernels.integrations import torchdistill as adapter  # noqa: E402

PATHS = dict(student_module_path="fc", student_module_io="output", teacher_module_path="fc", teacher_module_io="output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alpha, beta", [(None, None), (0.5, None), (0.3, 0.9)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("with_targets", [True, False])
def test_fused_kd_loss_is_torchdistill_kd_loss(dtype, alpha, beta, reduction, with_targets):
    s = (3 * torch.randn(6, 37, dtype=torch.float64)).to(dtype).requires_grad_()
    t = (3 * torch.randn(6, 37, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, 37, (6,)) if with_targets else None
    config = {"key": "FusedKDLoss", "kwargs": dict(PATHS, temperature=4.0, alpha=alpha, beta=beta, reduction=reduction)}
    ours = get_mid_level_loss(config)
    assert isinstance(ours, adapter.FusedKDLoss)
    if alpha is None:
        theirs = KDLoss(**PATHS, temperature=4.0, alpha=0.0, reduction=reduction)
    else:
        theirs = KDLoss(**PATHS, temperature=4.0, alpha=alpha, beta=beta, reduction=reduction)
    s2 = s.detach().clone().requires_grad_()
    loss = ours({"fc": {"output": s}}, {"fc": {"output": t}}, targets)
    ref = theirs({"fc": {"output": s2}}, {"fc": {"output": t}}, targets)
    loss.backward()
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss.to(ref.dtype), ref, **tol)
    torch.testing.assert_close(s.grad, s2.grad, **tol)


def test_low_level_keys_resolve():
    assert isinstance(get_low_level_loss("DistillationKLLoss", temperature=2.0), ffsd_kernels.DistillationKLLoss)
    assert isinstance(get_low_level_loss("JSDLoss", beta=0.1), ffsd_kernels.JSDLoss)
    assert isinstance(get_low_level_loss("FusedKLDivLoss", reduction="batchmean"), ffsd_kernels.KLDivLoss)
    assert isinstance(get_low_level_loss("FusedLinearDistillationLoss"), ffsd_kernels.FusedLinearDistillationLoss)
    adapter.register()  # a second time is harmless
    with pytest.raises(ValueError):  # KDLoss's reduction="mean" is accepted since issue 29; an unknown one is not
        adapter.FusedKDLoss(**PATHS, temperature=1.0, reduction="max")
