"""The captured step's warm-up undo (``CapturedStep.snapshot`` / ``undo``), on the CPU: the undo logic is
device-independent, only the capture between them needs CUDA. Under DDP the same check runs on two processes
(``tests/integration/test_distributed.py``)."""

import pytest
import torch

from ffsd_fast.step.cuda_graph import DDP_WARMUP_STEPS, CapturedStep
from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates
from ffsd_fast.step.train_step import TrainStep
from tests.helpers.methods import build


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def make_stepper(scaled: bool) -> TrainStep:
    torch.manual_seed(0)
    nets = build("resnet20", num_classes=10, num_students=2, image_size=16).train()
    optimizers = make_optimizers(nets)
    set_learning_rates(optimizers, 0.05, 1e-3)
    # growth_interval=1: the scale doubles at every step, so a warm-up that is not undone leaves it changed.
    scaler = torch.amp.GradScaler("cpu", growth_interval=1) if scaled else None
    return TrainStep(nets, optimizers, torch.tensor([1e-5, 1000.0, 10.0]), scaler=scaler)


@pytest.mark.slow
@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad-scaler"])
def test_warmup_undone_leaves_training_exactly_as_without_it(scaled):
    plain, warmed = make_stepper(scaled), make_stepper(scaled)
    captured = CapturedStep(warmed, DDP_WARMUP_STEPS)
    saved = captured.snapshot()
    for step in range(DDP_WARMUP_STEPS):
        warmed(*batch(500 + step))
    assert not torch.equal(warmed.method.students[0].fc.weight, plain.method.students[0].fc.weight)
    captured.undo(saved)
    for step in range(3):
        plain(*batch(step))
        warmed(*batch(step))
    for (name, a), b in zip(plain.method.state_dict().items(), warmed.method.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for oa, ob in zip(plain.optimizers, warmed.optimizers, strict=True):
        for pa, pb in zip(oa.state.values(), ob.state.values(), strict=True):
            for key, value in pa.items():
                assert torch.equal(value, pb[key]), key
    if scaled:
        assert warmed.scaler.state_dict() == plain.scaler.state_dict()
        assert plain.scaler.get_scale() == 65536.0 * 2**3  # it did grow, three times
