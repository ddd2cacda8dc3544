"""``branch_distillation_losses``: every branch's CE and softened KL to its teacher (ONE, CL-ILR, OKDDip) against a
float64 formula written out here from ``F.cross_entropy``, ``F.softmax`` and ``F.log_softmax``.

The kernel tests run where the Triton kernels run (the CPU under ``TRITON_INTERPRET=1``; CUDA), with the plain
PyTorch reference patched to raise, so that a silent fallback fails. Values (each of the ``2M`` terms on its own) and
both gradients (the logits', and the teacher's when it requires grad) are compared with autograd on ``.double()``
copies, for M = 2, 3, 5, B = 1 and 3, C = 1, 7, 100 (one chunk) and 1000 and 3001 (several), a shared ``[B, C]`` and
a per-branch ``[M, B, C]`` teacher, ε = 0 and 1e-7, fp32/fp16/bf16, strided logits and teachers (a slice of a bigger
stack, a transposed layout, ``torch.stack`` of separate tensors), and upstream gradients that differ per term.
Tolerances (relative) as ``test_logit_group.py``: fp32 1e-5, fp16/bf16 1e-2.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from ffsd_kernels import (
    BranchDistillationLosses,
    branch_distillation_losses,
    branch_distillation_losses_reference,
)
from ffsd_kernels._dispatch import use_triton
from tests.helpers import DEVICES, HALF_DTYPES, TRITON_DEVICES, check, grad_error, leaf64, value_error
from tests.helpers.kernel_launches import kernels_launched

bg_module = importlib.import_module("ffsd_kernels.branch_group")

HALF_TOL = 1e-2
OP = "branch_distillation"
EPSILON = 1e-7  # the public codes' constant


@pytest.fixture
def kernels_only(monkeypatch):
    """Make the plain PyTorch reference raise, so that a passing test proves the Triton path ran."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    monkeypatch.setattr(bg_module, "branch_distillation_losses_reference", forbidden)


def upstream(num_branches: int, device) -> torch.Tensor:
    """A different, non-unit upstream gradient for every term (signs alternate)."""
    k = torch.arange(2 * num_branches, dtype=torch.float32)
    return ((0.4 + 0.37 * k) * (-1.0) ** k).to(device)


def branch64(z64: torch.Tensor, t64: torch.Tensor, labels: torch.Tensor, temperature: float, epsilon: float):
    """``[2M]`` in float64: each branch's CE, then ``T² mean_b Σ_c q (log q − log p)``, ``q = softmax(t_i/T) + ε``."""
    labels = labels.cpu()
    ce, kl = [], []
    for i in range(z64.shape[0]):
        teacher = t64 if t64.dim() == 2 else t64[i]
        q = F.softmax(teacher / temperature, dim=1) + epsilon
        log_p = F.log_softmax(z64[i] / temperature, dim=1)
        ce.append(F.cross_entropy(z64[i], labels))
        kl.append(temperature**2 * (q * (q.log() - log_p)).sum(1).mean())
    return torch.stack([*ce, *kl])


def make(shape, dtype, device, layout):
    """``(tensor as passed, gradient of it from the leaves' grads)``: a leaf, or a view of one (``slice``,
    ``transposed``), or ``torch.stack`` of separate leaves (``stack``, for ``[M, B, C]`` only)."""

    def leaf(*s):
        return (3 * torch.randn(s, dtype=torch.float64)).to(device, dtype).requires_grad_()

    if layout == "contiguous":
        x = leaf(*shape)
        return x, lambda: x.grad
    if layout == "slice":  # every stride ≠ the dense one
        base = leaf(*(n + 3 for n in shape))
        index = tuple(slice(1, n + 1) for n in shape)
        return base[index], lambda: base.grad[index]
    if layout == "transposed":  # the last two dimensions swapped, as a baddbmm's [G, C, B] output transposed
        base = leaf(*shape[:-2], shape[-1], shape[-2])
        return base.transpose(-1, -2), lambda: base.grad.transpose(-1, -2)
    assert layout == "stack" and len(shape) == 3
    parts = [leaf(*shape[1:]) for _ in range(shape[0])]
    return torch.stack(parts), lambda: torch.stack([p.grad for p in parts])


def run_case(
    num_branches,
    shape,
    dtype,
    device,
    shared=False,
    epsilon=EPSILON,
    teacher_grad=True,
    temperature=3.0,
    layout="contiguous",
    teacher_layout="contiguous",
    teacher_dtype=None,
    tol=None,
    op=OP,
):
    """Value of every term and both gradients against ``branch64``, with ``upstream`` weights."""
    batch, classes = shape
    z, z_grad = make((num_branches, batch, classes), dtype, device, layout)
    t_shape = (batch, classes) if shared else (num_branches, batch, classes)
    t, t_grad = make(t_shape, teacher_dtype or dtype, device, teacher_layout)
    if not teacher_grad:
        t = t.detach()
    labels = torch.randint(0, classes, (batch,), device=device)
    labels[0] = classes - 1  # the last class, at the end of the last chunk
    assert use_triton(z, t)
    out = branch_distillation_losses(z, t, labels, temperature, epsilon)
    assert out.shape == (2 * num_branches,) and out.dtype == torch.float32 and out.device == z.device
    weights = upstream(num_branches, device)
    out.backward(weights)

    z64, t64 = leaf64(z), leaf64(t, teacher_grad)
    ref = branch64(z64, t64, labels, temperature, epsilon)
    ref.backward(weights.cpu().double())
    for k in range(2 * num_branches):
        check(op, dtype, "value " + ("ce" if k < num_branches else "kl"), value_error(out[k], ref[k]), tol)
    dz = z_grad()
    assert dz.dtype == dtype and dz.shape == z.shape
    for i in range(num_branches):
        check(op, dtype, "grad logits", grad_error(dz[i], z64.grad[i]), tol)
    if teacher_grad:
        dt = t_grad()
        assert dt.dtype == t.dtype and dt.shape == t.shape
        check(op, t.dtype, "grad teacher", grad_error(dt, t64.grad), tol)
    else:
        assert t.grad is None
    return out


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels
# ---------------------------------------------------------------------------------------------------------------

# (M, (B, C), shared teacher, ε, teacher gradient): odd shapes, one and several chunks (C = 3001 at M = 2, C = 1000 at
# M = 5: 1024- and 256-class chunks), both teachers, both ε, the gradient on and off.
FP32_CASES = [
    (2, (1, 1), False, EPSILON, True),
    (2, (3, 7), True, 0.0, True),
    (2, (3, 3001), False, EPSILON, True),
    (2, (1, 3001), True, EPSILON, False),
    (3, (3, 1), True, EPSILON, True),
    (3, (3, 100), True, EPSILON, False),
    (3, (3, 100), False, 0.0, True),
    (3, (1, 7), False, EPSILON, False),
    (5, (3, 7), False, EPSILON, True),
    (5, (3, 1000), True, EPSILON, True),
    (5, (1, 1000), False, 0.0, False),
]


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", FP32_CASES, ids=str)
def test_fp32(case, device):
    num_branches, shape, shared, epsilon, teacher_grad = case
    run_case(num_branches, shape, torch.float32, device, shared, epsilon, teacher_grad)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 4.5])
def test_temperatures(temperature, device):
    run_case(3, (3, 37), torch.float32, device, temperature=temperature)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False])
def test_half_precision(shared, dtype, device):
    run_case(3, (3, 100), dtype, device, shared, tol=HALF_TOL)


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_mixed_dtypes(device):
    """bf16 logits, an fp32 teacher: each gradient in its input's dtype."""
    run_case(3, (3, 37), torch.bfloat16, device, teacher_dtype=torch.float32, tol=HALF_TOL, op=f"{OP}[mixed]")


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3001)], ids=str)
@pytest.mark.parametrize(
    ("layout", "teacher_layout", "shared"),
    [("slice", "transposed", False), ("transposed", "slice", True), ("stack", "stack", False)],
)
def test_strided_inputs(layout, teacher_layout, shared, shape, device):
    run_case(
        2, shape, torch.float32, device, shared, layout=layout, teacher_layout=teacher_layout, op=f"{OP}[{layout}]"
    )


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_expanded_upstream_and_strided_labels(device):
    """``out.sum().backward()`` (an upstream gradient of stride 0) and labels with a stride."""
    z = torch.randn(3, 5, 19, device=device, requires_grad=True)
    t = torch.randn(3, 5, 19, device=device, requires_grad=True)
    labels = torch.randint(0, 19, (10,), device=device)[::2]
    out = branch_distillation_losses(z, t, labels, 2.0, EPSILON)
    out.sum().backward()
    z64, t64 = leaf64(z), leaf64(t)
    ref = branch64(z64, t64, labels, 2.0, EPSILON)
    ref.sum().backward()
    check(OP, torch.float32, "value", value_error(out, ref))
    check(OP, torch.float32, "grad logits", grad_error(z.grad, z64.grad))
    check(OP, torch.float32, "grad teacher", grad_error(t.grad, t64.grad))


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_teacher_alone_requires_grad(device):
    """Only the teacher asks for a gradient: the logits' is never written."""
    z = torch.randn(2, 4, 11, device=device)
    t = torch.randn(4, 11, device=device, requires_grad=True)
    labels = torch.randint(0, 11, (4,), device=device)
    branch_distillation_losses(z, t, labels, 2.0, EPSILON).backward(upstream(2, device))
    t64 = leaf64(t)
    branch64(leaf64(z, False), t64, labels, 2.0, EPSILON).backward(upstream(2, "cpu").double())
    assert z.grad is None
    check(OP, torch.float32, "grad teacher", grad_error(t.grad, t64.grad))


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_identical_teacher_gives_zero_kl(device):
    """A branch that is its own teacher (ε = 0): its KL is 0 to fp32 precision, for 1000 classes too."""
    z = torch.randn(2, 5, 1000, device=device)
    out = branch_distillation_losses(z, z.clone(), torch.zeros(5, dtype=torch.long, device=device), 2.0)
    assert out[2:].abs().max().item() < 1e-5


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_deterministic(device):
    z = torch.randn(3, 37, 50, device=device, requires_grad=True)
    t = torch.randn(3, 37, 50, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (37,), device=device)
    runs = []
    for _ in range(2):
        z.grad = t.grad = None
        out = branch_distillation_losses(z, t, labels, 2.0, EPSILON)
        out.backward(upstream(3, device))
        runs.append((out.detach().clone(), z.grad.clone(), t.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shared", [True, False])
def test_two_forward_launches_one_backward(shared, device, monkeypatch):
    """The per-row launch and the fixed-order reduction forward, one launch backward that writes both gradients and
    reads the upstream gradient from device memory; no torch kernel either way (allocations only), for a transposed
    logits tensor too (read through its strides, never copied)."""
    monkeypatch.setattr(bg_module, "_check_label_range", lambda *args: None)  # CUDA labels are not checked
    z, _ = make((3, 5, 7), torch.float32, device, "transposed")
    t = torch.randn(*((5, 7) if shared else (3, 5, 7)), device=device, requires_grad=True)
    labels = torch.randint(0, 7, (5,), device=device)
    with kernels_launched(monkeypatch) as forward:
        out = branch_distillation_losses(z, t, labels, 2.0, EPSILON)
    assert forward.triton == ["_branch_rows_kernel", "_reduce_rows_kernel"] and forward.aten == []
    grad = upstream(3, device)
    with kernels_launched(monkeypatch) as backward:
        dz, dt = torch.autograd.grad(out, [z, t], grad)
    assert backward.triton == ["_branch_backward_kernel"] and backward.aten == []
    assert dz.shape == z.shape and dt.shape == t.shape


# ---------------------------------------------------------------------------------------------------------------
# The contract, the reference and the checks, on every device
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
def test_float64_runs_the_reference(shared, device):
    """float64 runs the reference, which is the float64 formula (values and both gradients to 1e-12)."""
    z = torch.randn(3, 5, 13, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(*((5, 13) if shared else (3, 5, 13)), dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.randint(0, 13, (5,), device=device)
    assert not use_triton(z, t)
    out = branch_distillation_losses(z, t, labels, 2.5, EPSILON)
    assert out.dtype == torch.float64
    assert torch.equal(out, branch_distillation_losses_reference(z, t, labels, 2.5, EPSILON))
    out.backward(upstream(3, device).double())
    z64, t64 = leaf64(z), leaf64(t)
    branch64(z64, t64, labels, 2.5, EPSILON).backward(upstream(3, "cpu").double())
    check(OP, torch.float64, "value", value_error(out, branch64(z64, t64, labels, 2.5, EPSILON)))
    check(OP, torch.float64, "grad logits", grad_error(z.grad, z64.grad))
    check(OP, torch.float64, "grad teacher", grad_error(t.grad, t64.grad))


@pytest.mark.parametrize("device", DEVICES)
def test_reference_in_low_precision_is_the_formula(device):
    """The reference itself (what ``ffsd_kernels.reference`` exposes), on fp32 and bf16 inputs: float32 out."""
    for dtype, tol in ((torch.float32, None), (torch.bfloat16, HALF_TOL)):
        z = torch.randn(3, 5, 13, device=device).to(dtype).requires_grad_()
        t = torch.randn(5, 13, device=device).to(dtype).requires_grad_()
        labels = torch.randint(0, 13, (5,), device=device)
        out = branch_distillation_losses_reference(z, t, labels, 2.0, EPSILON)
        assert out.dtype == torch.float32
        out.backward(upstream(3, device))
        z64, t64 = leaf64(z), leaf64(t)
        branch64(z64, t64, labels, 2.0, EPSILON).backward(upstream(3, "cpu").double())
        check(f"{OP}_reference", dtype, "value", value_error(out, branch64(z64, t64, labels, 2.0, EPSILON)), tol)
        check(f"{OP}_reference", dtype, "grad logits", grad_error(z.grad, z64.grad), tol)
        check(f"{OP}_reference", dtype, "grad teacher", grad_error(t.grad, t64.grad), tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [branch_distillation_losses, branch_distillation_losses_reference], ids=["op", "ref"])
@pytest.mark.parametrize("shared", [True, False])
def test_teacher_probability_underflowing_to_zero(shared, op, device):
    """ε = 0 and a teacher logit 400 below the others at T = 3: its softened probability underflows to 0 in fp32
    (not in float64), as PCL's ensemble teacher's did in a 4-epoch digits run (logits −202 … 137). Its term is 0
    (``0 · log 0``), not NaN: the op and the reference (PCL's path on the CPU) give the float64 formula's values and
    gradients."""
    z = torch.randn(3, 4, 10, device=device, requires_grad=True)
    t = torch.randn(*((4, 10) if shared else (3, 4, 10)), device=device)
    t[..., 0] = -400.0
    t.requires_grad_()
    assert (F.softmax(t.detach() / 3.0, dim=-1) == 0).any()
    labels = torch.randint(0, 10, (4,), device=device)
    out = op(z, t, labels, 3.0, 0.0)
    out.backward(upstream(3, device))
    z64, t64 = leaf64(z), leaf64(t)
    ref = branch64(z64, t64, labels, 3.0, 0.0)
    ref.backward(upstream(3, "cpu").double())
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all() and torch.isfinite(t.grad).all()
    check(OP, torch.float32, "value", value_error(out, ref))
    check(OP, torch.float32, "grad logits", grad_error(z.grad, z64.grad))
    check(OP, torch.float32, "grad teacher", grad_error(t.grad, t64.grad))


@pytest.mark.usefixtures("kernels_only")
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_module_and_autocast(device):
    """The module gives the function's values; under autocast half inputs still give float32."""
    z = torch.randn(2, 4, 20, device=device).to(torch.bfloat16).requires_grad_()
    t = torch.randn(2, 4, 20, device=device).to(torch.bfloat16)
    labels = torch.zeros(4, dtype=torch.long, device=device)
    module = BranchDistillationLosses(temperature=3.0, epsilon=EPSILON)
    assert "epsilon=1e-07" in repr(module)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = module(z, t, labels)
    assert out.dtype == torch.float32
    assert torch.equal(out, branch_distillation_losses(z, t, labels, 3.0, EPSILON))
    out.sum().backward()
    assert z.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("z_shape", "t_shape", "labels", "temperature", "epsilon", "message"),
    [
        ((3, 4), (3, 4), [0, 1, 2], 2.0, 0.0, r"logits of shape \[M, B, C\]"),
        ((2, 3, 4), (2, 4, 4), [0, 1, 2], 2.0, 0.0, "teacher_logits of shape"),
        ((2, 3, 4), (3, 4), [0, 1], 2.0, 0.0, "integer labels of shape"),
        ((2, 3, 4), (3, 4), [0, 1, 2], 0.0, 0.0, "temperature > 0"),
        ((2, 3, 4), (3, 4), [0, 1, 2], 2.0, -1e-7, "epsilon >= 0"),
        ((2, 3, 4), (3, 4), [0, 1, 4], 2.0, 0.0, r"labels in \[0, 4\)"),
    ],
)
def test_bad_inputs_raise(z_shape, t_shape, labels, temperature, epsilon, message):
    z, t = torch.randn(z_shape), torch.randn(t_shape)
    for op in (branch_distillation_losses, branch_distillation_losses_reference):
        with pytest.raises(ValueError, match=message):
            op(z, t, torch.tensor(labels), temperature, epsilon)
    with pytest.raises(TypeError, match="teacher_logits"):
        branch_distillation_losses(
            torch.randn(2, 3, 4), torch.zeros(3, 4, dtype=torch.long), torch.tensor([0, 1, 2]), 2.0
        )
    with pytest.raises(ValueError, match="epsilon >= 0"):
        BranchDistillationLosses(2.0, -1.0)
