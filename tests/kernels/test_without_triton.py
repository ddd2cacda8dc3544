"""``import ffsd_kernels`` where triton is not installed (macOS, Windows): every op runs its PyTorch reference."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoTriton())
    import torch
    import ffsd_kernels as K
    import ffsd_kernels.reference as R
    from ffsd_kernels import _dispatch

    assert not _dispatch.HAS_TRITON and "triton" not in sys.modules
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    assert torch.equal(K.kl_div_loss(s, t, 2.0), R.kl_div_loss(s, t, 2.0))
    K.kl_div_loss(s, t, 2.0).backward()
    assert s.grad is not None
    x, y = s.detach().log_softmax(1), t.softmax(1)
    assert torch.equal(K.kl_div(x, y, reduction="batchmean"), R.kl_div(x, y, reduction="batchmean"))
    assert torch.equal(K.jsd_loss(s, t, 0.3), R.jsd_loss(s, t, 0.3))
    h, w = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4)
    K.fused_linear_distillation_loss(h, w, h.detach(), w, chunk_size=2).backward()
    assert h.grad is not None
    x, y = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    assert torch.equal(K.attention_distance(x, y), R.attention_distance(x, y))
    assert torch.equal(K.diversity_loss(x, y), R.diversity_loss(x, y))
    block = K.FusionBlock(4, 2, 8)
    assert block([x, y]).shape == (3, 8, 5, 6)
    print("references ran")
    """
)


def test_ffsd_kernels_imports_and_runs_without_triton():
    # The interpreter flag must not matter here: without triton nothing can be interpreted either.
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "references ran" in proc.stdout
