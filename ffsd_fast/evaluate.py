"""Evaluation of every network of a run on a loader: students, fusion module and leader (FFSD), the students'
average and ensembles."""

import torch

from ffsd_fast.distributed import SINGLE_PROCESS, World, all_reduce_sum
from ffsd_fast.method import FFSDNetworks


def _correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``[B]`` booleans: the label is among the top-``k`` logits."""
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


@torch.no_grad()
def evaluate(
    nets: FFSDNetworks, loader, topk: tuple[int, ...] = (1,), world: World = SINGLE_PROCESS
) -> dict[str, float]:
    """Accuracies in percent, keyed ``student{i}_top{k}``, ``fusion_top{k}``, ``leader_top{k}``,
    ``average_top{k}`` (mean of the students'), ``ensemble_top{k}`` (mean logits of the students) and
    ``oracle_ensemble_top{k}`` (a sample counts when any student gets it: what the reference calls its ensemble);
    the baselines have no fusion or leader entries.

    Counts stay on the device and are read back once, at the end, summed over the ranks of ``world`` (each
    evaluates its own disjoint shard). Samples labelled ``PAD_LABEL`` (< 0) only fill a batch: never counted.
    """
    was_training = nets.training
    nets.eval()
    m = nets.num_students
    counts: dict[str, torch.Tensor] = {}
    total = 0
    for images, labels in loader:
        student_logits, last_maps = [], []
        for student in nets.students:
            logits, taps = student(images)
            student_logits.append(logits)
            last_maps.append(taps[-1])
        if nets.leader is not None:
            fusion_logits, _ = nets.fusion(last_maps)
            leader_logits, _ = nets.leader.backbone(images)
        for k in topk:
            hits = [_correct(z, labels, k) for z in student_logits]
            batch = {f"student{i}_top{k}": hits[i] for i in range(m)}
            if nets.leader is not None:
                batch[f"fusion_top{k}"] = _correct(fusion_logits, labels, k)
                batch[f"leader_top{k}"] = _correct(leader_logits, labels, k)
            batch[f"ensemble_top{k}"] = _correct(torch.stack(student_logits).mean(0), labels, k)
            batch[f"oracle_ensemble_top{k}"] = torch.stack(hits).any(dim=0)
            for name, hit in batch.items():
                counts[name] = counts.get(name, 0) + hit.sum()
        total = total + (labels >= 0).sum()
    nets.train(was_training)
    names = list(counts)
    device = next(nets.parameters()).device
    summed = all_reduce_sum(
        torch.stack([*(counts[n] for n in names), torch.as_tensor(total, device=device)]).double(), world
    )
    values = summed[:-1].mul(100.0 / summed[-1].clamp(min=1)).tolist()  # host sync
    result = dict(zip(names, values, strict=True))
    for k in topk:
        result[f"average_top{k}"] = sum(result[f"student{i}_top{k}"] for i in range(m)) / m
    return result


@torch.no_grad()
def evaluate_network(network: torch.nn.Module, loader, topk: tuple[int, ...] = (1,)) -> dict[str, float]:
    """Accuracies in percent of one backbone (``(logits, taps)`` from its forward), keyed ``top{k}``."""
    was_training = network.training
    network.eval()
    counts = torch.zeros(len(topk), dtype=torch.long)
    total = 0
    for images, labels in loader:
        logits, _ = network(images)
        counts = counts.to(labels.device) + torch.stack([_correct(logits, labels, k).sum() for k in topk])
        total = total + (labels >= 0).sum()  # evaluation pads (PAD_LABEL) are not counted
    network.train(was_training)
    values = (counts.double() * 100.0 / max(int(total), 1)).tolist()  # host sync
    return {f"top{k}": v for k, v in zip(topk, values, strict=True)}
