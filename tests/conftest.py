import os

# Triton's interpreter must be chosen before triton is first imported: on a machine without an NVIDIA driver the
# ops' Triton kernels then run on CPU tensors, so every kernel is tested here. With a GPU, they compile for it.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    # One place seeds every test, so a failure reproduces.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
