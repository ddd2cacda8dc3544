"""KDCL's one-backward step, one by one and stacked, with students of one architecture and of several, against the
plain sequential transcription (``tests/helpers/kdcl_reference.py``), in float64: every parameter and buffer after
several steps; for the fitted ensembles (linear, general), with their weights fitted on held-out images after each
step (an epoch here) by the method's ``between_epochs`` and by the reference's ``fit``."""

import copy

import pytest
import torch

from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates
from tests.helpers import kdcl_reference
from tests.helpers.methods import build, max_relative_error, train_step

STEPS = 3
# How closely the fitted weights must agree: general's are a closed form; linear's an L-BFGS fit that stops when
# its gradient reaches 1e-10 or its steps stall, which in weights is ~1e-7 where the optimum lies on the simplex's
# boundary (a weight near 0, its softmax parameter drifting to −∞).
FIT_TOLERANCE = {"linear": 1e-6, "general": 1e-10}
MIXED = "resnet20,wrn16_2,resnet20"  # two of one architecture (stacked together) and one beside them


def _heldout():
    """Held-out ``(images, labels)`` batches as the loader reads them: one view, the last batch partial."""
    return [(torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))) for n in (7, 4)]


def _run(kind, stacked, kdcl_models="", alpha=0.5, reference_alpha=None, swap_views=False, reference_kind=None):
    """``STEPS`` steps of the method and of the reference from the same weights, each followed for a fitted
    ensemble by the fit on held-out images. Returns (the worst relative error of every parameter and buffer, the
    worst difference of the fitted weights).

    After each fit both go on from the reference's weights: the linear fit is an optimisation that stops at its
    tolerance (L-BFGS's path, near a boundary of the simplex, follows rounding), so its weights agree to that
    tolerance only, and the step's parity is checked apart from it."""
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
        fitted = kind in FIT_TOLERANCE
        weights = torch.full((3,), 1 / 3) if fitted else None  # uniform until the first fit
        fit_error = 0.0
        for _ in range(STEPS):
            views = [torch.randn(6, 3, 16, 16) for _ in range(3)]
            y = torch.randint(0, 10, (6,))
            train_step(nets, optimizers, torch.cat(views), y, lambdas)
            given = torch.cat(views[::-1] if swap_views else views)
            alpha_used = reference_alpha or alpha
            kdcl_reference.kdcl_step(reference, ref_optimizers, given, y, kind, alpha=alpha_used, weights=weights)
            if fitted:
                batches = _heldout()
                record = nets.between_epochs(batches, lambda tensor: tensor)
                assert nets.training  # back in train mode for the next step
                weights = kdcl_reference.fit(reference, batches, reference_kind or kind)
                assert list(record) == ["kdcl_weight0", "kdcl_weight1", "kdcl_weight2"]
                assert torch.equal(torch.tensor(list(record.values())), nets.ensemble_weights)
                fit_error = max(fit_error, (nets.ensemble_weights - weights).abs().max().item())
                nets.ensemble_weights.copy_(weights)
                reference.ensemble_weights.copy_(weights)
        if fitted:
            print(f"fitted weights {weights.tolist()}, worst difference {fit_error:.2e}")
        return max_relative_error(nets, reference), fit_error
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("kdcl_models", ["", MIXED], ids=["one-architecture", "mixed"])
@pytest.mark.parametrize("kind", ["minlogit", "naive", "mean", "linear", "general"])
def test_kdcl_step_equals_sequential_reference(kind, kdcl_models, stacked):
    error, fit_error = _run(kind, stacked, kdcl_models)
    print(f"parity kdcl {kind} {kdcl_models or 'resnet20'} {stacked=}: worst error {error:.2e}")
    assert error < 1e-10
    assert fit_error < FIT_TOLERANCE.get(kind, 0) or fit_error == 0


def test_kdcl_parity_detects_a_wrong_weight():
    """Sharp enough to see the KL weighted 1 % differently."""
    assert _run("minlogit", False, alpha=0.5, reference_alpha=0.505)[0] > 1e-6


def test_kdcl_parity_detects_views_given_to_the_wrong_students():
    assert _run("minlogit", True, MIXED, swap_views=True)[0] > 1e-6


@pytest.mark.parametrize(("kind", "other"), [("linear", "general"), ("general", "linear")])
def test_kdcl_parity_tells_the_fitted_ensembles_apart(kind, other):
    """The method's fit against the other fit's reference: the weights differ."""
    assert _run(kind, False, reference_kind=other)[1] > 1e-3


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
        assert max_relative_error(nets, reference) > 1e-6
    finally:
        torch.set_default_dtype(torch.float32)
