"""Several networks of one architecture run as one: grouped convolutions, channels laid out network by network.

``StackedNetworks(networks)`` runs ``G`` networks that read the same input in one forward: the first convolution
(which reads the shared input) becomes one dense convolution to ``G·C`` channels, every later one a grouped
convolution with ``G`` times the groups, every BatchNorm one over ``G·C`` channels, every classifier one batched
matmul. The networks' own forward code runs unchanged on the stacked tensors (every op between those layers is
per channel: ReLU, pooling, residual additions; a concatenation over channels goes through
``models.channels.cat_channels``, which the stack's forward makes join the channels network by network), so a tap
of the stack is the networks' taps side by side, and network ``g``'s tap is the channel slice ``[g·C, (g+1)·C)``:
a view, no copy.

Why: a small CIFAR network is bound by the number of kernels it launches, not by its arithmetic. Stacked, ``G``
networks launch the kernels of one, each ``G`` times larger.

It is an execution detail. The networks keep their modules, parameters and buffers, state dicts, optimiser state
and forwards (evaluation runs them one by one): their parameters and buffers are re-pointed, in place, at slices
of the stack's tensors, so that the two always hold the same values. After a backward through the stack,
``share_grads`` hands each network's parameters their slices of the stack's gradients (views, no copy), which is
where their optimisers read them. Stack after the last ``.to(...)``: moving or converting a network gives it new
tensors, which the stack no longer sees.

An architecture whose forward concatenates channels with a plain ``torch.cat`` cannot be stacked this way: the
concatenation would interleave the networks' channels, and a grouped convolution needs each group's channels
contiguous. ``models.stack_blocker`` names any such architecture (none in the zoo today).
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm  # what nn.SyncBatchNorm itself applies

from ffsd_fast.models.channels import stacked_groups


class StackingError(ValueError):
    """These networks cannot run as one stacked network (the message says why)."""


def _stack_parameter(sources: list[torch.Tensor], dim: int | None) -> nn.Parameter:
    """One parameter holding ``sources`` concatenated (``dim=0``) or stacked (``dim=None``); each source is then
    re-pointed at its slice, keeping its identity (optimisers and hooks hold it)."""
    data = torch.cat([s.detach() for s in sources]) if dim == 0 else torch.stack([s.detach() for s in sources])
    if sources[0].dim() == 4:  # keep the sources' memory format (channels-last weights stay channels-last)
        data = data.contiguous(memory_format=_memory_format(sources[0]))
    stacked = nn.Parameter(data, requires_grad=sources[0].requires_grad)
    for g, view in enumerate(_slices(stacked, len(sources), dim)):
        sources[g].data = view.view(sources[g].shape)
    return stacked


def _stack_buffer(sources: list[torch.Tensor]) -> torch.Tensor:
    data = torch.cat([s.detach().reshape(-1) for s in sources])
    for g, view in enumerate(data.chunk(len(sources))):
        sources[g].data = view.view(sources[g].shape)
    return data


def _slices(stacked: torch.Tensor, count: int, dim: int | None) -> list[torch.Tensor]:
    return list(stacked.detach().chunk(count)) if dim == 0 else list(stacked.detach().unbind(0))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class _StackedWeights(nn.Module):
    """A stacked layer with a weight (and bias) that autocast casts: ``StackedNetworks.forward`` puts this forward's
    low-precision views of them in ``cast``, which ``weights`` prefers."""

    def __init__(self, sources: list[nn.Module], dim: int | None) -> None:
        super().__init__()
        self.count = len(sources)
        self.weight = _stack_parameter([s.weight for s in sources], dim)
        self.bias = _stack_parameter([s.bias for s in sources], dim) if sources[0].bias is not None else None
        self.cast: dict[str, torch.Tensor] = {}

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.cast.get("weight", self.weight), self.cast.get("bias", self.bias)


class _StackedConvolution(_StackedWeights):
    """What a stacked convolution and transposed convolution share: their configuration, weights joined along dim 0
    (output channels for one, input channels for the other: the groups' blocks either way)."""

    kind = "convolution"

    def __init__(self, sources: list[nn.Conv2d] | list[nn.ConvTranspose2d]) -> None:
        first = sources[0]
        if first.padding_mode != "zeros":
            raise StackingError(f"a {self.kind} with padding_mode={first.padding_mode!r} cannot be stacked")
        super().__init__(sources, 0)
        self.in_channels, self.groups = first.in_channels, first.groups
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation

    def check_stacked(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.count * self.in_channels:
            raise StackingError(
                f"stacked {self.kind} of {self.count} × {self.in_channels} input channels got {x.shape[1]}"
            )


class StackedConv2d(_StackedConvolution):
    """``G`` copies of one ``Conv2d``: dense to ``G·C_out`` on a shared input of ``C_in`` channels, grouped (``G``
    times the groups) on a stacked input of ``G·C_in``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights()
        if x.shape[1] == self.in_channels and self.groups == 1:
            groups = 1  # the shared input: one dense convolution computes every network's output channels
        else:
            self.check_stacked(x)
            groups = self.count * self.groups
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class StackedConvTranspose2d(_StackedConvolution):
    """``G`` copies of one ``ConvTranspose2d`` on a stacked input of ``G·C_in`` channels: one transposed convolution
    with ``G`` times the groups (its weight ``[C_in, C_out / groups, k, k]`` joins along the input channels)."""

    kind = "transposed convolution"

    def __init__(self, sources: list[nn.ConvTranspose2d]) -> None:
        super().__init__(sources)
        self.output_padding = sources[0].output_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights()
        self.check_stacked(x)
        return F.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, self.output_padding, self.count * self.groups, self.dilation
        )


class StackedBatchNorm2d(nn.Module):
    """``G`` copies of one ``BatchNorm2d`` as one over ``G·C`` channels (each channel's statistics are its own).

    ``num_batches_tracked`` is left to the stack, which increments every layer's counters in one op."""

    def __init__(self, sources: list[nn.BatchNorm2d]) -> None:
        super().__init__()
        first = sources[0]
        if first.momentum is None or not first.track_running_stats:
            # A cumulative average reads the counter in every layer; untracked statistics have none to share.
            raise StackingError("a BatchNorm without running statistics or with momentum=None cannot be stacked")
        self.momentum, self.eps = first.momentum, first.eps
        self.weight = _stack_parameter([s.weight for s in sources], 0) if first.affine else None
        self.bias = _stack_parameter([s.bias for s in sources], 0) if first.affine else None
        self.register_buffer("running_mean", _stack_buffer([s.running_mean for s in sources]))
        self.register_buffer("running_var", _stack_buffer([s.running_var for s in sources]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )


class StackedSyncBatchNorm(StackedBatchNorm2d):
    """``G`` copies of one ``SyncBatchNorm`` (``--sync-bn``) as one over ``G·C`` channels whose batch statistics are
    reduced across the processes of its group: each of the ``G·C`` channels is its own, so one synchronised
    normalisation over the stacked channels is the ``G`` networks' synchronised ones side by side (one all-gather of
    the stack's statistics instead of one per network and layer).

    It synchronises exactly when ``nn.SyncBatchNorm`` would (training, a process group of more than one process, on
    a device NCCL serves); otherwise, as there, it is the plain batch normalisation of its base class."""

    def __init__(self, sources: list[nn.SyncBatchNorm]) -> None:
        super().__init__(sources)
        self.process_group = sources[0].process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_size = self._sync_world_size()
        return super().forward(x) if world_size <= 1 else self.synchronised(x, world_size)

    def synchronised(self, x: torch.Tensor, world_size: int) -> torch.Tensor:
        """The training normalisation with the statistics of the group's ``world_size`` processes."""
        if x.device.type == "cpu":
            raise StackingError("SyncBatchNorm synchronises over NCCL: its input must be on a GPU, not the CPU")
        group = self.process_group or torch.distributed.group.WORLD
        return sync_batch_norm.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum, group, world_size
        )

    def _sync_world_size(self) -> int:
        """The processes whose statistics this forward reduces: 1 (none to reduce with) in eval mode or alone."""
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        return torch.distributed.get_world_size(self.process_group or torch.distributed.group.WORLD)


class StackedLinear(_StackedWeights):
    """``G`` copies of one ``Linear`` as one batched matmul: ``[N, G·C] → [G, N, K]`` (network ``g``'s logits are
    ``out[g]``, a contiguous view)."""

    def __init__(self, sources: list[nn.Linear]) -> None:
        super().__init__(sources, None)  # weight [G, K, C]
        self.in_features = sources[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights()
        x = x.reshape(x.shape[0], self.count, self.in_features).transpose(0, 1)  # [G, N, C], a view
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _memory_order(t: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """``t`` flattened in the order of a tensor of those ``strides`` (a view when ``t`` has them, else a copy)."""
    order = sorted(range(t.dim()), key=lambda d: -strides[d])
    return t.permute(order).reshape(-1)


class _CastWeights(torch.autograd.Function):
    """Every convolution and classifier weight of the stack in the autocast dtype: one cast of the fp32 buffer that
    holds them all, and views into it (autocast would cast them one by one, a kernel each, forward and backward).
    The backward joins the weights' gradients in that buffer's order, one ``cat`` and one cast."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, dtype: torch.dtype, layouts: list) -> tuple[torch.Tensor, ...]:
        ctx.layouts = layouts
        low = flat.to(dtype)
        return tuple(low.as_strided(shape, stride, offset) for shape, stride, offset in layouts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        pieces = [
            _memory_order(g, stride) if g is not None else torch.zeros(math.prod(shape), device=grads[0].device)
            for g, (shape, stride, _) in zip(grads, ctx.layouts, strict=True)
        ]
        return torch.cat(pieces).float(), None, None


_STACKED = {
    nn.Conv2d: StackedConv2d,
    nn.ConvTranspose2d: StackedConvTranspose2d,
    nn.BatchNorm2d: StackedBatchNorm2d,
    nn.SyncBatchNorm: StackedSyncBatchNorm,
    nn.Linear: StackedLinear,
}


class StackedNetworks(nn.Module):
    """``networks`` (one architecture, ``G ≥ 1`` of them) as one network; ``forward(x)`` returns what theirs
    returns, stacked: for a backbone ``(logits [G, N, K], [tap_1 … tap_K])`` with taps ``[N, G·C_k, H_k, W_k]``,
    for a decoder its list of maps (``split`` separates them network by network).

    Built in train mode (BatchNorm uses batch statistics and updates the running ones); ``eval()`` uses the running
    statistics, as the networks' own modules would. Its parameters are not the networks' parameters (those are views
    into them), so it belongs in no state dict and no optimiser.
    """

    def __init__(self, networks: list[nn.Module]) -> None:
        super().__init__()
        if not networks:
            raise StackingError("nothing to stack")
        kinds = {type(n).__name__ for n in networks}
        if len(kinds) > 1:
            raise StackingError(f"networks of different classes cannot be stacked: {sorted(kinds)}")
        layout = [_layout(n) for n in networks]
        if any(other != layout[0] for other in layout[1:]):
            raise StackingError("the networks differ in their layers or parameter shapes")
        self.count = len(networks)
        self.body = copy.deepcopy(networks[0])  # the forward code and the module tree; its layers are replaced
        # (stack parameter, the networks' parameters that are its slices, the dim they were joined on)
        self._shared: list[tuple[nn.Parameter, list[nn.Parameter], int | None]] = []
        counters = []
        for name, module in list(self.body.named_modules()):
            sources = [n.get_submodule(name) for n in networks]
            stacked_class = _STACKED.get(type(module))
            if stacked_class is None:
                if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(False)):
                    raise StackingError(f"layer {name!r} ({type(module).__name__}) has state and cannot be stacked")
                continue  # a container, or a block whose forward composes the layers (BasicBlock, WideBasic)
            if not name:
                raise StackingError(f"a bare {type(module).__name__} is not a network")
            _check_same_config(name, sources)
            stacked = stacked_class(sources)
            parent, _, child = name.rpartition(".")
            setattr(self.body.get_submodule(parent) if parent else self.body, child, stacked)
            dim = None if stacked_class is StackedLinear else 0
            for key in ("weight", "bias"):
                if getattr(stacked, key, None) is not None:
                    self._shared.append((getattr(stacked, key), [getattr(s, key) for s in sources], dim))
            if issubclass(stacked_class, StackedBatchNorm2d):
                counters += [s.num_batches_tracked for s in sources]
        # Every BatchNorm's num_batches_tracked, of every network, in one tensor: one increment per forward.
        self.register_buffer("counters", _stack_buffer(counters) if counters else torch.zeros(0, dtype=torch.long))
        self._build_flat()
        self.train()

    def _build_flat(self) -> None:
        """Puts every convolution and classifier weight and bias (the ones autocast casts) in one fp32 buffer,
        ``flat``, which the stack's parameters and the networks' (slices of them) then view."""
        self._flat_used = False
        self._cast_layers = [m for m in self.body.modules() if isinstance(m, _StackedWeights)]
        members = [(m, key) for m in self._cast_layers for key in ("weight", "bias") if getattr(m, key) is not None]
        self._cast_members = members
        self._in_flat = {id(getattr(m, key)) for m, key in members}
        if not members:
            self.flat = None
            return
        sources = {id(stacked): group for stacked, group, _ in self._shared}
        flat = torch.cat([_memory_order(getattr(m, key).detach(), getattr(m, key).stride()) for m, key in members])
        self.flat = nn.Parameter(flat)
        self._layouts, offset = [], 0
        for m, key in members:
            param = getattr(m, key)
            layout = (tuple(param.shape), param.stride(), offset)
            for source in sources[id(param)]:  # the networks' slices: the same place in the new buffer
                source.data = self.flat.detach().as_strided(
                    source.shape, source.stride(), offset + source.storage_offset() - param.storage_offset()
                )
            param.data = self.flat.detach().as_strided(*layout)
            self._layouts.append(layout)
            offset += param.numel()

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - what the networks' forward returns, stacked
        if self.training and self.counters.numel():
            self.counters.add_(1)
        with stacked_groups(self.count):  # the networks' concatenations over channels, network by network
            return self._forward_body(x)

    def _forward_body(self, x: torch.Tensor):  # noqa: ANN202 - as forward
        device = x.device.type
        self._flat_used = self.flat is not None and torch.is_autocast_enabled(device)
        if not self._flat_used:
            return self.body(x)
        views = _CastWeights.apply(self.flat, torch.get_autocast_dtype(device), self._layouts)
        for (module, key), view in zip(self._cast_members, views, strict=True):
            module.cast[key] = view
        try:
            return self.body(x)
        finally:
            for module in self._cast_layers:
                module.cast.clear()

    def split(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """Network by network: ``[G, N, K]`` logits by ``g``, ``[N, G·C, H, W]`` taps by channel slice (views)."""
        if stacked.dim() == 3:
            return list(stacked.unbind(0))
        return list(stacked.chunk(self.count, dim=1))

    def share_grads(self) -> None:
        """Gives every network parameter its slice of the stack's gradient (a view; None where the stack has none).

        Call it after each backward through the stack, before the optimisers step."""
        flat_grad = self.flat.grad if self._flat_used else None
        for stacked, sources, dim in self._shared:
            if flat_grad is not None and id(stacked) in self._in_flat:  # the gradient came through the cast buffer
                for source in sources:
                    source.grad = flat_grad.as_strided(source.shape, source.stride(), source.storage_offset())
                continue
            if stacked.grad is None:
                for source in sources:
                    source.grad = None
                continue
            for source, grad in zip(sources, _slices(stacked.grad, self.count, dim), strict=True):
                source.grad = grad.view(source.shape)


def _layout(network: nn.Module) -> tuple:
    """Every module's name and class, every parameter's and buffer's name and shape."""
    modules = tuple((name, type(m)) for name, m in network.named_modules())
    tensors = tuple((name, tuple(t.shape)) for name, t in [*network.named_parameters(), *network.named_buffers()])
    return modules, tensors


def _check_same_config(name: str, sources: list[nn.Module]) -> None:
    def config(m: nn.Module) -> tuple:
        skip = {"training", "_parameters", "_buffers", "_modules"}
        return tuple(sorted((k, repr(v)) for k, v in vars(m).items() if k not in skip and not k.startswith("_")))

    if any(config(s) != config(sources[0]) for s in sources[1:]):
        raise StackingError(f"layer {name!r} is configured differently in the networks")
