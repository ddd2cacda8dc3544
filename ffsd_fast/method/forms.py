"""The two forms a method's networks run in, behind one interface: one by one (``Separate``) or several networks of
one architecture as one grouped network (``Stacked``, ``--stack-networks``).

A method's forward is written once against it: ``form(name, x)`` runs the networks of ``stack_groups()[name]`` and
returns their outputs by network, as ``Group``s; ``form.attention_maps``, ``form.distances`` and
``form.online_distillation_losses`` are the grouped ops, which ``Stacked`` computes in one launch for every network
and ``Separate`` network by network. Either way the maths is the same (the float64 parity suite runs both).
"""

from collections.abc import Mapping, Sequence
from types import ModuleType

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import ffsd_kernels
import ffsd_kernels.reference
from ffsd_fast.models.stacking import StackedNetworks


def kernel_ops(name: str | ModuleType) -> ModuleType:
    """The loss library behind ``--kernels``: the fused ops (Triton on CUDA tensors, their references elsewhere) or
    the plain PyTorch references under the same names; a namespace of those functions as it is (an ablation's)."""
    if not isinstance(name, str):
        return name
    return ffsd_kernels if name == "triton" else ffsd_kernels.reference


class Group:
    """One tensor per network (``group[i]``; None for a network that has none); ``joined``: the same tensors side by
    side in one tensor (along ``dim``: 1 for feature maps, 0 for ``[G, B, K]`` logits), when the networks ran
    stacked. ``joint``: ``attention_maps`` gives the map of the parts side by side, ``A(concat(parts))``."""

    def __init__(
        self, parts: Sequence[torch.Tensor | None], joined: torch.Tensor | None = None, dim: int = 1, joint=False
    ) -> None:
        self.parts, self.joined, self.dim, self.joint = list(parts), joined, dim, joint

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Group":
        """One network's tensor."""
        return cls([tensor], tensor)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.parts[i]

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def value(self) -> torch.Tensor | list[torch.Tensor]:
        """What an op that takes either form takes: the joined tensor, else the list of parts."""
        return self.joined if self.joined is not None else self.parts

    def select(self, start: int, stop: int) -> "Group":
        """Networks ``start … stop − 1``; joined, a slice of the joined tensor (a view, no copy)."""
        joined = None
        if self.joined is not None:
            width = self.joined.shape[self.dim] // len(self.parts)
            joined = self.joined.narrow(self.dim, start * width, (stop - start) * width)
        return Group(self.parts[start:stop], joined, self.dim)

    def detach(self) -> "Group":
        joined = self.joined.detach() if self.joined is not None else None
        return Group([p.detach() if p is not None else None for p in self.parts], joined, self.dim, self.joint)

    def whole(self) -> "Group":
        """These networks' tensors as one input to ``attention_maps``: the map of their concatenation."""
        return Group(self.parts, self.joined, self.dim, joint=True)


def _eval_mode(module: nn.Module, run):
    # Targets come from a network in eval mode (running statistics, none updated) with its pre-step weights.
    module.eval()
    with torch.no_grad():
        outputs = run()
    module.train()
    return outputs


class Distances:
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


class _Form:
    """What both forms share: the loss library of the method's settings (``kernels``), read when used."""

    def __init__(self, settings: Mapping) -> None:
        self.settings = settings

    @property
    def ops(self) -> ModuleType:
        return kernel_ops(self.settings["kernels"])


class Separate(_Form):
    """Every network on its own, and the ungrouped ops."""

    def __init__(self, settings: Mapping, groups: dict[str, list[nn.Module]]) -> None:
        super().__init__(settings)
        self.groups = groups

    def __call__(self, name: str, x: torch.Tensor | Group, eval: bool = False):  # noqa: ANN204 - the networks' output
        """The networks of ``name`` on ``x`` (shared) or on ``x[i]`` each (None: not run); their outputs' structure,
        each tensor a ``Group`` by network. ``eval``: in eval mode, without gradients."""
        outputs = []
        for i, network in enumerate(self.groups[name]):
            given = x if isinstance(x, torch.Tensor) else x[i]
            if given is None:
                outputs.append(None)
            else:
                outputs.append(_eval_mode(network, lambda n=network, g=given: n(g)) if eval else network(given))
        flat = [tree_flatten(o)[0] if o is not None else None for o in outputs]
        spec = tree_flatten(next(o for o in outputs if o is not None))[1]
        width = len(next(f for f in flat if f is not None))
        leaves = [Group([f[k] if f is not None else None for f in flat]) for k in range(width)]
        return tree_unflatten(leaves, spec)

    def attention_maps(self, inputs: list[Group]) -> list[Group]:
        """Each input's attention maps by network (a ``whole`` input: the one map of its concatenation)."""
        maps = []
        for group in inputs:
            if group.joint:
                maps.append(Group.of(self.ops.attention_map(torch.cat(group.parts, dim=1))))
            else:
                maps.append(Group([self.ops.attention_map(p) if p is not None else None for p in group.parts]))
        return maps

    def distances(self) -> Distances:
        return Distances(self.ops, grouped=False)

    def online_distillation_losses(
        self, logits: Group, fusion_logits: torch.Tensor, labels: torch.Tensor, temperature: float
    ) -> list[torch.Tensor]:
        """``ops.online_distillation_losses``'s ``[2M + 4]`` terms (students ``0 … M−1``, the leader last) from the
        ungrouped ops: the students' CE, their mutual KL, the fusion head's and the leader's CE and KL."""
        students, leader = logits.parts[:-1], logits.parts[-1]
        mutual = self.ops.mutual_kl_loss(students, temperature)
        ce = [nn.functional.cross_entropy(z, labels) for z in students]
        teachers = [z.detach() for z in students]  # the fusion head's teacher: the students' mean logits
        fusion = self.ops.cross_entropy_kl_loss(fusion_logits, teachers, labels, temperature)
        leader_terms = self.ops.cross_entropy_kl_loss(leader, fusion_logits.detach(), labels, temperature)
        return [*ce, *mutual, *fusion, *leader_terms]

    def zero_grad(self) -> None:
        pass

    def share_grads(self) -> None:
        pass


class Stacked(_Form):
    """Each group of networks as one ``StackedNetworks``, and the grouped ops: every attention map of a step in one
    launch each way, every distance in one op, every logit term in one op."""

    def __init__(self, settings: Mapping, groups: dict[str, list[nn.Module]]) -> None:
        super().__init__(settings)
        self.stacks = {name: StackedNetworks(networks) for name, networks in groups.items()}

    def __call__(self, name: str, x: torch.Tensor | Group, eval: bool = False):  # noqa: ANN204 - the networks' output
        stack = self.stacks[name]
        if isinstance(x, Group):
            x = x.joined if x.joined is not None else _side_by_side(x.parts)
        outputs = _eval_mode(stack, lambda: stack(x)) if eval else stack(x)
        flat, spec = tree_flatten(outputs)
        return tree_unflatten([Group(stack.split(t), t, dim=1 if t.dim() == 4 else 0) for t in flat], spec)

    def attention_maps(self, inputs: list[Group]) -> list[Group]:
        tensors = [g.joined if g.joined is not None else _side_by_side(g.parts) for g in inputs]
        groups = [1 if g.joint else len(g) for g in inputs]
        return [Group(maps) for maps in self.ops.attention_maps(tensors, groups)]

    def distances(self) -> Distances:
        return Distances(self.ops, grouped=True)

    def online_distillation_losses(
        self, logits: Group, fusion_logits: torch.Tensor, labels: torch.Tensor, temperature: float
    ) -> list[torch.Tensor]:
        """Two forward launches and one backward launch instead of one set per term."""
        return list(self.ops.online_distillation_losses(logits.joined, fusion_logits, labels, temperature).unbind())

    def zero_grad(self) -> None:
        for stack in self.stacks.values():
            stack.zero_grad(set_to_none=True)

    def share_grads(self) -> None:
        """The networks' gradients: views into the stacks'. After each backward, before the optimisers step."""
        for stack in self.stacks.values():
            stack.share_grads()


def _side_by_side(parts: list[torch.Tensor | None]) -> torch.Tensor:
    # A network that needs no input this step still runs stacked: zeros stand in (its outputs go unused).
    present = next(p for p in parts if p is not None)
    return torch.cat([p if p is not None else torch.zeros_like(present) for p in parts], dim=1)
