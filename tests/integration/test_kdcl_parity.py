"""KDCL's one-backward step, one by one and stacked, with students of one architecture and of several, against the
plain sequential transcription (``tests/helpers/kdcl_reference.py``), in float64: every parameter and buffer after
several steps."""

import copy

import pytest
import torch

from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates
from tests.helpers import kdcl_reference
from tests.helpers.methods import build, train_step

STEPS = 3
MIXED = "resnet20,wrn16_2,resnet20"  # two of one architecture (stacked together) and one beside them


def _max_relative_error(fast, reference):
    state = lambda nets: {**dict(nets.named_parameters()), **dict(nets.named_buffers())}  # noqa: E731
    got, worst = state(fast), 0.0
    for name, ref in state(reference).items():
        if not ref.is_floating_point():
            assert torch.equal(got[name], ref), name
            continue
        worst = max(worst, (got[name] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30))
    return worst


def _run(kind, stacked, kdcl_models="", alpha=0.5, reference_alpha=None, swap_views=False):
    """``STEPS`` steps of the method and of the reference from the same weights; the worst relative error."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        nets = build("resnet20", 10, 3, 16, method="kdcl", kdcl_ensemble=kind, kdcl_models=kdcl_models)
        reference = copy.deepcopy(nets)
        if stacked:
            nets.stack()
        nets.train()
        reference.train()
        optimizers = make_optimizers(nets)
        set_learning_rates(optimizers, 0.1, 1e-3)
        ref_optimizers = kdcl_reference.make_sgds(reference)
        lambdas = torch.tensor([alpha])
        for _ in range(STEPS):
            views = [torch.randn(6, 3, 16, 16) for _ in range(3)]
            y = torch.randint(0, 10, (6,))
            train_step(nets, optimizers, torch.cat(views), y, lambdas)
            given = torch.cat(views[::-1] if swap_views else views)
            kdcl_reference.kdcl_step(reference, ref_optimizers, given, y, kind, alpha=reference_alpha or alpha)
        return _max_relative_error(nets, reference)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("kdcl_models", ["", MIXED], ids=["one-architecture", "mixed"])
@pytest.mark.parametrize("kind", ["minlogit", "naive", "mean"])
def test_kdcl_step_equals_sequential_reference(kind, kdcl_models, stacked):
    error = _run(kind, stacked, kdcl_models)
    print(f"parity kdcl {kind} {kdcl_models or 'resnet20'} {stacked=}: worst error {error:.2e}")
    assert error < 1e-10


def test_kdcl_parity_detects_a_wrong_weight():
    """Sharp enough to see the KL weighted 1 % differently."""
    assert _run("minlogit", False, alpha=0.5, reference_alpha=0.505) > 1e-6


def test_kdcl_parity_detects_views_given_to_the_wrong_students():
    assert _run("minlogit", True, MIXED, swap_views=True) > 1e-6


@pytest.mark.parametrize("other", ["naive", "mean"])
def test_kdcl_parity_tells_the_ensembles_apart(other):
    """The minlogit method against another ensemble's reference: the variants are not the same maths."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        nets = build("resnet20", 10, 2, 16, method="kdcl", kdcl_ensemble="minlogit")
        reference = copy.deepcopy(nets)
        optimizers = make_optimizers(nets)
        set_learning_rates(optimizers, 0.1, 1e-3)
        ref_optimizers = kdcl_reference.make_sgds(reference)
        x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 10, (6,))
        train_step(nets, optimizers, x, y, torch.tensor([0.5]))
        kdcl_reference.kdcl_step(reference, ref_optimizers, x, y, other)
        assert _max_relative_error(nets, reference) > 1e-6
    finally:
        torch.set_default_dtype(torch.float32)
