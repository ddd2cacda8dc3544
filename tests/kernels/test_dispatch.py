"""The switch point (``ffsd_kernels._dispatch``): on fp32 CPU input without the interpreter every public function is
its reference, bit for bit; with it, the Triton kernels agree with the reference to fp32 precision."""

import pytest
import torch

import ffsd_kernels
from ffsd_kernels import AttentionDistance, KLDivLoss, _dispatch, attention_map
from tests.helpers import feature

LAYOUTS = ["nchw", "channels_last"]


@pytest.mark.parametrize(
    "interpreter",
    [False, pytest.param(True, marks=pytest.mark.skipif(not _dispatch.INTERPRETER, reason="needs TRITON_INTERPRET=1"))],
    ids=["reference", "interpreted"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_against_reference_on_fp32_cpu(layout, interpreter, monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRETER", interpreter)
    s, t = torch.randn(6, 40), torch.randn(6, 40)
    labels = torch.randint(0, 40, (6,))
    x = feature((3, 8, 5, 7), torch.float32, layout, requires_grad=False)
    y = feature((3, 4, 5, 7), torch.float32, layout, requires_grad=False)
    a, b = attention_map(x), attention_map(y)
    pairs = [
        (ffsd_kernels.kl_div_loss(s, t, 3.0), ffsd_kernels.kl_div_loss_reference(s, t, 3.0)),
        (KLDivLoss(3.0)(s, t), ffsd_kernels.kl_div_loss_reference(s, t, 3.0)),
        (ffsd_kernels.kl_div_loss(s, [t, s], 3.0), ffsd_kernels.kl_div_loss_reference(s, [t, s], 3.0)),
        (
            torch.stack(ffsd_kernels.cross_entropy_kl_loss(s, t, labels, 3.0)),
            torch.stack(ffsd_kernels.cross_entropy_kl_loss_reference(s, t, labels, 3.0)),
        ),
        (ffsd_kernels.mutual_kl_loss([s, t], 3.0), ffsd_kernels.mutual_kl_loss_reference([s, t], 3.0)),
        (ffsd_kernels.attention_map(x), ffsd_kernels.attention_map_reference(x)),
        (ffsd_kernels.normalized_distance(a, b), ffsd_kernels.normalized_distance_reference(a, b)),
        (ffsd_kernels.attention_distance(x, y), ffsd_kernels.attention_distance_reference(x, y)),
        (AttentionDistance()(x, y), ffsd_kernels.attention_distance_reference(x, y)),
        (ffsd_kernels.diversity_loss(a, b), ffsd_kernels.diversity_loss_reference(a, b)),
        (ffsd_kernels.diversity_shift(x), ffsd_kernels.diversity_shift_reference(x)),
    ]
    for i, (public, reference) in enumerate(pairs):
        assert public.dtype == reference.dtype, i
        if interpreter:
            torch.testing.assert_close(public, reference, rtol=1e-5, atol=1e-7, msg=f"pair {i}")
        else:
            assert torch.equal(public, reference), i
