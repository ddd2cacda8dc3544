"""KDCL, online knowledge distillation via collaborative learning (Guo et al., CVPR 2020): ``m`` students, of one
architecture or several, each fed its own augmentation of the same images and each taught by the labels and by an
ensemble of all the students' logits (detached). Student 1 (``--model``) is kept. The terms, the ensemble variants,
their defaults and where they come from (the paper, or the unofficial public code): ``docs/methods/kdcl.md``.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast import models
from ffsd_fast.errors import UserError
from ffsd_fast.method.base import LossTerms, Method, NetworkSpec, ParamGroup, TermTable, option
from ffsd_fast.method.forms import Group
from ffsd_fast.method.registry import register

ENSEMBLES = ("naive", "linear", "minlogit", "general", "mean")
# The variants whose weights are fitted between epochs on the held-out slice of the training set (the students' logits
# weighted, t = Σ_i w_i z_i): linear by the least cross-entropy, general by the students' error correlations.
FITTED = ("linear", "general")
# The linear fit: L-BFGS on the softmax parameters of the weights, from uniform weights, to a gradient of
# at most 1e-10, 100 iterations, or steps that stall (a change below 1e-14).
LINEAR_FIT = {"lr": 1.0, "max_iter": 100, "tolerance_grad": 1e-10, "tolerance_change": 1e-14}


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def fit_linear(
    logits: torch.Tensor, labels: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = _same
) -> torch.Tensor:
    """KDCL-Linear's weights: the ``w`` on the simplex (``w_i ≥ 0``, ``Σ w_i = 1``) that minimises the mean
    cross-entropy of ``Σ_i w_i z_i`` over the held-out images, from the students' ``[m, N, K]`` logits; float64.

    Parametrised as ``w = softmax(β)`` (the simplex without constraints) and fitted by L-BFGS from ``β = 0``. In
    several processes each holds its own images and ``reduce`` sums the loss and its gradient over them, so every
    rank takes the same L-BFGS steps and ends with the same weights."""
    logits, m = logits.double(), logits.shape[0]
    count = reduce(torch.tensor(float(labels.numel()), dtype=torch.float64, device=logits.device))
    beta = torch.zeros(m, dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta], line_search_fn="strong_wolfe", **LINEAR_FIT)

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(torch.tensordot(beta.softmax(0), logits, 1), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, beta)
        summed = reduce(torch.cat([loss.detach()[None], grad])) / count  # host sync (L-BFGS reads the loss)
        beta.grad = summed[1:]
        return summed[0]

    optimizer.step(closure)
    return beta.detach().softmax(0)


def general_weights(
    logits: torch.Tensor, labels: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = _same
) -> torch.Tensor:
    """KDCL-General's weights, the generalised ensemble's (Perrone & Cooper): with ``e_i = softmax(z_i) − onehot(y)``
    each student's error on a held-out image and ``C_ij`` the mean over the held-out images of ``⟨e_i, e_j⟩``,
    ``w = C⁻¹1 / 1ᵀC⁻¹1``, the weights summing to 1 that minimise ``wᵀCw``, the ensemble's squared error (they may
    be negative); float64. ``C⁻¹`` is the pseudo-inverse, so students that err alike share a weight rather than
    failing a solve; with no error at all (``C = 0``) the weights stay uniform. ``reduce`` sums ``C`` and the
    count over the ranks."""
    m, _, classes = logits.shape
    errors = logits.double().softmax(-1) - F.one_hot(labels, classes).double()
    sums = torch.einsum("ink,jnk->ij", errors, errors).flatten()
    count = torch.tensor([float(labels.numel())], dtype=torch.float64, device=logits.device)
    summed = reduce(torch.cat([sums, count]))
    c = summed[:-1].view(m, m) / summed[-1].clamp(min=1)
    row = torch.linalg.pinv(c, hermitian=True).sum(1)
    total = row.sum()
    return row / total if total.item() > 0 else torch.full_like(row, 1 / m)  # host sync


def student_models(model: str, settings: Mapping[str, Any], num_students: int | None = None) -> list[str]:
    """Each student's architecture: ``kdcl_models`` (comma-separated, student 1 first, which must be ``model``), or
    ``model`` for every one when it is empty. ``UserError`` (one line) for an unknown name or a wrong count."""
    given = settings.get("kdcl_models") or ""
    if not given:
        return [model] * (num_students or 1)
    names = [name.strip() for name in given.split(",")]
    known = models.names()
    for name in names:
        if name not in known:
            raise UserError(f"--kdcl-models: unknown model {name!r}; known models: {', '.join(known)}")
    if names[0] != model:
        raise UserError(f"--kdcl-models: student 1 is --model {model}, so the list must start with it, not {names[0]}")
    if num_students is not None and len(names) != num_students:
        raise UserError(f"--kdcl-models names {len(names)} models for --num-students {num_students}: give one each")
    return names


def ensemble_teacher(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The ensemble's ``[B, K]`` logits from the students' detached ``[m, B, K]``: ``naive`` the logits of the
    student whose CE is lowest, image by image; ``minlogit`` each student's logits less its target logit, then the
    least over the students, class by class; ``mean`` their mean (the public code's); ``linear`` and ``general``
    their sum weighted by ``weights`` (``[m]``, fitted between epochs)."""
    m, batch, classes = logits.shape
    if kind in FITTED:
        return torch.tensordot(weights.to(logits.dtype), logits, 1)
    if kind == "mean":
        return logits.mean(0)
    if kind == "minlogit":
        target = logits.gather(2, labels.view(1, batch, 1).expand(m, batch, 1))
        return (logits - target).amin(0)
    if kind == "naive":
        ce = F.cross_entropy(logits.flatten(0, 1), labels.repeat(m), reduction="none").view(m, batch)
        best = ce.argmin(0).view(1, batch, 1).expand(1, batch, classes)
        return logits.gather(0, best).squeeze(0)
    raise UserError(f"--kdcl-ensemble {kind}: unknown; choose one of {', '.join(ENSEMBLES)}")


@register
class KDCL(Method):
    """``students``: student ``i`` is ``kdcl_models``'s ``i``-th architecture. Settings read: ``kdcl_models``,
    ``kdcl_ensemble``, ``kdcl_temperature``, ``kdcl_holdout``, ``kernels``; ``kdcl_alpha`` weighs the terms (a λ).
    The fitted ensembles (``linear``, ``general``) hold their weights in the buffer ``ensemble_weights``."""

    name = "kdcl"
    summary = "KDCL: students (any architectures), each on its own view, taught by their ensemble; student 1 kept"
    min_students = (2, "the ensemble needs two students")
    lambdas = ("kdcl_alpha",)
    reported = "student0"  # the deployed network: student 1, as PCL's table reports KDCL's ResNet-32
    nesterov = False  # the code's plain momentum SGD (train.py lines 166-167)
    # The code's CIFAR-100 run (train.py lines 22-30): 240 epochs, lr ×0.1 after epochs 150, 180 and 210, batch 64;
    # its lr 0.05 and weight decay 5e-4 are in configs/cifar100-resnet32-kdcl.yaml.
    recipe = {
        "cifar10": {"epochs": 240, "lr_milestones": [150, 180, 210], "batch_size": 64},
        "cifar100": {"epochs": 240, "lr_milestones": [150, 180, 210], "batch_size": 64},
    }
    # PCL's paper (Wu & Gong, AAAI 2021) reports KDCL on CIFAR-100 ResNet-32 at 73.76 top-1, one number (as the issue
    # quotes it; that table was not read here, nor KDCL's own paper, which reports other pairs).
    published = {("cifar100", "resnet32"): (73.76, 73.76)}
    options = {
        "kdcl_models": option(
            str, "", "KDCL: each student's model, comma-separated, student 1 (--model) first; empty: all --model"
        ),
        "kdcl_ensemble": option(
            str,
            "minlogit",
            "KDCL: the ensemble teacher: naive (the lowest-CE student's logits), minlogit (target-logit-shifted "
            "minimum), mean (the public code's), linear and general (weighted logits, the weights fitted after each "
            "epoch on a held-out slice of the training set, --kdcl-holdout)",
            choices=ENSEMBLES,
        ),
        "kdcl_holdout": option(
            float,
            0.1,
            "KDCL linear and general: the fraction of the training set held out of training, to fit the ensemble's "
            "weights on after each epoch (unused by the other ensembles)",
            above=0,
            below=1,
        ),
        "kdcl_temperature": option(float, 4.0, "KDCL: temperature of the students' KL to the ensemble", above=0),
        "kdcl_alpha": option(
            float, 0.5, "KDCL: each student's loss is (1 − alpha)·CE + alpha·KL, as the code weighs them", at_least=0
        ),
    }
    defaults = {"kernels": "torch"}

    @classmethod
    def view_count(cls, config: Mapping[str, Any]) -> int:
        return config["num_students"]  # one augmentation per student (the code's data.py lines 152-156)

    @classmethod
    def holdout_fraction(cls, config: Mapping[str, Any]) -> float:
        # Only the fitted ensembles fit on held-out data; the others train on the whole training set.
        return config["kdcl_holdout"] if config["kdcl_ensemble"] in FITTED else 0.0

    @classmethod
    def stacked_models(cls, model: str, settings: Mapping[str, Any]) -> list[str]:
        return list(dict.fromkeys(student_models(model, settings)))

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.architectures = student_models(spec.model, self.settings, spec.num_students)
        for name in dict.fromkeys(self.architectures):
            models.check_image_size(name, spec.image_size)
        # Drawn in order, as the code builds its list of models (train.py lines 161-163).
        self.students = nn.ModuleList(models.create(name, spec.num_classes) for name in self.architectures)
        if self.settings["kdcl_ensemble"] in FITTED:
            # The fitted ensemble's weights, uniform until the first fit: a buffer, so the checkpoint keeps them and a
            # captured step reads the ones that between_epochs copies in.
            m = len(self.students)
            self.register_buffer("ensemble_weights", torch.full((m,), 1 / m, dtype=torch.get_default_dtype()))

    def stack_groups(self) -> dict[str, list[nn.Module]]:
        return {name: [self.students[i] for i in indices] for name, indices in self.groups().items()}

    def epoch_lambdas(self, epoch: int) -> dict[str, float]:
        # Constant from the first step: the code weighs CE and KL by 1 − alpha and alpha throughout (train.py line
        # 85); a warm-up of alpha would raise the CE's weight too.
        return {"kdcl_alpha": self.settings["kdcl_alpha"]}

    def groups(self) -> dict[str, list[int]]:
        """The students' indices by architecture, in order of first appearance."""
        found: dict[str, list[int]] = {}
        for i, name in enumerate(self.architectures):
            found.setdefault(name, []).append(i)
        return found

    def parameter_groups(self) -> list[ParamGroup]:
        return [ParamGroup("sgd", list(self.students.parameters()), "weight_decay")]

    def logits(self, inputs: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Every student's ``[m, B, K]`` logits, on ``inputs[i]`` each, or on one shared batch; a stacked group's
        logits as they come when it is the only one."""
        found: list[torch.Tensor | None] = [None] * len(self.students)
        for name, indices in self.groups().items():
            given = inputs if isinstance(inputs, torch.Tensor) else Group([inputs[i] for i in indices])
            logits, _ = self.form(name, given)
            if len(indices) == len(self.students) and logits.joined is not None:
                return logits.joined
            for k, i in enumerate(indices):
                found[i] = logits[k]
        return torch.stack(found)

    def _weights(self) -> torch.Tensor | None:
        return self.ensemble_weights if self.settings["kdcl_ensemble"] in FITTED else None

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.logits(images)
        return {f"student{i}": logits[i] for i in range(len(logits))}

    @torch.no_grad()
    def between_epochs(
        self,
        heldout: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, float]:
        """The fitted ensembles' weights, from every student in eval mode on the held-out images (one view each,
        unaugmented): ``fit_linear`` or ``general_weights``, copied into ``ensemble_weights``."""
        kind = self.settings["kdcl_ensemble"]
        if kind not in FITTED or heldout is None:
            return {}
        was_training = self.training
        self.eval()
        logits, labels = [], []
        for images, y in heldout:
            logits.append(self.logits(images).double())
            labels.append(y)
        self.train(was_training)
        weights = self.ensemble_weights
        classes = self.spec.num_classes
        z = torch.cat(logits, 1) if logits else weights.new_zeros(len(weights), 0, classes, dtype=torch.float64)
        y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=weights.device)
        with torch.enable_grad():
            fitted = fit_linear(z, y, reduce) if kind == "linear" else general_weights(z, y, reduce)
        weights.copy_(fitted)
        return {f"kdcl_weight{i}": w for i, w in enumerate(fitted.tolist())}  # host sync

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor) -> LossTerms:
        m, batch = len(self.students), labels.shape[0]
        if images.shape[0] != m * batch:
            raise UserError(f"kdcl: {batch} labels need {m} views of their images, got {images.shape[0]} rows")
        z = self.logits(list(images.unflatten(0, (m, batch))))  # view i is student i's
        teacher = ensemble_teacher(z.detach(), labels, self.settings["kdcl_ensemble"], self._weights())
        # Every student's CE and KL in one op (its rows: student i's images, in order).
        ce, kl = self.ops.cross_entropy_kl_loss(
            z, teacher.expand_as(z), labels.expand(m, batch), self.settings["kdcl_temperature"], reduction="none"
        )
        # One mean and one unbind for the 2m terms: indexed one by one, each would cost a kernel in the backward.
        values = torch.stack([ce, kl], dim=1).mean(-1).flatten().unbind()  # student0.ce, student0.kl, student1.ce, …
        alpha = lambdas[0]
        keep = 1 - alpha  # once: a kernel
        terms = TermTable(self.form.distances())
        for i in range(m):
            terms.add(f"student{i}.ce", values[2 * i], keep)
            terms.add(f"student{i}.kl", values[2 * i + 1], alpha)
        return terms.total(lambdas)
