"""``online_distillation_losses``: every logit loss of an online-distillation step (the students' CE and mutual KL,
the fusion head's CE and KL from the students' ensemble, the leader's CE and KL from the fusion head) against float64
formulas written out here from ``F.cross_entropy`` and ``tests.helpers.kl64``.

The kernel tests run where the Triton kernels run (the CPU under ``TRITON_INTERPRET=1``, which ``tests/conftest.py``
sets where there is no GPU; CUDA), with the plain PyTorch reference patched to raise, so that a silent fallback
fails. Values (each of the ``2M + 4`` terms on its own) and both gradients (each network's on its own) are compared
with autograd on ``.double()`` copies (exact for half inputs too), for M = 2 and 3, odd B and C (one class, 7 classes,
1000 classes in one chunk, 3001 in several), fp32/fp16/bf16, strided ``logits`` (a slice of a bigger stack, the
transposed layout of ``baddbmm`` over ``[G, C, D] @ [G, D, B]``, ``torch.stack`` of separate tensors), and upstream
gradients that differ per term (and an expanded one, stride 0). Tolerances (relative) as ``test_kl_div.py``: fp32
1e-5, fp16/bf16 1e-2. The worst error per dtype and kind is printed at the end.
"""

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

from ffsd_kernels import (
    OnlineDistillationLosses,
    cross_entropy_kl_loss,
    mutual_kl_loss,
    online_distillation_losses,
    online_distillation_losses_reference,
)
from ffsd_kernels._dispatch import use_triton
from tests.helpers import (
    DEVICES,
    HALF_DTYPES,
    TRITON_DEVICES,
    check,
    grad_error,
    kl64,
    leaf64,
    value_error,
)
from tests.helpers.kernel_launches import kernels_launched

lg_module = importlib.import_module("ffsd_kernels.logit_group")

HALF_TOL = 1e-2
OP = "online_distillation"
SHAPES = [(1, 1), (5, 7), (3, 1000), (2, 3001)]  # (B, C): one class; odd; one chunk of 1000; several chunks


@pytest.fixture
def kernels_only(monkeypatch):
    """Make the plain PyTorch reference raise, so that a passing test proves the Triton path ran."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    monkeypatch.setattr(lg_module, "online_distillation_losses_reference", forbidden)


def term_names(num_students: int) -> list[str]:
    return [
        *(f"student{i}.ce" for i in range(num_students)),
        *(f"student{i}.mutual" for i in range(num_students)),
        "fusion.ce",
        "fusion.kl",
        "leader.ce",
        "leader.kl",
    ]


def upstream(num_students: int, device) -> torch.Tensor:
    """A different, non-unit upstream gradient for every term (signs alternate)."""
    k = torch.arange(2 * num_students + 4, dtype=torch.float32)
    return ((0.4 + 0.37 * k) * (-1.0) ** k).to(device)


def online64(z64: torch.Tensor, f64: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[2M + 4]`` in float64: the students' CE and ``1/(M−1) Σ_{j≠i} KL_T(z_i ‖ sg(z_j))``, the fusion head's CE and
    ``KL_T(f ‖ sg(mean_i z_i))``, the leader's CE and ``KL_T(z_L ‖ sg(f))``."""
    labels = labels.cpu()
    m = z64.shape[0] - 1
    students = [z64[i] for i in range(m)]
    ce = [F.cross_entropy(z, labels) for z in students]
    mutual = [
        sum(kl64(students[i], students[j].detach(), temperature) for j in range(m) if j != i) / (m - 1)
        for i in range(m)
    ]
    ensemble = torch.stack(students).detach().mean(0)
    fusion = [F.cross_entropy(f64, labels), kl64(f64, ensemble, temperature)]
    leader = [F.cross_entropy(z64[m], labels), kl64(z64[m], f64.detach(), temperature)]
    return torch.stack([*ce, *mutual, *fusion, *leader])


def make_logits(num_nets: int, batch: int, classes: int, dtype, device, layout: str):
    """``(logits [G, B, C] as passed, leaves that receive the gradient, gradient of logits from the leaves' grads)``."""

    def leaf(*shape):
        return (3 * torch.randn(shape, dtype=torch.float64)).to(device, dtype).requires_grad_()

    if layout == "contiguous":
        z = leaf(num_nets, batch, classes)
        return z, [z], lambda: z.grad
    if layout == "slice":  # networks, rows and classes of a bigger stack: every stride ≠ the dense one
        base = leaf(num_nets + 2, batch + 3, classes + 5)
        z = base[1 : num_nets + 1, 2 : batch + 2, 3 : classes + 3]
        return z, [base], lambda: base.grad[1 : num_nets + 1, 2 : batch + 2, 3 : classes + 3]
    if layout == "transposed":  # baddbmm(bias [G, C, 1], W [G, C, D], x^T [G, D, B]).transpose(1, 2)
        base = leaf(num_nets, classes, batch)
        z = base.transpose(1, 2)
        return z, [base], lambda: base.grad.transpose(1, 2)
    assert layout == "stack"  # separate networks' logits, stacked (a copy, outside the op)
    zs = [leaf(batch, classes) for _ in range(num_nets)]
    return torch.stack(zs), zs, lambda: torch.stack([z.grad for z in zs])


def run_case(
    num_students, shape, dtype, device, temperature=2.0, layout="contiguous", fusion_dtype=None, tol=None, op=OP
):
    """Value of every term and both gradients against ``online64``, with ``upstream`` weights."""
    batch, classes = shape
    z, _, z_grad = make_logits(num_students + 1, batch, classes, dtype, device, layout)
    f = (3 * torch.randn(batch, classes, dtype=torch.float64)).to(device, fusion_dtype or dtype).requires_grad_()
    labels = torch.randint(0, classes, (batch,), device=device)
    labels[0] = classes - 1  # the last class, at the end of the last chunk
    assert use_triton(z, f)
    out = online_distillation_losses(z, f, labels, temperature)
    assert out.shape == (2 * num_students + 4,) and out.dtype == torch.float32 and out.device == z.device
    weights = upstream(num_students, device)
    out.backward(weights)

    z64, f64 = leaf64(z), leaf64(f)
    ref = online64(z64, f64, labels, temperature)
    ref.backward(weights.cpu().double())
    for k, name in enumerate(term_names(num_students)):
        check(op, dtype, f"value {name.split('.')[-1]}", value_error(out[k], ref[k]), tol)
    dz = z_grad()
    assert dz.dtype == dtype and f.grad.dtype == f.dtype and f.grad.shape == f.shape
    for g in range(num_students + 1):
        check(op, dtype, "grad " + ("leader" if g == num_students else "student"), grad_error(dz[g], z64.grad[g]), tol)
    check(op, f.dtype, "grad fusion", grad_error(f.grad, f64.grad), tol)
    return out, z, f, labels


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 4.5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("num_students", [2, 3])
def test_fp32(num_students, shape, temperature, device):
    run_case(num_students, shape, torch.float32, device, temperature)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (3, 1000)], ids=str)
@pytest.mark.parametrize("num_students", [2, 3])
def test_half_precision(num_students, shape, dtype, device):
    run_case(num_students, shape, dtype, device, 4.0, tol=HALF_TOL)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=str)
def test_mixed_dtypes(dtypes, device):
    """The stacked networks in one dtype, the fusion head in another: each gradient in its input's dtype."""
    run_case(3, (5, 37), dtypes[0], device, 2.0, fusion_dtype=dtypes[1], tol=HALF_TOL, op=f"{OP}[mixed]")


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", [(5, 7), (3, 1000), (2, 3001)], ids=str)
@pytest.mark.parametrize("layout", ["slice", "transposed", "stack"])
@pytest.mark.parametrize("num_students", [2, 3])
def test_strided_logits(num_students, layout, shape, device):
    run_case(num_students, shape, torch.float32, device, 3.0, layout=layout, op=f"{OP}[{layout}]")


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_strided_fusion_labels_and_expanded_upstream(device):
    """A transposed fusion head, labels with a stride, and ``out.sum().backward()`` (an upstream gradient of
    stride 0); the gradient lands only at the viewed positions of the bases."""
    num_students, batch, classes, temperature = 3, 5, 19, 2.0
    z_base = torch.randn(num_students + 2, batch, classes + 4, device=device, requires_grad=True)
    z = z_base[1:, :, 2 : classes + 2]
    f_base = torch.randn(classes, batch, device=device, requires_grad=True)
    f = f_base.t()
    labels = torch.randint(0, classes, (2 * batch,), device=device)[::2]
    assert not (z.is_contiguous() or f.is_contiguous() or labels.is_contiguous())
    out = online_distillation_losses(z, f, labels, temperature)
    out.sum().backward()
    z64, f64 = leaf64(z), leaf64(f)
    ref = online64(z64, f64, labels, temperature)
    ref.sum().backward()
    check(OP, torch.float32, "value", value_error(out, ref))
    check(OP, torch.float32, "grad", grad_error(z_base.grad[1:, :, 2 : classes + 2], z64.grad))
    check(OP, torch.float32, "grad fusion", grad_error(f_base.grad.t(), f64.grad))
    assert torch.all(z_base.grad[0] == 0) and torch.all(z_base.grad[..., :2] == 0)
    assert torch.all(z_base.grad[..., classes + 2 :] == 0)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("which", ["logits", "fusion"])
def test_one_input_requires_grad(which, device):
    """Only the input that requires a gradient gets one (the other is never written)."""
    z = torch.randn(3, 4, 11, device=device, requires_grad=which == "logits")
    f = torch.randn(4, 11, device=device, requires_grad=which == "fusion")
    labels = torch.randint(0, 11, (4,), device=device)
    weights = upstream(2, device)
    online_distillation_losses(z, f, labels, 2.0).backward(weights)
    z64, f64 = leaf64(z, which == "logits"), leaf64(f, which == "fusion")
    online64(z64, f64, labels, 2.0).backward(weights.cpu().double())
    if which == "logits":
        assert f.grad is None
        check(OP, torch.float32, "grad student", grad_error(z.grad, z64.grad))
    else:
        assert z.grad is None
        check(OP, torch.float32, "grad fusion", grad_error(f.grad, f64.grad))


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_matches_the_separate_ops(device):
    """What ``ffsd_losses`` computes with four ops (``F.cross_entropy``, ``mutual_kl_loss``, two
    ``cross_entropy_kl_loss``), values and gradients, to fp32 precision."""
    num_students, batch, classes, temperature = 3, 6, 100, 2.0
    z = torch.randn(num_students + 1, batch, classes, device=device, requires_grad=True)
    f = torch.randn(batch, classes, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)
    weights = upstream(num_students, device)
    out = online_distillation_losses(z, f, labels, temperature)
    (out * weights).sum().backward()
    z_grad, f_grad = z.grad, f.grad
    z.grad = f.grad = None
    students = z[:num_students]
    separate = torch.stack(
        [
            *(F.cross_entropy(students[i], labels) for i in range(num_students)),
            *mutual_kl_loss(students, temperature),
            *cross_entropy_kl_loss(f, students.detach(), labels, temperature),
            *cross_entropy_kl_loss(z[num_students], f.detach(), labels, temperature),
        ]
    )
    (separate * weights).sum().backward()
    torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_grad, z.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(f_grad, f.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_identical_students_give_zero_mutual(device):
    """Students that agree: their mutual terms are 0 to fp32 precision (the deviations from the ensemble vanish),
    not the rounding of two O(log C) log-sum-exps."""
    z = torch.randn(4, 5, 1000, device=device)
    z[1] = z[0]
    z[2] = z[0]
    out = online_distillation_losses(z, torch.randn(5, 1000, device=device), torch.zeros(5, dtype=torch.long), 2.0)
    assert out[3:6].abs().max().item() < 1e-6


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_deterministic(device):
    z = torch.randn(4, 37, 50, device=device, requires_grad=True)
    f = torch.randn(37, 50, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (37,), device=device)
    runs = []
    for _ in range(2):
        z.grad = f.grad = None
        out = online_distillation_losses(z, f, labels, 2.0)
        out.backward(upstream(3, device))
        runs.append((out.detach().clone(), z.grad.clone(), f.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_one_backward_launch_two_forward_launches(layout, device, monkeypatch):
    """The per-row launch and the fixed-order finish forward, one launch backward that writes both gradients and
    reads the upstream gradient from device memory; no torch kernel either way (allocations only), for a transposed
    ``logits`` too (read through its strides, never copied)."""
    # The CPU labels' range check is the only torch work on the CPU; CUDA labels are not checked (a host sync).
    monkeypatch.setattr(lg_module, "_check_label_range", lambda *args: None)
    z, leaves, _ = make_logits(4, 5, 7, torch.float32, device, layout)
    f = torch.randn(5, 7, device=device, requires_grad=True)
    labels = torch.randint(0, 7, (5,), device=device)
    with kernels_launched(monkeypatch) as forward:
        out = online_distillation_losses(z, f, labels, 2.0)
    assert forward.triton == ["_online_rows_kernel", "_online_finish_kernel"] and forward.aten == []
    grad = upstream(3, device)
    # autograd.grad, not backward (kernels_launched says why; test_gradients_are_not_copied covers backward).
    with kernels_launched(monkeypatch) as backward:
        dz, df = torch.autograd.grad(out, [leaves[0], f], grad)
    assert backward.triton == ["_online_backward_kernel"] and backward.aten == []
    assert dz.shape == leaves[0].shape and df.shape == f.shape


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gradients_are_not_copied(layout, device, monkeypatch):
    """The leaves' .grad are the very tensors the backward launch wrote (laid out as the inputs: adopted by
    AccumulateGrad, not copied), for a transposed ``logits`` too."""
    written = []
    backward = lg_module._online_backward

    def spy(*args):
        dz, df = backward(*args)
        written.append((dz.data_ptr(), df.data_ptr()))  # addresses only: a reference would force a copy
        return dz, df

    monkeypatch.setattr(lg_module, "_online_backward", spy)
    z, leaves, _ = make_logits(4, 5, 7, torch.float32, device, layout)
    f = torch.randn(5, 7, device=device, requires_grad=True)
    online_distillation_losses(z, f, torch.randint(0, 7, (5,), device=device), 2.0).backward(upstream(3, device))
    assert written == [(leaves[0].grad.data_ptr(), f.grad.data_ptr())]


# ---------------------------------------------------------------------------------------------------------------
# The contract, the reference and the checks, on every device
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_students", [2, 3])
def test_float64_runs_the_reference(num_students, device):
    """float64 runs the reference, which is the float64 formula (values and gradients to 1e-12)."""
    z = torch.randn(num_students + 1, 5, 13, dtype=torch.float64, device=device, requires_grad=True)
    f = torch.randn(5, 13, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.randint(0, 13, (5,), device=device)
    assert not use_triton(z, f)
    out = online_distillation_losses(z, f, labels, 2.5)
    assert out.dtype == torch.float64
    assert torch.equal(out, online_distillation_losses_reference(z, f, labels, 2.5))
    out.backward(upstream(num_students, device).double())
    z64, f64 = leaf64(z), leaf64(f)
    ref = online64(z64, f64, labels, 2.5)
    ref.backward(upstream(num_students, "cpu").double())
    check(OP, torch.float64, "value", value_error(out, ref))
    check(OP, torch.float64, "grad", grad_error(z.grad, z64.grad))
    check(OP, torch.float64, "grad fusion", grad_error(f.grad, f64.grad))


@pytest.mark.parametrize("device", DEVICES)
def test_reference_in_fp32_is_the_formula(device):
    """The reference itself (what ``ffsd_kernels.reference`` exposes), on fp32 and bf16 inputs."""
    for dtype, tol in ((torch.float32, None), (torch.bfloat16, HALF_TOL)):
        z = torch.randn(4, 5, 13, device=device).to(dtype).requires_grad_()
        f = torch.randn(5, 13, device=device).to(dtype).requires_grad_()
        labels = torch.randint(0, 13, (5,), device=device)
        out = online_distillation_losses_reference(z, f, labels, 2.0)
        assert out.dtype == torch.float32
        out.backward(upstream(3, device))
        z64, f64 = leaf64(z), leaf64(f)
        ref = online64(z64, f64, labels, 2.0)
        ref.backward(upstream(3, "cpu").double())
        check(f"{OP}_reference", dtype, "value", value_error(out, ref), tol)
        check(f"{OP}_reference", dtype, "grad", grad_error(z.grad, z64.grad), tol)
        check(f"{OP}_reference", dtype, "grad fusion", grad_error(f.grad, f64.grad), tol)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_autocast_returns_float32(device):
    z = torch.randn(3, 4, 20, device=device).to(torch.bfloat16).requires_grad_()
    f = torch.randn(4, 20, device=device).to(torch.bfloat16).requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = online_distillation_losses(z, f, torch.zeros(4, dtype=torch.long, device=device), 2.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert z.grad.dtype == f.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("label", [-1, 10])
def test_unchecked_out_of_range_label_makes_ce_nan(label, dtype, device, monkeypatch):
    """CUDA labels are not read (a host sync): an out-of-range one makes every CE term NaN, on the Triton path
    (fp32) and the reference (fp64) alike, and leaves the KL terms as they were. On the CPU, whose labels are
    checked, the check is switched off to see the same paths."""
    if device == "cpu":  # this op's check, and that of the cross_entropy_kl_loss_reference the reference calls
        monkeypatch.setattr(lg_module, "_check_label_range", lambda *args: None)
        monkeypatch.setattr(importlib.import_module("ffsd_kernels.kl_div"), "check_label_range", lambda *args: None)
    z, f = torch.randn(3, 4, 10, dtype=dtype, device=device), torch.randn(4, 10, dtype=dtype, device=device)
    good = torch.tensor([0, 9, 5, 3], device=device)
    bad = torch.tensor([0, 9, label, 3], device=device)
    ce = [0, 1, 4, 6]  # the CE terms of M = 2
    for op in (online_distillation_losses, online_distillation_losses_reference):
        out, ref = op(z, f, bad, 2.0), online_distillation_losses_reference(z, f, good, 2.0)
        assert torch.isnan(out[ce]).all()
        kl = [2, 3, 5, 7]
        torch.testing.assert_close(out[kl], ref[kl], rtol=1e-5, atol=1e-7)


# Each call gets logits [3, 4, 10], fusion logits [4, 10], labels [4].
BAD_CALLS = {
    "logits-2d": lambda z, f, y: online_distillation_losses(z[0], f, y, 2.0),
    "one-student": lambda z, f, y: online_distillation_losses(z[:2], f, y, 2.0),
    "fusion-classes": lambda z, f, y: online_distillation_losses(z, torch.randn(4, 11), y, 2.0),
    "fusion-batch": lambda z, f, y: online_distillation_losses(z, torch.randn(5, 10), y, 2.0),
    "labels-batch": lambda z, f, y: online_distillation_losses(z, f, torch.zeros(5, dtype=torch.long), 2.0),
    "labels-2d": lambda z, f, y: online_distillation_losses(z, f, y[:, None], 2.0),
    "labels-float": lambda z, f, y: online_distillation_losses(z, f, y.float(), 2.0),
    "temperature-0": lambda z, f, y: online_distillation_losses(z, f, y, 0.0),
    "reference-one-student": lambda z, f, y: online_distillation_losses_reference(z[:2], f, y, 2.0),
}


@pytest.mark.parametrize("call", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_shapes_raise(call):
    with pytest.raises(ValueError):
        call(torch.randn(3, 4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,)))


def test_integer_logits_raise_type_error():
    with pytest.raises(TypeError):
        online_distillation_losses(torch.zeros(3, 4, 10, dtype=torch.long), torch.randn(4, 10), torch.zeros(4), 2.0)


@pytest.mark.parametrize("label", [-1, -100, 10, 2**40])
@pytest.mark.parametrize("entry", ["function", "module", "reference"])
def test_out_of_range_cpu_labels_are_refused(entry, label):
    """Every label must be in [0, C): there is no ignore_index (−100 is refused as well)."""
    z, f, labels = torch.randn(3, 4, 10), torch.randn(4, 10), torch.tensor([0, 9, label, 3])
    op = "online_distillation_losses_reference" if entry == "reference" else "online_distillation_losses"
    call = {
        "function": online_distillation_losses,
        "module": lambda *args: OnlineDistillationLosses(args[-1])(*args[:-1]),
        "reference": online_distillation_losses_reference,
    }[entry]
    with pytest.raises(ValueError, match=re.escape(f"{op} expects labels in [0, 10), got {label}")):
        call(z, f, labels, 2.0)


@pytest.mark.parametrize("temperature", [1.0, 4.5])
def test_module_equals_function(temperature):
    z, f, labels = torch.randn(4, 6, 20), torch.randn(6, 20), torch.randint(0, 20, (6,))
    module = OnlineDistillationLosses(temperature)
    assert torch.equal(module(z, f, labels), online_distillation_losses(z, f, labels, temperature))
    assert f"temperature={temperature}" in repr(module)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture():
    """No host synchronisation: forward and backward captured in one CUDA graph, replayed to the eager result."""
    z = torch.randn(4, 64, 1000, device="cuda", requires_grad=True)
    f = torch.randn(64, 1000, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device="cuda")
    weights = upstream(3, "cuda")

    def step():
        online_distillation_losses(z, f, labels, 2.0).backward(weights)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    eager_z, eager_f = z.grad.clone(), f.grad.clone()
    z.grad, f.grad = None, None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(z.grad, eager_z)
    torch.testing.assert_close(f.grad, eager_f)
