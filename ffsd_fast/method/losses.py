"""FFSD's loss terms for one batch, as ``ffsd-spec.md`` states them, in one forward over every network.

``ffsd_losses`` returns every term unweighted together with its weight, and the weighted total; weights are applied
here and nowhere else. Every path between networks is cut by ``detach`` (the spec's ``sg``), so one backward of the
total gives each network exactly the gradient of its own loss.
"""

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

import ffsd_kernels
import ffsd_kernels.reference
from ffsd_fast.method.networks import FFSDNetworks, SelfDistillationDecoder


def kernel_ops(name: str) -> ModuleType:
    """The loss library behind ``--kernels``: the fused ops (Triton on CUDA tensors, their references elsewhere) or
    the plain PyTorch references under the same names."""
    return ffsd_kernels if name == "triton" else ffsd_kernels.reference


# Index of each λ in the device tensor that the step receives (warmed up by the trainer each epoch).
LAMBDA_DIV, LAMBDA_SD, LAMBDA_F = 0, 1, 2


@dataclass(frozen=True)
class LossOptions:
    temperature: float = 2.0
    # quirk: the students' self-distillation term is weighted by λ_div (1e-5, nearly off), not λ_sd.
    student_sd_uses_lambda_div: bool = True
    # The reference skips the diversity and student SD terms entirely when λ_div is 0.
    diversity_enabled: bool = True


@dataclass
class LossTerms:
    """Every term unweighted and weighted, keyed ``network.term`` (``student1.diversity``), and their weighted sum."""

    values: dict[str, torch.Tensor]
    weighted: dict[str, torch.Tensor]
    total: torch.Tensor

    def detach(self) -> "LossTerms":
        return LossTerms(
            {k: v.detach() for k, v in self.values.items()},
            {k: v.detach() for k, v in self.weighted.items()},
            self.total.detach(),
        )


def _eval_pass(decoder: SelfDistillationDecoder, x: torch.Tensor) -> list[torch.Tensor]:
    # The targets come from the decoder in eval mode (running statistics, none updated), with its pre-step weights.
    decoder.eval()
    with torch.no_grad():
        outputs = decoder(x)
    decoder.train()
    return outputs


def ffsd_losses(
    nets: FFSDNetworks,
    images: torch.Tensor,
    labels: torch.Tensor,
    lambdas: torch.Tensor,
    options: LossOptions,
    ops: ModuleType,
) -> LossTerms:
    """Forward every network once and compute every loss term of one FFSD step.

    Args:
        nets: the run's networks, in train mode.
        images, labels: one batch, ``[B, 3, H, W]`` and ``[B]``.
        lambdas: ``[3]`` device tensor ``(λ_div, λ_sd, λ_f)``, already warmed up for the epoch.
        options: temperature and quirk switches.
        ops: the loss library (``ffsd_kernels``), so that its implementations can be swapped in one place.
    """
    temperature = options.temperature
    values: dict[str, torch.Tensor] = {}
    weighted: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        values[name] = value
        weighted[name] = value if weight is None else value * weight

    lambda_div, lambda_sd, lambda_f = lambdas[LAMBDA_DIV], lambdas[LAMBDA_SD], lambdas[LAMBDA_F]
    student_sd_weight = lambda_div if options.student_sd_uses_lambda_div else lambda_sd

    # Forward in the reference's order: leader, students, fusion module.
    leader_logits, leader_taps, trans_fused = nets.leader(images)
    student_logits, student_taps = zip(*(student(images) for student in nets.students), strict=True)
    last_maps = [taps[-1].detach() for taps in student_taps]
    fusion_logits, fused = nets.fusion(last_maps)

    # Each attention map is computed once and reused, with its gradient where a term needs one.
    student_attention = [[ops.attention_map(f) for f in taps] for taps in student_taps]
    leader_attention = [ops.attention_map(f) for f in leader_taps]

    num_students = nets.num_students
    # Deep mutual learning, every student from every other one's detached logits, in one op.
    mutual = ops.mutual_kl_loss(student_logits, temperature)
    for i in range(num_students):
        add(f"student{i}.ce", F.cross_entropy(student_logits[i], labels))
        add(f"student{i}.mutual", mutual[i])
        if i == 0 or not options.diversity_enabled:
            continue
        add(
            f"student{i}.diversity",
            ops.diversity_loss(student_attention[i][-1], student_attention[i - 1][-1].detach()),
            lambda_div,
        )
        targets = _eval_pass(nets.decoders[i - 1], ops.diversity_shift(last_maps[i - 1]))
        add(
            f"student{i}.self_distillation",
            sum(ops.normalized_distance(student_attention[i][k], ops.attention_map(g)) for k, g in enumerate(targets)),
            student_sd_weight,
        )

    # The fusion module's teacher is the students' ensemble: the mean of their logits.
    ce, kl = ops.cross_entropy_kl_loss(fusion_logits, [z.detach() for z in student_logits], labels, temperature)
    add("fusion.ce", ce)
    add("fusion.kl", kl)

    ce, kl = ops.cross_entropy_kl_loss(leader_logits, fusion_logits.detach(), labels, temperature)
    add("leader.ce", ce)
    add("leader.kl", kl)
    fused = fused.detach()
    add("leader.fusion", ops.normalized_distance(leader_attention[-1], ops.attention_map(fused)), lambda_f)
    # A(concat(f_1 … f_m)) is the mean of the students' maps A(f_i): every student has C channels.
    concat_attention = torch.stack([a[-1].detach() for a in student_attention]).mean(dim=0)
    add("leader.trans_fusion", ops.normalized_distance(ops.attention_map(trans_fused), concat_attention), lambda_f)
    targets = _eval_pass(nets.leader_decoder, fused)
    add(
        "leader.self_distillation",
        sum(ops.normalized_distance(leader_attention[k], ops.attention_map(g)) for k, g in enumerate(targets)),
        lambda_f,
    )

    # The decoders' training passes come after their eval passes above, which must see the old BN statistics.
    decoder_pairs = [(f"decoder{i}", nets.decoders[i - 1], i) for i in range(1, num_students)]
    decoder_pairs.append(("decoder_leader", nets.leader_decoder, None))
    for name, decoder, student in decoder_pairs:
        taps = leader_taps if student is None else student_taps[student]
        attention = leader_attention if student is None else student_attention[student]
        outputs = decoder(taps[-1].detach())
        add(
            f"{name}.feature",
            sum(ops.normalized_distance(g, taps[k].detach()) for k, g in enumerate(outputs)),
            lambda_sd,
        )
        add(
            f"{name}.attention",
            sum(ops.normalized_distance(ops.attention_map(g), attention[k].detach()) for k, g in enumerate(outputs)),
            lambda_sd,
        )

    return LossTerms(values, weighted, total=sum(weighted.values()))


def baseline_losses(
    nets: FFSDNetworks, images: torch.Tensor, labels: torch.Tensor, options: LossOptions, ops: ModuleType
) -> LossTerms:
    """The baselines' terms: each student's CE and, for ``dml``, its mutual KL from every other (detached) student
    (the same ``student{i}.mutual`` as FFSD's). ``independent`` is CE alone: the students never meet."""
    values: dict[str, torch.Tensor] = {}
    student_logits = [student(images)[0] for student in nets.students]
    mutual = ops.mutual_kl_loss(student_logits, options.temperature) if nets.method == "dml" else None
    for i, logits in enumerate(student_logits):
        values[f"student{i}.ce"] = F.cross_entropy(logits, labels)
        if mutual is not None:
            values[f"student{i}.mutual"] = mutual[i]
    return LossTerms(values, dict(values), total=sum(values.values()))


def step_losses(
    nets: FFSDNetworks,
    images: torch.Tensor,
    labels: torch.Tensor,
    lambdas: torch.Tensor,
    options: LossOptions,
    ops: ModuleType,
) -> LossTerms:
    """The loss terms of one step of the run's method (``nets.method``: a static choice, no tensor branching)."""
    if nets.method == "ffsd":
        return ffsd_losses(nets, images, labels, lambdas, options, ops)
    return baseline_losses(nets, images, labels, options, ops)
