"""KDCL's ensembles (and the fits of the linear and general ones), its students' architectures and its checks, one
at a time."""

import threading

import pytest
import torch
import torch.nn.functional as F

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.method import registry
from ffsd_fast.method.base import check_stackable
from ffsd_fast.method.kdcl import KDCL, ensemble_teacher, fit_linear, general_weights, student_models
from tests.helpers.methods import build


def _logits():
    torch.manual_seed(0)
    return torch.randn(3, 5, 7), torch.randint(0, 7, (5,))


def test_minlogit_zeroes_the_target_logit_and_takes_the_least_shifted_logit():
    z, y = _logits()
    teacher = ensemble_teacher(z, y, "minlogit")
    assert torch.equal(teacher[torch.arange(5), y], torch.zeros(5))
    shifted = z - z[:, torch.arange(5), y].unsqueeze(-1)
    assert torch.equal(teacher, shifted.min(0).values)
    # The CE of the teacher is at most every student's: its non-target logits are the least of theirs.
    ce = F.cross_entropy(teacher, y, reduction="none")
    assert all((ce <= F.cross_entropy(z[i], y, reduction="none") + 1e-6).all() for i in range(3))


def test_naive_takes_each_image_from_its_lowest_ce_student():
    z, y = _logits()
    teacher = ensemble_teacher(z, y, "naive")
    ce = torch.stack([F.cross_entropy(z[i], y, reduction="none") for i in range(3)])
    for b in range(5):
        assert torch.equal(teacher[b], z[ce[:, b].argmin(), b])


def test_mean_is_the_public_codes_mean_logits():
    z, y = _logits()
    assert torch.allclose(ensemble_teacher(z, y, "mean"), z.mean(0))


def _students(m=2, n=400, classes=5, seed=1):
    """Logits of ``m`` students that are each right on a different part of the images, so that their best mixture
    lies inside the simplex."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    z = torch.randn(m, n, classes, generator=g, dtype=torch.float64)
    for i in range(m):
        sure = torch.rand(n, generator=g) < 0.5 + 0.1 * i
        z[i, sure, y[sure]] += 3.0
    return z, y


def _ce(z, y, w):
    return F.cross_entropy(torch.tensordot(w, z, 1), y).item()


def test_linear_weights_are_the_least_ce_mixture_on_the_simplex():
    z, y = _students()
    w = fit_linear(z, y)
    assert w.dtype == torch.float64 and abs(w.sum().item() - 1) < 1e-12 and (w > 0).all()
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    losses = torch.tensor([_ce(z, y, torch.stack([a, 1 - a])) for a in grid], dtype=torch.float64)
    best = grid[losses.argmin()]
    assert abs(w[0].item() - best.item()) < 1e-4 and 0.05 < w[0] < 0.95  # an inside optimum, found
    assert _ce(z, y, w) <= losses.min().item() + 1e-12


def test_linear_weights_of_three_students_meet_the_optimality_conditions():
    z, y = _students(m=3)
    w = fit_linear(z, y).requires_grad_()
    F.cross_entropy(torch.tensordot(w, z, 1), y).backward()
    # Inside the simplex, the CE's slope along every direction of the simplex is 0: equal partial derivatives.
    assert (w > 1e-3).all() and (w.grad - w.grad.mean()).abs().max() < 1e-8


def test_linear_weights_put_everything_on_a_student_that_alone_is_best():
    y = torch.arange(40) % 5
    # The first student favours the label by 5, the second the next class: any of the second only lowers the margin.
    z = torch.stack([5 * F.one_hot(y, 5), 5 * F.one_hot((y + 1) % 5, 5)]).double()
    w = fit_linear(z, y)
    assert w[0] > 1 - 1e-6


def test_general_weights_are_the_generalised_ensembles():
    z, y = _students(m=3)
    w = general_weights(z, y)
    errors = z.softmax(-1) - F.one_hot(y, 5).double()
    c = torch.einsum("ink,jnk->ij", errors, errors) / len(y)
    # The weights summing to 1 of least wᵀCw: Cw is the same in every row (the Lagrange condition).
    assert abs(w.sum().item() - 1) < 1e-12
    assert ((c @ w) - (c @ w).mean()).abs().max() < 1e-12
    for other in (torch.tensor([1.0, 0, 0]), torch.full((3,), 1 / 3), torch.tensor([0.2, 0.5, 0.3])):
        assert w @ c @ w <= other.double() @ c @ other.double() + 1e-15


def test_general_weights_split_evenly_between_students_that_err_alike_and_stay_uniform_without_errors():
    z, y = _students()
    z[1] = z[0]
    assert torch.allclose(general_weights(z, y), torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-9)
    perfect = torch.full((2, 4, 3), -1e4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    perfect[:, torch.arange(4), labels] = 1e4
    assert torch.equal(general_weights(perfect, labels), torch.tensor([0.5, 0.5], dtype=torch.float64))


def _as_two_ranks(fit, z, y):
    """``fit`` run by two threads, each on half of the images, with a ``reduce`` that sums over both (as the
    trainer's all-reduce does across processes); both results."""
    halves = [(z[:, : len(y) // 3], y[: len(y) // 3]), (z[:, len(y) // 3 :], y[len(y) // 3 :])]
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def reduce(rank, tensor):
        slots[rank] = tensor.clone()
        barrier.wait()
        summed = slots[0] + slots[1]
        barrier.wait()
        tensor.copy_(summed)
        return tensor

    def work(rank):
        results[rank] = fit(*halves[rank], lambda tensor: reduce(rank, tensor))

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("fit", [fit_linear, general_weights], ids=["linear", "general"])
def test_ranks_each_on_their_share_fit_what_one_process_fits_on_all(fit):
    z, y = _students(m=3)
    whole = fit(z, y)
    first, second = _as_two_ranks(fit, z, y)
    assert torch.equal(first, second)  # every rank the same weights
    assert torch.allclose(first, whole, rtol=0, atol=1e-8)


def test_fitted_ensembles_weigh_the_logits():
    z, y = _logits()
    w = torch.tensor([0.2, 0.5, 0.3])
    for kind in ("linear", "general"):
        assert torch.allclose(ensemble_teacher(z, y, kind, w), 0.2 * z[0] + 0.5 * z[1] + 0.3 * z[2])


@pytest.mark.parametrize("kind", ["linear", "general"])
def test_fitted_ensembles_hold_out_and_keep_their_weights_in_a_buffer(kind):
    config = {"kdcl_ensemble": kind, "kdcl_holdout": 0.2}
    assert KDCL.holdout_fraction(config) == 0.2
    nets = build("resnet20", 10, 3, 16, method="kdcl", kdcl_ensemble=kind)
    assert torch.equal(nets.state_dict()["ensemble_weights"], torch.full((3,), 1 / 3))  # uniform until fitted
    nets.train()
    batches = [(torch.randn(5, 3, 16, 16), torch.randint(0, 10, (5,)))]
    record = nets.between_epochs(batches, lambda tensor: tensor)
    assert nets.training
    assert torch.equal(nets.ensemble_weights, torch.tensor([record[f"kdcl_weight{i}"] for i in range(3)]))
    assert not torch.equal(nets.ensemble_weights, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("kind", ["naive", "minlogit", "mean"])
def test_the_other_ensembles_hold_out_nothing_and_fit_nothing(kind):
    assert KDCL.holdout_fraction({"kdcl_ensemble": kind, "kdcl_holdout": 0.2}) == 0.0
    nets = build("resnet20", 10, 2, 16, method="kdcl", kdcl_ensemble=kind)
    assert "ensemble_weights" not in nets.state_dict()  # checkpoints saved before the fitted ensembles still load
    assert nets.between_epochs([(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.int64))], None) == {}


def test_the_run_holds_out_what_the_ensemble_asks_for():
    from ffsd_fast.trainer.config import Config, data_spec, resolve

    assert data_spec(resolve(Config(device="cpu", method="kdcl", kdcl_ensemble="general"))).holdout == 0.1
    assert data_spec(resolve(Config(device="cpu", method="kdcl", kdcl_holdout=0.3, kdcl_ensemble="linear"))).holdout
    assert data_spec(resolve(Config(device="cpu", method="kdcl", kdcl_holdout=0.3))).holdout == 0.0
    assert data_spec(resolve(Config(device="cpu"))).holdout == 0.0


def test_student_models_default_to_model_and_read_the_list():
    assert student_models("resnet20", {}, 3) == ["resnet20"] * 3
    assert student_models("resnet20", {"kdcl_models": "resnet20, wrn16_2"}, 2) == ["resnet20", "wrn16_2"]
    assert KDCL.stacked_models("resnet20", {"kdcl_models": "resnet20,wrn16_2,resnet20"}) == ["resnet20", "wrn16_2"]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("resnet20,nonet", "unknown model 'nonet'"),
        ("wrn16_2,resnet20", "must start with it, not wrn16_2"),
        ("resnet20,wrn16_2,resnet20", "names 3 models for --num-students 2"),
    ],
)
def test_bad_model_lists_are_one_line_user_errors(given, message):
    with pytest.raises(UserError, match=message) as error:
        build("resnet20", 10, 2, 16, method="kdcl", kdcl_models=given)
    assert "\n" not in str(error.value)


def test_students_are_their_architectures_and_stack_by_architecture():
    nets = build("resnet20", 10, 3, 16, method="kdcl", kdcl_models="resnet20,wrn16_2,resnet20")
    stock = {name: set(models.create(name, 10).state_dict()) for name in ("resnet20", "wrn16_2")}
    for student, name in zip(nets.students, ["resnet20", "wrn16_2", "resnet20"], strict=True):
        assert set(student.state_dict()) == stock[name]
    groups = nets.stack_groups()
    assert list(groups) == ["resnet20", "wrn16_2"]
    assert groups["resnet20"] == [nets.students[0], nets.students[2]] and groups["wrn16_2"] == [nets.students[1]]


def test_check_stackable_checks_every_architecture(monkeypatch):
    blocked = lambda name: "a plain cat" if name == "wrn16_2" else None  # noqa: E731
    monkeypatch.setattr(models, "stack_blocker", blocked)
    check_stackable(KDCL, "resnet20", {"kdcl_models": "resnet20,resnet20"})
    with pytest.raises(UserError, match="wrn16_2 cannot be stacked"):
        check_stackable(KDCL, "resnet20", {"kdcl_models": "resnet20,wrn16_2"})


def test_one_view_per_student_and_a_batch_without_them_is_refused():
    assert registry.get("kdcl").view_count({"num_students": 3}) == 3
    nets = build("resnet20", 10, 2, 16, method="kdcl")
    with pytest.raises(UserError, match="6 labels need 2 views of their images, got 6 rows"):
        nets(torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,)), torch.tensor([0.5]))


def test_step_auto_leaves_out_the_stacked_form_when_any_architecture_cannot_stack(monkeypatch):
    from ffsd_fast.step.distributed import SINGLE_PROCESS
    from ffsd_fast.trainer import step_forms
    from ffsd_fast.trainer.config import Config, resolve

    cfg = resolve(Config(device="cpu", method="kdcl", kdcl_models="resnet20,wrn16_2"))
    forms, left_out = step_forms.candidates(cfg, SINGLE_PROCESS, set())
    assert [f.name for f in forms] == ["per-network", "stacked", "per-network compiled", "stacked compiled"]
    assert left_out == {}
    monkeypatch.setattr(step_forms, "stack_blocker", lambda name: "a plain cat" if name == "wrn16_2" else None)
    forms, left_out = step_forms.candidates(cfg, SINGLE_PROCESS, set())
    assert [f.name for f in forms] == ["per-network", "per-network compiled"]
    assert left_out == {"every stacked form": "wrn16_2: a plain cat"}


def test_the_weights_are_written_in_place_so_a_captured_step_reads_them():
    nets = build("resnet20", 10, 2, 16, method="kdcl", kdcl_ensemble="general").train()
    address = nets.ensemble_weights.data_ptr()
    nets.between_epochs([(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))], lambda tensor: tensor)
    saved = {name: value.clone() for name, value in nets.state_dict().items()}
    nets.ensemble_weights.fill_(0.5)
    nets.load_state_dict(saved)  # a resume restores them in place too
    assert nets.ensemble_weights.data_ptr() == address
    assert torch.equal(nets.ensemble_weights, saved["ensemble_weights"])
