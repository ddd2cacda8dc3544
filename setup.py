from setuptools import find_packages, setup

setup(
    name="ffsd-fast",
    version="0.1.0",
    description="Fast, faithful FFSD online knowledge distillation, and fused distillation kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels directory installs as `ffsd_kernels`: a different PyPI package already owns the name `kernels`.
    packages=find_packages(include=["ffsd_fast", "ffsd_fast.*"]) + ["ffsd_kernels"],
    package_dir={"ffsd_kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "scikit-learn",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff"],
        "dali": ["nvidia-dali-cuda130"],
    },
    entry_points={
        "console_scripts": [
            "ffsd-train=ffsd_fast.cli.train:main",
            "ffsd-export=ffsd_fast.cli.export:main",
            "ffsd-eval=ffsd_fast.cli.eval:main",
        ]
    },
)
