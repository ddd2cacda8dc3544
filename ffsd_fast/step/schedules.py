"""Learning-rate and λ schedules of the reference, as pure functions of the (1-based) epoch and the step."""

import math


def warmed_up_lambda(value: float, epoch: int, warmup_epochs: int = 5) -> float:
    """``λ(e) = λ · exp(−5 · (1 − e/5)²)`` for epochs ``e ≤ 5`` (1-based), else ``λ``."""
    if epoch <= warmup_epochs:
        return value * math.exp(-5.0 * (1.0 - epoch / warmup_epochs) ** 2)
    return value


def multistep_lr(base: float, epoch: int, milestones: list[int], gamma: float = 0.1) -> float:
    """``base · γ^(number of milestones ≤ completed epochs)``, for the 1-based ``epoch`` (``MultiStepLR`` stepped
    once per epoch): with milestones 150, 225, epochs 151–225 run at ×0.1."""
    completed = epoch - 1
    return base * gamma ** sum(completed >= m for m in milestones)


def imagenet_sgd_lr(base: float, epoch: int, step: int, steps_per_epoch: int, quirk: bool = True) -> float:
    """The reference's per-iteration ImageNet lr: step decays at 30, 60, 80 and a 5-epoch linear warm-up.

    ``e`` is the epoch the formula sees: the reference passes the 1-based epoch to a formula written for 0-based
    ones (quirk, the default), so epochs 1–29 run at ``base`` and warm-up starts near 0.2; ``quirk=False`` passes the
    0-based epoch.
    """
    e = epoch if quirk else epoch - 1
    lr = base * 0.1 ** (e // 30 + (e >= 80))
    if e < 5:
        lr *= (1 + step + e * steps_per_epoch) / (5 * steps_per_epoch)
    return lr
