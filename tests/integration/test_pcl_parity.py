"""PCL's one-backward step, one by one and stacked, against the plain sequential transcription of the public code
(``tests/helpers/pcl_reference.py``), in float64: every parameter, buffer and temporal-mean tensor after several
steps that cross the KL weights' ramp-up and the temporal mean's decay warm-up."""

import copy

import pytest
import torch

from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates
from tests.helpers import pcl_reference
from tests.helpers.methods import build, max_relative_error, train_step

M = 3
# Epochs 1-4 with a 2-epoch ramp: the code's ramp gives e^-5, 1, e^-5, then 1 after it (the clean one 0.0067, 0.29, 1,
# 1): both sides' weights change from step to step, each computed on its own side.
EPOCHS = (1, 2, 3, 4)
RAMPUP = 2
DECAY = 0.6  # reached at the fourth step (1 − 1/4 = 0.75 > 0.6): the warm-up min(1 − 1/(t + 1), decay) both ways


def _run(model, stacked, quirks=True, reference_scale=1.0, reference_decay=DECAY):
    """The method and the reference for ``EPOCHS`` (one step each) from the same weights; the worst relative error
    over every parameter and buffer, the temporal means' included."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        settings = {f"quirk_pcl_{q}": quirks for q in ("rampup_divisor", "shared_classifier_init", "mean_init")}
        nets = build(model, 10, M, 16, method="pcl", pcl_rampup_epochs=RAMPUP, pcl_ema_decay=DECAY, **settings)
        nets.settings["pcl_mean_consistency"] = 0.8  # the two weights apart: each reaches its own term
        reference = copy.deepcopy(nets)
        if stacked:
            nets.stack()
        nets.train()
        reference.train()
        optimizers = make_optimizers(nets)
        set_learning_rates(optimizers, 0.1, 1e-3)
        ref_optimizer = pcl_reference.make_sgd(reference)
        for epoch in EPOCHS:
            weights = nets.epoch_lambdas(epoch)
            lambdas = torch.tensor([weights[name] for name in nets.lambdas])
            x, y = torch.randn(M * 6, 3, 16, 16), torch.randint(0, 10, (6,))
            train_step(nets, optimizers, x, y, lambdas)
            ramp = pcl_reference.rampup(epoch - 1, RAMPUP, code_divisor=quirks) * reference_scale
            pcl_reference.pcl_step(reference, ref_optimizer, x, y, ramp, 0.8 * ramp, decay=reference_decay)
        return max_relative_error(nets, reference)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("model", ["resnet20", "wrn16_2"])
@pytest.mark.parametrize("quirks", [True, False], ids=["code", "clean"])
def test_pcl_step_equals_sequential_reference(model, stacked, quirks):
    error = _run(model, stacked, quirks)
    print(f"parity pcl {model} {stacked=} {quirks=}: worst error {error:.2e}")
    assert error < 1e-10


def test_pcl_parity_detects_a_wrong_weight():
    """Sharp enough to see both KL weights 1 % off."""
    assert _run("resnet20", False, reference_scale=1.01) > 1e-6


def test_pcl_parity_detects_another_decay():
    """The temporal means are compared too: a decay of 0.5 instead of 0.6 shows."""
    assert _run("resnet20", True, reference_decay=0.5) > 1e-6
