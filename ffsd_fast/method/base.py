"""What a method is: an ``nn.Module`` that holds its networks and whose forward turns a batch into named loss terms.

The trainer, evaluation, export, summary, run log, report and CLI read a method through this declaration alone and
never name one. A method subclasses ``Method``, sets the class attributes below, builds its networks in its
``__init__``, implements ``forward``, ``parameter_groups`` and ``eval_logits``, and registers itself
(``registry.register``): that is the whole of adding one (``tests/integration/test_method_plugin.py`` does it in a
test file).

A method writes its forward once, against ``self.form`` (``forms.Separate`` or ``forms.Stacked``): the networks'
outputs by network, and the grouped ops. Whether the networks run one by one or stacked is the form's business.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import Field, dataclass, field
from types import ModuleType
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.method.forms import Distances, Separate, Stacked, kernel_ops

__all__ = ["LossTerms", "Method", "NetworkSpec", "ParamGroup", "TermTable", "kernel_ops"]


@dataclass(frozen=True)
class NetworkSpec:
    """What every method builds its networks from: the backbone, the task, and the run's settings.

    ``settings``: the run's configuration fields by name (a method reads its own: temperature, λ's, quirks), with
    the defaults of ``Method.defaults`` for those a caller leaves out."""

    model: str
    num_classes: int
    num_students: int
    image_size: int
    settings: Mapping[str, Any] = field(default_factory=dict)


def option(kind: type, default: Any, help: str, **checks: Any) -> tuple[type, Field]:
    """A configuration field that a method adds (``Method.options``): a flag, a YAML key, a value checked as the
    run's fields are (``choices``; ``at_least``, ``above``, ``below``), recorded in the run's config."""
    return kind, field(default=default, metadata={"help": help, **checks})


class ParamGroup(NamedTuple):
    """Parameters that one optimiser updates alike: ``optimizer`` ``sgd`` (the networks) or ``adam`` (helper
    networks such as decoders); ``weight_decay`` names the field of ``step.optimizers.OptimizerSpec`` to use."""

    optimizer: str
    params: list[nn.Parameter]
    weight_decay: str


class LossTerms(NamedTuple):
    """Every term unweighted and weighted, keyed ``network.term`` (``student1.diversity``), and their weighted sum.

    A NamedTuple, so that DDP finds its tensors (pytree): the first backward of a static graph must pass through
    them, or that step's gradients are never reduced."""

    values: dict[str, torch.Tensor]
    weighted: dict[str, torch.Tensor]
    total: torch.Tensor

    def detach(self) -> "LossTerms":
        return LossTerms(
            {k: v.detach() for k, v in self.values.items()},
            {k: v.detach() for k, v in self.weighted.items()},
            self.total.detach(),
        )


class TermTable:
    """The terms of one step, each a value or the list of values it sums, and its weight (a λ of the step's device
    tensor, or None for 1). ``total`` weights them in a handful of kernels whatever their number."""

    def __init__(self, distances: Distances) -> None:
        self.distances = distances
        self.parts: dict[str, list] = {}
        self.weights: dict[str, torch.Tensor | None] = {}

    def add(self, name: str, value: torch.Tensor | list, weight: torch.Tensor | None = None) -> None:
        self.parts[name] = list(value) if isinstance(value, list) else [value]
        self.weights[name] = weight

    def total(self, lambdas: torch.Tensor) -> LossTerms:
        """The parts in one ``[T, K]`` stack (a shared zero pads the shorter sums), the weights in one ``[T]`` stack.
        Summed in Python, each addition and each weighting would be a kernel of its own, forward and backward (~40
        and ~15 a step); the backward of these is one multiplication."""
        parts, names = self.distances.resolve(self.parts), list(self.parts)
        width = max(len(p) for p in parts.values())
        zero, one = lambdas.new_zeros(()), lambdas.new_ones(())
        table = torch.stack([t for name in names for t in parts[name] + [zero] * (width - len(parts[name]))])
        values = table.view(len(names), width).sum(dim=1) if width > 1 else table
        weighted = values * torch.stack([one if self.weights[n] is None else self.weights[n] for n in names])
        return LossTerms(
            dict(zip(names, values.unbind(), strict=True)),
            dict(zip(names, weighted.unbind(), strict=True)),
            total=weighted.sum(),
        )


def create_students(spec: NetworkSpec, probe_forward: bool) -> list[nn.Module]:
    """``spec.num_students`` backbones, drawn first, as the reference draws them.

    ``probe_forward`` (quirk, on by default): the reference runs student 1 once in train mode on
    ``randn(1, 3, H, W)`` to read its last stage's shape. That updates student 1's BN running statistics and
    consumes random numbers. Skipped when the last stage is 1×1, where BN cannot train on a single value."""
    models.check_image_size(spec.model, spec.image_size)
    _, height, width = models.tap_shapes(spec.model, spec.image_size)[-1]
    students = [models.create(spec.model, spec.num_classes) for _ in range(spec.num_students)]
    if probe_forward and height * width > 1:
        probe = torch.randn(1, 3, spec.image_size, spec.image_size)
        students[0].train()
        with torch.no_grad():
            students[0](probe)
    return students


def check_stackable(method: "type[Method]", model: str, settings: Mapping[str, Any] | None = None) -> None:
    """``UserError`` (one line, saying why) unless ``method``'s networks can run stacked (``--stack-networks``):
    every architecture it stacks (``Method.stacked_models`` of ``model`` and the run's ``settings``)."""
    if not method.stackable:
        raise UserError(f"--stack-networks: the {method.name} method cannot run its networks stacked; drop it")
    for name in method.stacked_models(model, settings or {}):
        _check_model_stackable(name)


def _check_model_stackable(model: str) -> None:
    reason = models.stack_blocker(model)
    if reason is not None:
        raise UserError(
            f"--stack-networks: {model} cannot be stacked: {reason}, which would interleave the networks' "
            "channels (grouped convolutions need them network by network); drop --stack-networks"
        )


class Method(nn.Module):
    """One online-distillation method: its networks (submodules, so its state dict is the checkpoint's) and its
    forward ``(images, labels, lambdas) -> LossTerms`` over them, every path between networks cut by ``detach`` so
    that one backward of the total gives each network the gradient of its own loss.

    Class attributes, the declaration the trainer reads:
        name: the ``--method`` value. summary: one line for ``--help``.
        min_students: the least ``--num-students`` (and why, for the error).
        lambdas: the configuration fields that weight its terms; the trainer warms each up over the first
            ``--lambda-warmup-epochs`` epochs and writes them, in this order, into the step's ``lambdas`` tensor.
        peers: the evaluated networks whose average and ensembles are reported (the students).
        labels: what tables call each evaluated network that is not a peer (peer ``i`` is "student i+1").
        deployed: the evaluated network that is kept and exported; ``deployed_prefix`` its backbone's keys in the
            state dict (a tuple of prefixes for one assembled from parts, as a trunk and a branch: the keys under
            each, each stripped of its prefix, make the stock backbone's state dict).
        reported: the report's number: the deployed network's top-1, or ``students``, their mean.
        stackable: whether ``--stack-networks`` can run its networks as one.
        nesterov: whether its SGD uses Nesterov momentum (the reference FFSD's does; some baselines' code does not).
        recipe: per dataset, defaults it sets beside the dataset's (``trainer.recipes``).
        published: (dataset, model) → the paper's (low, high) top-1 of the reported network.
        options: the configuration fields it adds (``option``), by name; they join the run's fields when the
            trainer's configuration is first imported, so a method with options registers before that.
        levers: settings that change its speed and not its maths, with the values ``--step auto`` may try, unless
            the command sets them.
        defaults: the run's settings it reads, with the values a caller that leaves them out gets (its options'
            defaults come from ``options``).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    min_students: ClassVar[tuple[int, str]] = (2, "the mutual terms need two")
    lambdas: ClassVar[tuple[str, ...]] = ()
    labels: ClassVar[dict[str, str]] = {}
    deployed: ClassVar[str] = "student0"
    deployed_prefix: ClassVar[str | tuple[str, ...]] = "students.0."
    reported: ClassVar[str] = "students"
    stackable: ClassVar[bool] = True
    nesterov: ClassVar[bool] = True
    recipe: ClassVar[dict[str, dict[str, Any]]] = {}
    published: ClassVar[dict[tuple[str, str], tuple[float, float]]] = {}
    options: ClassVar[dict[str, tuple[type, Field]]] = {}
    levers: ClassVar[dict[str, tuple]] = {}
    defaults: ClassVar[dict[str, Any]] = {"temperature": 2.0, "kernels": "torch"}

    @classmethod
    def stacked_models(cls, model: str, settings: Mapping[str, Any]) -> list[str]:
        """The architectures whose networks run stacked, one group each, for ``--model`` ``model`` and the run's
        ``settings``: ``model`` alone, unless the method builds networks of other architectures too."""
        return [model]

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        own = {name: option.default for name, (_, option) in self.options.items()}
        self.settings = {**self.defaults, **own, **spec.settings}

    @property
    def peers(self) -> list[str]:
        """The evaluated names of the peers: a method's ``students`` unless it says otherwise."""
        return [f"student{i}" for i in range(len(self.students))]

    @property
    def ops(self) -> ModuleType:
        """The loss library of ``settings["kernels"]`` (``ffsd_kernels`` or its references)."""
        return kernel_ops(self.settings["kernels"])

    @property
    def form(self) -> Separate | Stacked:
        """How the networks run: one by one until ``stack()``."""
        if "_form" not in self.__dict__:
            self.__dict__["_form"] = Separate(self.settings, self.stack_groups())
        return self.__dict__["_form"]

    def stack_groups(self) -> dict[str, list[nn.Module]]:
        """The networks that run as one when stacked, by the name ``self.form(name, …)`` runs them under; networks
        named here and not stacked run one by one."""
        raise NotImplementedError

    def stack(self) -> None:
        """``--stack-networks``: from now on ``self.form`` runs each of ``stack_groups()`` as one network. Call it
        after the last ``.to(...)`` (the networks' tensors become views into the stacks')."""
        check_stackable(type(self), self.spec.model, self.settings)
        # Not a submodule: the stacks' tensors are the networks' own (theirs are views into them), so they belong in
        # no state dict, no .to() and no parameter list.
        self.__dict__["_form"] = Stacked(self.settings, self.stack_groups())

    def train(self, mode: bool = True) -> "Method":
        """Train or eval mode for the networks and for the stacks that run them (which are not submodules)."""
        super().train(mode)
        for stack in getattr(self.form, "stacks", {}).values():
            stack.train(mode)
        return self

    def compile_networks(self, **options: Any) -> None:
        """``torch.compile`` in place (``nn.Module.compile``: the state-dict keys stay as they are, so checkpoints and
        exports do not change) every module the forward calls: the networks of ``stack_groups()`` (or, stacked,
        their stacks: zero graph breaks, ``tests/unit/models/test_stacking.py``) and every other network, down to
        the part of one that holds a grouped network (FFSD's leader: its backbone is grouped, its head is not).
        ``options`` go to ``torch.compile`` (``fullgraph=True``: ``--step auto``'s compiled candidates)."""
        stacks = list(getattr(self.form, "stacks", {}).values())
        grouped = [network for networks in self.stack_groups().values() for network in networks]
        ids = {id(network) for network in grouped}

        def others(module: nn.Module) -> list[nn.Module]:
            found = []
            for child in module.children():
                if id(child) in ids:
                    continue
                holds_grouped = any(id(m) in ids for m in child.modules())
                found += others(child) if holds_grouped or isinstance(child, nn.ModuleList) else [child]
            return found

        for network in [*(stacks or grouped), *others(self)]:
            network.compile(**options)

    @classmethod
    def view_count(cls, config: Mapping[str, Any]) -> int:
        """Augmented views of each training image the forward reads, for the run's configuration ``config`` (its
        fields by name): 1, the default, or e.g. one per network for a method that feeds each its own augmentation.
        The training loader then yields ``[V·B, 3, H, W]``, view-major (``ffsd_fast.data.in_memory``); ``labels``
        stay ``[B]``. Read before the method is built: the loaders come first."""
        return 1

    @classmethod
    def holdout_fraction(cls, config: Mapping[str, Any]) -> float:
        """The fraction of the training set to hold out of training for ``between_epochs`` to fit on, for the run's
        configuration ``config`` (its fields by name): 0, the default, holds none out. The data layer draws the
        slice from the seed (``data.sampling.holdout_split``). Read before the method is built: the loaders come
        first."""
        return 0.0

    def between_epochs(
        self,
        heldout: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, float]:
        """What the method does after each epoch's training, before its evaluation, outside the (possibly captured)
        step, so host synchronisations are allowed: for example fit its teacher's weights on ``heldout``, this
        rank's share of the held-out slice (``holdout_fraction``; None when none is held out), as ``(images,
        labels)`` batches read as evaluation reads them. ``reduce`` sums a tensor over the ranks (in place; the
        identity in one process), so that every rank fits the same values. What it writes must live in tensors
        the step reads (buffers, which a captured step sees without recapture, written with ``copy_``) and the
        checkpoint saves. Returns numbers for the epoch's record, by name (none, the default)."""
        return {}

    def epoch_lambdas(self, epoch: int) -> dict[str, float] | None:
        """The ``lambdas`` of a 1-based epoch, by name, for a method whose weights follow a schedule of its own
        (its paper's code); None, the default: each is warmed up over ``--lambda-warmup-epochs``."""
        return None

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor) -> LossTerms:
        raise NotImplementedError

    def after_step(self) -> None:
        """Work of the step after the optimisers have stepped (a temporal mean of the weights, PCL's): nothing, by
        default. Part of the step, so captured and compiled with it: device tensors only, no host sync."""

    def parameter_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every evaluated network's logits, by name: the peers, then the others (eval mode, no grad)."""
        raise NotImplementedError

    def table_label(self, name: str) -> str:
        """What tables call the evaluated network ``name``."""
        return f"student {int(name[len('student') :]) + 1}" if name in self.peers else self.labels[name]
