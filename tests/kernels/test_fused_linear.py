"""``fused_linear_distillation_loss`` against the unfused float64 definition (full logits, then the JSD and CE rows),
values and gradients of the student's and teacher's hidden states and heads; and its memory: the largest tensor that
it allocates, counted on the CPU, is one chunk's logits, never ``[N, V]``.

The memory count runs every ATen op under a ``TorchDispatchMode`` and records the storage of each output that is
not an input's: on the Triton path (the interpreter) that is every buffer the launchers allocate, on the float64
path every temporary of the chunk's autograd.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ffsd_kernels.fused_linear as fused_module
from ffsd_kernels import (
    FusedLinearDistillationLoss,
    fused_linear_distillation_loss,
    fused_linear_distillation_loss_reference,
    jsd_loss,
)
from ffsd_kernels.fused_linear import default_chunk_size
from tests.helpers import TRITON_DEVICES, check, grad_error, leaf64, value_error


def inputs(lead, hidden, vocab, dtype=torch.float32, teacher_grad=False, device="cpu", teacher_hidden=None):
    teacher_hidden = teacher_hidden or hidden + 3

    def draw(*shape, grad):
        return torch.randn(shape, dtype=torch.float64).to(device, dtype).requires_grad_(grad)

    return (
        draw(*lead, hidden, grad=True),
        draw(vocab, hidden, grad=True),
        draw(*lead, teacher_hidden, grad=teacher_grad),
        draw(vocab, teacher_hidden, grad=teacher_grad),
    )


def padded(lead, vocab, device="cpu"):
    labels = torch.randint(0, vocab, lead)
    labels.view(-1)[1::4] = -100
    return labels.to(device)


CASES = [
    # (lead, H, V, beta, T, ce_weight, reduction, chunk, teacher_grad)
    ((7,), 8, 37, 0.5, 1.0, 0.0, "batchmean", 3, False),
    ((2, 5), 16, 300, 0.0, 2.0, 0.5, "batchmean", 4, True),
    ((2, 5), 16, 300, 1.0, 1.5, 0.0, "sum", 10, True),
    ((3, 3), 8, 2100, 0.3, 2.0, 1.0, "sum", 1, False),
    ((9,), 4, 50, 0.9, 1.0, 0.2, "batchmean", None, False),
]


@pytest.mark.parametrize("device", [*TRITON_DEVICES, "cpu-float64"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("with_labels", [False, True], ids=["no-labels", "labels"])
def test_against_the_unfused_definition(case, with_labels, device, monkeypatch):
    lead, hidden, vocab, beta, temperature, ce_weight, reduction, chunk, teacher_grad = case
    dtype = torch.float64 if device == "cpu-float64" else torch.float32
    device = "cpu" if device == "cpu-float64" else device
    if dtype == torch.float32:  # the kernels must run, not the per-chunk reference
        monkeypatch.setattr(fused_module, "_chunk_reference", None)
    if not with_labels and ce_weight:
        ce_weight = 0.0
    x = inputs(lead, hidden, vocab, dtype, teacher_grad, device)
    labels = padded(lead, vocab, device) if with_labels else None
    options = dict(beta=beta, temperature=temperature, ce_weight=ce_weight, reduction=reduction)
    loss = fused_linear_distillation_loss(*x, labels, chunk_size=chunk, kd_weight=0.8, **options)
    assert loss.shape == () and loss.dtype == dtype
    (loss * -1.3).backward()
    x64 = [leaf64(t, t.requires_grad) for t in x]
    ref = fused_linear_distillation_loss_reference(
        *x64, labels.cpu() if with_labels else None, kd_weight=0.8, **options
    )
    (ref * -1.3).backward()
    check("fused_linear", dtype, "value", value_error(loss, ref))
    for name, t, t64 in zip(("grad_h_s", "grad_w_s", "grad_h_t", "grad_w_t"), x, x64, strict=True):
        if t.requires_grad:
            assert t.grad.dtype == t.dtype
            check("fused_linear", dtype, name, grad_error(t.grad, t64.grad), 1e-4 if dtype == torch.float32 else None)
        else:
            assert t.grad is None


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_bf16_and_equal_to_jsd_on_the_logits(device):
    x = inputs((2, 6), 32, 500, torch.bfloat16, False, device)
    labels = padded((2, 6), 500, device)
    loss = fused_linear_distillation_loss(*x, labels, beta=0.5, chunk_size=5)
    assert loss.dtype == torch.float32
    loss.backward()
    s, t = x[0] @ x[1].t(), x[2] @ x[3].t()  # the bf16 logits an unfused model would make
    assert abs(loss.item() - jsd_loss(s, t, 0.5, labels=labels).item()) < 1e-5
    x64 = [leaf64(v, v.requires_grad) for v in x]
    ref = fused_linear_distillation_loss_reference(*x64, labels.cpu(), beta=0.5)
    ref.backward()
    check("fused_linear", torch.bfloat16, "grad_h_s", grad_error(x[0].grad, x64[0].grad), 3e-2)
    check("fused_linear", torch.bfloat16, "grad_w_s", grad_error(x[1].grad, x64[1].grad), 3e-2)


def test_module_options_and_errors():
    x = inputs((4,), 8, 20, torch.float64)
    labels = torch.tensor([1, 2, -100, 3])
    module = FusedLinearDistillationLoss(beta=0.1, ce_weight=0.5, chunk_size=2)
    assert torch.equal(
        module(*x, labels), fused_linear_distillation_loss(*x, labels, beta=0.1, ce_weight=0.5, chunk_size=2)
    )
    assert "beta=0.1" in repr(module)
    assert default_chunk_size(8192, 128256, 4096) == 256
    for call in (
        lambda: fused_linear_distillation_loss(*x, ce_weight=1.0),  # CE without labels
        lambda: fused_linear_distillation_loss(*x, reduction="none"),
        lambda: fused_linear_distillation_loss(x[0], x[1][:, :5], x[2], x[3]),
        lambda: fused_linear_distillation_loss(*x, torch.tensor([1, 2, 3, 99]), ce_weight=1.0),  # label out of range
        lambda: fused_linear_distillation_loss(*x, chunk_size=0),
    ):
        with pytest.raises(ValueError):
            call()


# ---------------------------------------------------------------------------------------------------------------
# Memory: the largest intermediate tensor
# ---------------------------------------------------------------------------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """The largest storage, in bytes, that any op inside the block returns, other than the storages of ``known``."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                if t.untyped_storage().nbytes() > self.largest:
                    self.largest, self.shape = t.untyped_storage().nbytes(), tuple(t.shape)
        return out


def largest_intermediate(fn, x, labels):
    mode = LargestAllocation([*x, labels])
    with mode:
        fn(*x, labels).backward()
    return mode.largest, mode.shape


# float64 on the CPU (the per-chunk reference path, autograd included) at a size where the full logits would be 32 MiB.
MEMORY_SHAPE = dict(rows=1024, hidden=32, vocab=4096, chunk=64)


def test_largest_intermediate_is_one_chunk_of_logits_float64():
    rows, hidden, vocab, chunk = MEMORY_SHAPE.values()
    x = inputs((rows,), hidden, vocab, torch.float64, teacher_hidden=hidden)
    labels = padded((rows,), vocab)
    chunk_logits = chunk * vocab * 8
    fused, shape = largest_intermediate(
        lambda *a: fused_linear_distillation_loss(*a, beta=0.5, ce_weight=0.5, chunk_size=chunk), x, labels
    )
    unfused, _ = largest_intermediate(
        lambda *a: fused_linear_distillation_loss_reference(*a, beta=0.5, ce_weight=0.5), x, labels
    )
    print(f"\nlargest intermediate, [{rows}, {hidden} -> {vocab}] fp64, chunk {chunk}: fused {fused / 2**20:.2f} MiB "
          f"{shape}, unfused {unfused / 2**20:.2f} MiB; one chunk's logits {chunk_logits / 2**20:.2f} MiB")  # fmt: skip
    assert fused <= chunk_logits
    assert unfused >= rows * vocab * 8  # the unfused definition does make [N, V]


@pytest.mark.parametrize("device", [d for d in TRITON_DEVICES if d == "cpu"])
def test_largest_intermediate_is_one_chunk_of_logits_kernels(device, monkeypatch):
    monkeypatch.setattr(fused_module, "_chunk_reference", None)  # the kernels' path, not the reference's
    rows, hidden, vocab, chunk = 48, 8, 700, 8
    x = inputs((rows,), hidden, vocab, torch.float32, teacher_grad=True, teacher_hidden=hidden)
    labels = padded((rows,), vocab)
    fused, shape = largest_intermediate(
        lambda *a: fused_linear_distillation_loss(*a, beta=0.3, ce_weight=1.0, chunk_size=chunk), x, labels
    )
    assert fused <= chunk * vocab * 4, shape
