"""Deep mutual learning (Zhang et al., CVPR 2018): ``m`` students, each taught by the labels and by every other
student's detached logits (the same ``student{i}.mutual`` term as FFSD's). The first student is kept."""

import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast.method.base import LossTerms, Method, NetworkSpec, ParamGroup, create_students
from ffsd_fast.method.registry import register


@register
class DML(Method):
    """Settings read: ``temperature``, ``quirk_probe_forward`` (its students are drawn as FFSD's are), ``kernels``."""

    name = "dml"
    summary = "deep mutual learning among the students"
    defaults = {**Method.defaults, "quirk_probe_forward": True}
    mutual = True

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.students = nn.ModuleList(create_students(spec, self.settings["quirk_probe_forward"]))

    def stack_groups(self) -> dict[str, list[nn.Module]]:
        return {"students": list(self.students)}

    def parameter_groups(self) -> list[ParamGroup]:
        return [ParamGroup("sgd", list(self.students.parameters()), "weight_decay")]

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, _ = self.form("students", images)  # stacked: every student in one pass
        return {f"student{i}": logits[i] for i in range(len(logits))}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lambdas: torch.Tensor) -> LossTerms:
        logits, _ = self.form("students", images)
        # Stacked, the op takes the [m, B, K] logits as they are.
        mutual = self.ops.mutual_kl_loss(logits.value, self.settings["temperature"]) if self.mutual else None
        values: dict[str, torch.Tensor] = {}
        for i in range(len(logits)):
            values[f"student{i}.ce"] = F.cross_entropy(logits[i], labels)
            if mutual is not None:
                values[f"student{i}.mutual"] = mutual[i]
        return LossTerms(values, dict(values), total=sum(values.values()))
