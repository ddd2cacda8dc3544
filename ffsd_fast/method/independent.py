"""Independent training: each student alone on plain cross-entropy, the students never meet (the baseline every
online-distillation method is measured against). The first student is kept."""

from ffsd_fast.method.dml import DML
from ffsd_fast.method.registry import register


@register
class Independent(DML):
    name = "independent"
    summary = "each student alone, plain CE"
    min_students = (1, "one network is a plain run")
    mutual = False
