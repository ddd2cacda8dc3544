"""The method layer: each online-distillation method one module (its networks, loss terms, parameter groups,
evaluated and deployed networks), the forms its networks run in, the registry, and the loader of the authors'
weights. A method registers itself on import: the lines below import the built-in ones, in the order every list of
methods shows them (FFSD, then its baselines)."""

# isort: off
from ffsd_fast.method import ffsd  # noqa: F401
from ffsd_fast.method import dml, independent  # noqa: F401
from ffsd_fast.method import one  # noqa: F401
from ffsd_fast.method import cl_ilr  # noqa: F401
from ffsd_fast.method import okddip  # noqa: F401
from ffsd_fast.method import kdcl  # noqa: F401
from ffsd_fast.method import pcl  # noqa: F401

# isort: on
