"""Every op file of ``ffsd_kernels`` reads in the same order, so that one op's file is a map of every other's."""

import pathlib
import re

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"
OPS = sorted(p for p in KERNELS.glob("*.py") if not p.name.startswith("_") and p.name != "reference.py")
ORDER = [
    "Kernels",
    "Launch configuration",
    "Host launchers",
    "Autograd Functions",
    "Functional API",
    "Modules",
    "References",
]


def sections(path: pathlib.Path) -> list[str]:
    """The file's section titles (``# ---`` / ``# Title`` / ``# ---``), each cut to its first words."""
    titles = re.findall(r"^# -{20,}\n# (.+)\n# -{20,}$", path.read_text(encoding="utf-8"), re.M)
    return [next(kind for kind in ORDER if title.startswith(kind)) for title in titles]


@pytest.mark.parametrize("path", OPS, ids=lambda p: p.name)
def test_op_file_sections_in_the_fixed_order(path):
    found = sections(path)
    # Several sections of one kind may follow each other (two families of kernels); each kind appears once, in order.
    kinds = [kind for i, kind in enumerate(found) if i == 0 or found[i - 1] != kind]
    assert kinds == ORDER, f"{path.name}: {found}"
