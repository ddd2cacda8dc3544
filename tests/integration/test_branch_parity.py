"""The branch methods' one-backward step, one by one and stacked, against the plain sequential transcriptions of
their specifications (``tests/helpers/branch_reference.py``), in float64: every parameter and buffer after several
steps."""

import copy

import pytest
import torch

from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates
from tests.helpers import branch_reference
from tests.helpers.methods import build, max_relative_error, train_step

STEPS = 3


def _run(method, model, stacked, reference_step, weights, seed=0, size=16, **settings):
    """``STEPS`` steps of the fast method and of the reference from the same weights; the worst relative error."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        nets = build(model, 10, 3, size, method=method, **settings)
        reference = copy.deepcopy(nets)
        if stacked:
            nets.stack()
        nets.train()
        reference.train()
        optimizers = make_optimizers(nets)
        set_learning_rates(optimizers, 0.1, 1e-3)
        ref_optimizer = branch_reference.make_sgd(reference, nesterov=type(nets).nesterov)
        lambdas = torch.tensor(weights)
        for _ in range(STEPS):
            x, y = torch.randn(6, 3, size, size), torch.randint(0, 10, (6,))
            train_step(nets, optimizers, x, y, lambdas)
            reference_step(reference, ref_optimizer, x, y)
        return max_relative_error(nets, reference)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("model", ["resnet20", "wrn16_2"])
@pytest.mark.parametrize("quirks", [True, False], ids=["code", "clean"])
def test_one_step_equals_sequential_reference(model, stacked, quirks):
    weight = 0.7  # a ramped-up KL weight that moves the weights visibly
    settings = {"quirk_one_gate_relu": quirks, "quirk_one_target_epsilon": quirks}

    def reference(nets, optimizer, x, y):
        epsilon = 1e-7 if quirks else 0.0
        branch_reference.one_step(nets, optimizer, x, y, weight, t=3.0, epsilon=epsilon, gate_relu=quirks)

    error = _run("one", model, stacked, reference, (weight,), **settings)
    print(f"parity one {model} {stacked=} {quirks=}: worst error {error:.2e}")
    assert error < 1e-10


def test_one_parity_detects_a_wrong_weight():
    """Sharp enough to see the KL weighted 1 % differently."""

    def reference(nets, optimizer, x, y):
        branch_reference.one_step(nets, optimizer, x, y, 0.7 * 1.01)

    assert _run("one", "resnet20", False, reference, (0.7,)) > 1e-6


def test_one_parity_detects_the_epsilon_quirk():
    """The 1e-7 added to the target moves the weights by more than the tolerance."""

    def reference(nets, optimizer, x, y):
        branch_reference.one_step(nets, optimizer, x, y, 0.7, epsilon=0.0)

    assert _run("one", "resnet20", False, reference, (0.7,)) > 1e-10


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("model", ["resnet20", "wrn16_2"])
@pytest.mark.parametrize("quirks", [True, False], ids=["code", "clean"])
def test_cl_ilr_step_equals_sequential_reference(model, stacked, quirks):
    weight = 0.7
    settings = {"quirk_clilr_teacher_gradient": quirks, "quirk_clilr_target_epsilon": quirks}

    def reference(nets, optimizer, x, y):
        epsilon = 1e-7 if quirks else 0.0
        branch_reference.clilr_step(nets, optimizer, x, y, weight, epsilon=epsilon, teacher_gradient=quirks)

    error = _run("cl-ilr", model, stacked, reference, (weight,), **settings)
    print(f"parity cl-ilr {model} {stacked=} {quirks=}: worst error {error:.2e}")
    assert error < 1e-10


def test_cl_ilr_parity_detects_the_rescaling_and_the_teacher_gradient():
    """With the teachers detached the reference drifts past the tolerance; the trunk's gradient is scaled by 1/m."""

    def detached(nets, optimizer, x, y):
        branch_reference.clilr_step(nets, optimizer, x, y, 0.7, teacher_gradient=False)

    assert _run("cl-ilr", "resnet20", False, detached, (0.7,)) > 1e-6
    # The rescaling itself: what the branches read of the trunk passes back a third of their gradient (m = 3).
    torch.manual_seed(0)
    nets = build("resnet20", 10, 3, 16, method="cl-ilr")
    shared = torch.randn(2, 16, 8, 8, requires_grad=True)
    nets.to_branches(shared).sum().backward()
    assert torch.equal(shared.grad, torch.full_like(shared, 1 / 3))


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("model", ["resnet20", "wrn16_2"])
@pytest.mark.parametrize("quirks", [True, False], ids=["code", "clean"])
def test_okddip_step_equals_sequential_reference(model, stacked, quirks):
    weight = 0.7
    names = ("quirk_okddip_target_gradient", "quirk_okddip_target_epsilon", "quirk_okddip_self_attention")
    settings = dict.fromkeys(names, quirks)

    def reference(nets, optimizer, x, y):
        epsilon = 1e-7 if quirks else 0.0
        branch_reference.okddip_step(
            nets, optimizer, x, y, weight, epsilon=epsilon, target_gradient=quirks, self_attention=quirks
        )

    error = _run("okddip", model, stacked, reference, (weight,), **settings)
    print(f"parity okddip {model} {stacked=} {quirks=}: worst error {error:.2e}")
    assert error < 1e-10


def test_okddip_parity_detects_detached_targets():
    def detached(nets, optimizer, x, y):
        branch_reference.okddip_step(nets, optimizer, x, y, 0.7, target_gradient=False)

    assert _run("okddip", "resnet20", False, detached, (0.7,)) > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("method", ["one", "cl-ilr", "okddip"])
def test_imagenet_resnet_branches_equal_sequential_reference(method, stacked):
    """The ImageNet split (trunk: stem and ``layer1-3``; branch: ``layer4`` and ``fc``) of ResNet-18, at 32 px (the
    last stage 1x1), with the code's quirks."""
    steps = {
        "one": branch_reference.one_step,
        "cl-ilr": branch_reference.clilr_step,
        "okddip": branch_reference.okddip_step,
    }

    def reference(nets, optimizer, x, y):
        steps[method](nets, optimizer, x, y, 0.7)

    error = _run(method, "resnet18", stacked, reference, (0.7,), size=32)
    print(f"parity {method} resnet18 {stacked=}: worst error {error:.2e}")
    assert error < 1e-10
