"""ffsd-fast: a fast, faithful implementation of FFSD online knowledge distillation.

The layers, each importing only from those before it: ``errors``/``files`` (leaves) → ``data`` → ``models`` →
``method`` → ``step`` → ``trainer`` → ``cli`` (``tests/unit/test_layering.py`` holds the tree to it).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ffsd-fast")  # the one version: pyproject.toml's
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"
