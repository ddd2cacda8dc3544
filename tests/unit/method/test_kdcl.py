"""KDCL's ensembles, its students' architectures and its checks, one at a time."""

import pytest
import torch
import torch.nn.functional as F

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.method import registry
from ffsd_fast.method.base import check_stackable
from ffsd_fast.method.kdcl import KDCL, ensemble_teacher, student_models
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


@pytest.mark.parametrize("kind", ["linear", "general"])
def test_the_variants_not_implemented_say_why_in_one_line(kind):
    with pytest.raises(UserError, match=f"--kdcl-ensemble {kind}: not implemented: .*held-out") as error:
        build("resnet20", 10, 2, 16, method="kdcl", kdcl_ensemble=kind)
    assert "\n" not in str(error.value)


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
