"""Evaluation of every network of a run on a loader (the ones its method evaluates, and the peers' average and
ensembles); and of a saved run or an exported network on its dataset's test split (``ffsd-eval``)."""

import torch

from ffsd_fast import models
from ffsd_fast.data.common import DataSpec
from ffsd_fast.data.loaders import build_loaders, eval_index
from ffsd_fast.errors import UserError
from ffsd_fast.method import registry
from ffsd_fast.method.base import Method
from ffsd_fast.step.distributed import SINGLE_PROCESS, World, all_reduce_sum
from ffsd_fast.trainer import checkpoint, export
from ffsd_fast.trainer.eval_data import eval_data


def _correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``[B]`` booleans: the label is among the top-``k`` logits."""
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


# The evaluation's own entries: a method's network of one of these names would be hidden by them.
RESERVED = frozenset({"ensemble", "oracle_ensemble", "average"})


@torch.no_grad()
def evaluate(method: Method, loader, topk: tuple[int, ...] = (1,), world: World = SINGLE_PROCESS) -> dict[str, float]:
    """Accuracies in percent, keyed ``{network}_top{k}`` for every network the method evaluates (``student{i}``,
    FFSD's ``fusion`` and ``leader``), then ``ensemble_top{k}`` (the peers' mean logits), ``oracle_ensemble_top{k}``
    (a sample counts when any peer gets it: what the reference calls its ensemble) and ``average_top{k}`` (the mean
    of the peers' accuracies).

    Counts stay on the device and are read back once, at the end, summed over the ranks of ``world`` (each
    evaluates its own disjoint shard). Samples labelled ``PAD_LABEL`` (< 0) only fill a batch: never counted.
    """
    was_training = method.training
    method.eval()
    counts: dict[str, torch.Tensor] = {}
    total = 0
    for images, labels in loader:
        logits = method.eval_logits(images)
        if clash := RESERVED & logits.keys():
            # Its accuracy would be overwritten by the evaluation's own entry of that name, silently.
            raise ValueError(f"{type(method).__name__}.eval_logits names a network {sorted(clash)}: reserved")
        peers = [logits[name] for name in method.peers]
        for k in topk:
            batch = {f"{name}_top{k}": _correct(z, labels, k) for name, z in logits.items()}
            batch[f"ensemble_top{k}"] = _correct(torch.stack(peers).mean(0), labels, k)
            batch[f"oracle_ensemble_top{k}"] = torch.stack([batch[f"{p}_top{k}"] for p in method.peers]).any(dim=0)
            for name, hit in batch.items():
                counts[name] = counts.get(name, 0) + hit.sum()
        total = total + (labels >= 0).sum()
    method.train(was_training)
    names = list(counts)
    device = next(method.parameters()).device
    summed = all_reduce_sum(
        torch.stack([*(counts[n] for n in names), torch.as_tensor(total, device=device)]).double(), world
    )
    values = summed[:-1].mul(100.0 / summed[-1].clamp(min=1)).tolist()  # host sync
    result = dict(zip(names, values, strict=True))
    for k in topk:
        result[f"average_top{k}"] = sum(result[f"{p}_top{k}"] for p in method.peers) / len(method.peers)
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
        settings = {**cfg, "quirk_probe_forward": False}
        method = registry.create(
            cfg["method"], model, state["num_classes"], cfg["num_students"], image_size, **settings
        ).to(device)
        method.load_state_dict(state["networks"])
        return evaluate(method, test_loader, topk)
    num_classes = _num_classes(state)
    if num_classes != info.num_classes:
        raise UserError(f"the network has {num_classes} classes, {dataset} has {info.num_classes}")
    network = models.create(model, num_classes).to(device)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} does not load into {model}: {str(error).splitlines()[0]}") from None
    return evaluate_network(network, test_loader, topk)
