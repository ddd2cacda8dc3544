"""FFSD's networks besides the backbones: fusion module, leader with its trans-fusion head, SD decoders.

Everything here is a plain module; the loss terms are in ``losses.py``. Shapes come from the model registry, so
nothing needs a dummy forward pass (except the reference's probe, kept as a quirk in ``build_networks``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.models.init import reference_conv_init_
from ffsd_fast.models.stacking import StackedNetworks
from ffsd_kernels import FusionBlock


class FusionModule(nn.Module):
    """``φ = block(concat(maps))`` with ``block`` m·C → C, and a classifier ``z_F = fc(avgpool(φ))``.

    ``block`` is ``ffsd_kernels.FusionBlock``: the ``nn.Sequential`` depthwise 3×3 → BN → ReLU → 1×1 → BN → ReLU
    (keys ``0.weight``, ``1.*``, ``3.weight``, ``4.*``), computed without the concatenation by fused kernels when
    ``fused``, else by its modules on ``torch.cat``.
    """

    def __init__(self, channels: int, num_inputs: int, num_classes: int, fused: bool = False) -> None:
        super().__init__()
        self.block = FusionBlock(channels, num_inputs, channels, fused=fused)
        self.fc = nn.Linear(channels, num_classes)
        reference_conv_init_(self.block)

    def forward(self, maps: list[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``maps``: the m students' last maps, or the same side by side (``[B, m·C, H, W]``, stacked networks)."""
        fused = self.block(maps)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(fused, 1), 1))
        return logits, fused


class Leader(nn.Module):
    """The backbone plus the trans-fusion head ``τ = block(f^K)`` (C → m·C) on its last stage, the fusion module's
    block with one input.

    Only ``backbone`` is kept after training; the head exists to mimic the students' concatenated maps.
    """

    def __init__(self, backbone: nn.Module, channels: int, num_students: int, fused: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = FusionBlock(channels, 1, channels * num_students, fused=fused)
        # The reference builds the head inside the backbone, before the backbone's conv init runs over both.
        reference_conv_init_(self.head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        logits, taps = self.backbone(x)
        return logits, taps, self.head(taps[-1])


class DecoderBlock(nn.Module):
    """ConvTranspose2d(3, stride 2, padding 1, output_padding 1, no bias) → BN → ReLU: doubles H and W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Attribute names are the reference's ("convtranpose" sic), so its decoder weights load.
        self.convtranpose = nn.ConvTranspose2d(
            in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False
        )
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.convtranpose(x)))


class SelfDistillationDecoder(nn.Module):
    """Maps a last-stage map back to the shapes of stages ``K−1 … 1``; PyTorch's default init.

    Blocks are ``layer0`` (deepest) … ``layer{K−2}``, as in the reference, so its decoder weights load.
    """

    def __init__(self, tap_channels: list[int]) -> None:
        super().__init__()
        deep_to_shallow = tap_channels[::-1]
        self.num_blocks = len(tap_channels) - 1
        for i in range(self.num_blocks):
            self.add_module(f"layer{i}", DecoderBlock(deep_to_shallow[i], deep_to_shallow[i + 1]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns ``[g_1, …, g_{K−1}]`` in stage order (shallowest first), each shaped like that stage's tap."""
        outputs = []
        for i in range(self.num_blocks):
            x = getattr(self, f"layer{i}")(x)
            outputs.append(x)
        return outputs[::-1]


METHODS = ("ffsd", "dml", "independent")


class FFSDNetworks(nn.Module):
    """All networks of one run. ``decoders[i − 1]`` belongs to student ``i`` (0-based, ``i ≥ 1``).

    ``method`` is ``ffsd``, or a baseline trained on the students alone: ``dml`` (deep mutual learning) or
    ``independent`` (plain cross-entropy). The baselines have no decoders, fusion module or leader (``None``).
    """

    def __init__(
        self,
        students: list[nn.Module],
        decoders: list[SelfDistillationDecoder],
        leader_decoder: SelfDistillationDecoder | None,
        fusion: FusionModule | None,
        leader: Leader | None,
        method: str = "ffsd",
    ) -> None:
        super().__init__()
        self.students = nn.ModuleList(students)
        self.decoders = nn.ModuleList(decoders)
        self.leader_decoder = leader_decoder
        self.fusion = fusion
        self.leader = leader
        self.method = method
        # Not a submodule: the stack's tensors are the networks' own (theirs are views into it), so it belongs in
        # no state dict, no .to() and no parameter list.
        self.__dict__["stack"] = None
        self.__dict__["decoder_stack"] = None

    @property
    def num_students(self) -> int:
        return len(self.students)

    @property
    def stacks(self) -> list[StackedNetworks]:
        """The stacked networks the step runs (``stack_backbones``), none by default."""
        return [s for s in (self.stack, self.decoder_stack) if s is not None]

    @property
    def backbones(self) -> list[nn.Module]:
        """The students, then the leader's backbone (when there is one): the order of the stack's networks."""
        return [*self.students, *([self.leader.backbone] if self.leader is not None else [])]

    def stack_backbones(self, model: str) -> None:
        """``--stack-networks``: from now on the training step runs every backbone as one ``StackedNetworks``, and
        the self-distillation decoders as another.

        Call it after the last ``.to(...)``. One-line ``UserError`` for an architecture that cannot be stacked."""
        check_stackable(model)
        self.__dict__["stack"] = StackedNetworks(self.backbones)
        if self.leader_decoder is not None:
            # The decoders of students 1 … m−1 and the leader's, in the order of their inputs in the stack's last tap.
            self.__dict__["decoder_stack"] = StackedNetworks([*self.decoders, self.leader_decoder])


def check_stackable(model: str) -> None:
    """``UserError`` (one line, saying why) unless ``model``'s networks can run stacked (``--stack-networks``)."""
    reason = models.stack_blocker(model)
    if reason is not None:
        raise UserError(
            f"--stack-networks: {model} cannot be stacked: {reason}, which would interleave the networks' "
            "channels (grouped convolutions need them network by network); drop --stack-networks"
        )


def build_networks(
    model: str,
    num_classes: int,
    num_students: int,
    image_size: int,
    probe_forward: bool = True,
    fused_blocks: bool = False,
    method: str = "ffsd",
) -> FFSDNetworks:
    """Builds every network in the reference's order, so that a seeded run draws its weights in the same sequence.

    ``fused_blocks``: the fusion module and the trans-fusion head run the fused Triton fusion block (``--kernels
    triton``); the weights and state dict are the same either way. ``method``: ``ffsd``, or a baseline (``dml``,
    ``independent``) that builds the students alone, drawing their weights as FFSD's run does.

    ``probe_forward`` (quirk, on by default): the reference runs student 1 once in train mode on
    ``randn(1, 3, H, W)`` to read its last stage's shape. That updates student 1's BN running statistics and
    consumes random numbers. Skipped when the last stage is 1×1, where BN cannot train on a single value.
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if num_students < 2 and method != "independent":
        raise UserError(f"{method} needs at least 2 students (the mutual and diversity terms), got {num_students}")
    models.check_image_size(model, image_size)
    taps = models.tap_shapes(model, image_size)
    channels = taps[-1][0]
    students = [models.create(model, num_classes) for _ in range(num_students)]
    if probe_forward and taps[-1][1] * taps[-1][2] > 1:
        probe = torch.randn(1, 3, image_size, image_size)
        students[0].train()
        with torch.no_grad():
            students[0](probe)
    if method != "ffsd":
        return FFSDNetworks(students, [], None, None, None, method)
    tap_channels = [c for c, _, _ in taps]
    decoders = [SelfDistillationDecoder(tap_channels) for _ in range(1, num_students)]
    leader_decoder = SelfDistillationDecoder(tap_channels)
    fusion = FusionModule(channels, num_students, num_classes, fused=fused_blocks)
    leader = Leader(models.create(model, num_classes), channels, num_students, fused=fused_blocks)
    return FFSDNetworks(students, decoders, leader_decoder, fusion, leader)


def compile_networks(nets: FFSDNetworks) -> None:
    """``torch.compile`` every network in place (``nn.Module.compile``: the state-dict keys stay as they are, so
    checkpoints and exports do not change)."""
    for network in [*nets.students, *nets.decoders, nets.leader_decoder, nets.fusion, nets.leader]:
        if network is not None:
            network.compile()
