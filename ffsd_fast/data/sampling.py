"""Which samples each rank visits in each epoch: the one rule that every loader (tensors, torchvision, DALI) follows.

Randomness comes only from ``(seed, epoch)`` through private generators, so a run resumed at epoch ``e`` sees the
batches an uninterrupted run would, and the global RNG is never touched. Sharding follows ``DistributedSampler``:
every rank uses the same epoch permutation and takes every ``world_size``-th index starting at ``rank``; without
``drop_last`` the permutation is padded by wrapping around so that every rank gets the same number of samples,
with ``drop_last`` it is cut to a multiple of ``world_size``.
"""

import math

import numpy as np
import torch

from ffsd_fast.errors import UserError

# Tags that keep the random streams drawn from one (seed, epoch) apart from each other.
PERMUTATION, AUGMENTATION, SAMPLE, WORKERS, PIPELINE, HOLDOUT = 0, 1, 2, 3, 4, 5
# The label of an evaluation slot that only pads the last batch to full size: evaluation skips it.
PAD_LABEL = -1


def seed_for(seed: int, epoch: int, tag: int, key: int = 0) -> int:
    """A 64-bit seed for one random stream; SeedSequence keeps streams of neighbouring keys independent."""
    sequence = np.random.SeedSequence(seed % 2**64, spawn_key=(epoch, tag, key))
    return int(sequence.generate_state(1, np.uint64)[0])


def generator(seed: int, epoch: int, tag: int, key: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, epoch, tag, key))


def shard(order: torch.Tensor, rank: int, world_size: int, drop_last: bool) -> torch.Tensor:
    """This rank's interleaved share of ``order``, padded by wrapping around (or cut) like DistributedSampler."""
    n = len(order)
    if drop_last:
        order = order[: n - n % world_size]
    elif n % world_size:
        padding = world_size - n % world_size
        order = torch.cat([order, order.repeat(math.ceil(padding / n))[:padding]])
    return order[rank::world_size]


def samples_per_rank(num_samples: int, world_size: int, drop_last: bool) -> int:
    """The length of every rank's :func:`shard` (cut with ``drop_last``, padded without)."""
    return num_samples // world_size if drop_last else math.ceil(num_samples / world_size)


def train_batches(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Batches per rank and epoch (the same on every rank): the partial last one dropped with ``drop_last``,
    counted without (:func:`train_indices` fills it)."""
    per_rank = samples_per_rank(num_samples, world_size, drop_last)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def train_indices(
    num_samples: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int, drop_last: bool
) -> torch.Tensor:
    """The sample indices this rank trains on in ``epoch``, in order, a whole number of full batches.

    Every batch is full, so the step's shapes never change (CUDA graphs, ``torch.compile``): with ``drop_last`` the
    shard's partial last batch is dropped; without, it is filled by wrapping around to the shard's start (at most
    ``batch_size - 1`` samples seen twice in an epoch).
    """
    order = torch.randperm(num_samples, generator=generator(seed, epoch, PERMUTATION))
    mine = shard(order, rank, world_size, drop_last)
    wanted = train_batches(num_samples, batch_size, world_size, drop_last) * batch_size
    if wanted > len(mine):
        mine = mine.repeat(math.ceil(wanted / len(mine)))
    return mine[:wanted]


def eval_indices(num_samples: int, rank: int, world_size: int, batch_size: int) -> torch.Tensor:
    """This rank's disjoint evaluation share (``rank, rank + world_size, …``) padded with ``-1`` to full batches.

    Over all ranks every sample appears exactly once; a ``-1`` slot is filled with any image and ``PAD_LABEL``,
    which evaluation does not count.
    """
    mine = torch.arange(rank, num_samples, world_size)
    padding = -len(mine) % batch_size
    return torch.cat([mine, torch.full((padding,), -1, dtype=torch.int64)])


def holdout_split(num_samples: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the indices trained on, the indices held out), each sorted, disjoint, together ``0 … num_samples − 1``.

    ``round(fraction · num_samples)`` samples are held out, at least one when ``fraction > 0``, drawn by a
    permutation of the seed alone (epoch 0 of its own stream): every rank holds out the same samples, in every
    epoch, and a resumed run the ones it held out before. ``UserError`` when no sample would be left to train on."""
    if not 0 <= fraction < 1:
        raise UserError(f"the held-out fraction of the training set must be in [0, 1), got {fraction}")
    count = max(round(fraction * num_samples), 1) if fraction > 0 else 0
    if count >= num_samples:
        raise UserError(
            f"holding out {fraction} of {num_samples} training samples leaves none to train on: hold out less"
        )
    order = torch.randperm(num_samples, generator=generator(seed, 0, HOLDOUT))
    return order[count:].sort().values, order[:count].sort().values
