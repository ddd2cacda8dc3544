"""The branch methods with ``--kernels triton`` (their CE and KL terms on ``ffsd_kernels.branch_distillation_losses``'s
Triton kernels, under the interpreter on a CPU) give the terms and gradients of ``--kernels torch`` (the op's plain
PyTorch reference, which ``test_branch_parity.py`` holds to the sequential transcriptions), in fp32, one by one and
stacked, with the quirks on (ε, undetached teachers) and off."""

import importlib

import pytest
import torch

from tests.helpers import TRITON_DEVICE_NAMES
from tests.helpers.methods import build

pytestmark = pytest.mark.skipif("cpu" not in TRITON_DEVICE_NAMES, reason="needs TRITON_INTERPRET=1 (kernels on a CPU)")

bg_module = importlib.import_module("ffsd_kernels.branch_group")

QUIRKS = {
    "one": ("quirk_one_target_epsilon",),
    "cl-ilr": ("quirk_clilr_target_epsilon", "quirk_clilr_teacher_gradient"),
    "okddip": ("quirk_okddip_target_epsilon", "quirk_okddip_target_gradient"),
}


def _terms_and_grads(method, kernels, stacked, quirks):
    torch.manual_seed(0)
    nets = build("resnet20", 10, 3, 16, method=method, kernels=kernels, **dict.fromkeys(QUIRKS[method], quirks))
    if stacked:
        nets.stack()
    nets.train()
    torch.manual_seed(1)
    images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    terms = nets(images, labels, torch.tensor([0.7]))
    terms.total.backward()
    grads = {name: p.grad.clone() for name, p in nets.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.values.items()}, grads


@pytest.mark.parametrize("quirks", [True, False], ids=["code", "clean"])
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("method", list(QUIRKS))
def test_triton_terms_and_gradients_equal_torch(method, stacked, quirks, monkeypatch):
    torch_terms, torch_grads = _terms_and_grads(method, "torch", stacked, quirks)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    monkeypatch.setattr(bg_module, "branch_distillation_losses_reference", forbidden)
    triton_terms, triton_grads = _terms_and_grads(method, "triton", stacked, quirks)
    assert triton_terms.keys() == torch_terms.keys()
    for name, value in torch_terms.items():
        torch.testing.assert_close(triton_terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert triton_grads.keys() == torch_grads.keys()
    for name, grad in torch_grads.items():
        scale = grad.abs().max().item()
        error = (triton_grads[name] - grad).abs().max().item() / max(scale, 1e-12)
        assert error < 1e-4, f"{name}: relative error {error:.2e}"
