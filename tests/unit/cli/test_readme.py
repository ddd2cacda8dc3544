"""The README's and the docs' commands work as written: torchrun starts the installed package (``-m
ffsd_fast.train``; ``ffsd_fast/train.py`` exists only in a checkout), and the flags named are the ones that do it."""

import re

from ffsd_fast.trainer.config import build_parser
from tests.helpers import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(text: str) -> list[str]:
    """Each shell command of the fenced code blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_torchrun_examples_run_the_installed_package():
    for path in DOCUMENTS:
        for command in commands(path.read_text(encoding="utf-8")):
            if command.lstrip().startswith(("torchrun", "srun torchrun")):
                assert " -m ffsd_fast.train " in command, f"{path.name}: {command}"
    assert "torchrun --standalone --nproc_per_node=8 -m ffsd_fast.train" in (ROOT / "README.md").read_text()


def test_the_readme_names_the_flag_that_selects_the_fusion_kernels():
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "With `--fusion-kernel triton` the fusion module and the trans-fusion head use it" in text
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    for flag in re.findall(r"`(--[a-z][a-z-]+) triton`", text):
        assert flag in flags, flag
