"""``--cuda-graph``: the whole training step captured once as one CUDA graph, then replayed.

Small CIFAR networks are launch-bound: one step is hundreds of small kernels (every network's forward, every loss,
one backward, every optimiser). A graph replays them with one launch. What makes the step capturable is kept
elsewhere: no host synchronisation, static shapes, and the learning rates and λ's in device tensors that the trainer
writes in place. The batch is copied into static input buffers before each replay; a batch of another shape (the
last, partial one of an epoch) runs the same step eagerly, on the same parameters and optimiser state.

Under DDP (``torchrun``) the capture follows PyTorch's recipe (CUDA semantics notes, "Usage with
DistributedDataParallel"): NCCL's async error handling off before the process group is made
(``distributed.init_world``), DDP built on a side stream (``distributed.data_parallel``), and at least
``DDP_WARMUP_STEPS`` eager DDP steps before the capture (DDP settles its buckets and its static graph in its first
iterations, with host-side work that a capture cannot hold).
"""

from typing import Any

import torch

from ffsd_fast.errors import UserError
from ffsd_fast.method.base import LossTerms
from ffsd_fast.step.train_step import TrainStep

# Eager steps before the capture: 3 for one process (cuDNN's and Triton's choices), PyTorch's documented minimum of 11
# under DDP.
WARMUP_STEPS = 3
DDP_WARMUP_STEPS = 11


def check_capturable(device: torch.device, optimizer_impl: str) -> None:
    """One-line errors for what cannot be captured, before any work starts."""
    if device.type != "cuda":
        raise UserError("--cuda-graph captures the step on a CUDA device: this run is on the CPU (drop --cuda-graph)")
    if optimizer_impl == "apex":
        raise UserError(
            "--cuda-graph with --optimizer-impl apex: apex's optimisers take Python-float learning "
            "rates, which a captured graph cannot see change; use fused or foreach"
        )


class CapturedStep:
    """Runs ``step`` like ``step(images, labels)``, replaying a captured graph for batches of the captured
    shape.

    Capture happens on the first batch, after ``warmup`` eager steps on a side stream (they let cuDNN pick its
    algorithms and Triton compile its kernels outside the capture, and DDP settle). Those steps are then undone in
    place (``snapshot`` before, ``undo`` after: device-independent, tested on the CPU), so that training is the eager
    run's: parameters and buffers get their values back, optimiser state that existed before gets its values back,
    state the warm-up created (momentum buffers, Adam's moments and step counts) is zeroed, which is what a first
    step starts from, and the gradient scaler gets its scale and growth count back. In place, because the graph holds
    those tensors' addresses.
    """

    def __init__(self, step: TrainStep, warmup: int = WARMUP_STEPS) -> None:
        self.step = step
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape: tuple[torch.Size, torch.Size] | None = None

    def _state(self) -> list[torch.Tensor]:
        method = self.step.method
        tensors = [*method.parameters(), *method.buffers()]
        for optimizer in self.step.optimizers:
            for state in optimizer.state.values():
                tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return tensors

    def snapshot(self) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
        """Copies of everything a training step changes, for ``undo``."""
        return {id(t): t.detach().clone() for t in self._state()}, self.step.scaler.state_dict()

    def undo(self, saved: tuple[dict[int, torch.Tensor], dict[str, Any]]) -> None:
        """Every step since ``saved = snapshot()`` undone, in place."""
        before, scaler_state = saved
        with torch.no_grad():
            for tensor in self._state():
                if id(tensor) in before:
                    tensor.copy_(before[id(tensor)])
                else:
                    tensor.zero_()
        # In place too (load_state_dict fills the scale and growth tracker that the graph reads), and right whether
        # the warm-up made them or not: the scale may have halved or grown during it. A disabled scaler has none.
        self.step.scaler.load_state_dict(scaler_state)

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        saved = self.snapshot()
        self.static_images, self.static_labels = images.clone(), labels.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(self.static_images, self.static_labels)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_terms = self.step(self.static_images, self.static_labels)
        self.shape = (images.shape, labels.shape)
        self.undo(saved)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> LossTerms:
        if self.graph is None:
            self._capture(images, labels)
            self.graph.replay()
            return self.static_terms
        if (images.shape, labels.shape) != self.shape:
            return self.step(images, labels)
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)
        self.graph.replay()
        return self.static_terms
