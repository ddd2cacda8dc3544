"""Packaging: one version, a light core for kernel users, the trainer's dependencies in an extra, entry points that
resolve."""

import importlib
import importlib.metadata
import pathlib
import re

import tomllib

import ffsd_fast

PYPROJECT = tomllib.loads((pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_one_version():
    assert ffsd_fast.__version__ == PYPROJECT["project"]["version"] == importlib.metadata.version("ffsd-fast")


def test_the_core_is_light_and_the_trainer_is_an_extra():
    project = PYPROJECT["project"]
    assert names(project["dependencies"]) == {"torch", "numpy", "triton"}
    triton = next(r for r in project["dependencies"] if r.startswith("triton"))
    assert "platform_system == 'Linux'" in triton  # torch's own marker: no triton wheel elsewhere
    assert {"torchvision", "scikit-learn", "pyyaml", "tqdm", "tensorboard", "matplotlib"} <= names(
        project["optional-dependencies"]["train"]
    )
    assert all("==" in r for r in project["optional-dependencies"]["dali"])  # the tested version


def test_console_scripts_resolve():
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
