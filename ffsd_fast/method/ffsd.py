"""FFSD (Li et al., TNNLS 2022): ``m`` students, a fusion module, a leader with its trans-fusion head, and the
self-distillation decoders; only the leader's backbone is kept. The loss terms are ``docs/method.md``'s.

Its networks besides the backbones are plain modules, sized from the model registry (no dummy forward pass, except
the reference's probe, a quirk). Every path between networks is cut by ``detach`` (the spec's ``sg``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast import models
from ffsd_fast.method.base import Method, NetworkSpec, ParamGroup, TermTable, create_students, option
from ffsd_fast.method.forms import Group
from ffsd_fast.method.registry import register
from ffsd_fast.models.init import reference_conv_init_
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


@register
class FFSD(Method):
    """All networks of an FFSD run. ``decoders[i − 1]`` belongs to student ``i`` (0-based, ``i ≥ 1``).

    Settings read: ``temperature``; ``lambda_div`` (0 switches the diversity and student SD terms off, as the
    reference does); ``quirk_student_sd_lambda_div`` (the students' SD term weighted by λ_div, not λ_sd);
    ``quirk_probe_forward``; ``fusion_kernel`` (``triton``: the fusion module and the head run the fused Triton
    fusion block; the weights and state dict are the same either way); ``kernels``.
    """

    name = "ffsd"
    summary = "FFSD: students, fusion module, leader and self-distillation decoders; the leader is kept"
    min_students = (2, "the mutual and diversity terms need two")
    lambdas = ("lambda_div", "lambda_sd", "lambda_f")
    labels = {"fusion": "fusion module", "leader": "leader"}
    deployed, deployed_prefix, reported = "leader", "leader.backbone.", "leader"
    # The paper's leader top-1 (%): CIFAR-100 its three runs as a range, ImageNet one run (Li et al., TNNLS 2022).
    published = {
        ("cifar100", "resnet20"): (72.58, 72.88),
        ("cifar100", "resnet32"): (74.82, 74.92),
        ("cifar100", "resnet56"): (75.66, 75.91),
        ("cifar100", "wrn16_2"): (75.69, 75.87),
        ("cifar100", "wrn40_2"): (79.11, 79.19),
        ("cifar100", "densenet40"): (77.17, 77.70),
        ("cifar100", "googlenet"): (81.34, 81.93),
        ("imagenet", "resnet18"): (70.87, 70.87),
        ("imagenet", "resnet34"): (74.69, 74.69),
    }
    options = {
        "lambda_div": option(
            float, 1e-5, "FFSD's λ_div: diversity weight (and, by the quirk, the students' SD weight)", at_least=0
        ),
        "lambda_sd": option(float, 1000.0, "FFSD's λ_sd: the decoders' reconstruction weight", at_least=0),
        "lambda_f": option(float, 10.0, "FFSD's λ_f: the leader's fusion, trans-fusion and SD weight", at_least=0),
        "quirk_student_sd_lambda_div": option(
            bool, True, "weight the students' self-distillation term by λ_div, not λ_sd, as the reference does"
        ),
    }
    levers = {"fusion_kernel": ("torch", "triton")}  # cuDNN on torch.cat, or the concat-free Triton block
    defaults = {**Method.defaults, "quirk_probe_forward": True, "fusion_kernel": "torch"}

    def __init__(self, spec: NetworkSpec) -> None:
        """Every network in the reference's order, so that a seeded run draws its weights in the same sequence."""
        super().__init__(spec)
        students = create_students(spec, self.settings["quirk_probe_forward"])
        tap_channels = [c for c, _, _ in models.tap_shapes(spec.model, spec.image_size)]
        channels, m, fused = tap_channels[-1], spec.num_students, self.settings["fusion_kernel"] == "triton"
        self.students = nn.ModuleList(students)
        self.decoders = nn.ModuleList(SelfDistillationDecoder(tap_channels) for _ in range(1, m))
        self.leader_decoder = SelfDistillationDecoder(tap_channels)
        self.fusion = FusionModule(channels, m, spec.num_classes, fused=fused)
        self.leader = Leader(models.create(spec.model, spec.num_classes), channels, m, fused=fused)

    def stack_groups(self) -> dict[str, list[nn.Module]]:
        # The decoders in the order of their inputs in the backbones' last tap: students 1 … m−1, then the leader.
        return {"backbones": [*self.students, self.leader.backbone], "decoders": [*self.decoders, self.leader_decoder]}

    def parameter_groups(self) -> list[ParamGroup]:
        params = lambda *modules: [p for module in modules for p in module.parameters()]  # noqa: E731
        return [
            ParamGroup("sgd", params(*self.students, self.leader), "weight_decay"),
            ParamGroup("sgd", params(self.fusion), "fusion_weight_decay"),
            ParamGroup("adam", params(*self.decoders, self.leader_decoder), "decoder_weight_decay"),
        ]

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        m = len(self.students)
        logits, taps = self.form("backbones", images)  # stacked: every backbone in one pass
        students = {f"student{i}": logits[i] for i in range(m)}
        return {**students, "fusion": self.fusion(taps[-1].select(0, m).value)[0], "leader": logits[m]}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor):  # noqa: ANN201
        """Every network once, then every term. ``lambdas``: ``(λ_div, λ_sd, λ_f)``, warmed up for the epoch."""
        form, ops, m = self.form, self.ops, len(self.students)
        logits, taps = form("backbones", images)  # students 0 … m−1, then the leader
        trans_fused = self.leader.head(taps[-1][m])
        # The students' last maps side by side: stacked, a channel slice of the stack's last tap (no concatenation).
        last = taps[-1].select(0, m).detach()
        fusion_logits, fused = self.fusion(last.value)
        fused = fused.detach()
        # The decoders' eval pass (the SD targets: students 1 … m−1 from the previous student's shifted map, the
        # leader's from the fused map) comes before their training pass, which must not have moved the BN statistics.
        diversity = self.settings["lambda_div"] > 0
        shifted = [ops.diversity_shift(last[i - 1]) if diversity else None for i in range(1, m)]
        targets = form("decoders", Group([*shifted, fused]), eval=True)
        outputs = form("decoders", taps[-1].select(1, m + 1).detach())
        # Each attention map computed once, with its gradient where a term needs one; A(concat(f_1 … f_m)) too.
        maps = form.attention_maps([*taps, *targets, *outputs, Group.of(fused), Group.of(trans_fused), last.whole()])
        stages = len(taps) - 1  # what each decoder reconstructs: stages 1 … K−1
        tap_maps, target_maps, output_maps = maps[: stages + 1], maps[stages + 1 : -3 - stages], maps[-3 - stages : -3]
        fused_map, trans_fused_map, concat_map = (g[0] for g in maps[-3:])
        lambda_div, lambda_sd, lambda_f = lambdas[0], lambdas[1], lambdas[2]
        terms = TermTable(form.distances())
        d = terms.distances
        losses = form.online_distillation_losses(logits, fusion_logits, labels, self.settings["temperature"])
        student_sd_weight = lambda_div if self.settings["quirk_student_sd_lambda_div"] else lambda_sd
        for i in range(m):
            terms.add(f"student{i}.ce", losses[i])
            terms.add(f"student{i}.mutual", losses[m + i])
            if i == 0 or not diversity:
                continue
            terms.add(
                f"student{i}.diversity", ops.diversity_loss(tap_maps[-1][i], tap_maps[-1][i - 1].detach()), lambda_div
            )
            sd = [d(tap_maps[k][i], target_maps[k][i - 1]) for k in range(stages)]
            terms.add(f"student{i}.self_distillation", sd, student_sd_weight)
        for name, value in zip(("fusion.ce", "fusion.kl", "leader.ce", "leader.kl"), losses[2 * m :], strict=True):
            terms.add(name, value)
        terms.add("leader.fusion", d(tap_maps[-1][m], fused_map), lambda_f)
        terms.add("leader.trans_fusion", d(trans_fused_map, concat_map), lambda_f)
        terms.add(
            "leader.self_distillation", [d(tap_maps[k][m], target_maps[k][m - 1]) for k in range(stages)], lambda_f
        )
        for j in range(m):  # decoder j reconstructs network j + 1's taps (students 1 … m−1, then the leader)
            name = f"decoder{j + 1}" if j < m - 1 else "decoder_leader"
            feature = [d(outputs[k][j], taps[k][j + 1].detach()) for k in range(stages)]
            terms.add(f"{name}.feature", feature, lambda_sd)
            attention = [d(output_maps[k][j], tap_maps[k][j + 1].detach()) for k in range(stages)]
            terms.add(f"{name}.attention", attention, lambda_sd)
        return terms.total(lambdas)
