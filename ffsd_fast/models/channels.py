"""Concatenation over channels that stays inside each stacked network's channels (``models.stacking``).

A network whose forward concatenates channels (DenseNet's dense layers, GoogLeNet's inception modules) calls
``cat_channels`` instead of ``torch.cat(tensors, 1)``. Run on its own it is that very call. Run stacked, every
tensor is ``[N, G·C_i, H, W]`` with network ``g``'s channels in the slice ``[g·C_i, (g+1)·C_i)``, and a plain
``torch.cat`` would put all the networks' first inputs before all their second ones; ``cat_channels`` joins them
network by network instead, so that the output keeps the stacked layout ``[N, G·ΣC_i, H, W]``.

The group count ``G`` is set by ``StackedNetworks.forward`` for the duration of its forward (``stacked_groups``), so
that the networks' forward code need not know whether it runs stacked. It is held per thread: a ``threading.local``
rather than a ``ContextVar``, because ``torch.compile`` traces reads and writes of the former without a graph break
(it refuses ``ContextVar.set``), and forwards in other threads (``nn.DataParallel``'s replicas) keep their own.
"""

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

_state = threading.local()


def stacked_group_count() -> int:
    """How many networks the forward now running stacks (1 outside a stacked forward)."""
    return getattr(_state, "groups", 1)


@contextmanager
def stacked_groups(groups: int) -> Iterator[None]:
    """Within it, ``cat_channels`` joins ``groups`` stacked networks' channels network by network."""
    previous = stacked_group_count()
    _state.groups = groups
    try:
        yield
    finally:
        _state.groups = previous


def cat_channels(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors, 1)`` of each network's maps: ``[N, G·C_i, H, W]`` each → ``[N, G·ΣC_i, H, W]``.

    Stacked, the maps are viewed as ``[N, G, C_i, H, W]`` and joined on ``C_i``: one ``cat``, as unstacked, and
    views on either side. Channels-last maps are joined in their own memory order (``[N, H, W, G, C_i]``), so the
    output stays channels-last as ``torch.cat`` keeps it, at no cost.
    """
    groups = stacked_group_count()
    if groups == 1:
        return torch.cat(tensors, 1)
    if _channels_last(tensors[0]):
        pieces = [t.permute(0, 2, 3, 1).unflatten(3, (groups, -1)) for t in tensors]  # [N, H, W, G, C_i], views
        return torch.cat(pieces, 4).flatten(3).permute(0, 3, 1, 2)
    return torch.cat([t.unflatten(1, (groups, -1)) for t in tensors], 2).flatten(1, 2)


def _channels_last(t: torch.Tensor) -> bool:
    # A map whose layout reads both ways (1×1 spatial) takes the NCHW path, whose output is then both as well.
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
