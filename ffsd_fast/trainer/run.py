"""The FFSD trainer: one run, read top to bottom as its phases.

``train(cfg)``: check the device → build (data, networks, optimisers, scaler, the step) → restore (a checkpoint, when
resuming; one starting point on every rank) → for each epoch {train, the method's work between epochs, evaluate,
save} → finish (summary). The step
itself is ``ffsd_fast.step.train_step``; the only host synchronisations are marked ``# host sync`` and happen every
``--log-every`` steps and at epoch ends.

Under ``torchrun`` every process trains on its own shard with ``--batch-size`` images per step and DDP averages the
gradients during the backward (``ffsd_fast.step.distributed``); rank 0 alone writes the run directory (log,
checkpoints, summary), and every rank holds the same evaluation results.
"""

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Collection

import torch
from tqdm import tqdm

from ffsd_fast import models
from ffsd_fast.data.image_folder import ImageFolderIndex, find_images, index_images, leave_out
from ffsd_fast.data.loaders import build_loaders, smallest_train_batch
from ffsd_fast.errors import UserError
from ffsd_fast.files import write_atomic
from ffsd_fast.method import registry
from ffsd_fast.models.cost import cost
from ffsd_fast.step.cuda_graph import check_capturable
from ffsd_fast.step.distributed import (
    World,
    barrier,
    broadcast_state,
    close_world,
    init_world,
    on_main,
)
from ffsd_fast.step.optimizers import make_optimizers
from ffsd_fast.step.precision import mixed_precision
from ffsd_fast.trainer import checkpoint, step_forms
from ffsd_fast.trainer.config import FIELDS, Config, data_spec, optimizer_spec, to_dict
from ffsd_fast.trainer.evaluate import evaluate, topk_for
from ffsd_fast.trainer.loop import between_epochs, learning_rates, train_epoch
from ffsd_fast.trainer.resume import AUTO, changes, check_resumable, find_auto
from ffsd_fast.trainer.run_dir import (
    claim_new_run_dir,
    lock_run_dir,
    prepare_output_dir,
    release_run_dirs,
    remove_partial_files,
)
from ffsd_fast.trainer.runlog import RunLog, code_version, environment
from ffsd_fast.trainer.state import Run
from ffsd_fast.trainer.summary import curves, epoch_line, print_table, summarize


def training_device(cfg: Config, world: World) -> torch.device:
    """This process's device, after the one-line errors for what it cannot run."""
    device = torch.device(cfg.device, world.local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if cfg.cuda_graph:
        check_capturable(device, cfg.optimizer_impl)
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn synchronises BatchNorm over NCCL: it needs --device cuda")
    if cfg.grad_compression != "none" and not world.distributed:
        raise UserError(
            f"--grad-compression {cfg.grad_compression} compresses the gradients that processes exchange: this run "
            "has one process (drop it, or start several with torchrun)"
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest convolution algorithms once
    return device


def check_batchnorm_batches(cfg: Config, num_train: int) -> None:
    """BatchNorm cannot train on one value per channel: refuse a batch that would give it one, before training."""
    _, height, width = models.tap_shapes(cfg.model, cfg.image_size)[-1]
    smallest = smallest_train_batch(cfg.dataset, num_train, cfg.batch_size, cfg.drop_last)  # ImageNet's wrap around
    if smallest * height * width == 1:
        raise UserError(
            f"--batch-size {cfg.batch_size} on {num_train} training images leaves a batch of 1, and the last stage of "
            f"{cfg.model} at {cfg.image_size} px is 1×1, so BatchNorm would train on a single value: add --drop-last "
            "or choose a batch size that does not leave 1"
        )


def imagenet_index(cfg: Config, world: World) -> ImageFolderIndex:
    """The ImageNet tree's file lists, corrupt images left out: rank 0 decodes every image (cached), the other
    ranks list the tree themselves and receive only the names of the corrupt files."""
    root_key = hashlib.sha1(os.path.abspath(cfg.data_root).encode()).hexdigest()[:12]
    cache = os.path.join(cfg.output_dir, ".image-check", f"{root_key}.json")
    main_index = on_main(world, lambda: index_images(cfg.data_root, cfg.workers, cfg.check_images, cache))
    if world.is_main:
        return main_index
    return leave_out(find_images(cfg.data_root), main_index.corrupt)


def read_resume(
    cfg: Config, given: Collection[str], world: World, device: torch.device
) -> tuple[Config, dict | None, str | None]:
    """(the configuration to train with, the checkpoint that ``--resume`` names, its run directory); the checkpoint
    and directory are None for a fresh run. ``--resume auto`` keeps the run's epochs and milestones unless given."""
    resume = cfg.resume
    if resume == AUTO:
        resume = on_main(world, lambda: find_auto(cfg, given))
    if not resume:
        return cfg, None, None
    path = checkpoint.resolve_path(resume)
    on_main(world, lambda: lock_run_dir(os.path.dirname(os.path.abspath(path))))  # before reading: one writer
    saved = checkpoint.load(path, device)
    if cfg.resume == AUTO:  # what the command left to the defaults stays the run's (see ``resume``)
        kept = {k: saved["config"][k] for k in ("epochs", "lr_milestones") if k not in given and k in saved["config"]}
        cfg = dataclasses.replace(cfg, **kept)
    check_resumable(saved["config"], saved["epoch"], cfg, given, path)
    return cfg, saved, os.path.dirname(os.path.abspath(path))


def build(cfg: Config, world: World, device: torch.device, given: Collection[str] = FIELDS) -> Run:
    """Everything a run trains with: loaders, networks (seeded), optimisers, scaler and the step. ``given``: the
    fields the command asked for (a resume refuses to change those that change the result; see ``resume``)."""
    on_main(world, lambda: prepare_output_dir(cfg.output_dir))
    cfg, saved, run_dir = read_resume(cfg, given, world, device)
    index = imagenet_index(cfg, world) if cfg.dataset == "imagenet" else None
    amp_dtype, scaler = mixed_precision(cfg.amp, device)
    train_loader, test_loader, info = build_loaders(
        data_spec(cfg),
        device,
        rank=world.rank,
        world_size=world.world_size,
        dtype=amp_dtype or torch.float32,
        channels_last=cfg.channels_last,
        index=index,
    )
    check_batchnorm_batches(cfg, info.num_train // world.world_size)
    if run_dir is None:
        run_dir = on_main(world, lambda: claim_new_run_dir(cfg))

    torch.manual_seed(cfg.seed)
    method = build_method(cfg, info.num_classes, device, world)
    lambdas = torch.zeros(len(method.lambdas), device=device)
    amp = (amp_dtype, scaler)
    form, tuned = step_forms.choose(cfg, method, saved, train_loader, lambdas, amp, world, given)
    method = step_forms.apply(method, form, cfg)
    optimizers = make_optimizers(method, optimizer_spec(cfg))
    step = step_forms.make_step(cfg, method, optimizers, lambdas, amp, world)
    topk = topk_for(cfg.dataset, info.num_classes)
    return Run(
        cfg=cfg,
        world=world,
        device=device,
        run_dir=run_dir,
        info=info,
        train_loader=train_loader,
        test_loader=test_loader,
        heldout_loader=getattr(train_loader, "heldout", None),  # the in-memory loaders', when the method holds out
        method=method,
        optimizers=optimizers,
        scaler=scaler,
        lambdas=lambdas,
        step=step,
        form=form,
        tuning=tuned,
        topk=topk,
        saved=saved,
        saved_config=saved["config"] if saved is not None else None,
    )


def build_method(cfg: Config, num_classes: int, device: torch.device, world: World):  # noqa: ANN201
    """The run's method, its networks drawn from the seed, on the device in the run's layout, per-network (its step
    form, ``step_forms.apply``, comes next)."""
    method = registry.create(cfg.method, cfg.model, num_classes, cfg.num_students, cfg.image_size, **to_dict(cfg)).to(
        device
    )
    if cfg.sync_bn and world.distributed:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method


def restore(run: Run) -> None:
    """The resumed checkpoint's weights, optimiser states, history and RNGs, when there is one; then rank 0's weights
    on every rank (one starting point, whatever each built or loaded), compiled once they are final."""
    if run.saved is not None:
        run.history, run.start_epoch = checkpoint.restore(run.saved, run.method, run.optimizers, run.scaler)
        run.saved = None  # its tensors (on the training device) are copied in: not held for the whole run
    broadcast_state(run.method, run.world)
    if run.form.compiled:  # --compile, or the compiled form --step auto chose
        run.method.compile_networks(**step_forms.COMPILE_OPTIONS)


def open_log(run: Run) -> None:
    """The run directory's log (rank 0). A fresh run writes its config and version once; a resumed one first clears
    what the interrupted process left (temporary files, log records past the checkpoint) and logs a ``resume``
    record naming what it changed, so ``config.yaml`` stays the run's configuration as it started."""
    cfg, world, info = run.cfg, run.world, run.info
    steps = len(run.train_loader)
    resumed = run.saved_config is not None
    if world.is_main:
        remove_partial_files(run.run_dir)  # an interrupted write's, by a process killed in it
    if world.is_main and resumed:
        done = run.start_epoch - 1
        run.log = RunLog(run.run_dir, epochs_done=done, steps_per_epoch=steps)
        run.log.log(
            {"kind": "resume", "epoch": done, "changed": changes(run.saved_config, cfg), **environment(run.device)},
            done * steps,
        )
    elif world.is_main:
        run.log = RunLog(run.run_dir)
        run.log.write_config(to_dict(cfg), {**code_version(), **environment(run.device)})
    if info.corrupt and not resumed:
        shown = "\n  ".join(info.corrupt[:20])
        more = f"\n  … and {len(info.corrupt) - 20} more (all in metrics.jsonl)" if len(info.corrupt) > 20 else ""
        if world.is_main:
            print(
                f"ffsd-train: warning: {len(info.corrupt)} image(s) cannot be decoded and are left out:"
                f"\n  {shown}{more}",
                file=sys.stderr,
                flush=True,
            )
        run.log.log({"kind": "corrupt_images", "epoch": 0, "count": len(info.corrupt), "files": list(info.corrupt)}, 0)
    if run.tuning is not None:
        run.log.log(
            {"kind": "step_form", "epoch": run.start_epoch - 1, "form": run.form.name, **run.tuning.record()}, 0
        )
        if world.is_main:
            print(run.tuning.table(), flush=True)
    if world.is_main:
        processes = f"  ({world.world_size} processes)" if world.distributed else ""
        print(f"run directory: {run.run_dir}{processes}", flush=True)


def evaluate_epoch(
    run: Run, epoch: int, epoch_lambdas: dict[str, float], seconds: float, images: int, fitted: dict[str, float]
) -> dict:
    """Every network on the test split; the epoch's record (with what the method ``fitted`` between epochs) joins
    the history and the log."""
    cfg = run.cfg
    # Rank 0's BatchNorm statistics everywhere, as DDP's buffer broadcast would: every rank evaluates and the
    # checkpoint holds the same networks.
    broadcast_state(run.method, run.world, buffers_only=True)
    accuracies = evaluate(run.method, run.test_loader, run.topk, run.world)
    steps = len(run.train_loader)
    sgd_lr, decoder_lr = learning_rates(cfg, epoch, steps - 1, steps)
    record = {
        "kind": "eval",
        "epoch": epoch,
        **accuracies,
        "lr": sgd_lr,
        "decoder_lr": decoder_lr,
        **epoch_lambdas,
        "train_seconds": seconds,
        "train_images": images,
        "images_per_s": images / seconds,
        **fitted,
    }
    run.history.append(record)
    run.log.log(record, epoch * steps)  # TensorBoard's step: the global step, as the training records'
    run.log.plot_accuracy(run.history, curves(run.method), run.method.deployed)
    if run.world.is_main:
        speed = f"({seconds:.1f}s, {images / seconds:.0f} img/s)"
        tqdm.write(f"epoch {epoch}/{cfg.epochs}  {epoch_line(accuracies, run.method)}  {speed}")
    return record


def save(run: Run, epoch: int) -> None:
    """The checkpoint after ``epoch`` (rank 0); no rank runs ahead of the checkpoint a restart would resume from."""
    if run.world.is_main:
        state = checkpoint.state(
            to_dict(run.cfg), run.info.num_classes, epoch, run.method, run.optimizers, run.scaler, run.history
        )
        state["step_form"] = run.form.record()
        checkpoint.save_atomic(state, run.checkpoint_path)
    barrier(run.world)


def finish(run: Run) -> dict:
    """The run's summary: returned, and on rank 0 written to ``summary.json`` and printed as a table."""
    cfg, world, history = run.cfg, run.world, run.history
    train_seconds = sum(h["train_seconds"] for h in history)
    images_seen = sum(h["train_images"] for h in history)
    # The deployed network is the stock backbone (what ffsd-export writes): its cost, counted once here so that the
    # report reads it from the file.
    params, macs = cost(cfg.model, run.info.num_classes, cfg.image_size)
    summary = {
        **summarize(history, run.method, run.topk),
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "num_students": cfg.num_students,
        "epochs": cfg.epochs,
        "world_size": world.world_size,
        "num_classes": run.info.num_classes,
        "image_size": cfg.image_size,
        "deployed_params": params,
        "deployed_macs": macs,
        "train_seconds": train_seconds,
        "images_per_s": images_seen / max(train_seconds, 1e-9),
        "step": {"form": run.form.name, **(run.tuning.record() if run.tuning is not None else {})},
        "corrupt_images": list(run.info.corrupt),
        "run_dir": os.path.abspath(run.run_dir),
        "config": to_dict(cfg),
        **code_version(),
        **environment(run.device),
    }
    if world.is_main:
        write_atomic(
            os.path.join(run.run_dir, "summary.json"), lambda fh: fh.write(json.dumps(summary, indent=2).encode())
        )
        print_table(summary, run.method)
        print(
            f"\nrun directory: {os.path.abspath(run.run_dir)}  (summary.json, metrics.jsonl, accuracy.png, "
            "checkpoint.pt)",
            flush=True,
        )
    return summary


def train(cfg: Config, given: Collection[str] = FIELDS) -> dict:
    """Trains one FFSD run to ``cfg.epochs`` and returns its summary (also written to ``summary.json``). ``given``:
    the fields the command set (default: all of them, so a resume in code refuses any change of result)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    world = init_world(cfg.device, cuda_graph=bool(cfg.cuda_graph))
    try:
        run = build(cfg, world, training_device(cfg, world), given)
        restore(run)
        open_log(run)
        try:
            for epoch in range(run.start_epoch, run.cfg.epochs + 1):
                epoch_lambdas, seconds, images = train_epoch(run, epoch)
                fitted = between_epochs(run)
                evaluate_epoch(run, epoch, epoch_lambdas, seconds, images, fitted)
                save(run, epoch)
        finally:
            run.log.close()
        return finish(run)
    finally:
        release_run_dirs()
        close_world(world)
