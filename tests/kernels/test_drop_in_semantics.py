"""The drop-ins mean what the README says they replace (issue 29): a teacher's ``−inf`` logit (a masked vocabulary
entry) gives torch's value in every distillation loss, ``FusedKDLoss`` is torchdistill's ``KDLoss``, and the
modules' options are checked at construction.

``−inf`` teachers are checked against ``T² · F.kl_div(F.log_softmax(s / T), F.softmax(t / T), 'batchmean')`` in
float64 (where a class of probability 0 contributes 0, by ``xlogy``), on the Triton path (the references patched to
raise) and on the reference (float64); the student's gradient against torch's, the teacher's (where it has one)
against that of a teacher whose masked entries are ``−1e4`` instead, whose probabilities are exactly 0 too.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import ffsd_kernels
from tests.helpers import TRITON_DEVICES

kl_module = importlib.import_module("ffsd_kernels.kl_div")
jsd_module = importlib.import_module("ffsd_kernels.jsd")

# (rows, classes, masked columns): one chunk; several chunks with the whole first chunk (2048 classes) masked, so
# that the online softmax starts on a chunk that is −inf throughout.
MASKED = [(4, 37, slice(5, 20)), (2, 5000, slice(0, 2100))]
TEMPERATURES = [1.0, 3.0]


@pytest.fixture
def kernels_only(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    for name in ("kl_div_loss_reference", "cross_entropy_kl_loss_reference"):
        monkeypatch.setattr(kl_module, name, forbidden)
    monkeypatch.setattr(jsd_module, "jsd_loss_reference", forbidden)


def masked_pair(rows, classes, masked, dtype, device):
    """Student and teacher logits drawn in float64; the teacher's ``masked`` columns −inf in every row but the
    last, whose odd columns are −inf instead (each row keeps finite entries)."""
    s = 3 * torch.randn(rows, classes, dtype=torch.float64)
    t = 3 * torch.randn(rows, classes, dtype=torch.float64)
    t[:-1, masked] = float("-inf")
    t[-1, 1::2] = float("-inf")
    return s.to(device, dtype), t.to(device, dtype)


def torch_kl(s, t, temperature):
    """``T² · F.kl_div(log_softmax, softmax, 'batchmean')``, the README's definition, in float64."""
    log_p_s = F.log_softmax(s.double() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p_s, F.softmax(t.double() / temperature, dim=-1), reduction="batchmean")


def close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64), **tol)


def student_grad(fn, s, *args):
    s = s.detach().clone().requires_grad_()
    out = fn(s, *args)
    out.backward()
    return out, s.grad


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("rows, classes, masked", MASKED)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_masked_teacher_kl_kernels_are_torchs(rows, classes, masked, temperature, device, kernels_only):
    s, t = masked_pair(rows, classes, masked, torch.float32, device)
    expected, expected_grad = student_grad(torch_kl, s.double().cpu(), t.double().cpu(), temperature)
    losses = {
        "kl_div_loss": lambda x: ffsd_kernels.kl_div_loss(x, t, temperature),
        "DistillationKLLoss": lambda x: ffsd_kernels.DistillationKLLoss(temperature)(x, t),
        "cross_entropy_kl_loss": lambda x: ffsd_kernels.cross_entropy_kl_loss(
            x, t, torch.zeros(rows, dtype=torch.long, device=device), temperature
        )[1],
        "mean of two equal teachers": lambda x: ffsd_kernels.kl_div_loss(x, [t, t], temperature),
    }
    for name, fn in losses.items():
        value, grad = student_grad(fn, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), name
        close(value, expected, torch.float32)
        close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("rows, classes, masked", MASKED)
def test_masked_teacher_gradient_is_finite_and_zero_where_masked(rows, classes, masked, device, kernels_only):
    """The teacher's own gradient (teachers that train, as in FFSD's fusion) is that of a teacher whose masked
    entries are −1e4: 0 at the masked classes, where torch's autograd of xlogy gives NaN."""
    s, t = masked_pair(rows, classes, masked, torch.float32, device)
    t_finite = torch.where(torch.isinf(t), torch.full_like(t, -1e4), t)
    grads = []
    for teacher in (t, t_finite):
        teacher = teacher.clone().requires_grad_()
        ffsd_kernels.kl_div_loss(s, teacher, 2.0).backward()
        grads.append(teacher.grad)
    assert torch.isfinite(grads[0]).all()
    assert (grads[0][torch.isinf(t)] == 0).all()
    close(grads[0], grads[1], torch.float32)


@pytest.mark.parametrize("rows, classes, masked", MASKED[:1])
def test_masked_teacher_reference_is_torchs(rows, classes, masked):
    """The float64 path (the references) too, value and both gradients finite."""
    s, t = masked_pair(rows, classes, masked, torch.float64, "cpu")
    expected, expected_grad = student_grad(torch_kl, s, t, 2.0)
    teacher = t.clone().requires_grad_()
    value, grad = student_grad(lambda x: ffsd_kernels.kl_div_loss(x, teacher, 2.0), s)
    close(value, expected, torch.float64)
    close(grad, expected_grad, torch.float64)
    assert torch.isfinite(teacher.grad).all()
    ce, kl = ffsd_kernels.cross_entropy_kl_loss(s, t, torch.zeros(rows, dtype=torch.long), 2.0)
    close(kl, expected, torch.float64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("rows, classes, masked", MASKED)
def test_masked_teacher_jsd_is_that_of_a_vanishing_logit(rows, classes, masked, beta, device, kernels_only):
    """jsd_loss where a −inf teacher logit is relevant (β < 1: KL(P ‖ ·), in which P = 0 contributes 0): the value
    and both gradients of a teacher at −1e4 there (P exactly 0 as well), all finite. At β = 1 (KL(Q ‖ P)) the loss
    is +inf, as it is."""
    s, t = masked_pair(rows, classes, masked, torch.float32, device)
    t_finite = torch.where(torch.isinf(t), torch.full_like(t, -1e4), t)
    results = []
    for teacher in (t, t_finite):
        student, teacher = s.clone().requires_grad_(), teacher.clone().requires_grad_()
        loss = ffsd_kernels.jsd_loss(student, teacher, beta, 2.0)
        loss.backward()
        results.append((loss, student.grad, teacher.grad))
    for got, want in zip(results[0], results[1], strict=True):
        assert torch.isfinite(got).all()
        close(got, want, torch.float32)


def test_masked_teacher_jsd_reference():
    s, t = masked_pair(4, 37, slice(5, 20), torch.float64, "cpu")
    t_finite = torch.where(torch.isinf(t), torch.full_like(t, -1e4), t)
    for beta in (0.0, 0.5):
        close(ffsd_kernels.jsd_loss(s, t, beta, 2.0), ffsd_kernels.jsd_loss(s, t_finite, beta, 2.0), torch.float64)
    assert ffsd_kernels.jsd_loss(s, t, 1.0, 2.0) == float("inf")


# ---------------------------------------------------------------------------------------------------------------
# FusedKDLoss is torchdistill's KDLoss
# ---------------------------------------------------------------------------------------------------------------

PATHS = dict(student_module_path="fc", student_module_io="output", teacher_module_path="fc", teacher_module_io="output")


def kd_pair(kwargs, s, t, targets):
    """``(FusedKDLoss value, its student gradient, KDLoss value, its student gradient)``."""
    pytest.importorskip("torchdistill")
    from torchdistill.losses.mid_level import KDLoss

    from ffsd_kernels.integrations.torchdistill import FusedKDLoss

    out = []
    for cls in (FusedKDLoss, KDLoss):
        student = s.detach().clone().requires_grad_()
        loss = cls(**PATHS, **kwargs)({"fc": {"output": student}}, {"fc": {"output": t}}, targets)
        loss.sum().backward()
        out += [loss, student.grad]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=4.0, alpha=0.5),  # targets with -100 rows: KDLoss keeps them in the KL
        dict(temperature=4.0, alpha=0.5, reduction="mean"),
        dict(temperature=2.0, alpha=0.3, reduction="sum", label_smoothing=0.1),
        dict(temperature=2.0, alpha=0.3, beta=0.9, ignore_index=3, label_smoothing=0.2),
        dict(temperature=2.0, alpha=0.0, reduction="none"),
    ],
    ids=["ignored-rows", "mean", "label-smoothing", "ignore-index-3", "none"],
)
def test_fused_kd_loss_takes_kd_loss_kwargs_and_semantics(kwargs, dtype):
    s = (3 * torch.randn(6, 37, dtype=torch.float64)).to(dtype)
    t = (3 * torch.randn(6, 37, dtype=torch.float64)).to(dtype)
    ignored = kwargs.get("ignore_index", -100)
    targets = torch.tensor([0, ignored, 5, 3, ignored, 36])
    ours, our_grad, theirs, their_grad = kd_pair(kwargs, s, t, targets)
    close(ours, theirs, dtype)
    close(our_grad, their_grad, dtype)


def test_fused_kd_loss_masked_teacher_is_kd_losss():
    s, t = masked_pair(4, 37, slice(5, 20), torch.float32, "cpu")
    ours, our_grad, theirs, their_grad = kd_pair(dict(temperature=4.0, alpha=0.5), s, t, torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(ours) and torch.isfinite(our_grad).all()
    close(ours, theirs, torch.float32)
    close(our_grad, their_grad, torch.float32)


def test_fused_kd_loss_refuses_at_construction():
    pytest.importorskip("torchdistill")
    from ffsd_kernels.integrations.torchdistill import FusedKDLoss

    with pytest.raises(ValueError, match="reduction"):
        FusedKDLoss(**PATHS, temperature=1.0, reduction="max")
    with pytest.raises(ValueError, match="temperature > 0"):
        FusedKDLoss(**PATHS, temperature=0.0)
    with pytest.raises(TypeError):  # as KDLoss: an unknown CE keyword is nn.CrossEntropyLoss's TypeError
        FusedKDLoss(**PATHS, temperature=1.0, no_such_option=1)


# ---------------------------------------------------------------------------------------------------------------
# Options checked at construction
# ---------------------------------------------------------------------------------------------------------------

BAD_MODULES = {
    "DistillationKLLoss(0.0)": (lambda: ffsd_kernels.DistillationKLLoss(0.0), "temperature > 0"),
    "DistillationKLLoss(reduction='mean')": (
        lambda: ffsd_kernels.DistillationKLLoss(2.0, reduction="mean"),
        "reduction",
    ),
    "CrossEntropyKLLoss(-1.0)": (lambda: ffsd_kernels.CrossEntropyKLLoss(-1.0), "temperature > 0"),
    "MutualKLLoss(nan)": (lambda: ffsd_kernels.MutualKLLoss(float("nan")), "temperature > 0"),
    "JSDLoss(beta=2)": (lambda: ffsd_kernels.JSDLoss(beta=2), "beta"),
    "JSDLoss(temperature=0)": (lambda: ffsd_kernels.JSDLoss(temperature=0), "temperature > 0"),
    "JSDLoss(reduction='mean')": (lambda: ffsd_kernels.JSDLoss(reduction="mean"), "reduction"),
    "FusedLinearDistillationLoss(beta=-1)": (lambda: ffsd_kernels.FusedLinearDistillationLoss(beta=-1), "beta"),
    "FusedLinearDistillationLoss(reduction='none')": (
        lambda: ffsd_kernels.FusedLinearDistillationLoss(reduction="none"),
        "reduction",
    ),
    "FusedLinearDistillationLoss(chunk_size=0)": (
        lambda: ffsd_kernels.FusedLinearDistillationLoss(chunk_size=0),
        "chunk_size",
    ),
    "OnlineDistillationLosses(0)": (lambda: ffsd_kernels.OnlineDistillationLosses(0), "temperature > 0"),
}


@pytest.mark.parametrize("case", BAD_MODULES)
def test_module_options_checked_at_construction(case):
    build, match = BAD_MODULES[case]
    with pytest.raises(ValueError, match=match) as error:
        build()
    message = str(error.value)
    assert "\n" not in message and message.split()[0] == case.split("(")[0], message
