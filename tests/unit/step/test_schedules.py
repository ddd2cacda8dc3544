"""λ warm-up and learning-rate schedules, at the boundaries the spec states."""

import math

import pytest

from ffsd_fast.step.schedules import imagenet_sgd_lr, multistep_lr, warmed_up_lambda


def test_lambda_warmup():
    assert warmed_up_lambda(10.0, 1) == pytest.approx(10 * math.exp(-5 * 0.8**2))
    assert warmed_up_lambda(10.0, 5) == 10.0
    assert warmed_up_lambda(10.0, 6) == 10.0
    assert warmed_up_lambda(1000.0, 3) == pytest.approx(1000 * math.exp(-5 * 0.4**2))


def test_cifar_multistep_after_completed_epochs():
    lr = [multistep_lr(0.1, e, [150, 225]) for e in (1, 150, 151, 225, 226, 299)]
    assert lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_imagenet_lr_with_the_quirk():
    steps = 100
    # Warm-up during epochs 1-4 only, starting near 0.2 (the 1-based epoch in a 0-based formula).
    assert imagenet_sgd_lr(0.1, 1, 0, steps) == pytest.approx(0.1 * (1 + 100) / 500)
    assert imagenet_sgd_lr(0.1, 4, 99, steps) == pytest.approx(0.1)
    assert imagenet_sgd_lr(0.1, 5, 0, steps) == pytest.approx(0.1)
    assert imagenet_sgd_lr(0.1, 29, 50, steps) == pytest.approx(0.1)
    assert imagenet_sgd_lr(0.1, 30, 0, steps) == pytest.approx(0.01)
    assert imagenet_sgd_lr(0.1, 60, 0, steps) == pytest.approx(0.001)
    assert imagenet_sgd_lr(0.1, 79, 0, steps) == pytest.approx(0.001)
    assert imagenet_sgd_lr(0.1, 80, 0, steps) == pytest.approx(0.0001)
    assert imagenet_sgd_lr(0.1, 89, 0, steps) == pytest.approx(0.0001)


def test_imagenet_lr_clean():
    steps = 100
    assert imagenet_sgd_lr(0.1, 1, 0, steps, quirk=False) == pytest.approx(0.1 / 500)
    assert imagenet_sgd_lr(0.1, 5, 99, steps, quirk=False) == pytest.approx(0.1)
    assert imagenet_sgd_lr(0.1, 30, 0, steps, quirk=False) == pytest.approx(0.1)
    assert imagenet_sgd_lr(0.1, 31, 0, steps, quirk=False) == pytest.approx(0.01)
    assert imagenet_sgd_lr(0.1, 81, 0, steps, quirk=False) == pytest.approx(0.0001)
