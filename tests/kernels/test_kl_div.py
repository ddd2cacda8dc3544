"""``kl_div_loss``, ``cross_entropy_kl_loss`` and ``mutual_kl_loss`` against float64 formulas written out in
``tests/helpers``; ``kl_div`` / ``KLDivLoss`` against ``torch.nn.functional.kl_div`` in float64 (every reduction,
``log_target``); the rows of ``[..., V]`` logits, ``labels`` with ``ignore_index`` and the reductions.

Two kinds of test. The contract tests call the public functions on every device (the CPU always: its Triton
kernels under the interpreter, its reference without; CUDA where there is one), in float32 and float64, so they hold
for whatever sits behind the names. The kernel tests run only where the Triton kernels run (the CPU under
``TRITON_INTERPRET=1``, which ``tests/conftest.py`` turns on where there is no GPU; CUDA), with the plain PyTorch
references patched to raise, so a silent fallback fails. Values and gradients are compared with float64 formulas
evaluated by autograd on ``.double()`` copies: relative error below 1e-5 for fp32 inputs, 1e-12 for fp64 and 1e-2
for fp16/bf16 ones (whose loss and gradients are rounded to 8 or 11 bits on return). Large ``C`` uses small ``B``:
the interpreter runs every program in Python.

Errors: values ``|a − b| / max(|b|, tiny)``, gradients ``max|ga − gb| / max|gb|``. Where the float64 answer is
(numerically) zero — a KL over one class, whose gradients vanish analytically — the denominator is 1, so the error
is absolute. The worst error seen per op and dtype is printed at the end.
"""

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

from ffsd_kernels import (
    CrossEntropyKLLoss,
    DistillationKLLoss,
    KLDivLoss,
    MutualKLLoss,
    cross_entropy_kl_loss,
    cross_entropy_kl_loss_reference,
    kl_div,
    kl_div_loss,
    kl_div_loss_reference,
    mutual_kl_loss,
    mutual_kl_loss_reference,
)
from ffsd_kernels._dispatch import use_triton
from tests.helpers import (
    DEVICE_NAMES,
    DEVICES,
    EXACT_DTYPES,
    HALF_DTYPES,
    TRITON_DEVICE_NAMES,
    TRITON_DEVICES,
    check,
    grad_error,
    kl64,
    leaf64,
    params,
    union,
    value_error,
)

# The module, not the function ``ffsd_kernels.kl_div`` that shadows its name on the package.
kl_module = importlib.import_module("ffsd_kernels.kl_div")
mutual_module = importlib.import_module("ffsd_kernels.mutual_kl")
torch_kl_module = importlib.import_module("ffsd_kernels.torch_kl_div")

HALF_TOL = 1e-2
KL_SHAPES = [(1, 1), (1, 7), (5, 3), (13, 100), (3, 3001)]
# A vocabulary of 70000 classes: many chunks per row, about a second a case through the interpreter, so slow.
LARGE = (2, 70000)
SHAPES = [*KL_SHAPES, pytest.param(LARGE, marks=pytest.mark.slow)]
TEMPERATURES = [1.0, 4.5]
TEACHER_FORMS = ["single", "list3", "stacked3"]


@pytest.fixture
def kernels_only(monkeypatch):
    """Make the plain PyTorch references raise, so that a passing test proves the Triton path ran."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    for name in ("kl_div_loss_reference", "cross_entropy_kl_loss_reference"):
        monkeypatch.setattr(kl_module, name, forbidden)
    monkeypatch.setattr(mutual_module, "mutual_kl_loss_reference", forbidden)


def logits(shape, dtype=torch.float32, device="cpu", scale=3.0, requires_grad=True) -> torch.Tensor:
    return (scale * torch.randn(shape, dtype=torch.float64)).to(device, dtype).requires_grad_(requires_grad)


def make_teacher(form: str, shape, dtype, device, requires_grad: bool):
    """``(teacher_logits as passed to the op, list of the M leaf tensors that receive gradients)``."""
    if form == "single":
        t = logits(shape, dtype, device, requires_grad=requires_grad)
        return t, [t]
    if form == "list3":
        ts = [logits(shape, dtype, device, requires_grad=requires_grad) for _ in range(3)]
        return ts, ts
    t = logits((3, *shape), dtype, device, requires_grad=requires_grad)
    return t, [t]


def teacher64(leaves: list[torch.Tensor], form: str, requires_grad: bool):
    """float64 leaves mirroring ``leaves`` and the mean teacher logits ``[B, C]`` built from them."""
    leaves64 = [leaf64(t, requires_grad) for t in leaves]
    if form == "single":
        return leaves64, leaves64[0]
    if form == "list3":
        return leaves64, torch.stack(leaves64).mean(0)
    return leaves64, leaves64[0].mean(0)


def check_teacher_grads(op, dtype, leaves, leaves64, tol=None):
    for t, t64 in zip(leaves, leaves64, strict=True):
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape
        check(op, dtype, "grad_teacher", grad_error(t.grad, t64.grad), tol)


def mutual64(zs64: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """``loss_i = 1/(M−1) Σ_{j≠i} KL_T(z_i ‖ sg(z_j))`` in float64, from ``kl64``."""
    m = len(zs64)
    return torch.stack(
        [sum(kl64(zs64[i], zs64[j].detach(), temperature) for j in range(m) if j != i) / (m - 1) for i in range(m)]
    )


# ---------------------------------------------------------------------------------------------------------------
# kl_div_loss: the contract, on every device
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
@pytest.mark.parametrize("shape", KL_SHAPES, ids=str)
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["t-detached", "t-grad"])
def test_kl_value_and_gradients(shape, temperature, dtype, device, teacher_grad):
    s = (3 * torch.randn(shape, dtype=torch.float64)).to(device, dtype).requires_grad_()
    t = (3 * torch.randn(shape, dtype=torch.float64)).to(device, dtype).requires_grad_(teacher_grad)
    loss = kl_div_loss(s, t, temperature)
    assert loss.shape == () and loss.dtype == dtype and loss.device == s.device
    loss.backward()

    s64, t64 = leaf64(s), leaf64(t, teacher_grad)
    ref = kl64(s64, t64, temperature)
    ref.backward()
    check("kl_div_loss", dtype, "value", value_error(loss, ref))
    check("kl_div_loss", dtype, "grad_student", grad_error(s.grad, s64.grad))
    if teacher_grad:
        check("kl_div_loss", dtype, "grad_teacher", grad_error(t.grad, t64.grad))
    else:
        assert t.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_kl_upstream_gradient_not_one(dtype, device):
    s = torch.randn(7, 33, dtype=torch.float64).to(device, dtype).requires_grad_()
    t = torch.randn(7, 33, dtype=torch.float64).to(device, dtype).requires_grad_()
    (kl_div_loss(s, t, 2.5) * 3.7).backward()
    s64, t64 = leaf64(s), leaf64(t)
    (kl64(s64, t64, 2.5) * 3.7).backward()
    check("kl_div_loss", dtype, "grad_student", grad_error(s.grad, s64.grad))
    check("kl_div_loss", dtype, "grad_teacher", grad_error(t.grad, t64.grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["column_slice", "transposed"])
def test_kl_non_contiguous_inputs(view, device):
    if view == "column_slice":
        s_base = torch.randn(9, 80, device=device, requires_grad=True)
        t_base = torch.randn(9, 80, device=device)
        s, t = s_base[:, ::2], t_base[:, 1::2]
    else:
        s_base = torch.randn(40, 9, device=device, requires_grad=True)
        t_base = torch.randn(40, 9, device=device)
        s, t = s_base.t(), t_base.t()
    assert not s.is_contiguous() and not t.is_contiguous()
    loss = kl_div_loss(s, t, 3.0)
    loss.backward()
    s64 = leaf64(s)
    ref = kl64(s64, leaf64(t, False), 3.0)
    ref.backward()
    check("kl_div_loss", torch.float32, "value", value_error(loss, ref))
    # The gradient lands in the base tensor, at the viewed positions only.
    grad = s_base.grad.t() if view == "transposed" else s_base.grad[:, ::2]
    check("kl_div_loss", torch.float32, "grad_student", grad_error(grad, s64.grad))
    if view == "column_slice":
        assert torch.all(s_base.grad[:, 1::2] == 0)


# Two grids, one test: the contract's (T = 2, detached teacher, upstream 1; every device) and the kernels' (T = 4.5,
# the teacher also differentiated, upstream 0.6, up to C = 70000; where the kernels run). Wherever the Triton path
# runs, the references are made to raise.
KL_HALF_CASES = union(
    [
        (shape, dtype, 2.0, False, 1.0, device)
        for shape in [(5, 3), (13, 100), (3, 3001)]
        for dtype in HALF_DTYPES
        for device in DEVICE_NAMES
    ],
    [
        (shape, dtype, 4.5, True, 0.6, device)
        for shape in [*KL_SHAPES[2:], LARGE]
        for dtype in HALF_DTYPES
        for device in TRITON_DEVICE_NAMES
    ],
)


@pytest.mark.parametrize(
    "shape, dtype, temperature, teacher_grad, upstream, device",
    params(KL_HALF_CASES, slow=lambda case: case[0] == LARGE),
)
def test_kl_half_precision(shape, dtype, temperature, teacher_grad, upstream, device, request):
    s = logits(shape, dtype, device, scale=2.0)
    t = logits(shape, dtype, device, scale=2.0, requires_grad=teacher_grad)
    if use_triton(s, t):
        request.getfixturevalue("kernels_only")
    loss = kl_div_loss(s, t, temperature)
    assert loss.dtype == torch.float32 and loss.shape == ()  # fp32 for half inputs, autocast or not
    (loss * upstream).backward()
    assert s.grad.dtype == dtype
    s64, t64 = leaf64(s), leaf64(t, teacher_grad)  # the half inputs, exactly, in float64
    ref = kl64(s64, t64, temperature)
    (ref * upstream).backward()
    check("kl_div_loss", dtype, "value", value_error(loss, ref), HALF_TOL)
    check("kl_div_loss", dtype, "grad_student", grad_error(s.grad, s64.grad), HALF_TOL)
    if teacher_grad:
        assert t.grad.dtype == dtype
        check("kl_div_loss", dtype, "grad_teacher", grad_error(t.grad, t64.grad), HALF_TOL)
    else:
        assert t.grad is None


def test_kl_detached_teacher_gets_no_gradient():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    kl_div_loss(s, t.detach(), 4.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_kl_module_equals_function(temperature):
    s, t = torch.randn(6, 20), torch.randn(6, 20)
    module = DistillationKLLoss(temperature=temperature)
    assert torch.equal(module(s, t), kl_div_loss(s, t, temperature))
    assert f"temperature={temperature}" in repr(module)
    assert torch.equal(DistillationKLLoss()(s, t), kl_div_loss(s, t))


# float64 (the reference, to 1e-14) on every device, float32 where the Triton kernels run (to fp32 precision).
@pytest.mark.parametrize(
    "dtype, device",
    params([(torch.float64, d) for d in DEVICE_NAMES] + [(torch.float32, d) for d in TRITON_DEVICE_NAMES]),
)
def test_kl_identical_logits_give_zero(dtype, device, request):
    s = logits((3, 50), dtype, device)
    if dtype == torch.float32:
        request.getfixturevalue("kernels_only")
    loss = kl_div_loss(s, s.detach().clone(), 2.0)
    loss.backward()
    value_tol, grad_tol = (1e-14, 1e-14) if dtype == torch.float64 else (1e-6, 1e-7)
    assert abs(loss.item()) < value_tol
    assert s.grad.abs().max().item() < grad_tol


# ---------------------------------------------------------------------------------------------------------------
# kl_div_loss: the Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["t-detached", "t-grad"])
def test_kl_fp32(shape, temperature, device, teacher_grad):
    s = logits(shape, device=device)
    t = logits(shape, device=device, requires_grad=teacher_grad)
    assert use_triton(s, t)
    loss = kl_div_loss(s, t, temperature)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device == s.device
    (loss * 3.7).backward()  # grad_output ≠ 1

    s64, t64 = leaf64(s), leaf64(t, teacher_grad)
    ref = kl64(s64, t64, temperature)
    (ref * 3.7).backward()
    check("kl_div_loss", torch.float32, "value", value_error(loss, ref))
    check("kl_div_loss", torch.float32, "grad_student", grad_error(s.grad, s64.grad))
    if teacher_grad:
        check("kl_div_loss", torch.float32, "grad_teacher", grad_error(t.grad, t64.grad))
    else:
        assert t.grad is None


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("form", ["list3", "stacked3"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 37), (3, 3001)], ids=str)
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["t-detached", "t-grad"])
def test_kl_mean_teacher(shape, form, device, teacher_grad):
    s = logits(shape, device=device)
    teacher, leaves = make_teacher(form, shape, torch.float32, device, teacher_grad)
    loss = kl_div_loss(s, teacher, 2.0)
    (loss * -1.9).backward()

    s64 = leaf64(s)
    leaves64, t64 = teacher64(leaves, form, teacher_grad)
    ref = kl64(s64, t64, 2.0)
    (ref * -1.9).backward()
    check("kl_div_loss[mean]", torch.float32, "value", value_error(loss, ref))
    check("kl_div_loss[mean]", torch.float32, "grad_student", grad_error(s.grad, s64.grad))
    if teacher_grad:
        check_teacher_grads("kl_div_loss[mean]", torch.float32, leaves, leaves64)
    else:
        assert all(t.grad is None for t in leaves)


# ---------------------------------------------------------------------------------------------------------------
# cross_entropy_kl_loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("form", TEACHER_FORMS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (13, 100), (3, 3001)], ids=str)
def test_cross_entropy_kl(shape, temperature, form, device):
    batch, num_classes = shape
    s = logits(shape, device=device)
    teacher, leaves = make_teacher(form, shape, torch.float32, device, True)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    labels[0] = num_classes - 1  # the last class, at the end of the last chunk
    ce, kl = cross_entropy_kl_loss(s, teacher, labels, temperature)
    assert ce.shape == kl.shape == () and ce.dtype == kl.dtype == torch.float32
    (0.3 * ce + 2.1 * kl).backward()  # two different upstream gradients into one student gradient

    s64 = leaf64(s)
    leaves64, t64 = teacher64(leaves, form, True)
    ce64, kl64_ = F.cross_entropy(s64, labels.cpu()), kl64(s64, t64, temperature)
    (0.3 * ce64 + 2.1 * kl64_).backward()
    check("cross_entropy_kl", torch.float32, "value_ce", value_error(ce, ce64))
    check("cross_entropy_kl", torch.float32, "value_kl", value_error(kl, kl64_))
    check("cross_entropy_kl", torch.float32, "grad_student", grad_error(s.grad, s64.grad))
    check_teacher_grads("cross_entropy_kl", torch.float32, leaves, leaves64)


@pytest.mark.slow  # C = 70000
@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_kl_large_vocabulary(dtype, device):
    shape = (2, 70000)
    s = logits(shape, dtype, device, scale=2.0)
    teacher, leaves = make_teacher("list3", shape, dtype, device, True)
    labels = torch.tensor([69999, 5], device=device)
    ce, kl = cross_entropy_kl_loss(s, teacher, labels, 4.5)
    (-0.8 * ce + 1.7 * kl).backward()
    s64 = leaf64(s)
    leaves64, t64 = teacher64(leaves, "list3", True)
    ce64, kl64_ = F.cross_entropy(s64, labels.cpu()), kl64(s64, t64, 4.5)
    (-0.8 * ce64 + 1.7 * kl64_).backward()
    tol = None if dtype == torch.float32 else HALF_TOL
    check("cross_entropy_kl", dtype, "value_ce", value_error(ce, ce64), tol)
    check("cross_entropy_kl", dtype, "value_kl", value_error(kl, kl64_), tol)
    check("cross_entropy_kl", dtype, "grad_student", grad_error(s.grad, s64.grad), tol)
    check_teacher_grads("cross_entropy_kl", dtype, leaves, leaves64, tol)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("used", ["ce", "kl"])
def test_cross_entropy_kl_one_output_used(used, device):
    s, t = logits((6, 45), device=device), logits((6, 45), device=device)
    labels = torch.randint(0, 45, (6,), device=device)
    ce, kl = cross_entropy_kl_loss(s, t, labels, 3.0)
    (ce if used == "ce" else kl).backward()
    s64, t64 = leaf64(s), leaf64(t)
    (F.cross_entropy(s64, labels.cpu()) if used == "ce" else kl64(s64, t64, 3.0)).backward()
    check("cross_entropy_kl", torch.float32, "grad_student", grad_error(s.grad, s64.grad))
    if used == "kl":
        check("cross_entropy_kl", torch.float32, "grad_teacher", grad_error(t.grad, t64.grad))
    else:
        assert t.grad is not None and torch.all(t.grad == 0)  # the KL's upstream gradient is zero


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cross_entropy_kl_half_precision(dtype, device):
    s, t = logits((4, 3001), dtype, device, 2.0), logits((4, 3001), dtype, device, 2.0, requires_grad=False)
    labels = torch.randint(0, 3001, (4,), device=device)
    ce, kl = cross_entropy_kl_loss(s, t, labels, 4.5)
    assert ce.dtype == kl.dtype == torch.float32
    (ce + 1.5 * kl).backward()
    assert s.grad.dtype == dtype
    s64 = leaf64(s)
    ce64, kl64_ = F.cross_entropy(s64, labels.cpu()), kl64(s64, leaf64(t, False), 4.5)
    (ce64 + 1.5 * kl64_).backward()
    check("cross_entropy_kl", dtype, "value_ce", value_error(ce, ce64), HALF_TOL)
    check("cross_entropy_kl", dtype, "value_kl", value_error(kl, kl64_), HALF_TOL)
    check("cross_entropy_kl", dtype, "grad_student", grad_error(s.grad, s64.grad), HALF_TOL)


# ---------------------------------------------------------------------------------------------------------------
# mutual_kl_loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("num_models", [2, 3, 4])
@pytest.mark.parametrize("form", ["list", "stacked"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (13, 100), (3, 3001)], ids=str)
def test_mutual_kl(shape, temperature, form, num_models, device):
    if form == "list":
        zs = [logits(shape, device=device) for _ in range(num_models)]
        arg = zs
    else:
        arg = logits((num_models, *shape), device=device)
        zs = [arg]
    losses = mutual_kl_loss(arg, temperature)
    assert losses.shape == (num_models,) and losses.dtype == torch.float32
    weights = torch.tensor([1.3, -0.7, 2.1, 0.4][:num_models], device=device)
    (losses * weights).sum().backward()  # a different upstream gradient for every loss

    zs64 = [leaf64(z) for z in zs]
    per_model64 = zs64 if form == "list" else list(zs64[0].unbind(0))
    ref = mutual64(per_model64, temperature)
    (ref * weights.cpu().double()).sum().backward()
    check("mutual_kl", torch.float32, "value", value_error(losses, ref))
    for z, z64 in zip(zs, zs64, strict=True):
        check("mutual_kl", torch.float32, "grad", grad_error(z.grad, z64.grad))


@pytest.mark.slow  # C = 70000
@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
def test_mutual_kl_large_vocabulary(dtype, device):
    z = logits((2, 1, 70000), dtype, device, scale=2.0)
    losses = mutual_kl_loss(z, 4.5)
    losses.sum().backward()  # upstream gradient: an expanded tensor of ones (stride 0)
    z64 = leaf64(z)
    ref = mutual64(list(z64.unbind(0)), 4.5)
    ref.sum().backward()
    tol = None if dtype == torch.float32 else HALF_TOL
    check("mutual_kl", dtype, "value", value_error(losses, ref), tol)
    check("mutual_kl", dtype, "grad", grad_error(z.grad, z64.grad), tol)


@pytest.mark.parametrize("num_models", [2, 3])
def test_mutual_kl_closed_form_gradient(num_models):
    """``∂loss_i/∂z_i = (T/B)/(M−1) · (M p_i − Σ_j p_j)`` per row, derived in ``kl_div.py``, checked by autograd."""
    temperature, batch = 2.5, 4
    z64 = torch.randn(num_models, batch, 11, dtype=torch.float64, requires_grad=True)
    mutual64(list(z64.unbind(0)), temperature).sum().backward()
    p = F.softmax(z64.detach() / temperature, dim=2)
    closed = (temperature / batch) / (num_models - 1) * (num_models * p - p.sum(0, keepdim=True))
    assert grad_error(closed, z64.grad) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Strides: column slices and transposed views, never copied
# ---------------------------------------------------------------------------------------------------------------


def strided(shape, view: str, device, requires_grad=True, extra_leading=()):
    """A ``[*extra_leading, B, C]`` non-contiguous view and its base (which receives the gradient)."""
    batch, num_classes = shape
    if view == "column_slice":
        base = torch.randn(*extra_leading, batch, num_classes + 5, device=device, requires_grad=requires_grad)
        x = base[..., 1 : num_classes + 1]
    else:
        base = torch.randn(*extra_leading, num_classes, batch, device=device, requires_grad=requires_grad)
        x = base.transpose(-1, -2)
    assert not x.is_contiguous()
    return x, base


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("view", ["column_slice", "transposed"])
def test_non_contiguous_inputs(view, device):
    shape, temperature = (9, 2100), 3.0
    s, s_base = strided(shape, view, device)
    t, t_base = strided(shape, view, device)
    ts, ts_base = strided(shape, view, device, extra_leading=(3,))
    labels = torch.randint(0, shape[1], (shape[0],), device=device)
    z, z_base = strided(shape, view, device, extra_leading=(2,))

    kl = kl_div_loss(s, t, temperature)
    ce, kl_mean = cross_entropy_kl_loss(s, ts, labels, temperature)
    mutual = mutual_kl_loss(z, temperature)
    (kl + 0.5 * ce + 1.5 * kl_mean + mutual.sum()).backward()

    s64, t64, ts64, z64 = leaf64(s), leaf64(t), leaf64(ts), leaf64(z)
    kl_ref = kl64(s64, t64, temperature)
    ce_ref, kl_mean_ref = F.cross_entropy(s64, labels.cpu()), kl64(s64, ts64.mean(0), temperature)
    mutual_ref = mutual64(list(z64.unbind(0)), temperature)
    (kl_ref + 0.5 * ce_ref + 1.5 * kl_mean_ref + mutual_ref.sum()).backward()

    for name, value, ref in [
        ("kl", kl, kl_ref),
        ("ce", ce, ce_ref),
        ("kl_mean", kl_mean, kl_mean_ref),
        ("mutual", mutual, mutual_ref),
    ]:
        check("strided", torch.float32, f"value_{name}", value_error(value, ref))

    def viewed(grad):  # the gradient at the viewed positions of the base
        return grad[..., 1 : shape[1] + 1] if view == "column_slice" else grad.transpose(-1, -2)

    for name, base, x64 in [("s", s_base, s64), ("t", t_base, t64), ("ts", ts_base, ts64), ("z", z_base, z64)]:
        check("strided", torch.float32, f"grad_{name}", grad_error(viewed(base.grad), x64.grad))
        if view == "column_slice":  # nothing lands outside the view
            assert torch.all(base.grad[..., :1] == 0) and torch.all(base.grad[..., shape[1] + 1 :] == 0)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, dtypes, shape checks, modules
# ---------------------------------------------------------------------------------------------------------------


def test_float64_runs_the_reference():
    s, t = torch.randn(4, 30, dtype=torch.float64), torch.randn(3, 4, 30, dtype=torch.float64)
    labels = torch.randint(0, 30, (4,))
    assert not use_triton(s, t)
    assert torch.equal(kl_div_loss(s, t, 2.0), kl_div_loss_reference(s, t, 2.0))
    ce, kl = cross_entropy_kl_loss(s, list(t), labels, 2.0)
    ce_ref, kl_ref = cross_entropy_kl_loss_reference(s, list(t), labels, 2.0)
    assert torch.equal(ce, ce_ref) and torch.equal(kl, kl_ref)
    assert torch.equal(mutual_kl_loss(t, 2.0), mutual_kl_loss_reference(t, 2.0))
    assert kl.dtype == torch.float64


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_autocast_returns_float32(device):
    s = logits((3, 40), torch.bfloat16, device)
    t = logits((3, 40), torch.bfloat16, device, requires_grad=False)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = kl_div_loss(s, t, 2.0)
        ce, kl = cross_entropy_kl_loss(s, t, torch.zeros(3, dtype=torch.long, device=device), 2.0)
        mutual = mutual_kl_loss([s, t], 2.0)
    assert loss.dtype == ce.dtype == kl.dtype == mutual.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == torch.bfloat16


# Each call gets a student ``s`` of shape [4, 10]. The first four rows are the contract's own shape checks.
BAD_CALLS = {
    "kl-teacher-classes": lambda s: kl_div_loss(s, torch.randn(4, 11)),
    "kl-teacher-batch": lambda s: kl_div_loss(s, torch.randn(5, 10)),
    "kl-1d": lambda s: kl_div_loss(s[0], torch.randn(10)),
    "kl-3d-teacher-classes": lambda s: kl_div_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5)),
    "kl-labels-shape": lambda s: kl_div_loss(s, torch.randn(4, 10), labels=torch.zeros(4, 10, dtype=torch.long)),
    "kl-reduction-mean": lambda s: kl_div_loss(s, torch.randn(4, 10), reduction="mean"),
    "kl-teacher-list-classes": lambda s: kl_div_loss(s, [torch.randn(4, 10), torch.randn(4, 11)]),
    "kl-teacher-list-empty": lambda s: kl_div_loss(s, []),
    "kl-teacher-stack-classes": lambda s: kl_div_loss(s, torch.randn(3, 4, 11)),
    "kl-teacher-4d": lambda s: kl_div_loss(s, torch.randn(2, 3, 4, 10)),
    "kl-temperature-0": lambda s: kl_div_loss(s, torch.randn(4, 10), temperature=0.0),
    "ce-labels-batch": lambda s: cross_entropy_kl_loss(s, torch.randn(4, 10), torch.zeros(5, dtype=torch.long)),
    "ce-labels-2d": lambda s: cross_entropy_kl_loss(s, torch.randn(4, 10), torch.zeros(4, 1, dtype=torch.long)),
    "ce-labels-float": lambda s: cross_entropy_kl_loss(s, torch.randn(4, 10), torch.zeros(4)),
    "ce-teacher-batch": lambda s: cross_entropy_kl_loss(s, torch.randn(5, 10), torch.zeros(4, dtype=torch.long)),
    "mutual-one-model": lambda s: mutual_kl_loss([s]),
    "mutual-one-stacked": lambda s: mutual_kl_loss(s.unsqueeze(0)),
    "mutual-2d": lambda s: mutual_kl_loss(s),
    "mutual-classes": lambda s: mutual_kl_loss([s, torch.randn(4, 11)]),
    "mutual-temperature-negative": lambda s: mutual_kl_loss([s, s], temperature=-1.0),
}


@pytest.mark.parametrize("call", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_shapes_raise(call):
    with pytest.raises(ValueError):
        call(torch.randn(4, 10))


CE_ENTRIES = {
    "function": cross_entropy_kl_loss,
    "module": lambda s, t, labels: CrossEntropyKLLoss()(s, t, labels),
    "reference": cross_entropy_kl_loss_reference,
}


@pytest.mark.parametrize("label", [-1, -99, 10, 2**40])
@pytest.mark.parametrize("entry", list(CE_ENTRIES))
def test_out_of_range_cpu_labels_are_refused(entry, label):
    """−100 (``ignore_index``) leaves its row out; any other label outside [0, C) is refused on the CPU."""
    s, labels = torch.randn(4, 10), torch.tensor([0, 9, label, 3])
    op = "cross_entropy_kl_loss_reference" if entry == "reference" else "cross_entropy_kl_loss"
    message = f"{op} expects labels in [0, 10) or ignore_index=-100, got {label}"
    with pytest.raises(ValueError, match=re.escape(message)):
        CE_ENTRIES[entry](s, torch.randn(4, 10), labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("label", [-1, 10])
def test_unchecked_out_of_range_label_makes_ce_nan(label, dtype, device, monkeypatch):
    """CUDA labels are not read (that would be a host sync): an out-of-range one makes CE NaN, on the Triton path
    (fp32) and the reference (fp64) alike, and leaves the KL as it was. On the CPU, whose labels are checked, the
    check is switched off to see the same paths."""
    if device == "cpu":
        monkeypatch.setattr(kl_module, "check_label_range", lambda *args: None)
    s, t = logits((4, 10), dtype, device), logits((4, 10), dtype, device, requires_grad=False)
    labels = torch.tensor([0, 9, label, 3], device=device)
    for ce, kl in (cross_entropy_kl_loss(s, t, labels, 2.0), cross_entropy_kl_loss_reference(s, t, labels, 2.0)):
        assert torch.isnan(ce)
        torch.testing.assert_close(kl, kl_div_loss_reference(s, t, 2.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_modules_equal_functions(temperature):
    s, t, u = torch.randn(6, 20), torch.randn(6, 20), torch.randn(6, 20)
    labels = torch.randint(0, 20, (6,))
    assert torch.equal(DistillationKLLoss(temperature)(s, [t, u]), kl_div_loss(s, [t, u], temperature))
    ce, kl = CrossEntropyKLLoss(temperature)(s, t, labels)
    ce_f, kl_f = cross_entropy_kl_loss(s, t, labels, temperature)
    assert torch.equal(ce, ce_f) and torch.equal(kl, kl_f)
    assert torch.equal(MutualKLLoss(temperature)([s, t, u]), mutual_kl_loss([s, t, u], temperature))
    for module in (DistillationKLLoss(temperature), CrossEntropyKLLoss(temperature), MutualKLLoss(temperature)):
        assert f"temperature={temperature}" in repr(module)
    assert torch.equal(CrossEntropyKLLoss()(s, t, labels)[1], kl_div_loss(s, t))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture():
    """No host synchronisation: forward and backward of all three ops are captured in one CUDA graph."""
    s = torch.randn(8, 1000, device="cuda", requires_grad=True)
    t = torch.randn(3, 8, 1000, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (8,), device="cuda")

    def step():
        ce, kl = cross_entropy_kl_loss(s, t, labels, 2.0)
        (ce + kl + kl_div_loss(s, t[0].detach(), 2.0) + mutual_kl_loss(t, 2.0).sum()).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    eager_s, eager_t = s.grad.clone(), t.grad.clone()
    s.grad, t.grad = None, None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(s.grad, eager_s)
    torch.testing.assert_close(t.grad, eager_t)


# ---------------------------------------------------------------------------------------------------------------
# kl_div and KLDivLoss: exactly torch's, on the fused kernels
# ---------------------------------------------------------------------------------------------------------------

TORCH_REDUCTIONS = ["none", "mean", "sum", "batchmean"]
# (input shape, target shape): rows of odd widths, one wide row, [B, T, V], a 1-D pair, a target broadcast.
TORCH_SHAPES = [((5, 7), (5, 7)), ((1, 3001), (1, 3001)), ((2, 3, 11), (2, 3, 11)), ((13,), (13,)), ((4, 9), (9,))]


@pytest.fixture
def torch_kl_kernels_only(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("F.kl_div ran instead of the Triton kernels")

    monkeypatch.setattr(torch_kl_module, "kl_div_reference", forbidden)


def torch_pair(input_shape, target_shape, dtype, device, log_target, zeros=False):
    """Log-probabilities and a (log-)probability target, drawn in float64 and rounded once to ``dtype``."""
    x = F.log_softmax(torch.randn(input_shape, dtype=torch.float64) * 2, -1)
    y = F.softmax(torch.randn(target_shape, dtype=torch.float64) * 2, -1)
    if zeros:
        y = torch.where(torch.rand(target_shape) < 0.3, 0.0, y)
    y = y.log() if log_target else y
    return x.to(device, dtype).requires_grad_(), y.to(device, dtype).requires_grad_()


@pytest.mark.filterwarnings("ignore:reduction. 'mean'")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob-target", "log-target"])
@pytest.mark.parametrize("reduction", TORCH_REDUCTIONS)
@pytest.mark.parametrize("shapes", TORCH_SHAPES, ids=str)
def test_kl_div_is_torch_kl_div(shapes, reduction, log_target, dtype, device, request):
    x, y = torch_pair(*shapes, dtype, device, log_target)
    if use_triton(x, y):
        request.getfixturevalue("torch_kl_kernels_only")
    out = kl_div(x, y, reduction=reduction, log_target=log_target)
    x64, y64 = leaf64(x), leaf64(y)
    ref = F.kl_div(x64, y64, reduction=reduction, log_target=log_target)
    assert out.shape == ref.shape and out.dtype == dtype
    upstream = torch.rand(ref.shape, dtype=torch.float64) + 0.5  # grad_output ≠ 1 (elementwise for none)
    out.backward(upstream.to(device, dtype))
    ref.backward(upstream)
    check("kl_div", dtype, "value", value_error(out, ref))
    check("kl_div", dtype, "grad_input", grad_error(x.grad, x64.grad))
    check("kl_div", dtype, "grad_target", grad_error(y.grad, y64.grad))
    module = KLDivLoss(reduction=reduction, log_target=log_target)
    assert isinstance(module, torch.nn.KLDivLoss)
    torch.testing.assert_close(module(x, y), out, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:reduction. 'mean'")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", TORCH_REDUCTIONS)
def test_kl_div_half_precision(reduction, dtype, device, torch_kl_kernels_only):
    x, y = torch_pair((3, 3001), (3, 3001), dtype, device, False)
    out = kl_div(x, y, reduction=reduction)
    assert out.dtype == dtype  # torch's dtype rule: the input's
    out.backward(torch.ones_like(out))
    x64, y64 = leaf64(x), leaf64(y)
    ref = F.kl_div(x64, y64, reduction=reduction)
    ref.backward(torch.ones_like(ref))
    check("kl_div", dtype, "value", value_error(out, ref), HALF_TOL)
    check("kl_div", dtype, "grad_input", grad_error(x.grad, x64.grad), HALF_TOL)
    check("kl_div", dtype, "grad_target", grad_error(y.grad, y64.grad), HALF_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_div_zero_targets_as_torch(device):
    """``xlogy``: a target of 0 adds 0 to the loss, and its gradient is NaN exactly where torch's is."""
    x, y = torch_pair((6, 40), (6, 40), torch.float32, device, False, zeros=True)
    out = kl_div(x, y, reduction="sum")
    out.backward()
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    ref = F.kl_div(x2, y2, reduction="sum")
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(y.grad, y2.grad, equal_nan=True)
    assert torch.isnan(y.grad).any()


def test_kl_div_module_keeps_torch_call_pattern():
    """Issue 19: ``KLDivLoss()(log_softmax(s / T), softmax(t / T))`` once gave 0.248 where torch gave 0.428."""
    s, t, temperature = torch.randn(8, 100), torch.randn(8, 100), 4.0
    args = F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    for reduction in ("batchmean", "sum"):
        torch.testing.assert_close(
            KLDivLoss(reduction=reduction)(*args), torch.nn.KLDivLoss(reduction=reduction)(*args)
        )
    with pytest.warns(UserWarning, match="'mean' divides the total loss"):
        torch.testing.assert_close(KLDivLoss()(*args), torch.nn.KLDivLoss()(*args))
    assert KLDivLoss(reduction="sum", log_target=True).log_target
    with pytest.raises(ValueError):
        kl_div(*args, reduction="average")


# ---------------------------------------------------------------------------------------------------------------
# Rows: [..., V] logits, labels with ignore_index, reductions, fp32 results
# ---------------------------------------------------------------------------------------------------------------


def kept_rows64(x, labels, ignore_index=-100):
    """The float64 rows of ``x`` ``[..., V]`` whose label is not ``ignore_index``, as ``[K, V]``."""
    return x.reshape(-1, x.shape[-1])[labels.reshape(-1).cpu() != ignore_index]


def kl_rows64(s, t, temperature):
    """Per-row ``T² KL(p_t ‖ p_s)`` of float64 ``[N, V]`` logits."""
    log_p_s, log_p_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    return temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)


def padded_labels(lead, num_classes, device):
    labels = torch.randint(0, num_classes, lead)
    labels.view(-1)[::3] = -100  # every third row is padding
    return labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 1, 3)], ids=str)
def test_kl_rows_labels_and_reductions(lead, reduction, device, request):
    num_classes, temperature = 37, 2.0
    s = logits((*lead, num_classes), device=device)
    t = logits((*lead, num_classes), device=device)
    labels = padded_labels(lead, num_classes, device)
    if use_triton(s, t):
        request.getfixturevalue("kernels_only")
    kl = kl_div_loss(s, t, temperature, labels=labels, reduction=reduction)
    ce, kl_ce = cross_entropy_kl_loss(s, t, labels, temperature, reduction=reduction)
    assert kl.shape == ce.shape == (lead if reduction == "none" else ())
    (1.3 * kl + 0.4 * ce + 0.7 * kl_ce).sum().backward()

    s64, t64 = leaf64(s), leaf64(t)
    kept = labels.cpu() != -100
    rows_kl = torch.zeros(lead, dtype=torch.float64)
    rows_ce = torch.zeros(lead, dtype=torch.float64)
    rows_kl = rows_kl.masked_scatter(kept, kl_rows64(kept_rows64(s64, labels), kept_rows64(t64, labels), temperature))
    ce_kept = F.cross_entropy(kept_rows64(s64, labels), labels.cpu()[kept], reduction="none")
    rows_ce = rows_ce.masked_scatter(kept, ce_kept)
    if reduction == "none":
        ref_kl, ref_ce = rows_kl, rows_ce
    else:
        divisor = kept.sum() if reduction == "batchmean" else 1
        ref_kl, ref_ce = rows_kl.sum() / divisor, rows_ce.sum() / divisor
    (1.3 * ref_kl + 0.4 * ref_ce + 0.7 * ref_kl).sum().backward()
    check("kl_rows", torch.float32, "value_kl", value_error(kl, ref_kl))
    check("kl_rows", torch.float32, "value_kl_ce", value_error(kl_ce, ref_kl))
    check("kl_rows", torch.float32, "value_ce", value_error(ce, ref_ce))
    check("kl_rows", torch.float32, "grad_student", grad_error(s.grad, s64.grad))
    check("kl_rows", torch.float32, "grad_teacher", grad_error(t.grad, t64.grad))
    assert torch.all(s.grad[~kept.to(device)] == 0) and torch.all(t.grad[~kept.to(device)] == 0)
    if reduction == "none":
        assert torch.all(kl[~kept.to(device)] == 0) and torch.all(ce[~kept.to(device)] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_mutual_rows_labels_and_reductions(reduction, device, request):
    lead, num_classes, temperature = (2, 4), 29, 3.0
    z = logits((3, *lead, num_classes), device=device)
    labels = padded_labels(lead, num_classes, device)
    if use_triton(z):
        request.getfixturevalue("kernels_only")
    losses = mutual_kl_loss(z, temperature, labels=labels, reduction=reduction)
    assert losses.shape == ((3, *lead) if reduction == "none" else (3,))
    weights = torch.tensor([1.3, -0.7, 2.1], device=device).view(3, *[1] * (losses.dim() - 1))
    (losses * weights).sum().backward()
    z64 = leaf64(z)
    kept = (labels.cpu() != -100).reshape(-1)
    zs = [z64[i].reshape(-1, num_classes) for i in range(3)]
    rows = torch.stack(
        [sum(kl_rows64(zs[i], zs[j].detach(), temperature) for j in range(3) if j != i) / 2 for i in range(3)]
    )
    rows = torch.where(kept, rows, 0.0)
    ref = {"none": rows.reshape(3, *lead), "sum": rows.sum(1), "batchmean": rows.sum(1) / kept.sum()}[reduction]
    (ref * weights.cpu().double()).sum().backward()
    check("mutual_rows", torch.float32, "value", value_error(losses, ref))
    check("mutual_rows", torch.float32, "grad", grad_error(z.grad, z64.grad))


@pytest.mark.parametrize("device", DEVICES)
def test_every_row_ignored_gives_zero_not_nan(device):
    s, t = logits((2, 3, 11), device=device), logits((2, 3, 11), device=device)
    labels = torch.full((2, 3), -100, device=device)
    kl = kl_div_loss(s, t, 2.0, labels=labels)
    ce, kl_ce = cross_entropy_kl_loss(s, t, labels, 2.0)
    (kl + ce + kl_ce).backward()
    assert kl.item() == ce.item() == kl_ce.item() == 0.0
    assert torch.all(s.grad == 0) and torch.all(t.grad == 0)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_inputs_give_fp32_results_outside_autocast(dtype, device):
    """A bf16 loss once came back as 4.0 where the fp32 value was 4.0038: every distillation form returns fp32."""
    s, t = logits((2, 3, 300), dtype, device), logits((2, 3, 300), dtype, device, requires_grad=False)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    outputs = [
        kl_div_loss(s, t, 2.0),
        *cross_entropy_kl_loss(s, t, labels, 2.0),
        mutual_kl_loss([s, t], 2.0),
        kl_div_loss(s, t, 2.0, reduction="none"),
    ]
    assert all(out.dtype == torch.float32 for out in outputs)
    ref = kl64(leaf64(s).reshape(-1, 300), leaf64(t).reshape(-1, 300), 2.0)
    check("kl_div_loss", dtype, "value", value_error(outputs[0], ref), 1e-5)  # fp32 accuracy of half inputs


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_leading_dims_are_views_not_copies(device):
    """``[B, T, V]`` logits (and a vocabulary slice of them) reach the kernels as ``[N, V]`` views."""
    base = torch.randn(2, 5, 50, device=device, requires_grad=True)
    s = base[..., 3:40]  # strided rows: reshape(-1, V) of it is still a view
    t = torch.randn(2, 5, 37, device=device)
    loss = kl_div_loss(s, t, 2.0)
    loss.backward()
    s64 = leaf64(s)
    ref = kl64(s64.reshape(-1, 37), leaf64(t, False).reshape(-1, 37), 2.0)
    ref.backward()
    check("kl_div_loss", torch.float32, "value", value_error(loss, ref))
    check("kl_div_loss", torch.float32, "grad_student", grad_error(base.grad[..., 3:40], s64.grad))
    assert torch.all(base.grad[..., :3] == 0) and torch.all(base.grad[..., 40:] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_labels(device):
    """``labels[:, ::2]`` flattens to a view of stride 2: the ops read it as the labels it shows."""
    s, t = logits((2, 4, 13), device=device), logits((2, 4, 13), device=device)
    labels = padded_labels((2, 8), 13, device)[:, ::2]
    assert not labels.is_contiguous() and labels.reshape(-1)._base is not None
    dense = labels.contiguous()
    torch.testing.assert_close(kl_div_loss(s, t, 2.0, labels=labels), kl_div_loss(s, t, 2.0, labels=dense))
    torch.testing.assert_close(
        torch.stack(cross_entropy_kl_loss(s, t, labels, 2.0)), torch.stack(cross_entropy_kl_loss(s, t, dense, 2.0))
    )
