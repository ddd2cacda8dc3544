"""The switch point (``ffsd_kernels._dispatch``): on fp32 CPU input without the interpreter every public function is
its reference, bit for bit; with it, the Triton kernels agree with the reference to fp32 precision. Before it, every
public entry refuses logits and feature maps of any dtype but fp32, fp16, bf16 and fp64 (``check_dtypes``)."""

import pytest
import torch

import ffsd_kernels
from ffsd_kernels import AttentionDistance, DistillationKLLoss, _dispatch, attention_map
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
        (DistillationKLLoss(3.0)(s, t), ffsd_kernels.kl_div_loss_reference(s, t, 3.0)),
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


# Every public entry that takes logits or feature maps, called with one argument of a bad dtype ``b(*shape)`` and
# the others fp32 ``f(*shape)``: (the op the error names, the call). Modules name the function they run.
def _block(fused: bool = True) -> ffsd_kernels.FusionBlock:
    return ffsd_kernels.FusionBlock(3, 2, 4, fused=fused)


BAD_DTYPE_CALLS = {
    "kl_div_loss/student": ("kl_div_loss", lambda f, b: ffsd_kernels.kl_div_loss(b(4, 10), f(4, 10))),
    "kl_div_loss/teacher": ("kl_div_loss", lambda f, b: ffsd_kernels.kl_div_loss(f(4, 10), b(4, 10))),
    "kl_div_loss/teacher-list": (
        "kl_div_loss",
        lambda f, b: ffsd_kernels.kl_div_loss(f(4, 10), [f(4, 10), b(4, 10)]),
    ),
    "kl_div_loss/teacher-stacked": ("kl_div_loss", lambda f, b: ffsd_kernels.kl_div_loss(f(4, 10), b(2, 4, 10))),
    "DistillationKLLoss": ("kl_div_loss", lambda f, b: DistillationKLLoss(2.0)(b(4, 10), f(4, 10))),
    "kl_div_loss_reference/student": (
        "kl_div_loss_reference",
        lambda f, b: ffsd_kernels.kl_div_loss_reference(b(4, 10), f(4, 10)),
    ),
    "kl_div_loss_reference/teacher-list": (
        "kl_div_loss_reference",
        lambda f, b: ffsd_kernels.kl_div_loss_reference(f(4, 10), [b(4, 10), f(4, 10)]),
    ),
    "cross_entropy_kl_loss/student": (
        "cross_entropy_kl_loss",
        lambda f, b: ffsd_kernels.cross_entropy_kl_loss(b(4, 10), f(4, 10), torch.zeros(4, dtype=torch.long)),
    ),
    "cross_entropy_kl_loss/teacher": (
        "cross_entropy_kl_loss",
        lambda f, b: ffsd_kernels.cross_entropy_kl_loss(f(4, 10), b(4, 10), torch.zeros(4, dtype=torch.long)),
    ),
    "CrossEntropyKLLoss": (
        "cross_entropy_kl_loss",
        lambda f, b: ffsd_kernels.CrossEntropyKLLoss()(b(4, 10), f(4, 10), torch.zeros(4, dtype=torch.long)),
    ),
    "cross_entropy_kl_loss_reference/student": (
        "cross_entropy_kl_loss_reference",
        lambda f, b: ffsd_kernels.cross_entropy_kl_loss_reference(b(4, 10), f(4, 10), torch.zeros(4, dtype=torch.long)),
    ),
    "cross_entropy_kl_loss_reference/teacher": (
        "cross_entropy_kl_loss_reference",
        lambda f, b: ffsd_kernels.cross_entropy_kl_loss_reference(f(4, 10), b(4, 10), torch.zeros(4, dtype=torch.long)),
    ),
    "mutual_kl_loss/list": ("mutual_kl_loss", lambda f, b: ffsd_kernels.mutual_kl_loss([f(4, 10), b(4, 10)])),
    "mutual_kl_loss/stacked": ("mutual_kl_loss", lambda f, b: ffsd_kernels.mutual_kl_loss(b(2, 4, 10))),
    "MutualKLLoss": ("mutual_kl_loss", lambda f, b: ffsd_kernels.MutualKLLoss()([b(4, 10), f(4, 10)])),
    "mutual_kl_loss_reference": (
        "mutual_kl_loss_reference",
        lambda f, b: ffsd_kernels.mutual_kl_loss_reference([f(4, 10), b(4, 10)]),
    ),
    "attention_map": ("attention_map", lambda f, b: ffsd_kernels.attention_map(b(2, 3, 4, 4))),
    "attention_map_reference": (
        "attention_map_reference",
        lambda f, b: ffsd_kernels.attention_map_reference(b(2, 3, 4, 4)),
    ),
    "normalized_distance/x": (
        "normalized_distance",
        lambda f, b: ffsd_kernels.normalized_distance(b(2, 1, 4, 4), f(2, 1, 4, 4)),
    ),
    "normalized_distance/y": (
        "normalized_distance",
        lambda f, b: ffsd_kernels.normalized_distance(f(2, 1, 4, 4), b(2, 1, 4, 4)),
    ),
    "NormalizedDistance": (
        "normalized_distance",
        lambda f, b: ffsd_kernels.NormalizedDistance()(f(2, 16), b(2, 16)),
    ),
    "normalized_distance_reference": (
        "normalized_distance_reference",
        lambda f, b: ffsd_kernels.normalized_distance_reference(f(2, 16), b(2, 16)),
    ),
    "attention_distance/x": (
        "attention_distance",
        lambda f, b: ffsd_kernels.attention_distance(b(2, 3, 4, 4), f(2, 5, 4, 4)),
    ),
    "attention_distance/y": (
        "attention_distance",
        lambda f, b: ffsd_kernels.attention_distance(f(2, 3, 4, 4), b(2, 5, 4, 4)),
    ),
    "AttentionDistance": (
        "attention_distance",
        lambda f, b: ffsd_kernels.AttentionDistance()(b(2, 3, 4, 4), f(2, 5, 4, 4)),
    ),
    "attention_distance_reference": (
        "attention_distance_reference",
        lambda f, b: ffsd_kernels.attention_distance_reference(f(2, 3, 4, 4), b(2, 5, 4, 4)),
    ),
    "diversity_loss/x": ("diversity_loss", lambda f, b: ffsd_kernels.diversity_loss(b(2, 1, 4, 4), f(2, 1, 4, 4))),
    "diversity_loss/y": ("diversity_loss", lambda f, b: ffsd_kernels.diversity_loss(f(2, 1, 4, 4), b(2, 1, 4, 4))),
    "DiversityLoss": ("diversity_loss", lambda f, b: ffsd_kernels.DiversityLoss()(b(2, 1, 4, 4), f(2, 1, 4, 4))),
    "diversity_loss_reference": (
        "diversity_loss_reference",
        lambda f, b: ffsd_kernels.diversity_loss_reference(f(2, 1, 4, 4), b(2, 1, 4, 4)),
    ),
    "diversity_shift": ("diversity_shift", lambda f, b: ffsd_kernels.diversity_shift(b(2, 3, 4, 4))),
    "diversity_shift_reference": (
        "diversity_shift_reference",
        lambda f, b: ffsd_kernels.diversity_shift_reference(b(2, 3, 4, 4)),
    ),
    "fusion_block": ("fusion_block", lambda f, b: ffsd_kernels.fusion_block([f(2, 3, 4, 4), b(2, 3, 4, 4)], _block())),
    "FusionBlock": ("fusion_block", lambda f, b: _block()([b(2, 3, 4, 4), f(2, 3, 4, 4)])),
    "FusionBlock/unfused": ("fusion_block_reference", lambda f, b: _block(False)([f(2, 3, 4, 4), b(2, 3, 4, 4)])),
    "fusion_block_reference": (
        "fusion_block_reference",
        lambda f, b: ffsd_kernels.fusion_block_reference([b(2, 3, 4, 4), f(2, 3, 4, 4)], _block()),
    ),
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
@pytest.mark.parametrize("case", list(BAD_DTYPE_CALLS), ids=list(BAD_DTYPE_CALLS))
def test_integer_bool_and_complex_inputs_are_refused(case, dtype):
    """Integer logits once ran the reference in fp32 and came back cast to int64 (``kl_div_loss`` gave tensor(1) for
    1.8): every entry refuses them before it chooses a path, naming the op, the dtype and what is accepted."""
    op, call = BAD_DTYPE_CALLS[case]

    def bad(*shape):
        return (3 * torch.randn(shape)).to(dtype)

    with pytest.raises(TypeError) as info:
        call(torch.randn, bad)
    message = str(info.value)
    assert message.startswith(f"{op} expects ") and message.endswith(f"got {dtype}"), message
    assert "(torch.float32, torch.float16, torch.bfloat16 or torch.float64)" in message
