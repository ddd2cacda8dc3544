"""Data-parallel training under ``torchrun``: one process per GPU (or several CPU processes over gloo).

Every trained network's gradients are averaged by ``torch.nn.parallel.DistributedDataParallel``: one DDP around
the method, a module that holds every network and whose forward computes the step's losses (timm's task-module
pattern), so the all-reduce of each ~``--ddp-bucket-mb`` bucket starts as soon as the backward has filled it and runs
under the rest of the backward. One DDP around the whole step rather than one per network: the same arithmetic and,
on the CPU, the same speed within the noise (``benchmarks/ddp_step.py``, ``benchmarks/results/ddp_step.jsonl``), but
one set of buckets, and nothing that reaches into a network past its DDP wrapper (the stacked step calls
``leader.head`` directly) or that changes when the set of networks changes.

BatchNorm buffers: each rank updates its own running statistics, and
rank 0's are broadcast before every evaluation and checkpoint (``broadcast_state(..., buffers_only=True)``), so that
every rank evaluates, and the checkpoint holds, the same networks. DDP's broadcast of rank 0's buffers before every
forward is off (``broadcast_buffers=False``): training normalises with batch statistics, and the one place where it
reads running ones (the decoders' eval-mode pass that makes the self-distillation targets) sees on each rank an
average over its own batches of the same distribution; a broadcast there would put one more collective on every
step's critical path (before the forward, where nothing overlaps it, and inside a captured graph) and change the
arithmetic of runs made so far. A resume stays exact: the checkpoint holds the statistics that every rank had just
received. ``--sync-bn`` makes the batch statistics global on CUDA (``SyncBatchNorm``).
"""

import contextlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ffsd_fast.errors import UserError
from ffsd_fast.method.base import Method

# --grad-compression: DDP's built-in hooks, which cast each bucket to half precision for the all-reduce (half the
# bytes on the wire) and back to fp32 after it.
COMPRESSION_HOOKS = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
GRAD_COMPRESSION = ("none", *COMPRESSION_HOOKS)

# No buffer broadcast before each forward (why: the module docstring). torch 2.14 calls the switch
# forward_sync_buffers and deprecates broadcast_buffers; torch 2.11 (the GPU machines) knows only broadcast_buffers.
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


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


def init_world(device_type: str, cuda_graph: bool = False) -> World:
    """The process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo on the CPU); a
    single process when ``WORLD_SIZE`` is unset or 1. ``cuda_graph``: the step will be captured with its
    all-reduces inside."""
    world = World(_env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1))
    if not world.distributed:
        return world
    if device_type == "cuda" and cuda_graph:
        # PyTorch's recipe for DDP in a CUDA graph (CUDA semantics notes, "Usage with DistributedDataParallel"): the
        # NCCL watchdog's async error handling polls the collectives' events, which a captured collective does not
        # have. It is read when the process group is made, so it is set before.
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
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


def all_reduce_max(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


class _StackedParameters(torch.nn.Module):
    """What DDP wraps when networks run stacked: the method's forward, over the parameters that its backward gives
    gradients to. Those are the stacks' (the stacked networks' own parameters are views into them, which the
    backward never reaches: the step hands them their slices afterwards) and those of the networks that run on their
    own (FFSD's fusion module and trans-fusion head)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.__dict__["method"] = method  # not a submodule: its stacked networks' parameters get no gradient
        groups = method.stack_groups().values()
        stacked = {id(p) for networks in groups for network in networks for p in network.parameters()}
        self.stacks = torch.nn.ModuleList(method.form.stacks.values())
        self.own = torch.nn.ParameterList([p for p in method.parameters() if id(p) not in stacked])

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor):  # noqa: ANN201
        return self.method(images, labels, lambdas)


def data_parallel(
    method: Method, bucket_mb: float = 25, compression: str = "none", for_capture: bool = False
) -> DistributedDataParallel:
    """One DDP around the method (process group already made, every rank calling this with the same networks): its
    forward is the step's loss terms, its backward averages every gradient over the ranks. ``compression``: one of
    ``GRAD_COMPRESSION``. ``for_capture``: the step will be captured in a CUDA graph."""
    if compression not in GRAD_COMPRESSION:
        raise UserError(f"--grad-compression must be one of {', '.join(GRAD_COMPRESSION)}; got {compression!r}")
    device = next(method.parameters()).device
    # PyTorch's recipe for capturing DDP's backward: DDP built on a side stream (its constructor's work, and the
    # AccumulateGrad nodes that it keeps, then belong to no stream that the capture must follow).
    side = torch.cuda.Stream(device) if for_capture else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        ddp = DistributedDataParallel(
            _StackedParameters(method) if getattr(method.form, "stacks", None) else method,
            device_ids=[device] if device.type == "cuda" else None,
            **NO_FORWARD_BUFFER_SYNC,
            bucket_cap_mb=bucket_mb,
            # Every step runs the same graph over the same parameters: DDP records it once (which parameters get a
            # gradient, in which order) and then needs no per-step search for unused parameters.
            static_graph=True,
            # The gradients are views into the buckets that DDP all-reduces: no copy into and out of them each step,
            # and no second copy of every gradient in memory.
            gradient_as_bucket_view=True,
        )
        if compression != "none":
            ddp.register_comm_hook(None, COMPRESSION_HOOKS[compression])
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    return ddp
