"""Contracts of the one-backward step that hold on any device."""

import contextlib
import copy

import pytest
import torch

import ffsd_kernels
import ffsd_kernels.reference
from ffsd_fast.step.cuda_graph import CapturedStep
from ffsd_fast.step.optimizers import make_optimizers, set_learning_rates
from ffsd_fast.step.precision import mixed_precision
from ffsd_fast.step.train_step import TrainStep
from ffsd_kernels._dispatch import INTERPRETER
from tests.helpers.kernel_launches import forbid_host_syncs, recorded_launches
from tests.helpers.methods import build, train_step


@pytest.fixture
def setup():
    nets = build("resnet20", num_classes=10, num_students=3, image_size=16, kernels=ffsd_kernels).train()
    return nets, make_optimizers(nets), torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_makes_no_host_synchronisation(setup, monkeypatch, kernels, channels_last, amp):
    _, _, x, y = setup
    nets = build("resnet20", 10, 3, 16, fused_blocks=kernels == "triton", kernels=kernels).train()
    if channels_last:
        nets = nets.to(memory_format=torch.channels_last)
    # The fused optimisers (the default); foreach on a CPU reads Adam's step count on the host (not on a GPU, where it
    # is capturable).
    optimizers = make_optimizers(nets)
    stepper = TrainStep(nets, optimizers, torch.tensor([1e-5, 1000.0, 10.0]), amp, channels_last=channels_last)
    set_learning_rates(optimizers, 0.05, 1e-4)
    # The interpreter reads tensors on the host to run a kernel: here the Triton launches are recorded, not run.
    launches = recorded_launches(monkeypatch, execute=False) if INTERPRETER else contextlib.nullcontext([])
    with launches as recorded:
        forbid_host_syncs(monkeypatch)
        for _ in range(2):
            terms = stepper(x, y)
        monkeypatch.undo()
    if kernels == "triton" and INTERPRETER:
        assert recorded, "the Triton kernels did not run"
    else:
        assert torch.isfinite(terms.total)


def test_bf16_channels_last_stays_close_to_fp32():
    """Three steps under bf16 autocast with channels-last networks and inputs against fp32 NCHW, from the same
    weights on the same batches: every cross-entropy within 6 % (bf16 keeps 8 bits of mantissa; seen: 3.3 %)."""
    nets = build("resnet20", num_classes=10, num_students=2, image_size=16).train()
    twin = copy.deepcopy(nets).to(memory_format=torch.channels_last)
    lambdas = torch.tensor([1e-5, 1000.0, 10.0])
    fp32 = TrainStep(nets, make_optimizers(nets), lambdas)
    bf16 = TrainStep(twin, make_optimizers(twin), lambdas, torch.bfloat16, channels_last=True)
    for stepper in (fp32, bf16):
        set_learning_rates(stepper.optimizers, 0.05, 1e-3)
    worst = 0.0
    for _ in range(3):
        x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
        a, b = fp32(x, y), bf16(x, y)
        for key in ("student0.ce", "student1.ce", "fusion.ce", "leader.ce"):
            worst = max(worst, abs(b.values[key].item() - a.values[key].item()) / a.values[key].item())
    print(f"bf16 + channels-last vs fp32: worst relative CE difference over 3 steps {worst:.2e}")
    assert worst < 6e-2


@pytest.mark.slow  # an FFSD step through Triton's interpreter: ~5 s on a CPU
def test_every_network_is_updated_once(setup):
    nets, optimizers, x, y = setup
    before = {name: p.detach().clone() for name, p in nets.named_parameters()}
    train_step(nets, optimizers, x, y, torch.tensor([1e-5, 1000.0, 10.0]))
    moved = {name.split(".")[0] for name, p in nets.named_parameters() if not torch.equal(p, before[name])}
    assert moved == {"students", "decoders", "leader_decoder", "fusion", "leader"}
    head = [n for n, p in nets.named_parameters() if n.startswith("leader.head.") and torch.equal(p, before[n])]
    assert not head, head


def test_learning_rates_are_written_in_place(setup):
    nets, optimizers, _, _ = setup
    tensors = [g["lr"] for o in optimizers for g in o.param_groups]
    set_learning_rates(optimizers, 0.025, 3e-4)
    assert [g["lr"] for o in optimizers for g in o.param_groups] == tensors  # same objects: graph-capture safe
    assert [float(t) for t in tensors] == pytest.approx([0.025, 0.025, 3e-4])


@pytest.mark.slow  # two FFSD steps through Triton's interpreter: ~10 s on a CPU
def test_terms_weighted_in_one_place(setup):
    nets, optimizers, x, y = setup
    lambdas = torch.tensor([0.5, 7.0, 3.0])
    terms = train_step(nets, optimizers, x, y, lambdas)
    weighted = terms.weighted
    assert torch.allclose(sum(weighted.values()), terms.total)
    assert torch.allclose(weighted["student1.diversity"], 0.5 * terms.values["student1.diversity"])
    assert torch.allclose(weighted["student2.self_distillation"], 0.5 * terms.values["student2.self_distillation"])
    assert torch.allclose(weighted["leader.trans_fusion"], 3.0 * terms.values["leader.trans_fusion"])
    assert torch.allclose(weighted["decoder_leader.feature"], 7.0 * terms.values["decoder_leader.feature"])
    assert torch.equal(weighted["leader.ce"], terms.values["leader.ce"])
    nets.settings["quirk_student_sd_lambda_div"] = False
    clean = train_step(nets, optimizers, x, y, lambdas)
    assert torch.allclose(
        clean.weighted["student1.self_distillation"], 7.0 * clean.values["student1.self_distillation"]
    )


@pytest.mark.slow  # four steps through the interpreter: ~25 s
@pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs TRITON_INTERPRET=1")
def test_ffsd_trains_with_triton_kernels_on_a_tiny_batch():
    """``--kernels triton`` end to end through the interpreter: fused losses and fusion blocks, several steps on one
    batch, every network's loss going down."""
    nets = build("resnet20", 10, 2, 16, fused_blocks=True, kernels=ffsd_kernels).train()
    optimizers = make_optimizers(nets)
    set_learning_rates(optimizers, 0.05, 1e-3)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    lambdas = torch.tensor([1e-5, 1000.0, 10.0])
    history = [train_step(nets, optimizers, x, y, lambdas) for _ in range(4)]
    for key in ("student0.ce", "student1.ce", "fusion.ce", "leader.ce"):
        first, last = history[0].values[key].item(), history[-1].values[key].item()
        assert last < first, (key, first, last)
    assert all(torch.isfinite(terms.total) for terms in history)


@pytest.mark.parametrize("method", ["dml", "independent"])
def test_baseline_step_is_ce_plus_mutual_kl_on_the_students_alone(method):
    nets = build("resnet20", num_classes=10, num_students=3, image_size=16, method=method).train()
    assert [name for name, _ in nets.named_children()] == ["students"]  # no decoders, fusion module or leader
    optimizers = make_optimizers(nets)
    assert len(optimizers) == 1
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():
        logits = [s(x)[0] for s in nets.students]
    expected = 0.0
    for i, z in enumerate(logits):
        expected += torch.nn.functional.cross_entropy(z, y)
        if method == "dml":
            expected += sum(ffsd_kernels.kl_div_loss_reference(z, logits[j], 2.0) for j in range(3) if j != i) / 2
    before = [p.detach().clone() for p in nets.parameters()]
    terms = train_step(nets, optimizers, x, y, torch.zeros(0))
    assert torch.allclose(terms.total, expected, rtol=1e-5)
    assert all(not torch.equal(p, b) for p, b in zip(nets.parameters(), before, strict=True) if p.dim() > 1)


def test_fp16_step_scales_the_loss_without_a_host_synchronisation(setup, monkeypatch):
    """fp16 autocast with the gradient scaler: the fused optimisers unscale and skip on the device."""
    _, _, x, y = setup
    nets = build("resnet20", num_classes=10, num_students=3, image_size=16).train()
    optimizers = make_optimizers(nets)
    amp_dtype, scaler = mixed_precision("fp16", x.device)
    stepper = TrainStep(nets, optimizers, torch.tensor([1e-5, 1000.0, 10.0]), amp_dtype, scaler)
    before = scaler.get_scale()
    forbid_host_syncs(monkeypatch)
    terms = stepper(x, y)
    monkeypatch.undo()
    assert torch.isfinite(terms.total) and scaler.get_scale() <= before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_stacked_step_with_triton_kernels_trains_like_the_eager_step(strict_fp32_cuda):
    """``--stack-networks --kernels triton --cuda-graph``: the grouped distance op copies its table of addresses to
    the device inside the capture (a pinned-memory copy); replays must train as the eager step does."""
    nets = build("resnet20", num_classes=10, num_students=2, image_size=16, fused_blocks=True, kernels=ffsd_kernels)
    nets = nets.cuda().train()
    twin = copy.deepcopy(nets)
    for networks in (nets, twin):
        networks.stack()
    lambdas = torch.tensor([1e-5, 1000.0, 10.0], device="cuda")
    eager = TrainStep(nets, make_optimizers(nets), lambdas)
    captured = CapturedStep(TrainStep(twin, make_optimizers(twin), lambdas))
    for optimizers in (eager.optimizers, captured.step.optimizers):
        set_learning_rates(optimizers, 0.05, 1e-3)
    for batch in (8, 8, 8, 5, 8):
        x, y = torch.randn(batch, 3, 16, 16, device="cuda"), torch.randint(0, 10, (batch,), device="cuda")
        a, b = eager(x, y), captured(x, y)
        torch.testing.assert_close(b.total, a.total, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(nets.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_step_trains_exactly_like_the_eager_step(strict_fp32_cuda):
    """Three full batches and a partial one: replayed graph (with its warm-up undone) against eager steps."""
    nets = build("resnet20", num_classes=10, num_students=2, image_size=16).cuda().train()
    twin = copy.deepcopy(nets)
    lambdas = torch.tensor([1e-5, 1000.0, 10.0], device="cuda")
    eager = TrainStep(nets, make_optimizers(nets), lambdas)
    captured = CapturedStep(TrainStep(twin, make_optimizers(twin), lambdas))
    for optimizers in (eager.optimizers, captured.step.optimizers):
        set_learning_rates(optimizers, 0.05, 1e-3)
    for batch in (8, 8, 8, 5):
        x, y = torch.randn(batch, 3, 16, 16, device="cuda"), torch.randint(0, 10, (batch,), device="cuda")
        a, b = eager(x, y), captured(x, y)
        torch.testing.assert_close(b.total, a.total, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(nets.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_kdcl_fitted_teacher_takes_no_host_synchronisation_in_the_step(monkeypatch):
    nets = build("resnet20", 10, 2, 16, method="kdcl", kdcl_ensemble="linear").train()
    nets.ensemble_weights.copy_(torch.tensor([0.7, 0.3]))
    stepper = TrainStep(nets, make_optimizers(nets), torch.tensor([0.5]))
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 10, (6,))
    forbid_host_syncs(monkeypatch)
    for _ in range(2):
        terms = stepper(x, y)
    monkeypatch.undo()
    assert torch.isfinite(terms.total)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_captured_kdcl_step_trains_with_the_weights_fitted_between_epochs(strict_fp32_cuda):
    """The captured step against the eager one, each fitted between its "epochs" (two steps each) on the same
    held-out images: the replays read the weights that ``between_epochs`` copies in, with no recapture."""
    nets = build("resnet20", 10, 2, 16, method="kdcl", kdcl_ensemble="linear").cuda().train()
    twin = copy.deepcopy(nets)
    lambdas = torch.tensor([0.5], device="cuda")
    eager = TrainStep(nets, make_optimizers(nets), lambdas)
    captured = CapturedStep(TrainStep(twin, make_optimizers(twin), lambdas))
    for optimizers in (eager.optimizers, captured.step.optimizers):
        set_learning_rates(optimizers, 0.05, 1e-3)
    heldout = [(torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda"))]
    for _ in range(3):
        for _ in range(2):
            x, y = torch.randn(16, 3, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
            a, b = eager(x, y), captured(x, y)
            torch.testing.assert_close(b.total, a.total, rtol=1e-4, atol=1e-5)
        nets.between_epochs(heldout, lambda tensor: tensor)
        twin.between_epochs(heldout, lambda tensor: tensor)
        torch.testing.assert_close(twin.ensemble_weights, nets.ensemble_weights, rtol=0, atol=1e-4)
    assert not torch.equal(nets.ensemble_weights.cpu(), torch.tensor([0.5, 0.5]))
    for (name, p), q in zip(nets.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
