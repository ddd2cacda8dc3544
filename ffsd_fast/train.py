"""The FFSD trainer. Runs as ``python -m ffsd_fast.train``, as ``ffsd-train`` and as ``torchrun ffsd_fast/train.py``.

Reads top to bottom: configuration, processes, data, networks, then the epoch loop (train steps, one evaluation of
every network, one checkpoint), then the summary. The step itself is ``ffsd_fast.step.train_step``; the only host
synchronisations are marked ``# host sync`` and happen every ``--log-every`` steps and at epoch ends.

Under ``torchrun`` every process trains on its own shard with ``--batch-size`` images per step and the gradients
are averaged (``ffsd_fast.distributed``); rank 0 alone writes the run directory (log, checkpoints, summary), and
every rank holds the same evaluation results.
"""

import os
import sys

if __name__ == "__main__" and not __package__:
    # torchrun runs this file as a script, which puts ffsd_fast/ on sys.path: put the project root there instead,
    # so that our module names (data, config, models…) cannot shadow anything else.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import hashlib
import json
import time
from types import ModuleType

import torch
from tqdm import tqdm

import ffsd_kernels
import ffsd_kernels.reference
from ffsd_fast import checkpoint, models
from ffsd_fast.config import Config, parse_args, resolve, to_dict
from ffsd_fast.data import build_loaders
from ffsd_fast.distributed import (
    GradientAverager,
    World,
    all_reduce_sum,
    barrier,
    broadcast_object,
    broadcast_state,
    close_world,
    init_world,
)
from ffsd_fast.errors import UserError
from ffsd_fast.evaluate import evaluate
from ffsd_fast.graph import CapturedStep, check_capturable
from ffsd_fast.image_folder import find_images, index_images, leave_out
from ffsd_fast.losses import LAMBDA_DIV, LAMBDA_F, LAMBDA_SD, LossOptions, LossTerms
from ffsd_fast.method import FFSDNetworks, build_networks, compile_networks
from ffsd_fast.runlog import NullLog, RunLog, code_version
from ffsd_fast.schedules import imagenet_sgd_lr, multistep_lr, warmed_up_lambda
from ffsd_fast.step import Stepper, make_optimizers, mixed_precision, set_learning_rates

IMAGENET_DECODER_MILESTONES = [30, 60, 80]
# Fields that must agree between a checkpoint and the run that resumes it.
_RUN_IDENTITY = ("method", "model", "dataset", "num_students", "image_size")


class NonFiniteLoss(UserError):
    pass


def kernel_ops(name: str) -> ModuleType:
    """The loss library behind ``--kernels``: the fused ops (Triton on CUDA tensors, their references elsewhere) or
    the plain PyTorch references under the same names."""
    return ffsd_kernels if name == "triton" else ffsd_kernels.reference


def on_main(world: World, work):
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


def learning_rates(cfg: Config, epoch: int, step: int, steps_per_epoch: int) -> tuple[float, float]:
    """(SGD lr, decoder Adam lr) for a 1-based epoch and the step within it."""
    if cfg.lr_schedule == "imagenet":
        return (
            imagenet_sgd_lr(cfg.lr, epoch, step, steps_per_epoch, quirk=cfg.quirk_imagenet_lr_epoch),
            multistep_lr(cfg.decoder_lr, epoch, IMAGENET_DECODER_MILESTONES),
        )
    return multistep_lr(cfg.lr, epoch, cfg.lr_milestones), multistep_lr(cfg.decoder_lr, epoch, cfg.lr_milestones)


def lambdas_for(cfg: Config, epoch: int) -> list[float]:
    values = [0.0] * 3
    values[LAMBDA_DIV], values[LAMBDA_SD], values[LAMBDA_F] = cfg.lambda_div, cfg.lambda_sd, cfg.lambda_f
    return [warmed_up_lambda(v, epoch, cfg.lambda_warmup_epochs) for v in values]


def check_batchnorm_batches(cfg: Config, num_train: int) -> None:
    """BatchNorm cannot train on one value per channel: refuse a batch that would give it one, before training."""
    _, height, width = models.tap_shapes(cfg.model, cfg.image_size)[-1]
    last = num_train % cfg.batch_size
    smallest = last if last and not cfg.drop_last else cfg.batch_size
    if smallest * height * width == 1:
        raise UserError(
            f"--batch-size {cfg.batch_size} on {num_train} training images leaves a batch of 1, and the last stage of "
            f"{cfg.model} at {cfg.image_size} px is 1×1, so BatchNorm would train on a single value: add --drop-last "
            "or choose a batch size that does not leave 1"
        )


def new_run_dir(cfg: Config) -> str:
    method = "" if cfg.method == "ffsd" else f"-{cfg.method}"
    name = cfg.run_name or (f"{cfg.dataset}-{cfg.model}-m{cfg.num_students}{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    path = os.path.join(cfg.output_dir, name)
    suffix = 1
    while os.path.exists(path) and cfg.run_name is None:
        suffix += 1
        path = os.path.join(cfg.output_dir, f"{name}-{suffix}")
    os.makedirs(path, exist_ok=cfg.run_name is not None)
    return path


def find_auto_resume(cfg: Config) -> str | None:
    """``--resume auto``: the checkpoint to continue, or None for a fresh start (see ``Config.resume``)."""
    if cfg.run_name is not None:
        path = os.path.join(cfg.output_dir, cfg.run_name, checkpoint.CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    if not os.path.isdir(cfg.output_dir):
        return None
    candidates = []
    for entry in os.scandir(cfg.output_dir):
        path = os.path.join(entry.path, checkpoint.CHECKPOINT_NAME)
        if entry.is_dir() and os.path.isfile(path):
            candidates.append((os.path.getmtime(path), path))
    for _, path in sorted(candidates, reverse=True):
        try:
            saved = checkpoint.load(path)["config"]
        except UserError:
            continue  # a damaged checkpoint of some other run: not ours to continue
        if all(saved.get(k) == getattr(cfg, k) for k in _RUN_IDENTITY):
            return path
    return None


def check_resumable(saved: dict, cfg: Config, path: str) -> None:
    differ = [f"{k} {saved.get(k)!r} → {getattr(cfg, k)!r}" for k in _RUN_IDENTITY if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise UserError(
            f"checkpoint {path} is from another run ({'; '.join(differ)}): pass the flags it was "
            "trained with, or start a new run"
        )


def summarize(history: list[dict], num_students: int, topk: tuple[int, ...]) -> dict:
    """Final-epoch accuracies, and each network's best over epochs (at its own epoch, as the paper reports)."""
    final, summary = history[-1], {}
    for k in topk:
        for key in ("leader", "fusion", "ensemble", "average", "oracle_ensemble"):
            if f"{key}_top{k}" not in final:  # the baselines have no leader or fusion module
                continue
            summary[f"{key}_top{k}"] = final[f"{key}_top{k}"]
            summary[f"best_{key}_top{k}"] = max(h[f"{key}_top{k}"] for h in history)
        students = [f"student{i}_top{k}" for i in range(num_students)]
        summary[f"students_top{k}"] = [final[s] for s in students]
        summary[f"best_students_top{k}"] = [max(h[s] for h in history) for s in students]
    if "leader_top1" in final:
        summary["best_leader_epoch"] = max(history, key=lambda h: h["leader_top1"])["epoch"]
    return summary


def print_table(summary: dict, num_students: int) -> None:
    rows = [
        (f"student {i + 1}", summary["students_top1"][i], summary["best_students_top1"][i]) for i in range(num_students)
    ]
    rows += [
        (label, summary[f"{key}_top1"], summary[f"best_{key}_top1"])
        for label, key in [
            ("fusion module", "fusion"),
            ("leader", "leader"),
            ("students' average", "average"),
            ("ensemble (mean logits)", "ensemble"),
            ("oracle ensemble (any)", "oracle_ensemble"),
        ]
        if f"{key}_top1" in summary
    ]
    print(f"\n{'network':<24}{'final top-1':>12}{'best top-1':>12}")
    for label, final, best in rows:
        print(f"{label:<24}{final:>11.2f}%{best:>11.2f}%")


class LossMeter:
    """Running means of the loss terms, summed on the device and read back (one host sync) only when asked."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.count = 0

    def add(self, terms: LossTerms) -> None:
        stacked = torch.stack([terms.total, *terms.values.values(), *terms.weighted.values()]).double()
        if self.names is None:
            self.names = ["total", *terms.values, *(f"weighted/{k}" for k in terms.weighted)]
            self.sums = torch.zeros_like(stacked)
            self.bad = torch.zeros((), dtype=torch.bool, device=stacked.device)
        self.sums += stacked
        self.bad |= ~torch.isfinite(terms.total)
        self.count += 1

    def read(self, world: World) -> tuple[dict[str, float], bool]:
        """(means since the last read over all ranks, whether any rank's total was non-finite); resets the means.

        Every rank reads at the same step, so the all-reduce lines up, and all ranks stop together on a NaN."""
        summed = all_reduce_sum(torch.cat([self.sums / self.count, self.bad.double()[None]]), world)
        values = (summed / world.world_size).tolist()  # host sync
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.names, values[:-1], strict=True)), values[-1] > 0


def train_epoch(
    cfg: Config,
    epoch: int,
    step_fn: Stepper | CapturedStep,
    loader,
    run_log: RunLog | NullLog,
    last_good: str,
    world: World,
) -> tuple[float, int]:
    """One epoch of steps; losses are read back every ``--log-every`` steps. Returns (seconds, images)."""
    loader.set_epoch(epoch)
    step_fn.nets.train()
    meter, images_seen, steps = LossMeter(), 0, len(loader)
    started = time.perf_counter()
    bar = tqdm(
        loader,
        total=steps,
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=not (cfg.progress and world.is_main),
        leave=False,
        dynamic_ncols=True,
    )
    for step, (images, labels) in enumerate(bar):
        set_learning_rates(step_fn.optimizers, *learning_rates(cfg, epoch, step, steps))
        meter.add(step_fn(images, labels))
        images_seen += labels.shape[0] * world.world_size
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            means, non_finite = meter.read(world)
            if non_finite:
                raise NonFiniteLoss(
                    f"non-finite loss in epoch {epoch} by step {step + 1}: stopped; {last_good}; try a lower --lr"
                )
            run_log.log({"kind": "train", "epoch": epoch, "step": step + 1, **means}, (epoch - 1) * steps + step + 1)
            bar.set_postfix(loss=f"{means['total']:.3f}", ce=f"{means.get('leader.ce', means['student0.ce']):.3f}")
    bar.close()
    if step_fn.lambdas.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, images_seen


def imagenet_index(cfg: Config, world: World):
    """The ImageNet tree's file lists, corrupt images left out: rank 0 decodes every image (cached), the other
    ranks list the tree themselves and receive only the names of the corrupt files."""
    root_key = hashlib.sha1(os.path.abspath(cfg.data_root).encode()).hexdigest()[:12]
    cache = os.path.join(cfg.output_dir, ".image-check", f"{root_key}.json")
    main_index = on_main(world, lambda: index_images(cfg.data_root, cfg.workers, cfg.check_images, cache))
    if world.is_main:
        return main_index
    return leave_out(find_images(cfg.data_root), main_index.corrupt)


def train(cfg: Config) -> dict:
    """Trains one FFSD run to ``cfg.epochs`` and returns its summary (also written to ``summary.json``)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    world = init_world(cfg.device)
    try:
        return _train(cfg, world)
    finally:
        close_world(world)


def _train(cfg: Config, world: World) -> dict:
    ops = kernel_ops(cfg.kernels)
    device = torch.device(cfg.device, world.local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if cfg.cuda_graph:
        check_capturable(device, cfg.optimizer_impl)
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn synchronises BatchNorm over NCCL: it needs --device cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest convolution algorithms once

    resume = cfg.resume
    if resume == "auto":
        resume = on_main(world, lambda: find_auto_resume(cfg))
    saved = checkpoint.load(resume, device) if resume else None
    if saved is not None:
        ckpt_path = checkpoint.resolve_path(resume)
        check_resumable(saved["config"], cfg, ckpt_path)
        run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    index = imagenet_index(cfg, world) if cfg.dataset == "imagenet" else None
    amp_dtype, scaler = mixed_precision(cfg.amp, device)
    train_loader, test_loader, info = build_loaders(
        cfg.dataset,
        cfg.data_root,
        cfg.image_size,
        cfg.batch_size,
        cfg.eval_batch_size,
        device,
        cfg.seed,
        drop_last=cfg.drop_last,
        workers=cfg.workers,
        rank=world.rank,
        world_size=world.world_size,
        loader=cfg.loader,
        dtype=amp_dtype or torch.float32,
        channels_last=cfg.channels_last,
        index=index,
    )
    check_batchnorm_batches(cfg, info.num_train // world.world_size)
    if saved is None:
        run_dir = on_main(world, lambda: new_run_dir(cfg))

    torch.manual_seed(cfg.seed)
    nets: FFSDNetworks = build_networks(
        cfg.model,
        info.num_classes,
        cfg.num_students,
        cfg.image_size,
        probe_forward=cfg.quirk_probe_forward,
        fused_blocks=cfg.fusion_kernel == "triton",
        method=cfg.method,
    ).to(device)
    if cfg.sync_bn and world.distributed:
        nets = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets)
    if cfg.channels_last:
        nets = nets.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(
        nets,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
        cfg.fusion_weight_decay,
        cfg.decoder_lr,
        cfg.decoder_weight_decay,
        impl=cfg.optimizer_impl,
    )
    history: list[dict] = []
    start_epoch = 1
    if saved is not None:
        nets.load_state_dict(saved["networks"])
        for optimizer, state in zip(optimizers, saved["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        history = saved["history"]
        start_epoch = saved["epoch"] + 1
        checkpoint.set_rng_state(saved["rng"])
    broadcast_state(nets, world)  # one starting point on every rank, whatever each built or loaded
    if cfg.compile:
        compile_networks(nets)

    run_log = RunLog(run_dir) if world.is_main else NullLog()
    run_log.write_config(to_dict(cfg), code_version())
    if info.corrupt:
        shown = "\n  ".join(info.corrupt[:20])
        more = f"\n  … and {len(info.corrupt) - 20} more (all in metrics.jsonl)" if len(info.corrupt) > 20 else ""
        if world.is_main:
            print(
                f"ffsd-train: warning: {len(info.corrupt)} image(s) cannot be decoded and are left out:\n  "
                f"{shown}{more}",
                file=sys.stderr,
                flush=True,
            )
        run_log.log({"kind": "corrupt_images", "count": len(info.corrupt), "files": list(info.corrupt)}, 0)
    options = LossOptions(
        temperature=cfg.temperature,
        student_sd_uses_lambda_div=cfg.quirk_student_sd_lambda_div,
        diversity_enabled=cfg.lambda_div > 0,
    )
    topk = (1, 5) if cfg.dataset == "imagenet" and info.num_classes >= 5 else (1,)
    lambdas = torch.zeros(3, device=device)
    grad_sync = GradientAverager(list(nets.parameters()), world) if world.distributed else None
    step_fn = Stepper(nets, optimizers, lambdas, options, ops, amp_dtype, scaler, cfg.channels_last, grad_sync)
    if cfg.cuda_graph:
        step_fn = CapturedStep(step_fn)
    ckpt_path = os.path.join(run_dir, checkpoint.CHECKPOINT_NAME)
    if world.is_main:
        print(
            f"run directory: {run_dir}" + (f"  ({world.world_size} processes)" if world.distributed else ""), flush=True
        )
    train_seconds = sum(h["train_seconds"] for h in history)
    images_seen = sum(h["train_images"] for h in history)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            epoch_lambdas = lambdas_for(cfg, epoch)
            lambdas.copy_(torch.tensor(epoch_lambdas))
            last_good = (
                f"the last good checkpoint is {ckpt_path} (epoch {epoch - 1})"
                if os.path.exists(ckpt_path)
                else "no checkpoint was written yet"
            )
            seconds, epoch_images = train_epoch(cfg, epoch, step_fn, train_loader, run_log, last_good, world)
            train_seconds += seconds
            images_seen += epoch_images

            # Rank 0's BatchNorm statistics everywhere, as DDP's buffer broadcast would: every rank evaluates and
            # the checkpoint holds the same networks.
            broadcast_state(nets, world, buffers_only=True)
            accuracies = evaluate(nets, test_loader, topk, world)
            sgd_lr, decoder_lr = learning_rates(cfg, epoch, len(train_loader) - 1, len(train_loader))
            record = {
                "kind": "eval",
                "epoch": epoch,
                **accuracies,
                "lr": sgd_lr,
                "decoder_lr": decoder_lr,
                "lambda_div": epoch_lambdas[LAMBDA_DIV],
                "lambda_sd": epoch_lambdas[LAMBDA_SD],
                "lambda_f": epoch_lambdas[LAMBDA_F],
                "train_seconds": seconds,
                "train_images": epoch_images,
                "images_per_s": epoch_images / seconds,
            }
            history.append(record)
            run_log.log(record, epoch)
            run_log.plot_accuracy(history, cfg.num_students)
            students = " ".join(f"{accuracies[f'student{i}_top1']:.2f}" for i in range(cfg.num_students))
            leader = (
                f"leader {accuracies['leader_top1']:.2f}  fusion {accuracies['fusion_top1']:.2f}  "
                if "leader_top1" in accuracies
                else ""
            )
            if world.is_main:
                tqdm.write(
                    f"epoch {epoch}/{cfg.epochs}  {leader}students {students}  ensemble "
                    f"{accuracies['ensemble_top1']:.2f}  ({seconds:.1f}s, {epoch_images / seconds:.0f} img/s)"
                )
                checkpoint.save_atomic(
                    {
                        "format": 1,
                        "config": to_dict(cfg),
                        "num_classes": info.num_classes,
                        "epoch": epoch,
                        "networks": nets.state_dict(),
                        "optimizers": [o.state_dict() for o in optimizers],
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "history": history,
                        "rng": checkpoint.rng_state(),
                    },
                    ckpt_path,
                )
            barrier(world)  # no rank runs ahead of a checkpoint that a restart would resume from
    finally:
        run_log.close()

    summary = {
        **summarize(history, cfg.num_students, topk),
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "num_students": cfg.num_students,
        "epochs": cfg.epochs,
        "world_size": world.world_size,
        "train_seconds": train_seconds,
        "images_per_s": images_seen / max(train_seconds, 1e-9),
        "corrupt_images": list(info.corrupt),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "run_dir": os.path.abspath(run_dir),
        **code_version(),
    }
    if world.is_main:
        checkpoint.write_atomic(
            os.path.join(run_dir, "summary.json"), lambda fh: fh.write(json.dumps(summary, indent=2).encode())
        )
        print_table(summary, cfg.num_students)
        print(
            f"\nrun directory: {os.path.abspath(run_dir)}  (summary.json, metrics.jsonl, accuracy.png, checkpoint.pt)",
            flush=True,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        train(resolve(parse_args(argv)))
    except UserError as error:
        print(f"ffsd-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
