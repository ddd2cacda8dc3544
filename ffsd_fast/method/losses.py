"""FFSD's loss terms for one batch, as docs/method.md states them, in one forward over every network.

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
from ffsd_fast.models.stacking import StackedNetworks


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


class _Distances:
    """The step's normalised distances, one by one (``ops.normalized_distance``) or, ``grouped``, all at once
    (``ops.normalized_distances``: two forward launches and one backward launch, whatever their number).

    Grouped, a call returns the pair's index, which ``resolve`` replaces by its distance once every pair is known."""

    def __init__(self, ops: ModuleType, grouped: bool) -> None:
        self.ops, self.grouped = ops, grouped
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | int:
        if not self.grouped:
            return self.ops.normalized_distance(x, y)
        self.pairs.append((x, y))
        return len(self.pairs) - 1

    def resolve(self, parts: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        if not self.pairs:
            return parts
        xs, ys = zip(*self.pairs, strict=True)
        distances = self.ops.normalized_distances(list(xs), list(ys)).unbind()
        return {name: [distances[p] if isinstance(p, int) else p for p in ps] for name, ps in parts.items()}


def _by_network(stack: StackedNetworks, stacked: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``[network][k]`` views of stacked tensors ``[k]`` (taps, decoder outputs, their grouped attention maps)."""
    return [list(per_network) for per_network in zip(*(stack.split(t) for t in stacked), strict=True)]


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
    parts: dict[str, list[torch.Tensor]] = {}
    weights: dict[str, torch.Tensor | None] = {}

    def add(name: str, value: torch.Tensor | list[torch.Tensor], weight: torch.Tensor | None = None) -> None:
        """A term: one value, or the list of values it sums; weight None is 1."""
        parts[name] = list(value) if isinstance(value, list) else [value]
        weights[name] = weight

    # With stacked networks (opt-in, until a GPU has measured the grouped op inside a captured step) every distance
    # of the step is computed in one grouped op.
    distance = _Distances(ops, grouped=nets.stack is not None)
    lambda_div, lambda_sd, lambda_f = lambdas[LAMBDA_DIV], lambdas[LAMBDA_SD], lambdas[LAMBDA_F]
    student_sd_weight = lambda_div if options.student_sd_uses_lambda_div else lambda_sd

    num_students = nets.num_students
    if nets.stack is None:
        # Forward in the reference's order: leader, students, fusion module.
        leader_logits, leader_taps, trans_fused = nets.leader(images)
        student_logits, student_taps = zip(*(student(images) for student in nets.students), strict=True)
    else:
        # Every backbone in one forward (students, then the leader): each network's logits and taps are views.
        logits, taps = nets.stack(images)
        per_network = _by_network(nets.stack, taps)
        student_logits, student_taps = nets.stack.split(logits)[:num_students], per_network[:num_students]
        leader_logits, leader_taps = logits[num_students], per_network[num_students]
        trans_fused = nets.leader.head(leader_taps[-1])
        stacked_last = taps[-1]
    last_maps = [network_taps[-1].detach() for network_taps in student_taps]
    # Stacked, the students' last maps side by side are a channel slice of the stack's last tap: no concatenation.
    fusion_input = last_maps if nets.stack is None else stacked_last[:, : num_students * last_maps[0].shape[1]].detach()
    fusion_logits, fused = nets.fusion(fusion_input)
    fused = fused.detach()
    if nets.stack is None:
        # Each attention map is computed once and reused, with its gradient where a term needs one.
        student_attention = [[ops.attention_map(f) for f in taps] for taps in student_taps]
        leader_attention = [ops.attention_map(f) for f in leader_taps]
        fused_map, trans_fused_map = ops.attention_map(fused), ops.attention_map(trans_fused)
        # A(concat(f_1 … f_m)) is the mean of the students' maps A(f_i): every student has C channels.
        concat_attention = torch.stack([a[-1].detach() for a in student_attention]).mean(dim=0)
        eval_targets = decoder_outputs = decoder_maps = None
    else:
        # Every decoder's eval-mode targets in one stacked pass: students 1 … m−1 from the previous student's shifted
        # map, the leader's from the fused map (student targets unused when the diversity terms are off). The
        # training pass follows it (the eval pass must see the old BN statistics); its inputs (students 1 … m−1, then
        # the leader) are a slice of the last tap.
        decoders = nets.decoder_stack
        shifted = [ops.diversity_shift(last_maps[i - 1]) for i in range(1, num_students)]
        eval_outputs = _eval_pass(decoders, torch.cat([*shifted, fused], dim=1))
        train_outputs = decoders(stacked_last[:, leader_taps[-1].shape[1] :].detach())
        decoder_outputs = _by_network(decoders, train_outputs)
        # Every attention map of the step in one launch each way, each network's map an output of its own (no split
        # to differentiate): the taps', the decoders' (eval and training), the fused map's, the head's, and the map of
        # the students' last taps side by side, which is A(concat(f_1 … f_m)).
        inputs = [*taps, *eval_outputs, *train_outputs, fused, trans_fused, fusion_input]
        groups = [nets.stack.count] * len(taps) + [decoders.count] * 2 * len(eval_outputs) + [1, 1, 1]
        maps = ops.attention_maps(inputs, groups)
        tap_maps, maps = maps[: len(taps)], maps[len(taps) :]
        eval_maps, train_maps = maps[: len(eval_outputs)], maps[len(eval_outputs) : 2 * len(eval_outputs)]
        (fused_map,), (trans_fused_map,), (concat_attention,) = maps[2 * len(eval_outputs) :]
        student_attention = [[m[i] for m in tap_maps] for i in range(num_students)]
        leader_attention = [m[num_students] for m in tap_maps]
        eval_targets = [[m[j] for m in eval_maps] for j in range(decoders.count)]
        decoder_maps = [[m[j] for m in train_maps] for j in range(decoders.count)]

    if nets.stack is None:
        # Deep mutual learning, every student from every other one's detached logits, in one op.
        mutual = ops.mutual_kl_loss(student_logits, temperature)
        student_ce = [F.cross_entropy(z, labels) for z in student_logits]
        # The fusion module's teacher is the students' ensemble: the mean of their logits.
        teachers = [z.detach() for z in student_logits]
        fusion_ce, fusion_kl = ops.cross_entropy_kl_loss(fusion_logits, teachers, labels, temperature)
        leader_ce, leader_kl = ops.cross_entropy_kl_loss(leader_logits, fusion_logits.detach(), labels, temperature)
    else:
        # The same terms, all from the stack's logits (students, then the leader) in one op: two forward launches
        # and one backward launch instead of one set per term.
        group = ops.online_distillation_losses(logits, fusion_logits, labels, temperature).unbind()
        student_ce, mutual = group[:num_students], group[num_students : 2 * num_students]
        fusion_ce, fusion_kl, leader_ce, leader_kl = group[2 * num_students :]
    for i in range(num_students):
        add(f"student{i}.ce", student_ce[i])
        add(f"student{i}.mutual", mutual[i])
        if i == 0 or not options.diversity_enabled:
            continue
        add(
            f"student{i}.diversity",
            ops.diversity_loss(student_attention[i][-1], student_attention[i - 1][-1].detach()),
            lambda_div,
        )
        if eval_targets is None:
            targets = _eval_pass(nets.decoders[i - 1], ops.diversity_shift(last_maps[i - 1]))
            target_maps = [ops.attention_map(g) for g in targets]
        else:
            target_maps = eval_targets[i - 1]
        add(
            f"student{i}.self_distillation",
            [distance(student_attention[i][k], a) for k, a in enumerate(target_maps)],
            student_sd_weight,
        )

    add("fusion.ce", fusion_ce)
    add("fusion.kl", fusion_kl)
    add("leader.ce", leader_ce)
    add("leader.kl", leader_kl)
    add("leader.fusion", distance(leader_attention[-1], fused_map), lambda_f)
    add("leader.trans_fusion", distance(trans_fused_map, concat_attention), lambda_f)
    if eval_targets is None:
        target_maps = [ops.attention_map(g) for g in _eval_pass(nets.leader_decoder, fused)]
    else:
        target_maps = eval_targets[-1]
    add(
        "leader.self_distillation",
        [distance(leader_attention[k], a) for k, a in enumerate(target_maps)],
        lambda_f,
    )

    # The decoders' training passes come after their eval passes above, which must see the old BN statistics.
    decoder_pairs = [(f"decoder{i}", nets.decoders[i - 1], i) for i in range(1, num_students)]
    decoder_pairs.append(("decoder_leader", nets.leader_decoder, None))
    for j, (name, decoder, student) in enumerate(decoder_pairs):
        taps = leader_taps if student is None else student_taps[student]
        attention = leader_attention if student is None else student_attention[student]
        if decoder_outputs is None:
            outputs = decoder(taps[-1].detach())
            output_maps = [ops.attention_map(g) for g in outputs]
        else:
            outputs, output_maps = decoder_outputs[j], decoder_maps[j]
        add(
            f"{name}.feature",
            [distance(g, taps[k].detach()) for k, g in enumerate(outputs)],
            lambda_sd,
        )
        add(
            f"{name}.attention",
            [distance(a, attention[k].detach()) for k, a in enumerate(output_maps)],
            lambda_sd,
        )

    return weighted_terms(distance.resolve(parts), weights, lambdas)


def weighted_terms(
    parts: dict[str, list[torch.Tensor]], weights: dict[str, torch.Tensor | None], lambdas: torch.Tensor
) -> LossTerms:
    """Each term's value (the sum of its parts), weighted value and the weighted total, in a handful of kernels
    whatever the number of terms: the parts in one ``[T, K]`` stack (a shared zero pads the shorter sums), the
    weights in one ``[T]`` stack. Summed in Python, each addition and each weighting would be a kernel of its own,
    forward and backward (~40 and ~15 a step); the backward of these is one multiplication."""
    names = list(parts)
    width = max(len(p) for p in parts.values())
    zero, one = lambdas.new_zeros(()), lambdas.new_ones(())
    table = torch.stack([t for name in names for t in parts[name] + [zero] * (width - len(parts[name]))])
    values = table.view(len(names), width).sum(dim=1) if width > 1 else table
    weighted = values * torch.stack([one if weights[name] is None else weights[name] for name in names])
    return LossTerms(
        dict(zip(names, values.unbind(), strict=True)),
        dict(zip(names, weighted.unbind(), strict=True)),
        total=weighted.sum(),
    )


def baseline_losses(
    nets: FFSDNetworks, images: torch.Tensor, labels: torch.Tensor, options: LossOptions, ops: ModuleType
) -> LossTerms:
    """The baselines' terms: each student's CE and, for ``dml``, its mutual KL from every other (detached) student
    (the same ``student{i}.mutual`` as FFSD's). ``independent`` is CE alone: the students never meet."""
    values: dict[str, torch.Tensor] = {}
    if nets.stack is None:
        student_logits = [student(images)[0] for student in nets.students]
    else:
        student_logits = nets.stack(images)[0]  # [m, B, K]: the KL op takes them stacked
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
