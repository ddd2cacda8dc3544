"""The one-backward step against the plain sequential transcription of the spec, in float64."""

import copy

import pytest
import torch

import ffsd_kernels
import ffsd_kernels.reference
from ffsd_fast.step.optimizers import make_optimizers
from ffsd_kernels._dispatch import INTERPRETER
from tests.helpers.methods import build, max_relative_error, train_step
from tests.helpers.sequential_reference import make_reference_optimizers, reference_step

# Large enough λ's that every term moves the weights visibly (the defaults make some terms ~1e-5 of the loss).
LAMBDAS = (0.3, 2.0, 1.5)


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("num_students", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "model,image_size,clean_student_sd",
    # resnet18 (K = 4 taps) costs much more in float64 on a CPU (6-8 s): the default variant only, and slow. Three
    # students (2-3 s with resnet20) are slow too: the quick tier checks two. densenet40: a network that concatenates
    # channels (stacked, each network's concatenations stay in its channels), at 8 px and still slow.
    [
        ("resnet20", 16, False),
        ("resnet20", 16, True),
        pytest.param("resnet18", 32, False, marks=pytest.mark.slow),
        pytest.param("densenet40", 8, False, marks=pytest.mark.slow),
    ],
)
def test_parity_fast_step_equals_sequential_reference(model, image_size, clean_student_sd, num_students, stacked):
    """``stacked``: the backbones run as one network (``--stack-networks``), the same arithmetic."""
    torch.set_default_dtype(torch.float64)
    try:
        nets = build(model, 10, num_students, image_size, kernels=ffsd_kernels)
        nets.settings["quirk_student_sd_lambda_div"] = not clean_student_sd
        reference = copy.deepcopy(nets)
        if stacked:
            nets.stack()
        nets.train()
        reference.train()
        lambda_div, lambda_sd, lambda_f = LAMBDAS
        fast_opts = make_optimizers(nets)
        ref_opts = make_reference_optimizers(reference, lr=0.1, decoder_lr=1e-3)
        lambdas = torch.tensor(LAMBDAS)
        errors = []
        for step in range(3):
            x = torch.randn(6, 3, image_size, image_size)
            y = torch.randint(0, 10, (6,))
            train_step(nets, fast_opts, x, y, lambdas)
            reference_step(
                reference,
                ref_opts,
                x,
                y,
                lambda_div,
                lambda_sd,
                lambda_f,
                student_sd_lambda=lambda_sd if clean_student_sd else None,
            )
            if step in (0, 2):
                errors.append(max_relative_error(nets, reference))
        print(f"parity {model} m={num_students} clean_sd={clean_student_sd} {stacked=}: worst error {max(errors):.2e}")
        assert max(errors) < 1e-10
    finally:
        torch.set_default_dtype(torch.float32)


def test_parity_detects_a_wrong_term():
    """The comparison is sharp enough to see a single term weighted differently."""
    torch.set_default_dtype(torch.float64)
    try:
        nets = build("resnet20", num_classes=10, num_students=2, image_size=16, kernels=ffsd_kernels)
        reference = copy.deepcopy(nets)
        fast_opts = make_optimizers(nets)
        ref_opts = make_reference_optimizers(reference, lr=0.1, decoder_lr=1e-3)
        x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
        wrong = torch.tensor([LAMBDAS[0], LAMBDAS[1], LAMBDAS[2] * 1.01])
        train_step(nets, fast_opts, x, y, wrong)
        reference_step(reference, ref_opts, x, y, *LAMBDAS)
        assert max_relative_error(nets, reference) > 1e-6
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.slow  # through Triton's interpreter: ~8 s on a CPU
@pytest.mark.parametrize(
    "device",
    [
        pytest.param(
            "cpu", marks=pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs TRITON_INTERPRET=1")
        ),
        pytest.param(
            "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
        ),
    ],
)
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
def test_triton_kernels_step_equals_torch_step(device, stacked, request):
    """``--kernels triton`` (fused losses and fusion blocks) against ``--kernels torch``: every loss term, every
    gradient and every BatchNorm statistic, in float32. ``stacked``: the Triton side also runs the networks stacked
    (``--stack-networks``), with the grouped distance op."""
    if device == "cuda":
        request.getfixturevalue("strict_fp32_cuda")
    nets = build("resnet20", 10, 3, 16, fused_blocks=True, kernels=ffsd_kernels)
    nets = nets.to(device).train()
    twin = copy.deepcopy(nets)
    if stacked:
        nets.stack()
    for block in (twin.fusion.block, twin.leader.head):
        block.fused = False
    twin.settings["kernels"] = "torch"
    x, y = torch.randn(6, 3, 16, 16, device=device), torch.randint(0, 10, (6,), device=device)
    lambdas = torch.tensor(LAMBDAS, device=device)
    terms = {}
    for name, networks in (("triton", nets), ("torch", twin)):
        # Same BN state and dropout-free networks: the two forward passes see identical weights and inputs.
        terms[name] = networks(x, y, lambdas)
        terms[name].total.backward()
        networks.form.share_grads()
    for key, value in terms["torch"].values.items():
        got = terms["triton"].values[key]
        assert got.dtype == value.dtype == torch.float32, key
        assert (got - value).abs().item() <= 1e-5 * max(value.abs().item(), 1e-6), (key, got.item(), value.item())
    worst = 0.0
    for (name, p), q in zip(nets.named_parameters(), twin.parameters(), strict=True):
        scale = q.grad.abs().max().item()
        if scale > 1e-8:
            worst = max(worst, (p.grad - q.grad).abs().max().item() / scale)
        else:
            assert (p.grad - q.grad).abs().max().item() < 1e-8, name
    for (name, b), c in zip(nets.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    print(f"triton vs torch step: worst gradient relative error {worst:.2e}")
    assert worst < 2e-5
