"""``jsd_loss`` against a float64 transcription of TRL's ``generalized_jsd_loss`` (its ``F.kl_div`` calls and the
``logsumexp`` of the stacked, weighted log-probabilities), values and gradients, through the Triton kernels (the
reference patched to raise) wherever they run. Tolerances as in ``test_kl_div.py``."""

import pytest
import torch
import torch.nn.functional as F

import ffsd_kernels.jsd as jsd_module
from ffsd_kernels import JSDLoss, jsd_loss, jsd_loss_reference, kl_div_loss
from ffsd_kernels._dispatch import use_triton
from tests.helpers import (
    DEVICES,
    HALF_DTYPES,
    TRITON_DEVICES,
    check,
    grad_error,
    leaf64,
    value_error,
)

HALF_TOL = 1e-2
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
SHAPES = [(1, 1), (5, 3), (2, 3, 37), (3, 3001)]


@pytest.fixture
def kernels_only(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    monkeypatch.setattr(jsd_module, "jsd_loss_reference", forbidden)


def logits(shape, dtype=torch.float32, device="cpu", requires_grad=True):
    return (3 * torch.randn(shape, dtype=torch.float64)).to(device, dtype).requires_grad_(requires_grad)


def jsd_rows64(s, t, beta, temperature):
    """Per row, TRL's definition: β = 0 ``KL(P ‖ Q)``, β = 1 ``KL(Q ‖ P)``, else β KL(P ‖ M) + (1 − β) KL(Q ‖ M)."""
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    if beta == 0:
        rows = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1:
        rows = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - b), log_p + torch.log(b)]), dim=0)
        rows = b * F.kl_div(log_m, log_p, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            log_m, log_q, reduction="none", log_target=True
        )
    return rows.sum(-1)


def reduce64(rows, labels, reduction):
    if labels is not None:
        kept = labels.cpu() != -100
        rows = torch.where(kept, rows, 0.0)
        count = kept.sum()
    else:
        count = rows.numel()
    return {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / count}[reduction]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["t-detached", "t-grad"])
def test_jsd_value_and_gradients(shape, temperature, beta, teacher_grad, device, request):
    s = logits(shape, device=device)
    t = logits(shape, device=device, requires_grad=teacher_grad)
    if use_triton(s, t):
        request.getfixturevalue("kernels_only")
    loss = jsd_loss(s, t, beta, temperature)
    assert loss.shape == () and loss.dtype == torch.float32
    (loss * 1.7).backward()
    s64, t64 = leaf64(s), leaf64(t, teacher_grad)
    ref = jsd_rows64(s64, t64, beta, temperature).mean()
    (ref * 1.7).backward()
    check("jsd", torch.float32, "value", value_error(loss, ref))
    check("jsd", torch.float32, "grad_student", grad_error(s.grad, s64.grad))
    if teacher_grad:
        check("jsd", torch.float32, "grad_teacher", grad_error(t.grad, t64.grad))
    else:
        assert t.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_jsd_labels_and_reductions(reduction, beta, device, request):
    shape = (2, 5, 41)
    s, t = logits(shape, device=device), logits(shape, device=device)
    labels = torch.randint(0, 41, shape[:-1])
    labels.view(-1)[::3] = -100
    labels = labels.to(device)
    if use_triton(s, t):
        request.getfixturevalue("kernels_only")
    out = jsd_loss(s, t, beta, 2.0, labels=labels, reduction=reduction)
    assert out.shape == (shape[:-1] if reduction == "none" else ())
    upstream = torch.rand(out.shape, dtype=torch.float64) + 0.5
    out.backward(upstream.to(device, out.dtype))
    s64, t64 = leaf64(s), leaf64(t)
    ref = reduce64(jsd_rows64(s64, t64, beta, 2.0), labels, reduction)
    ref.backward(upstream)
    check("jsd_rows", torch.float32, "value", value_error(out, ref))
    check("jsd_rows", torch.float32, "grad_student", grad_error(s.grad, s64.grad))
    check("jsd_rows", torch.float32, "grad_teacher", grad_error(t.grad, t64.grad))
    ignored = labels == -100
    assert torch.all(s.grad[ignored] == 0) and torch.all(t.grad[ignored] == 0)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_half_precision(beta, dtype, device):
    s, t = logits((3, 3001), dtype, device), logits((3, 3001), dtype, device)
    loss = jsd_loss(s, t, beta, 1.5)
    assert loss.dtype == torch.float32
    (loss * 0.6).backward()
    assert s.grad.dtype == t.grad.dtype == dtype
    s64, t64 = leaf64(s), leaf64(t)
    ref = jsd_rows64(s64, t64, beta, 1.5).mean()
    (ref * 0.6).backward()
    check("jsd", dtype, "value", value_error(loss, ref), 1e-5)  # the inputs exactly, accumulated in fp32
    check("jsd", dtype, "grad_student", grad_error(s.grad, s64.grad), HALF_TOL)
    check("jsd", dtype, "grad_teacher", grad_error(t.grad, t64.grad), HALF_TOL)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_jsd_strided_inputs(device):
    s_base = torch.randn(9, 2100, device=device, requires_grad=True)
    t_base = torch.randn(2100, 9, device=device, requires_grad=True)
    s, t = s_base[:, 50:2050], t_base.t()[:, 100:2100]
    loss = jsd_loss(s, t, 0.3, 2.0)
    loss.backward()
    s64, t64 = leaf64(s), leaf64(t)
    ref = jsd_rows64(s64, t64, 0.3, 2.0).mean()
    ref.backward()
    check("jsd", torch.float32, "value", value_error(loss, ref))
    check("jsd", torch.float32, "grad_student", grad_error(s_base.grad[:, 50:2050], s64.grad))
    check("jsd", torch.float32, "grad_teacher", grad_error(t_base.grad.t()[:, 100:2100], t64.grad))


def test_beta_zero_is_kl_div_loss_without_t_squared():
    s, t = torch.randn(4, 30), torch.randn(4, 30)
    torch.testing.assert_close(jsd_loss(s, t, 0.0, 3.0) * 9.0, kl_div_loss(s, t, 3.0), rtol=1e-5, atol=1e-6)


def test_module_float64_and_bad_arguments():
    s, t = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(2, 3, 10, dtype=torch.float64)
    assert torch.equal(JSDLoss(0.2, 2.0)(s, t), jsd_loss_reference(s, t, 0.2, 2.0))
    assert jsd_loss(s, t).dtype == torch.float64
    assert "beta=0.2" in repr(JSDLoss(0.2))
    for call in (
        lambda: jsd_loss(s, t, beta=1.5),
        lambda: jsd_loss(s, t[..., :9]),
        lambda: jsd_loss(s, t, temperature=0.0),
        lambda: jsd_loss(s, t, reduction="mean"),
        lambda: jsd_loss(s[0, 0], t[0, 0]),
        lambda: jsd_loss(s, t, labels=torch.zeros(6, dtype=torch.long)),
    ):
        with pytest.raises(ValueError):
            call()
