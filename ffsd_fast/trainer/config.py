"""The run configuration: one typed, commented dataclass; command-line flags are made from its fields.

Precedence: the field defaults, then ``-c config.yaml``, then flags given on the command line. Fields left at
``None`` are filled by ``resolve`` from the dataset (the reference's CIFAR-100 and ImageNet recipes, and a small
recipe for the embedded digits that trains in minutes on a CPU).
"""

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from ffsd_fast import models
from ffsd_fast.data.common import DATASETS, DEFAULT_DATASET, DataSpec, absolute_data_root, check_dataset
from ffsd_fast.errors import UserError
from ffsd_fast.method import registry
from ffsd_fast.method.base import Method, check_stackable
from ffsd_fast.step.optimizers import OptimizerSpec
from ffsd_fast.trainer.help_text import HelpFormatter, with_default
from ffsd_fast.trainer.recipes import RECIPES, describe


def _field(default, help: str | Callable[[], str], **checks):
    """A config field: its default, its help, and the checks ``check_fields`` applies (``choices``; ``at_least``,
    ``above``, ``below`` for numbers and for each item of a list). ``help`` and ``choices`` may be functions, read
    when asked (the methods are whatever the registry holds by then)."""
    return field(default=default, metadata={"help": help, **checks})


def _now(value):
    return value() if callable(value) else value


def _methods_help() -> str:
    return "the online-distillation method: " + "; ".join(f"{n} ({registry.get(n).summary})" for n in registry.names())


@dataclass
class _RunConfig:
    # What to train.
    method: str = _field("ffsd", _methods_help, choices=registry.names)
    model: str = _field("resnet20", "backbone of every network: " + ", ".join(models.names()))
    dataset: str = _field(
        DEFAULT_DATASET, "digits (embedded, no download) | cifar10 | cifar100 | imagenet", choices=DATASETS
    )
    data_root: str | None = _field(
        None,
        "dataset folder (CIFAR: the folder holding cifar-100-python/; ImageNet: the folder holding train/ and val/)",
    )
    num_students: int = _field(2, "m, the number of common students (≥ 2)", at_least=1)
    image_size: int | None = _field(
        None,
        "input size (default by dataset, for CIFAR / ImageNet models: "
        + describe(lambda r: f"{r.image_size['cifar']}/{r.image_size['imagenet']}")
        + ")",
        at_least=1,
    )
    # Optimisation.
    epochs: int | None = _field(
        None, "epochs to train (default by dataset: " + describe(lambda r: r.epochs) + ")", at_least=1
    )
    batch_size: int | None = _field(
        None, "training batch per process (default by dataset: " + describe(lambda r: r.batch_size) + ")", at_least=1
    )
    eval_batch_size: int | None = _field(None, "evaluation batch per process (default: the training batch)", at_least=1)
    drop_last: bool = _field(False, "drop the last partial training batch (the reference keeps it)")
    lr: float = _field(0.1, "SGD learning rate of students, leader and fusion module", above=0)
    momentum: float = _field(0.9, "SGD momentum (Nesterov)", above=0, below=1)
    weight_decay: float = _field(1e-4, "weight decay of students and leader", at_least=0)
    fusion_weight_decay: float = _field(1e-5, "weight decay of the fusion module", at_least=0)
    decoder_lr: float = _field(1e-3, "Adam learning rate of the self-distillation decoders", above=0)
    decoder_weight_decay: float = _field(1e-4, "Adam L2 weight decay of the decoders", at_least=0)
    lr_schedule: str | None = _field(
        None,
        "multistep | imagenet (per-iteration warm-up and decay); default by dataset: "
        + describe(lambda r: r.lr_schedule),
        choices=("multistep", "imagenet"),
    )
    lr_milestones: list[int] | None = _field(
        None,
        "multistep: epochs after which every lr is ×0.1 (default by dataset: "
        + describe(lambda r: " ".join(map(str, r.lr_milestones)) if r.lr_milestones else "½ and ¾ of --epochs")
        + ")",
        at_least=0,
    )
    # The method.
    temperature: float = _field(2.0, "distillation temperature T", above=0)
    lambda_warmup_epochs: int = _field(
        5, "each of the method's λ's is λ(e) = λ·exp(−5(1 − e/W)²) for epochs e ≤ W", at_least=1
    )
    # The reference's quirks, reproduced by default; --no-quirk-… gives the clean variant.
    quirk_probe_forward: bool = _field(
        True,
        "run student 1 once on random input at construction, as the "
        "reference does (moves its BN statistics and the RNG)",
    )
    quirk_imagenet_lr_epoch: bool = _field(
        True, "ImageNet lr formula fed the 1-based epoch, as the reference does (epochs 1–29 at the full lr)"
    )
    # Running.
    seed: int = _field(0, "seed of the weights, the shuffling and the augmentation", at_least=0, below=2**63)
    device: str | None = _field(None, "cpu | cuda (default: cuda when available)", choices=("cpu", "cuda"))
    # Speed levers. Unset, they take the defaults that benchmarks/train_throughput.py measured fastest on an H100
    # (benchmarks/results/train_throughput.jsonl): on CUDA bf16 autocast, channels-last, the Triton losses and a
    # captured step (single process); on a CPU none of them.
    kernels: str | None = _field(
        None,
        "loss implementation: torch (plain PyTorch) | triton (fused Triton kernels on "
        "CUDA; the PyTorch references on a CPU unless TRITON_INTERPRET=1); default "
        "triton on CUDA, torch on a CPU",
        choices=("torch", "triton"),
    )
    fusion_kernel: str = _field(
        "torch",
        "fusion blocks: torch (torch.cat + cuDNN; measured faster on an H100) | "
        "triton (the concat-free Triton fusion block)",
        choices=("torch", "triton"),
    )
    amp: str | None = _field(
        None,
        "autocast dtype of the forward passes: bf16 | fp16 (with a gradient scaler) | off; "
        "default bf16 on CUDA, off on a CPU",
        choices=("bf16", "fp16", "off"),
    )
    channels_last: bool | None = _field(
        None, "networks and inputs in the channels-last memory format (default: on CUDA)"
    )
    compile: bool = _field(False, "torch.compile every network (in place; on a CPU Inductor needs a C++ compiler)")
    cuda_graph: bool | None = _field(
        None,
        "capture the whole training step once as a CUDA graph and replay it "
        "(CUDA only; the optimisers must be fused or foreach); default: on for "
        "a single CUDA process, off otherwise",
    )
    step: str | None = _field(
        None,
        "the training step's form, the same arithmetic either way: per-network | stacked (the networks of one "
        "architecture as one grouped network: fewer, larger kernels) | auto (time every "
        "form the run allows on its first batch and keep the fastest); default auto on CUDA, per-network on a CPU "
        "(nothing is timed there)",
        choices=("auto", "per-network", "stacked"),
    )
    step_tuning_seconds: float = _field(
        60.0,
        "--step auto: the seconds that timing the forms may take (each form a share of what is left; the "
        "compiled forms, timed last, are the first dropped)",
        above=0,
    )
    stack_networks: bool = _field(False, "short for --step stacked")
    optimizer_impl: str = _field(
        "fused",
        "SGD and Adam implementation: fused | foreach (PyTorch's) | apex "
        "(NVIDIA apex's FusedSGD/FusedAdam, when apex is installed)",
        choices=("fused", "foreach", "apex"),
    )
    workers: int = _field(4, "data-loading worker processes, or DALI threads (ImageNet folders)", at_least=0)
    loader: str = _field(
        "auto",
        "ImageNet folders: dali (NVIDIA DALI, GPU decoding on CUDA) | torchvision | auto (DALI when installed)",
        choices=("auto", "dali", "torchvision"),
    )
    check_images: bool = _field(
        True,
        "decode every ImageNet image once before training and leave the corrupt ones "
        "out (named in the log; cached under --output-dir)",
    )
    sync_bn: bool = _field(False, "synchronise BatchNorm statistics across processes (CUDA, multi-process)")
    grad_compression: str = _field(
        "none",
        "gradients all-reduced between processes as: none (fp32) | bf16 | fp16 (DDP's compression hooks: half the "
        "bytes, each gradient rounded to 16 bits before averaging; several processes only)",
        choices=("none", "bf16", "fp16"),
    )
    ddp_bucket_mb: int = _field(
        25,
        "size of DDP's gradient buckets in MiB: each bucket's all-reduce starts when the backward has filled it "
        "(several processes only)",
        at_least=1,
    )
    output_dir: str = _field("runs", "where run directories are created")
    run_name: str | None = _field(None, "run directory name (default: dataset-model-mM-time)")
    resume: str | None = _field(
        None,
        "continue a run: its checkpoint.pt, its run directory, or auto (the newest "
        "checkpoint of --run-name under --output-dir, else of a run with this "
        "method, model, dataset, m and image size; a fresh start when none)",
    )
    log_every: int = _field(20, "read the losses back from the device every N steps (a host sync)", at_least=1)
    progress: bool = _field(True, "show progress bars")


# Fields that do not change what a run computes: where files go and are read from, how often the host looks, how the
# step is launched (a captured step replays the same kernels). ``--resume`` accepts new values for these (and a larger
# ``--epochs``) and refuses any other change; the report groups runs by every field not here (and not the seed).
RESULT_NEUTRAL = frozenset(
    {
        "data_root",
        "output_dir",
        "run_name",
        "resume",
        "log_every",
        "progress",
        "workers",
        "cuda_graph",
        # How the gradients are cut into all-reduces: the same averages (up to the order in which a collective adds
        # the ranks' values, which NCCL may choose by message size).
        "ddp_bucket_mb",
        # The networks run as one grouped network: the same arithmetic (the float64 parity suite), the same state.
        "stack_networks",
        "step",
        "step_tuning_seconds",
    }
)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation):
    """``int | None`` → ``int``; ``list[int] | None`` → ``list[int]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _method_options() -> list[tuple[str, type, dataclasses.Field]]:
    """Every registered method's options (``Method.options``), each once: methods may share one, never redefine it."""
    options: dict[str, tuple[type, dataclasses.Field, str]] = {}
    for method in map(registry.get, registry.names()):
        for name, (kind, option) in method.options.items():
            if name in options and options[name][1] is not option:
                raise TypeError(f"methods {options[name][2]} and {method.name} both declare an option {name}")
            options[name] = (kind, option, method.name)
    return [(name, kind, option) for name, (kind, option, _) in options.items()]


# The run's fields, then the options of the methods registered by now (the built-in ones, and any imported before
# this module): each a flag, a YAML key and a checked value like every other field.
Config = dataclasses.make_dataclass("Config", _method_options(), bases=(_RunConfig,))
Config.__module__, Config.__doc__ = __name__, "A run's configuration: the run's fields and the methods' options."

FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ffsd-train",
        description="Train FFSD (online knowledge distillation with feature fusion and self-distillation). "
        "With no arguments it trains ResNet-20 students on the embedded digits dataset.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-c", "--config", help="YAML file of field: value pairs (flags given here override it)")
    parser.add_argument("--imagenet", action="store_true", help="short for --dataset imagenet")
    for f in FIELDS.values():
        kind = _base_type(f.type)
        kwargs = {"help": with_default(_now(f.metadata["help"]), f.default), "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kwargs["choices"] = _now(f.metadata["choices"])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kwargs.update(type=typing.get_args(kind)[0], nargs="+")
        else:
            kwargs["type"] = kind
        parser.add_argument(flag_of(f.name), dest=f.name, **kwargs)
    return parser


def _describe(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _check_number(name: str, value, meta: dict, where: str) -> None:
    if "above" in meta and not value > meta["above"]:
        raise UserError(f"{name}{where} must be greater than {meta['above']}, got {_describe(value)}")
    if "at_least" in meta and not value >= meta["at_least"]:
        raise UserError(f"{name}{where} must be at least {meta['at_least']}, got {_describe(value)}")
    if "below" in meta and not value < meta["below"]:
        raise UserError(f"{name}{where} must be less than {meta['below']}, got {_describe(value)}")


def check_field(name: str, value, where: str = ""):
    """``value`` for field ``name`` checked by type and range, as the field declares them (an int is accepted where a
    float is asked and returned as one); raises ``UserError`` naming the flag (and ``where``: the YAML file)."""
    f = FIELDS[name]
    flag = flag_of(name)
    kind = _base_type(f.type)
    if value is None:
        if f.default is None:
            return None
        raise UserError(f"{flag}{where} cannot be empty (null)")
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{flag}{where} must be true or false, got {_describe(value)}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{flag}{where} must be an integer, got {_describe(value)}")
        _check_number(flag, value, f.metadata, where)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{flag}{where} must be a number, got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{flag}{where} must be a finite number, got {value}")
        _check_number(flag, value, f.metadata, where)
    elif kind is str:
        if not isinstance(value, str):
            raise UserError(f"{flag}{where} must be a string, got {_describe(value)}")
        choices = _now(f.metadata.get("choices"))
        if choices and value not in choices:
            raise UserError(f"{flag}{where} must be one of {', '.join(choices)}; got {value!r}")
    elif typing.get_origin(kind) is list:  # list[int]: the only list field
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise UserError(f"{flag}{where} must be a list of integers (YAML: [150, 225]), got {_describe(value)}")
        for v in value:
            _check_number(flag, v, f.metadata, where)
        value = list(value)
    return value


def check_fields(values: dict, where: str = "") -> dict:
    """Every value of ``values`` (field: value) checked by ``check_field``; unknown fields refused."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown field(s){where}: {', '.join(unknown)}")
    return {name: check_field(name, value, where) for name, value in values.items()}


def load_yaml(path: str) -> dict:
    """A YAML file's field: value pairs, checked by type and range (the message names the file)."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            values = yaml.safe_load(fh) or {}
        except yaml.YAMLError as error:
            raise UserError(f"cannot parse config file {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of field: value")
    return check_fields(values, f" (in {path})")


def parse_command(argv: list[str] | None = None) -> tuple[Config, frozenset[str]]:
    """Flags (after ``-c config.yaml``) → (a ``Config``, not yet resolved; the fields the user gave, in the YAML file
    or as flags: what ``--resume`` compares with the run it continues)."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    if args.pop("imagenet", False):
        args["dataset"] = "imagenet"
    values = load_yaml(config_file) if config_file else {}
    values.update(check_fields(args))
    return Config(**values), frozenset(values)


def parse_args(argv: list[str] | None = None) -> Config:
    """Flags → ``Config`` (not yet resolved)."""
    return parse_command(argv)[0]


def resolve(config: Config) -> Config:
    """Fills the dataset-dependent defaults and checks every value; raises ``UserError`` on bad input."""
    c = Config(**check_fields(to_dict(config)))  # a Config built in code is checked as flags are
    check_dataset(c.dataset)
    models.family(c.model)  # raises UserError listing the known models
    registry.check_students(c.method, c.num_students)
    for name, value in registry.get(c.method).recipe.get(c.dataset, {}).items():
        if getattr(c, name) is None:  # the method's recipe, beside the dataset's
            setattr(c, name, value)
    recipe = RECIPES[c.dataset]
    if c.image_size is None:
        c.image_size = recipe.image_size[models.family(c.model)]
    models.check_image_size(c.model, c.image_size)
    if c.epochs is None:
        c.epochs = recipe.epochs
    if c.batch_size is None:
        c.batch_size = recipe.batch_size
    if c.eval_batch_size is None:
        c.eval_batch_size = c.batch_size
    if c.lr_schedule is None:
        c.lr_schedule = recipe.lr_schedule
    if c.lr_milestones is None:
        c.lr_milestones = recipe.milestones(c.epochs)
    data_spec(c)  # checks the data fields, naming the flag to fix
    c.data_root = absolute_data_root(c.data_root)  # saved so: ffsd-eval and --resume work from any folder
    if c.device is None:
        import torch

        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = c.device == "cuda"
    if c.kernels is None:
        c.kernels = "triton" if gpu else "torch"
    if c.amp is None:
        c.amp = "bf16" if gpu else "off"
    if c.channels_last is None:
        c.channels_last = gpu
    if c.cuda_graph is None:
        # Capture across processes puts NCCL inside the graph, with its own constraints (cuda_graph.py): opt-in.
        c.cuda_graph = gpu and int(os.environ.get("WORLD_SIZE", "1")) == 1 and not c.compile
    _resolve_step(c, gpu)
    check_combination(c)
    return c


def check_combination(c: Config) -> None:
    """Settings that cannot run together (also asked of each form ``--step auto`` would try)."""
    if c.sync_bn and c.fusion_kernel == "triton":
        raise UserError(
            "--sync-bn with --fusion-kernel triton: the Triton fusion block normalises with its own "
            "batch statistics; use --fusion-kernel torch"
        )


def _resolve_step(c: Config, gpu: bool) -> None:
    if c.stack_networks:
        if c.step not in (None, "stacked"):
            raise UserError(f"--stack-networks is --step stacked, and --step {c.step} was given too: give one of them")
        c.step = "stacked"
    if c.step is None:
        c.step = "auto" if gpu else "per-network"
    c.stack_networks = c.step == "stacked"
    if c.step == "stacked":
        _check_stackable(c)


def _check_stackable(c: Config) -> None:
    # --sync-bn stacks too: its SyncBatchNorm layers become one over the stacked channels (StackedSyncBatchNorm).
    check_stackable(registry.get(c.method), c.model, dataclasses.asdict(c))


def method_of(config: dict) -> type[Method]:
    """The method class of a saved run's configuration (one saved before ``--method`` existed trained the default)."""
    return registry.get(config.get("method", FIELDS["method"].default))


def data_spec(config: Config) -> DataSpec:
    """The data slice of a resolved configuration (with the views its method reads of each training image, and the
    slice of the training set it holds out)."""
    fields = to_dict(config)
    method = method_of(fields)
    return DataSpec(
        dataset=config.dataset,
        data_root=config.data_root,
        image_size=config.image_size,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        seed=config.seed,
        drop_last=config.drop_last,
        workers=config.workers,
        loader=config.loader,
        check_images=config.check_images,
        views=method.view_count(fields),
        holdout=method.holdout_fraction(fields),
    )


def optimizer_spec(config: Config) -> OptimizerSpec:
    """The optimiser slice of a configuration."""
    return OptimizerSpec(
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        fusion_weight_decay=config.fusion_weight_decay,
        decoder_lr=config.decoder_lr,
        decoder_weight_decay=config.decoder_weight_decay,
        impl=config.optimizer_impl,
    )


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
