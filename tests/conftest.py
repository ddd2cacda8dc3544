import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    # One place seeds every test, so a failure reproduces.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
