"""Stacked networks (``--stack-networks``): one grouped network computes exactly what the separate ones do, and the
separate ones keep their state dicts, optimisers and checkpoints."""

import copy
import io

import pytest
import torch

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.models.channels import cat_channels, stacked_group_count, stacked_groups
from ffsd_fast.models.stacking import StackedBatchNorm2d, StackedNetworks, StackedSyncBatchNorm, StackingError
from ffsd_fast.step.optimizers import make_optimizers
from tests.helpers.kernel_launches import AtenKernels
from tests.helpers.methods import build, train_step

# Every architecture of the zoo. The ones that concatenate channels (DenseNet's 40 layers, GoogLeNet's width) are
# the costliest in float64 on a CPU: at 8 px (taps 8/4/2), and slow even so.
CONCATENATING = ("densenet40", "googlenet")
STACKABLE = [
    pytest.param(name, 8, marks=pytest.mark.slow)
    if name in CONCATENATING
    else (name, 64 if models.family(name) == "imagenet" else 16)
    for name in models.names()
]


def assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", scale: float = 0.0) -> None:
    """Within ``tol`` of the largest entry, or of ``scale`` where larger (a sum in another order differs by
    rounding, far below it; a gradient that is 0 but for rounding, a conv bias before a BatchNorm, is compared at
    the scale of the network's others)."""
    error = (got - expected).abs().max().item()
    assert error <= tol * max(expected.abs().max().item(), scale, 1e-30), f"{what}: {error:.3e}"


@pytest.mark.parametrize("name,size", STACKABLE)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_stack_computes_what_the_networks_compute(name, size, channels_last):
    """Logits, taps, every gradient and every BatchNorm statistic, in float64, for 3 networks of each stackable
    architecture of the zoo."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    networks = [models.create(name, 5).double().to(memory_format=fmt).train() for _ in range(3)]
    separate = copy.deepcopy(networks)
    stack = StackedNetworks(networks)
    x = torch.randn(4, 3, size, size, dtype=torch.float64).contiguous(memory_format=fmt)

    logits, taps = stack(x)
    expected = [net(x) for net in separate]
    stacked_taps = [stack.split(t) for t in taps]
    loss = sum((z * z).sum() for z in stack.split(logits)) + sum((t * t).sum() for t in taps)
    loss.backward()
    stack.share_grads()
    sum((z * z).sum() + sum((t * t).sum() for t in f) for z, f in expected).backward()

    for g, (z, f) in enumerate(expected):
        assert_close(stack.split(logits)[g], z, 1e-12, "logits")
        for k, tap in enumerate(f):
            assert_close(stacked_taps[k][g], tap, 1e-12, f"tap {k}")
            # The stacked taps keep the networks' memory format (a concatenation's output included).
            assert taps[k].is_contiguous(memory_format=fmt) == tap.is_contiguous(memory_format=fmt), k
    for net, ref in zip(networks, separate, strict=True):
        scale = max(q.grad.abs().max().item() for q in ref.parameters())
        for (key, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
            assert p.grad.stride() == p.stride(), key  # what the fused optimisers expect
            assert_close(p.grad, q.grad, 1e-12, key, scale)
        for (key, b), c in zip(net.named_buffers(), ref.buffers(), strict=True):
            assert_close(b.double(), c.double(), 1e-12, key)  # running statistics and counters alike


def test_under_autocast_the_weights_are_cast_once_and_the_gradients_reach_the_networks():
    """bf16 autocast: one cast of the weights' buffer forward, one ``cat`` and one cast backward (not one each per
    weight); the networks' gradients are those of the separate networks under autocast, to bf16 rounding."""
    torch.manual_seed(0)
    networks = [models.create("resnet20", 5).train() for _ in range(3)]
    separate = copy.deepcopy(networks)
    stack = StackedNetworks(networks)
    x = torch.randn(8, 3, 16, 16)
    with AtenKernels() as aten, torch.autocast("cpu", dtype=torch.bfloat16):
        logits, taps = stack(x)
    casts = [op for op in aten.ops if op == "_to_copy"]
    assert len(casts) == 2  # the weights' buffer and the input batch
    loss = sum(z.square().mean() for z in stack.split(logits))  # in bf16: no cast of its own
    with AtenKernels() as aten:
        loss.backward()
    assert aten.ops.count("_to_copy") == 1 and aten.ops.count("cat") == 1
    stack.share_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sum(net(x)[0].square().mean() for net in separate)
    expected.backward()
    for net, ref in zip(networks, separate, strict=True):
        scale = max(q.grad.abs().max().item() for q in ref.parameters())
        for (key, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
            assert p.grad.dtype == torch.float32 and p.grad.stride() == p.stride(), key
            assert_close(p.grad, q.grad, 5e-2, key, scale)


def test_networks_keep_their_parameters_state_dicts_and_optimiser():
    nets = build("resnet20", num_classes=5, num_students=2, image_size=16)
    before = {k: v.clone() for k, v in nets.state_dict().items()}
    params = list(nets.parameters())
    optimizers = make_optimizers(nets)
    nets.stack()
    assert list(nets.parameters()) == params  # the same objects: the optimisers and their state stay valid
    assert optimizers[0].param_groups[0]["params"][0] is params[0]
    after = nets.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # The networks' tensors and the stack's are one: a write to either is seen by the other.
    with torch.no_grad():
        nets.students[1].conv1.weight.fill_(0.5)
    stacked_conv1 = nets.form.stacks["backbones"].body.conv1.weight
    channels = nets.students[1].conv1.weight.shape[0]
    assert torch.all(stacked_conv1[channels : 2 * channels] == 0.5)
    assert not torch.all(stacked_conv1[:channels] == 0.5)


def test_a_checkpoint_loads_into_a_stacked_run_and_back():
    torch.manual_seed(0)
    trained = build("resnet20", num_classes=5, num_students=2, image_size=16)
    trained.stack()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    torch.manual_seed(1)
    fresh = build("resnet20", num_classes=5, num_students=2, image_size=16)
    fresh.stack()
    fresh.load_state_dict(saved)
    # The stack reads the loaded weights (load_state_dict writes into the shared tensors in place).
    x = torch.randn(2, 3, 16, 16)
    fresh.form.stacks["backbones"].eval()
    trained.students[0].eval()
    logits, _ = fresh.form.stacks["backbones"](x)
    torch.testing.assert_close(logits[0], trained.students[0](x)[0])
    unstacked = build("resnet20", num_classes=5, num_students=2, image_size=16)
    unstacked.load_state_dict(saved)


def test_every_architecture_of_the_zoo_stacks():
    """DenseNet and GoogLeNet included: their concatenations over channels (``cat_channels``) stay network by
    network (what they compute stacked: ``test_stack_computes_what_the_networks_compute``)."""
    assert [name for name in models.names() if models.stack_blocker(name) is not None] == []
    for name in CONCATENATING:
        nets = build(name, num_classes=5, num_students=2, image_size=8, probe_forward=False)
        nets.stack()
        assert nets.form.stacks["backbones"].count == 3


def test_a_blocked_architecture_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(models._STACK_BLOCKERS, "resnet", "its forward concatenates channels with torch.cat")
    nets = build("resnet20", num_classes=5, num_students=2, image_size=16)
    with pytest.raises(UserError, match="--stack-networks: resnet20 cannot be stacked: its forward concatenates"):
        nets.stack()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_cat_channels_joins_each_network_own_channels(channels_last):
    """Unstacked it is ``torch.cat(tensors, 1)``, bit for bit; in a stacked forward of ``G`` networks, network
    ``g``'s slice of the output is the ``torch.cat`` of its slices of the inputs, in the inputs' memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    groups, widths = 3, (4, 1, 6)
    tensors = [torch.randn(2, groups * c, 5, 7).contiguous(memory_format=fmt) for c in widths]
    plain = cat_channels(tensors)
    assert torch.equal(plain, torch.cat(tensors, 1)) and plain.stride() == torch.cat(tensors, 1).stride()
    with stacked_groups(groups):
        joined = cat_channels(tensors)
    assert stacked_group_count() == 1  # restored on the way out
    assert joined.shape == (2, groups * sum(widths), 5, 7)
    assert joined.is_contiguous(memory_format=fmt)
    for g, out in enumerate(joined.chunk(groups, 1)):
        assert torch.equal(out, torch.cat([t.chunk(groups, 1)[g] for t in tensors], 1)), g


def test_networks_of_different_architectures_are_refused():
    with pytest.raises(StackingError, match="different classes"):
        StackedNetworks([models.create("resnet20", 5), models.create("wrn16_2", 5)])
    with pytest.raises(StackingError, match="differ in their layers"):
        StackedNetworks([models.create("resnet20", 5), models.create("resnet32", 5)])


@pytest.mark.parametrize("method", ["ffsd", "dml"])
def test_stacked_evaluation_gives_the_per_network_logits(method):
    """Evaluation runs every network in one stacked pass: the same logits as one by one (float64)."""
    torch.set_default_dtype(torch.float64)
    try:
        separate = build("resnet20", num_classes=5, num_students=2, image_size=16, method=method)
        stacked = copy.deepcopy(separate)
        stacked.stack()
        x = torch.randn(4, 3, 16, 16)
        with torch.no_grad():
            expected = separate.eval().eval_logits(x)
            got = stacked.eval().eval_logits(x)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-12, msg=name)
        assert not any(m.training for s in stacked.form.stacks.values() for m in s.modules())
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("method", ["ffsd", "dml"])
def test_stacks_compile_without_a_graph_break(method):
    """``--compile`` with stacked networks compiles each stack (``Method.compile_networks``): one graph each, under
    bf16 autocast too. ``torch._dynamo.explain`` traces without Inductor, so no C++ compiler is needed."""
    import torch._dynamo as dynamo

    nets = build("resnet20", num_classes=5, num_students=2, image_size=16, method=method)
    nets.stack()
    x = torch.randn(4, 3, 16, 16)
    stacks = nets.form.stacks
    inputs = {"backbones": x, "students": x, "decoders": torch.randn(4, 2 * 64, 4, 4)}
    for name, stack in stacks.items():
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                explained = dynamo.explain(stack)(inputs[name])
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, explained.break_reasons)
    compiled = []
    for stack in stacks.values():
        stack.compile = lambda stack=stack: compiled.append(stack)
    nets.compile_networks()
    assert compiled == list(stacks.values())


def sync_batchnorm_pair(method: str) -> tuple:
    """A method with ``--sync-bn``'s layers (``convert_sync_batchnorm``, as the trainer converts it), per-network
    and, from the same state, stacked."""
    separate = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        build("resnet20", num_classes=5, num_students=2, image_size=16, method=method)
    )
    stacked = copy.deepcopy(separate)
    stacked.stack()
    return separate, stacked


def sync_batchnorm_widths(network: torch.nn.Module) -> list[int]:
    return [m.num_features for m in network.modules() if isinstance(m, torch.nn.SyncBatchNorm)]


@pytest.mark.parametrize("method", ["ffsd", "dml"])
def test_sync_batchnorm_stacks_as_one_over_the_stacked_channels(method):
    """``--sync-bn`` stacked: every SyncBatchNorm of the networks becomes one ``StackedSyncBatchNorm`` over ``G·C``
    channels (none is left a plain BatchNorm, which would not synchronise), with the group's process group."""
    separate, stacked = sync_batchnorm_pair(method)
    groups = stacked.stack_groups()
    for name, stack in stacked.form.stacks.items():
        layers = [m for m in stack.modules() if isinstance(m, StackedBatchNorm2d)]
        assert layers and all(type(m) is StackedSyncBatchNorm for m in layers), name
        widths = sync_batchnorm_widths(groups[name][0])
        assert [m.running_mean.numel() for m in layers] == [stack.count * w for w in widths], name
        assert [m.weight.numel() for m in layers] == [stack.count * w for w in widths], name
        assert all(m.process_group is None for m in layers)  # the default group, as convert_sync_batchnorm's
    # The state dict is the per-network one, key for key and value for value, and loads back.
    expected = separate.state_dict()
    got = stacked.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    other = copy.deepcopy(separate)
    other.load_state_dict(got)
    stacked.load_state_dict(expected)


@pytest.mark.parametrize("method", ["ffsd", "dml"])
def test_sync_batchnorm_stacked_in_one_process_computes_what_the_networks_compute(method):
    """Outside a process group SyncBatchNorm is plain BatchNorm (as ``nn.SyncBatchNorm``'s own fallback): one
    training step stacked gives every parameter and statistic of the per-network one, and evaluation its logits
    (float64). The synchronised path needs NCCL: ``test_sync_batchnorm_stacked_synchronises_on_cuda``."""
    torch.set_default_dtype(torch.float64)
    try:
        separate, stacked = sync_batchnorm_pair(method)
        images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
        lambdas = torch.ones(len(separate.lambdas))
        for nets in (separate, stacked):
            train_step(nets, make_optimizers(nets), images, labels, lambdas)
        expected, got = separate.state_dict(), stacked.state_dict()
        for key, value in expected.items():
            assert_close(got[key].double(), value.double(), 1e-10, key, scale=1.0)
        with torch.no_grad():
            expected_logits = separate.eval().eval_logits(images)
            got_logits = stacked.eval().eval_logits(images)
        for name, value in expected_logits.items():
            torch.testing.assert_close(got_logits[name], value, rtol=1e-10, atol=1e-10, msg=name)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.cuda
def test_sync_batchnorm_stacked_synchronises_on_cuda(tmp_path):
    """The synchronised path (NCCL, a one-process group): the stacked layer's statistics reduced over the group give
    each network's output, gradients and running statistics of its own SyncBatchNorm's synchronised path."""
    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        networks = [torch.nn.SyncBatchNorm(16).cuda() for _ in range(3)]
        for g, network in enumerate(networks):  # statistics and affine parameters of their own
            with torch.no_grad():
                network.weight.uniform_(0.5, 1.5), network.bias.uniform_(-1, 1)
                network.running_mean.fill_(g), network.running_var.fill_(g + 1)
        copies = copy.deepcopy(networks)
        stacked = StackedSyncBatchNorm(copies).train()
        x = torch.randn(8, 48, 5, 5, device="cuda", requires_grad=True)
        out = stacked.synchronised(x, world_size=1)
        slices = x.detach().chunk(3, dim=1)
        inputs = [s.clone().requires_grad_() for s in slices]
        expected = [
            sync_batch_norm.apply(
                i, n.weight, n.bias, n.running_mean, n.running_var, n.eps, n.momentum, dist.group.WORLD, 1
            )
            for i, n in zip(inputs, networks, strict=True)
        ]
        torch.testing.assert_close(out, torch.cat(expected, dim=1))
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        sum((e * w).sum() for e, w in zip(expected, weights.chunk(3, dim=1), strict=True)).backward()
        torch.testing.assert_close(x.grad, torch.cat([i.grad for i in inputs], dim=1))
        torch.testing.assert_close(stacked.weight.grad, torch.cat([n.weight.grad for n in networks]))
        for network, copied in zip(networks, copies, strict=True):  # the statistics land in the networks' buffers
            torch.testing.assert_close(copied.running_mean, network.running_mean)
            torch.testing.assert_close(copied.running_var, network.running_var)
    finally:
        dist.destroy_process_group()
