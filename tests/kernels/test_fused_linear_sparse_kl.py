"""``fused_linear_sparse_kl_div_loss``: the sparse-teacher loss of ``hidden @ weight.T`` made chunk by chunk, value
and gradients (hidden states and head) against autograd through the unfused reference in float64, for the three
``tail`` options, several chunks (not dividing the rows), ``[B, T, H]`` hidden states, labels with ``ignore_index``,
both reductions and an upstream gradient that is not 1; the kernels' path with the reference patched to raise."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from ffsd_kernels import (
    FusedLinearSparseKLDivLoss,
    fused_linear_sparse_kl_div_loss,
    fused_linear_sparse_kl_div_loss_reference,
    sparse_kl_div_loss_reference,
)
from tests.helpers import DEVICES, TRITON_DEVICES, check, grad_error, value_error

fused_module = importlib.import_module("ffsd_kernels.fused_linear_sparse_kl")
sparse_module = importlib.import_module("ffsd_kernels.sparse_kl")


@pytest.fixture
def kernels_only(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    monkeypatch.setattr(fused_module, "fused_linear_sparse_kl_div_loss_reference", forbidden)
    monkeypatch.setattr(sparse_module, "sparse_kl_div_loss_reference", forbidden)


def problem(lead, hidden, vocab, k, dtype=torch.float32, device="cpu"):
    """``(hidden [..., H], weight [V, H], top-k log-probabilities, indices)``, drawn in float64."""
    h = torch.randn(*lead, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) / hidden**0.5
    teacher = F.log_softmax(2 * torch.randn(*lead, vocab, dtype=torch.float64), dim=-1)
    logprobs, indices = teacher.topk(k, dim=-1)
    return (
        h.to(device, dtype).requires_grad_(),
        w.to(device, dtype).requires_grad_(),
        logprobs.to(device, dtype),
        indices.to(device),
    )


def compare(dtype, h, w, logprobs, indices, upstream, tol=None, **kwargs):
    out = fused_linear_sparse_kl_div_loss(h, w, logprobs, indices, **kwargs)
    h64, w64 = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (h, w))
    kwargs.pop("chunk_size", None)
    labels = kwargs.pop("labels", None)
    out64 = sparse_kl_div_loss_reference(
        h64 @ w64.t(), logprobs.cpu().double(), indices.cpu(), labels=None if labels is None else labels.cpu(), **kwargs
    )
    check("fused_linear_sparse_kl", dtype, "value", value_error(out, out64), tol)
    (out * upstream).backward()
    (out64 * upstream).backward()
    check("fused_linear_sparse_kl", dtype, "grad_h", grad_error(h.grad, h64.grad), tol)
    check("fused_linear_sparse_kl", dtype, "grad_w", grad_error(w.grad, w64.grad), tol)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tail", ["zero", "bucket", "renormalize"])
@pytest.mark.parametrize("lead, chunk_size", [((7,), 3), ((2, 5), 4), ((6,), None)])
def test_kernels_equal_unfused_float64(lead, chunk_size, tail, device, kernels_only):
    h, w, logprobs, indices = problem(lead, 16, 300, 12, device=device)
    compare(torch.float32, h, w, logprobs, indices, 1.7, temperature=2.0, tail=tail, chunk_size=chunk_size)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_labels_and_reductions(reduction, device, kernels_only):
    h, w, logprobs, indices = problem((2, 5), 8, 120, 6, device=device)
    labels = torch.tensor([[1, -100, 3, 4, -100], [-100, 0, 0, 2, 9]], device=device)
    compare(
        torch.float32, h, w, logprobs, indices, 0.6, tail="bucket", labels=labels, reduction=reduction, chunk_size=3
    )
    assert (h.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_frozen_head_and_bf16(device, kernels_only):
    """A head that requires no gradient gets none; bf16 within 1e-2."""
    h, w, logprobs, indices = problem((6,), 32, 500, 16, dtype=torch.bfloat16, device=device)
    w.requires_grad_(False)
    out = fused_linear_sparse_kl_div_loss(h, w, logprobs, indices, chunk_size=4)
    h64 = h.detach().cpu().double().requires_grad_()
    out64 = sparse_kl_div_loss_reference(h64 @ w.detach().cpu().double().t(), logprobs.cpu().double(), indices.cpu())
    out.backward()
    out64.backward()
    assert w.grad is None and out.dtype == torch.float32
    check("fused_linear_sparse_kl", torch.bfloat16, "value", value_error(out, out64), 1e-2)
    check("fused_linear_sparse_kl", torch.bfloat16, "grad_h", grad_error(h.grad, h64.grad), 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_the_reference(device):
    h, w, logprobs, indices = problem((4,), 8, 50, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(
        fused_linear_sparse_kl_div_loss(h, w, logprobs, indices, 1.5, tail="renormalize"),
        fused_linear_sparse_kl_div_loss_reference(h, w, logprobs, indices, 1.5, tail="renormalize"),
        rtol=0,
        atol=0,
    )


def test_module_and_checks():
    h, w, logprobs, indices = problem((4,), 8, 50, 5)
    module = FusedLinearSparseKLDivLoss(2.0, tail="zero", chunk_size=3)
    torch.testing.assert_close(
        module(h, w, logprobs, indices), fused_linear_sparse_kl_div_loss(h, w, logprobs, indices, 2.0, chunk_size=3)
    )
    for build, match in [
        (lambda: FusedLinearSparseKLDivLoss(0.0), "temperature > 0"),
        (lambda: FusedLinearSparseKLDivLoss(tail="spread"), "tail"),
        (lambda: FusedLinearSparseKLDivLoss(reduction="none"), "reduction"),
        (lambda: FusedLinearSparseKLDivLoss(chunk_size=0), "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            build()
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        fused_linear_sparse_kl_div_loss(h, w.t(), logprobs, indices)
    with pytest.raises(ValueError, match="teacher_topk_indices in"):
        fused_linear_sparse_kl_div_loss(h, w, logprobs, indices + 50)
