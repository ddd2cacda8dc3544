"""PCL's pieces: the temporal mean's update (``after_step``, inside the step, no host sync), the ramp, the networks
it builds and what it evaluates and deploys."""

import math

import pytest
import torch

from ffsd_fast.errors import UserError
from ffsd_fast.method.branched import sigmoid_rampup
from ffsd_fast.method.pcl import pcl_rampup
from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates
from ffsd_fast.step.train_step import TrainStep
from tests.helpers.kernel_launches import forbid_host_syncs
from tests.helpers.methods import build


def _means(nets):
    return [p.detach().clone() for p in [*nets.mean_trunk.parameters(), *nets.mean_students.parameters()]]


def _online(nets):
    return [p.detach().clone() for p in [*nets.trunk.parameters(), *nets.students.parameters()]]


def test_after_step_is_the_warmed_up_exponential_moving_average():
    nets = build("resnet20", 10, 2, 16, method="pcl", pcl_ema_decay=0.6)
    first = _online(nets)
    nets.after_step()  # step 0: α = min(0, 0.6) = 0, the copy
    assert all(torch.equal(a, b) for a, b in zip(_means(nets), first, strict=True))
    with torch.no_grad():
        for p in [*nets.trunk.parameters(), *nets.students.parameters()]:
            p.add_(1.0)
    nets.after_step()  # step 1: α = 1/2, the true mean of the two
    for mean, before in zip(_means(nets), first, strict=True):
        torch.testing.assert_close(mean, before + 0.5)
    nets.mean_steps.fill_(10)  # α = min(1 − 1/11, 0.6) = 0.6
    previous, online = _means(nets), _online(nets)
    nets.after_step()
    for mean, old, new in zip(_means(nets), previous, online, strict=True):
        torch.testing.assert_close(mean, 0.6 * old + 0.4 * new)
    assert int(nets.mean_steps) == 11


def test_the_temporal_mean_takes_no_gradient_and_no_optimiser():
    nets = build("resnet20", 10, 3, 16, method="pcl")
    trained = {id(p) for group in nets.parameter_groups() for p in group.params}
    means = [*nets.mean_trunk.parameters(), *nets.mean_students.parameters()]
    assert means and not any(p.requires_grad or id(p) in trained for p in means)
    assert {id(p) for p in nets.ensemble.parameters()} <= trained


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
def test_the_step_with_its_temporal_mean_makes_no_host_synchronisation(monkeypatch, stacked):
    """The whole step, the update of the temporal mean included, with every host-synchronising method refused."""
    nets = build("resnet20", 10, 3, 16, method="pcl")
    if stacked:
        nets.stack()
    nets.train()
    optimizers = make_optimizers(nets)
    set_learning_rates(optimizers, 0.1, 1e-3)
    stepper = TrainStep(nets, optimizers, torch.tensor([0.5, 0.5]))
    x, y = torch.randn(3 * 4, 3, 16, 16), torch.randint(0, 10, (4,))
    before = _means(nets)
    forbid_host_syncs(monkeypatch)
    for _ in range(2):
        terms = stepper(x, y)
    monkeypatch.undo()
    assert torch.isfinite(terms.total)
    assert int(nets.mean_steps) == 2
    assert not any(torch.equal(a, b) for a, b in zip(_means(nets), before, strict=True))


def test_the_step_calls_after_step_once_after_the_optimisers(monkeypatch):
    nets = build("resnet20", 10, 2, 16, method="pcl").train()
    optimizers = make_optimizers(nets)
    order = []
    for optimizer in optimizers:
        optimizer.register_step_post_hook(lambda *args: order.append("optimiser"))
    monkeypatch.setattr(nets, "after_step", lambda: order.append("after_step"))
    TrainStep(nets, optimizers, torch.tensor([1.0, 1.0]))(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (4,)))
    assert order == ["optimiser"] * len(optimizers) + ["after_step"]


def test_the_code_ramp_and_the_clean_one():
    # The code's: exp(−5(1 − e)²) until L (e^-5, 1, e^-5, ~0 …), 1 after it.
    assert pcl_rampup(0, 80, True) == pytest.approx(math.exp(-5))
    assert pcl_rampup(1, 80, True) == 1.0
    assert pcl_rampup(2, 80, True) == pytest.approx(math.exp(-5))
    assert pcl_rampup(40, 80, True) < 1e-300 and pcl_rampup(81, 80, True) == 1.0
    for epoch in (0, 1, 40, 80, 81, 200):
        assert pcl_rampup(epoch, 80, False) == sigmoid_rampup(epoch, 80)
    nets = build("resnet20", 10, 2, 16, method="pcl", pcl_mean_consistency=0.5)
    assert nets.epoch_lambdas(2) == {"pcl_ensemble_consistency": 1.0, "pcl_mean_consistency": 0.5}


@pytest.mark.parametrize("model", ["resnet20", "wrn16_2"])
@pytest.mark.parametrize("same", [True, False])
def test_the_classifiers_start_alike_only_with_the_quirk_and_the_convolutions_never(model, same):
    nets = build(model, 10, 3, 16, method="pcl", quirk_pcl_shared_classifier_init=same)
    states = [b.state_dict() for b in nets.students]
    head = "fc" if model.startswith("resnet") else "linear"
    for key in (f"{head}.weight", f"{head}.bias"):
        assert all(torch.equal(states[0][key], s[key]) for s in states[1:]) == same
    conv = next(k for k in states[0] if "conv1.weight" in k)
    assert not any(torch.equal(states[0][conv], s[conv]) for s in states[1:])


@pytest.mark.parametrize("drawn", [True, False])
def test_the_temporal_mean_starts_drawn_or_copied(drawn):
    nets = build("resnet20", 10, 2, 16, method="pcl", quirk_pcl_mean_init=drawn)
    copied = all(torch.equal(a, b) for a, b in zip(_means(nets), _online(nets), strict=True))
    assert copied != drawn


def test_it_evaluates_peers_means_and_ensemble_and_deploys_the_first_mean():
    nets = build("resnet20", 10, 3, 16, method="pcl").eval()
    logits = nets.eval_logits(torch.randn(4, 3, 16, 16))
    assert list(logits) == [*nets.peers, "mean0", "mean1", "mean2", "peer_ensemble"]
    assert list(nets.labels) == ["mean0", "mean1", "mean2", "peer_ensemble"]
    assert nets.deployed == "mean0" and nets.table_label("mean0") == "mean-peer-1"
    keys = [k for k in nets.state_dict() if k.startswith(nets.deployed_prefix)]
    assert any(k.startswith("mean_trunk.") for k in keys) and any(k.startswith("mean_students.0.") for k in keys)


def test_one_view_per_peer_and_a_clear_error_otherwise():
    nets = build("resnet20", 10, 3, 16, method="pcl").train()
    assert type(nets).view_count({"num_students": 3}) == 3
    with pytest.raises(UserError, match="3 views"):
        nets(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)), torch.tensor([1.0, 1.0]))


def test_a_backbone_without_branches_is_a_user_error():
    with pytest.raises(UserError, match="no trunk and branches"):
        build("densenet40", 10, 2, 32, method="pcl")
