"""``sparse_kl_div_loss``: the student against a teacher given as its top-k log-probabilities, value and gradient
against float64 formulas written here from dense distributions (``F.kl_div`` over ``[N, V]`` or over the k), for
the three ``tail`` options; rows of ``[..., V]``, ``labels`` with ``ignore_index``, the reductions, padding entries,
duplicate indices, half precision and the argument checks.

The formulas build what each option means, not how the op computes it: ``zero`` scatters the renormalised teacher
into a dense ``[N, V]`` target; ``bucket`` spreads the tail mass uniformly over the missing classes in both the
teacher and the student (DistillKit's ``symmetric_uniform``), which gives the ``k + 1``-class KL the op computes;
``renormalize`` is ``F.kl_div`` between the two softmaxes over the k. Kernel tests patch the reference to raise.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from ffsd_kernels import SparseKLDivLoss, sparse_kl_div_loss, sparse_kl_div_loss_reference
from tests.helpers import DEVICES, TRITON_DEVICES, check, grad_error, value_error

sparse_module = importlib.import_module("ffsd_kernels.sparse_kl")

TAILS = ["zero", "bucket", "renormalize"]
# (leading shape, V, k): one chunk of each; a [B, T, V] batch; two chunks of the top-k (64 + 6) over three of the
# vocabulary (2048 classes a chunk).
SHAPES = [((3,), 50, 8), ((2, 3), 300, 16), ((2,), 5000, 70)]


@pytest.fixture
def kernels_only(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    monkeypatch.setattr(sparse_module, "sparse_kl_div_loss_reference", forbidden)


def sparse_teacher(lead, vocab, k, pad=0):
    """``(log-probabilities [..., k], indices [..., k])`` of a random teacher's top-k, float64; the last ``pad``
    entries of every row made padding (−inf)."""
    log_p = F.log_softmax(3 * torch.randn(*lead, vocab, dtype=torch.float64), dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    if pad:
        values[..., k - pad :] = float("-inf")
    return values, indices


def sparse_kl64(s, lp, idx, temperature, tail):
    """Per-row ``T² · KL`` in float64 from dense distributions (the module docstring's definitions)."""
    vocab = s.shape[-1]
    a = s.reshape(-1, vocab) / temperature
    lp, idx = lp.reshape(-1, lp.shape[-1]), idx.reshape(-1, idx.shape[-1])
    valid = lp > float("-inf")
    u = lp / temperature
    if tail == "renormalize":
        p = torch.softmax(u, dim=-1)
        log_q = torch.log_softmax(a.gather(1, idx).masked_fill(~valid, float("-inf")), dim=-1)
        return torch.where(p > 0, p * (p.log() - log_q), 0.0).sum(-1) * temperature**2
    log_q = F.log_softmax(a, dim=-1)
    if tail == "zero":
        target = torch.zeros_like(a).scatter(1, idx, torch.softmax(u, dim=-1))
        return F.kl_div(log_q, target, reduction="none").sum(-1) * temperature**2
    # bucket: the tail mass uniform over the classes outside the (valid) top-k, for the teacher and the student.
    tau = (1 - lp.exp().sum(-1)).clamp_min(0)
    scores = torch.cat([u, (tau.log() / temperature)[:, None]], dim=1)
    p = torch.softmax(scores, dim=1)
    in_top = torch.zeros_like(a, dtype=torch.bool).scatter(1, idx, valid)
    missing = (~in_top).sum(1, keepdim=True)
    target = torch.where(in_top, 0.0, p[:, -1:] / missing)
    target = target.scatter(1, idx, torch.where(valid, p[:, :-1], target.gather(1, idx)))
    q = log_q.exp()
    q_tail = 1 - torch.where(in_top, q, 0.0).sum(1, keepdim=True)
    student = torch.where(in_top, log_q, (q_tail / missing).log())
    return F.kl_div(student, target, reduction="none").sum(-1) * temperature**2


def student_logits(lead, vocab, dtype=torch.float32, device="cpu"):
    return (3 * torch.randn(*lead, vocab, dtype=torch.float64)).to(device, dtype).requires_grad_()


def compare(name, dtype, s, lp, idx, temperature, tail, upstream=None, tol=None, **kwargs):
    """Value and student gradient of the op against :func:`sparse_kl64` reduced the same way."""
    out = sparse_kl_div_loss(s, lp.to(s.device, dtype), idx.to(s.device), temperature, tail=tail, **kwargs)
    s64 = s.detach().to("cpu", torch.float64).requires_grad_()
    rows = sparse_kl64(s64, lp.to(torch.float64), idx, temperature, tail)
    labels = kwargs.get("labels")
    reduction = kwargs.get("reduction", "batchmean")
    if labels is not None:
        keep = labels.reshape(-1).cpu() != kwargs.get("ignore_index", -100)
        rows = torch.where(keep, rows, 0.0)
        count = keep.sum().clamp_min(1)
    else:
        count = rows.shape[0]
    out64 = {"none": rows.view(s.shape[:-1]), "sum": rows.sum(), "batchmean": rows.sum() / count}[reduction]
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check(name, dtype, "value", value_error(out, out64), tol)
    upstream = torch.rand(out.shape, dtype=torch.float64) + 0.5 if upstream is None else upstream
    out.backward(upstream.to(out.device, out.dtype))
    out64.backward(upstream)
    check(name, dtype, "grad", grad_error(s.grad, s64.grad), tol)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("lead, vocab, k", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kernels_equal_float64_formulas(lead, vocab, k, tail, temperature, device, kernels_only):
    lp, idx = sparse_teacher(lead, vocab, k)
    compare("sparse_kl", torch.float32, student_logits(lead, vocab, device=device), lp, idx, temperature, tail)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_labels_and_reductions(tail, reduction, device, kernels_only):
    """Rows labelled ignore_index leave the sum and the batchmean's count and get zero gradient; an upstream
    gradient that is not 1 (one per row for none)."""
    lp, idx = sparse_teacher((2, 5), 120, 10)
    labels = torch.tensor([[1, -100, 3, 4, -100], [-100, 0, 0, 2, 9]], device=device)
    s = student_logits((2, 5), 120, device=device)
    compare("sparse_kl", torch.float32, s, lp, idx, 2.0, tail, labels=labels, reduction=reduction)
    assert (s.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tail", TAILS)
def test_padding_entries_are_left_out(tail, device, kernels_only):
    """Entries at −inf (a teacher that stored fewer than k) contribute nothing, whatever index they carry."""
    lp, idx = sparse_teacher((4,), 90, 12, pad=5)
    compare("sparse_kl", torch.float32, student_logits((4,), 90, device=device), lp, idx, 1.5, tail)
    idx_junk = idx.clone()
    idx_junk[..., -5:] = 0  # padding's indices are never read as classes of the teacher
    s = student_logits((4,), 90, device=device)
    a = sparse_kl_div_loss(s, lp.float().to(device), idx.to(device), 1.5, tail=tail)
    b = sparse_kl_div_loss(s, lp.float().to(device), idx_junk.to(device), 1.5, tail=tail)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tail", TAILS)
def test_duplicate_indices_as_the_reference(tail, device, kernels_only, monkeypatch):
    """The same index twice (not a top-k, but allowed): every entry counts, and the gradient at that class sums
    both, as autograd through the reference's gather does."""
    lp, idx = sparse_teacher((3,), 40, 6)
    idx[:, 1] = idx[:, 0]
    s = student_logits((3,), 40, device=device)
    out = sparse_kl_div_loss(s, lp.float().to(device), idx.to(device), 2.0, tail=tail)
    out.backward()
    monkeypatch.undo()
    s64 = s.detach().cpu().double().requires_grad_()
    ref = sparse_kl_div_loss_reference(s64, lp, idx, 2.0, tail=tail)
    ref.backward()
    check("sparse_kl_duplicates", torch.float32, "value", value_error(out, ref))
    check("sparse_kl_duplicates", torch.float32, "grad", grad_error(s.grad, s64.grad))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_student(layout, device, kernels_only):
    lp, idx = sparse_teacher((6,), 70, 9)
    if layout == "sliced":
        s = (3 * torch.randn(6, 90, dtype=torch.float64)).float().to(device)[:, 10:80]
    else:
        s = (3 * torch.randn(70, 6, dtype=torch.float64)).float().to(device).t()
    assert not s.is_contiguous()
    compare("sparse_kl", torch.float32, s.requires_grad_(), lp, idx, 2.0, "bucket")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tail", TAILS)
def test_half_precision(dtype, tail, device, kernels_only):
    lp, idx = sparse_teacher((4,), 300, 16)
    s = student_logits((4,), 300, dtype=dtype, device=device)
    compare("sparse_kl", dtype, s, lp.to(dtype).double(), idx, 2.0, tail, tol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tail", TAILS)
def test_float64_reference_equals_formulas(tail, device):
    lp, idx = sparse_teacher((2, 3), 200, 10, pad=2)
    s = student_logits((2, 3), 200, dtype=torch.float64, device=device)
    compare("sparse_kl_reference", torch.float64, s, lp, idx, 3.0, tail, labels=torch.tensor([[0, -100, 1]] * 2))


def test_module_and_checks():
    lp, idx = sparse_teacher((3,), 30, 4)
    s = student_logits((3,), 30)
    module = SparseKLDivLoss(2.0, tail="bucket", reduction="sum")
    expected = sparse_kl_div_loss(s, lp.float(), idx, 2.0, tail="bucket", reduction="sum")
    torch.testing.assert_close(module(s, lp.float(), idx), expected)
    for build, match in [
        (lambda: SparseKLDivLoss(0.0), "temperature > 0"),
        (lambda: SparseKLDivLoss(tail="uniform"), "tail"),
        (lambda: SparseKLDivLoss(reduction="mean"), "reduction"),
    ]:
        with pytest.raises(ValueError, match=match):
            build()
    with pytest.raises(ValueError, match="teacher_topk_indices in"):
        bad = idx.clone()
        bad[1, 2] = 30
        sparse_kl_div_loss(s, lp.float(), bad)
    with pytest.raises(ValueError, match="one shape"):
        sparse_kl_div_loss(s, lp.float(), idx[:, :3])
    with pytest.raises(TypeError, match="integer"):
        sparse_kl_div_loss(s, lp.float(), idx.float())
    with pytest.raises(TypeError):
        sparse_kl_div_loss(s, lp.long(), idx)
