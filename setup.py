# The metadata lives in pyproject.toml; setup.py only maps the kernels/ folder to the package name ffsd_kernels
# (a different PyPI package already owns the name `kernels`), which pyproject's package list alone cannot express
# together with find_packages.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ffsd_fast", "ffsd_fast.*"]) + ["ffsd_kernels", "ffsd_kernels.integrations"],
    package_dir={"ffsd_kernels": "kernels"},
)
