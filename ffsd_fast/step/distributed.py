"""Data-parallel training under ``torchrun``: one process per GPU (or several CPU processes over gloo).

The FFSD step runs every network forward, sums every loss and calls one backward, so the networks are kept in sync
by one averaging of all their gradients between that backward and the optimisers' steps (``GradientAverager``),
rather than by a ``DistributedDataParallel`` wrapper per network: the same arithmetic as DDP (every rank applies the
mean gradient), one code path for students, fusion module, leader and decoders, and nothing in it that a CUDA graph
or ``torch.compile`` cannot take. BatchNorm statistics stay per rank (each normalises its own batch, as under DDP);
``--sync-bn`` makes them global on CUDA, and rank 0's running statistics are broadcast before every evaluation
and checkpoint, as DDP's buffer broadcast would.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ffsd_fast.errors import UserError

# Gradients are averaged in buckets of about this many bytes: few collectives, bounded extra memory.
BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = World()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer (set by torchrun)") from None


def init_world(device_type: str) -> World:
    """The process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo on the CPU); a
    single process when ``WORLD_SIZE`` is unset or 1."""
    world = World(_env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1))
    if not world.distributed:
        return world
    if device_type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} CUDA "
                "device(s): start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": torch.device("cuda", world.local_rank)} if device_type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
    return world


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (a run directory, a resume path, the list of corrupt files)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(world: World, work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0, its result on every rank; a ``UserError`` there is raised on every rank (instead of
    the others waiting forever for a result)."""
    outcome = None
    if world.is_main:
        try:
            outcome = ("ok", work())
        except UserError as error:
            outcome = ("error", str(error))
    kind, value = broadcast_object(outcome, world)
    if kind == "error":
        raise UserError(value)
    return value


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_state(module: torch.nn.Module, world: World, buffers_only: bool = False) -> None:
    """Rank 0's parameters (unless ``buffers_only``) and buffers on every rank, in place."""
    if not world.distributed:
        return
    tensors = [*([] if buffers_only else module.parameters()), *module.buffers()]
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor


class GradientAverager:
    """Replaces every parameter's gradient by its mean over the ranks: coalesced into ~64 MiB buckets per dtype
    and device, one ``all_reduce`` each, in a fixed order (the same on every rank)."""

    def __init__(self, parameters: list[torch.nn.Parameter], world: World) -> None:
        self.parameters, self.world = [p for p in parameters if p.requires_grad], world

    def _buckets(self) -> list[list[torch.Tensor]]:
        buckets, current, size, key = [], [], 0, None
        for p in self.parameters:
            if p.grad is None:
                # Every rank runs the same graph, so a missing gradient is missing everywhere; a zero keeps the
                # buckets identical across ranks regardless.
                p.grad = torch.zeros_like(p)
            grad_key = (p.grad.dtype, p.grad.device)
            if current and (grad_key != key or size + p.grad.numel() * p.grad.element_size() > BUCKET_BYTES):
                buckets.append(current)
                current, size = [], 0
            current.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            key = grad_key
        return buckets + ([current] if current else [])

    def __call__(self) -> None:
        if not self.world.distributed:
            return
        for grads in self._buckets():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat.div_(self.world.world_size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
