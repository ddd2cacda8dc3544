"""Every Triton launch the ops make compiles for an H100 (``sm_90``) with no register spills, and no launcher
synchronises with the host.

The launches are recorded, not executed, at the shapes the benchmarks use (the batch made smaller where the launch
configuration does not depend on it), so the dtypes, block sizes and ``num_warps`` compiled are the launchers' own.
The compilation runs in a fresh process without the interpreter (``python -m tests.kernels.test_compile``): with
``TRITON_INTERPRET=1`` in the environment, Triton 3.8 fails to compile loops, and once the interpreter has run a
kernel that calls a ``@triton.jit`` helper it leaves ``triton.language`` patched for the rest of the process.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import ffsd_kernels as K
from ffsd_kernels import _dispatch
from tests.helpers.kernel_launches import compile_for_h100, forbid_host_syncs, ptxas_resources, recorded_launches

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="records launches through Triton's interpreter (TRITON_INTERPRET=1)",
)


def _t(shape, dtype=torch.float32, grad=True, channels_last=False):
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _labels(batch, classes):
    return torch.randint(0, classes, (batch,))


def _padded(lead, classes):
    """Labels with every third row ``ignore_index``: the launches of the ignore path."""
    labels = torch.randint(0, classes, lead)
    labels.view(-1)[::3] = -100
    return labels


def _topk(lead, k, vocab=128256, dtype=torch.bfloat16):
    """A sparse teacher: ``k`` log-probabilities (distinct, falling) and distinct indices per row, no gradient."""
    logprobs = torch.log_softmax(torch.arange(k, 0, -1, dtype=torch.float32), 0).expand(*lead, k).to(dtype)
    indices = torch.randperm(vocab)[:k].expand(*lead, k).contiguous()
    return logprobs, indices


BF16 = torch.bfloat16
# Each case: forward and backward of one op. The KL batch is 64 rather than 8192: the grid grows with the batch, the
# kernels do not.
CASES = {
    "kl_div[64,128256]bf16": lambda: K.kl_div_loss(_t((64, 128256), BF16), _t((64, 128256), BF16, False), 2.0),
    "kl_div[128,100]fp32,teacher-grad": lambda: K.kl_div_loss(_t((128, 100)), _t((128, 100)), 4.0),
    "kl_div[256,1000]fp32,mean-of-3": lambda: K.kl_div_loss(_t((256, 1000)), [_t((256, 1000), grad=False)] * 3, 2.0),
    "kl_div[256,1000]bf16": lambda: K.kl_div_loss(_t((256, 1000), BF16), _t((256, 1000), BF16), 2.0),
    "cross_entropy_kl[128,100]fp32,mean-of-2": lambda: sum(
        K.cross_entropy_kl_loss(_t((128, 100)), [_t((128, 100), grad=False)] * 2, _labels(128, 100), 2.0)
    ),
    "cross_entropy_kl[64,128256]bf16": lambda: sum(
        K.cross_entropy_kl_loss(_t((64, 128256), BF16), _t((64, 128256), BF16, False), _labels(64, 128256), 1.0)
    ),
    "kl_div_loss[4,16,4096]bf16,labels,none": lambda: K.kl_div_loss(
        _t((4, 16, 4096), BF16), _t((4, 16, 4096), BF16), 2.0, labels=_padded((4, 16), 4096), reduction="none"
    ).sum(),
    "cross_entropy_kl[64,128256]bf16,labels": lambda: sum(
        K.cross_entropy_kl_loss(_t((64, 128256), BF16), _t((64, 128256), BF16, False), _padded((64,), 128256))
    ),
    "torch_kl_div[64,128256]bf16,batchmean": lambda: K.kl_div(
        _t((64, 128256), BF16), _t((64, 128256), BF16), reduction="batchmean"
    ),
    "torch_kl_div[128,100]fp32,none,log-target": lambda: K.kl_div(
        _t((128, 100)), _t((128, 100)), reduction="none", log_target=True
    ).sum(),
    "jsd[64,128256]bf16,beta=0.5": lambda: K.jsd_loss(_t((64, 128256), BF16), _t((64, 128256), BF16, False), 0.5),
    "jsd[256,1000]fp32,beta=0,teacher-grad": lambda: K.jsd_loss(_t((256, 1000)), _t((256, 1000)), 0.0, 2.0),
    "jsd[4,16,4096]bf16,beta=1,labels,none": lambda: K.jsd_loss(
        _t((4, 16, 4096), BF16), _t((4, 16, 4096), BF16), 1.0, labels=_padded((4, 16), 4096), reduction="none"
    ).sum(),
    "fused_linear[64,256->32000]bf16,labels,ce": lambda: K.fused_linear_distillation_loss(
        _t((64, 256), BF16),
        _t((32000, 256), BF16),
        _t((64, 256), BF16, False),
        _t((32000, 256), BF16, False),
        _padded((64,), 32000),
        ce_weight=0.5,
        chunk_size=16,
    ),  # fmt: skip
    "sparse_kl[64,128256]bf16,k=64,zero": lambda: K.sparse_kl_div_loss(_t((64, 128256), BF16), *_topk((64,), 64)),
    "sparse_kl[4,16,4096]bf16,k=64,bucket,labels,none": lambda: K.sparse_kl_div_loss(
        _t((4, 16, 4096), BF16),
        *_topk((4, 16), 64, vocab=4096),
        2.0,
        tail="bucket",
        labels=_padded((4, 16), 4096),
        reduction="none",
    ).sum(),  # fmt: skip
    "sparse_kl[256,1000]fp32,k=100,renormalize": lambda: K.sparse_kl_div_loss(
        _t((256, 1000)), *_topk((256,), 100, vocab=1000), 2.0, tail="renormalize"
    ),
    "fused_linear_sparse_kl[64,256->32000]bf16,k=64,labels": lambda: K.fused_linear_sparse_kl_div_loss(
        _t((64, 256), BF16),
        _t((32000, 256), BF16),
        *_topk((64,), 64, vocab=32000),
        labels=_padded((64,), 32000),
        chunk_size=16,
    ),  # fmt: skip
    "mutual_kl[3,128,100]fp32,labels,none": lambda: K.mutual_kl_loss(
        _t((3, 128, 100)), 2.0, labels=_padded((128,), 100), reduction="none"
    ).sum(),
    "mutual_kl[2,128,100]fp32": lambda: K.mutual_kl_loss([_t((128, 100)), _t((128, 100))], 2.0).sum(),
    "mutual_kl[4,256,1000]bf16": lambda: K.mutual_kl_loss(_t((4, 256, 1000), BF16), 2.0).sum(),
    "attention_distance[16,64,56,56]bf16,channels-last": lambda: K.attention_distance(
        _t((16, 64, 56, 56), BF16, channels_last=True), _t((16, 64, 56, 56), BF16, channels_last=True)
    ),
    "attention_distance[128,64,8,8]fp32": lambda: K.attention_distance(_t((128, 64, 8, 8)), _t((128, 128, 8, 8))),
    "attention_map[8,16,32,32]fp32,slice": lambda: K.attention_map(_t((8, 16, 32, 40))[..., 3:35]).sum(),
    "normalized_distance[128,32,16,16]fp32": lambda: K.normalized_distance(
        _t((128, 32, 16, 16)), _t((128, 32, 16, 16), grad=False)
    ),
    "normalized_distance[64,3000]bf16": lambda: K.normalized_distance(_t((64, 3000), BF16), _t((64, 3000), BF16)),
    # FFSD's distances of one step: fp32 attention maps at three resolutions and bf16 channels-last feature maps,
    # each student's against a detached target, all in one call.
    "normalized_distances[14 pairs,128,...]fp32+bf16,channels-last,y-detached": lambda: K.normalized_distances(
        [_t((128, 1, r, r)) for r in (32, 16, 8) * 3]
        + [_t((128, 16, 32, 32), BF16, channels_last=True) for _ in range(3)]
        + [_t((128, 32, 16, 16), BF16, channels_last=True) for _ in range(2)],
        [_t((128, 1, r, r), grad=False) for r in (32, 16, 8) * 3]
        + [_t((128, 16, 32, 32), BF16, False, channels_last=True) for _ in range(3)]
        + [_t((128, 32, 16, 16), BF16, False, channels_last=True) for _ in range(2)],
    ),
    "normalized_distances[1 pair,64,3000]fp16": lambda: K.normalized_distances(
        [_t((64, 3000), torch.float16)], [_t((64, 3000), torch.float16)]
    ),
    # FFSD's attention maps of one step with --stack-networks: the taps of three stacked networks (bf16,
    # channels-last, groups 3), the decoder outputs of two (groups 2) and two single maps, all in one call.
    "attention_maps[8 tensors,128,...]bf16,channels-last,groups-3/2/1": lambda: sum(
        m.float().sum()
        for row in K.attention_maps(
            [_t((128, 3 * c, r, r), BF16, channels_last=True) for c, r in ((16, 32), (32, 16), (64, 8))]
            + [_t((128, 2 * c, r, r), BF16, channels_last=True) for c, r in ((16, 32), (32, 16), (64, 8))]
            + [_t((128, 64, 8, 8), BF16, channels_last=True) for _ in range(2)],
            [3, 3, 3, 2, 2, 2, 1, 1],
        )
        for m in row
    ),
    "attention_maps[2 tensors,64,...]fp32+fp16,nchw": lambda: sum(
        m.float().sum()
        for row in K.attention_maps([_t((64, 32, 32, 32)), _t((64, 16, 8, 8), torch.float16)], [2, 1])
        for m in row
    ),
    "diversity_loss[128,1,8,8]fp32": lambda: K.diversity_loss(_t((128, 1, 8, 8)), _t((128, 1, 8, 8), grad=False)),
    "diversity_loss[16,1,56,56]bf16": lambda: K.diversity_loss(
        _t((16, 1, 56, 56), BF16), _t((16, 1, 56, 56), BF16, False)
    ),
    "diversity_shift[128,64,8,8]fp32,channels-last": lambda: K.diversity_shift(
        _t((128, 64, 8, 8), channels_last=True)
    ).sum(),
    "fusion_block[8,2x64,8,8]fp32": lambda: K.FusionBlock(64, 2, 64)([_t((8, 64, 8, 8)), _t((8, 64, 8, 8))]).sum(),
    "fusion_block[8,2x512,7,7]bf16,channels-last": lambda: (
        K.FusionBlock(512, 2, 512).to(BF16)([_t((8, 512, 7, 7), BF16, channels_last=True) for _ in range(2)]).sum()
    ),
    "fusion_block[8,3x64,56,56]fp32,channels-last,eval": lambda: (
        K.FusionBlock(64, 3, 64).eval()([_t((8, 64, 56, 56), channels_last=True) for _ in range(3)]).sum()
    ),
    "trans_fusion_head[8,64->128,8,8]fp64": lambda: (
        K.FusionBlock(64, 1, 128).double()(_t((8, 64, 8, 8), torch.float64)).sum()
    ),
    "online_distillation[2,128,100]bf16": lambda: K.online_distillation_losses(
        _t((3, 128, 100), BF16), _t((128, 100), BF16), _labels(128, 100), 2.0
    ),
    "online_distillation[3,256,1000]fp32": lambda: K.online_distillation_losses(
        _t((4, 256, 1000)), _t((256, 1000)), _labels(256, 1000), 2.0
    ),
    # The branch methods' losses: ONE's (3 branches, one detached teacher), CL-ILR's (4 branches, per-branch
    # teachers with their gradient, bf16), OKDDip's at ImageNet size (per-branch teachers, several chunks).
    "branch_distillation[3,128,100]fp32,shared": lambda: K.branch_distillation_losses(
        _t((3, 128, 100)), _t((128, 100), grad=False), _labels(128, 100), 3.0, 1e-7
    ),
    "branch_distillation[4,128,100]bf16,per-branch,teacher-grad": lambda: K.branch_distillation_losses(
        _t((4, 128, 100), BF16), _t((4, 128, 100), BF16), _labels(128, 100), 3.0, 1e-7
    ),
    "branch_distillation[4,256,1000]fp32,per-branch,teacher-grad": lambda: K.branch_distillation_losses(
        _t((4, 256, 1000)), _t((4, 256, 1000)), _labels(256, 1000), 3.0, 1e-7
    ),
    "branch_distillation[3,256,1000]bf16,shared,teacher-grad": lambda: K.branch_distillation_losses(
        _t((3, 256, 1000), BF16), _t((256, 1000), BF16), _labels(256, 1000), 3.0, 0.0
    ),
}


def _forward_backward(case: str) -> None:
    loss = CASES[case]()
    loss.backward(torch.ones_like(loss))


def compile_every_case() -> dict[str, list[dict]]:
    """For each case, each distinct launch: its kernel, launch keywords, and registers and spills (or the error)."""
    report: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as workdir, pytest.MonkeyPatch.context() as monkeypatch:
        # The ops take their Triton path on these CPU tensors; the launches are recorded, never run.
        monkeypatch.setattr(_dispatch, "INTERPRETER", True)
        for case in CASES:
            with recorded_launches(monkeypatch, execute=False) as launches:
                _forward_backward(case)
            rows, seen = [], set()
            for launch in launches:
                kwargs = {k: str(v) for k, v in launch.kwargs.items()}
                key = (launch.name, json.dumps(kwargs, sort_keys=True))
                if key in seen:
                    continue
                seen.add(key)
                row = {"kernel": launch.name, "kwargs": kwargs}
                try:
                    compiled = compile_for_h100(launch)
                    row.update(vars(ptxas_resources(compiled.asm["ptx"], Path(workdir))))
                except Exception as error:  # reported, and failed, by the test of this case
                    row["error"] = f"{type(error).__name__}: {error}"
                rows.append(row)
            report[case] = rows
    return report


@pytest.fixture(scope="module")
def compiled_cases() -> dict[str, list[dict]]:
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_compile"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow  # one subprocess compiles every launch for sm_90: ~10 s
@pytest.mark.xdist_group("compile")  # that subprocess runs once, on one worker
@pytest.mark.parametrize("case", list(CASES))
def test_launches_compile_for_h100_without_spills(case, compiled_cases):
    rows = compiled_cases[case]
    assert rows, f"{case}: no Triton kernel was launched"
    for row in rows:
        print(f"{case}: {row}")
        assert "error" not in row, row
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


@pytest.mark.parametrize("case", list(CASES))
def test_launchers_make_no_host_synchronisation(case, monkeypatch):
    with recorded_launches(monkeypatch, execute=False) as launches:
        forbid_host_syncs(monkeypatch)
        _forward_backward(case)
        monkeypatch.undo()
    assert launches


if __name__ == "__main__":
    print(json.dumps(compile_every_case()))
