"""Evaluation of every network of a run on a loader: students, fusion module and leader (FFSD), the students'
average and ensembles; and of a saved run or an exported leader on its dataset's test split (``ffsd-eval``)."""

import torch

from ffsd_fast import models
from ffsd_fast.data.common import DataSpec
from ffsd_fast.data.loaders import build_loaders, eval_index
from ffsd_fast.errors import UserError
from ffsd_fast.method.networks import FFSDNetworks, build_networks
from ffsd_fast.step.distributed import SINGLE_PROCESS, World, all_reduce_sum
from ffsd_fast.trainer import checkpoint, export
from ffsd_fast.trainer.eval_data import eval_data


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


def topk_for(dataset: str, num_classes: int) -> tuple[int, ...]:
    """The accuracies reported: top-1, and top-5 on ImageNet where there are at least 5 classes to rank."""
    return (1, 5) if dataset == "imagenet" and num_classes >= 5 else (1,)


def _num_classes(weights: dict[str, torch.Tensor]) -> int:
    # The classifier is the last 2-D weight of every backbone here (fc / linear).
    matrices = [v for k, v in weights.items() if k.endswith("weight") and v.dim() == 2]
    if not matrices:
        raise UserError("the state dict has no classifier (no 2-D weight): is it a backbone's?")
    return matrices[-1].shape[0]


def _settle(
    described: dict, source: str, model: str | None, dataset: str | None, image_size: int | None
) -> tuple[str, str, int]:
    """``(model, dataset, image_size)``: the ones ``source`` describes, an explicit ``--image-size`` overriding its
    own; an explicit ``--model`` or ``--dataset`` that contradicts it is refused (the weights are what they are)."""
    for flag, given in (("model", model), ("dataset", dataset)):
        if given is not None and given != described[flag]:
            raise UserError(f"--{flag} {given} contradicts {source}, which says {flag} {described[flag]}")
    return described["model"], described["dataset"], described["image_size"] if image_size is None else image_size


def evaluate_checkpoint(
    path: str,
    data_root: str | None,
    dataset: str | None,
    model: str | None,
    image_size: int | None,
    batch_size: int,
    device: torch.device,
    loader: str | None = None,
    check_images: bool = True,
    workers: int = 0,
) -> dict[str, float]:
    """Test accuracies of a run's checkpoint (every network) or of weights from ``ffsd-export`` (model, dataset and
    image size from their sidecar; a bare state dict needs all three given)."""
    state = checkpoint.read(path, device)
    path = checkpoint.resolve_path(path)
    if checkpoint.is_training_checkpoint(state):
        cfg = state["config"]
        model, dataset, image_size = _settle(cfg, f"the run's config in {path}", model, dataset, image_size)
        data_root = data_root or cfg["data_root"]
    elif (meta := export.read_sidecar(path)) is not None:
        model, dataset, image_size = _settle(meta, export.sidecar_path(path), model, dataset, image_size)
    else:
        # A bare state dict says nothing of its inputs: a guessed image size evaluated the wrong network silently.
        missing = [
            f"--{flag}" for flag, v in (("model", model), ("dataset", dataset), ("image-size", image_size)) if v is None
        ]
        if missing:
            raise UserError(
                f"{path} is a single network's weights without a sidecar ({export.sidecar_path(path)}): "
                f"give its {', '.join(missing)}"
            )
    loader, check_images, left_out = eval_data(path, state, loader, check_images)  # the run's loader, its left-out
    spec = DataSpec(dataset, data_root, image_size, batch_size, batch_size, 0, False, workers, loader, check_images)
    _, test_loader, info = build_loaders(spec, device, index=eval_index(spec, left_out))
    topk = topk_for(dataset, info.num_classes)
    if checkpoint.is_training_checkpoint(state):
        nets = build_networks(
            model,
            state["num_classes"],
            cfg["num_students"],
            image_size,
            probe_forward=False,
            method=cfg.get("method", "ffsd"),
        ).to(device)
        nets.load_state_dict(state["networks"])
        return evaluate(nets, test_loader, topk)
    num_classes = _num_classes(state)
    if num_classes != info.num_classes:
        raise UserError(f"the network has {num_classes} classes, {dataset} has {info.num_classes}")
    network = models.create(model, num_classes).to(device)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} does not load into {model}: {str(error).splitlines()[0]}") from None
    return evaluate_network(network, test_loader, topk)
