"""``models.cost``: a stock network's parameters and multiply-adds, counted on the meta device."""

import pytest
import torch

from ffsd_fast.errors import UserError
from ffsd_fast.models.cost import cost


def test_the_counts_match_the_published_ones():
    # torchvision's ResNet-18: 11,689,512 parameters, 1.81 G multiply-adds (its model card's "GFLOPS 1.81").
    params, macs = cost("resnet18", 1000, 224)
    assert params == 11_689_512 and macs == pytest.approx(1.814e9, rel=2e-3)
    # He et al.'s CIFAR ResNet-20 (identity shortcuts): 0.27 M parameters, about 41 M multiply-adds at 32 px.
    params, macs = cost("resnet20", 10, 32)
    assert params == 272_474 and 40e6 < macs < 42e6


def test_the_image_size_and_the_classes_count():
    _, at32 = cost("resnet20", 10, 32)
    _, at16 = cost("resnet20", 10, 16)
    head = 64 * 10  # the classifier's multiply-adds do not depend on the image size
    assert at16 - head == (at32 - head) // 4
    assert cost("resnet20", 100, 16)[0] - cost("resnet20", 10, 16)[0] == 90 * 65  # weights and bias per class


def test_counting_draws_no_random_numbers():
    state = torch.random.get_rng_state()
    cost("wrn16_2", 7, 32)  # a combination not counted before (the counts are cached)
    assert torch.equal(state, torch.random.get_rng_state())


def test_a_size_the_model_cannot_take_is_a_user_error():
    with pytest.raises(UserError):
        cost("resnet20", 10, 6)
