"""One rank of ``tests/integration/test_distributed.py``'s check that ranks agree on ``--step auto``'s form: each
rank's clock favours another form; the choice (the smallest of each form's slowest-rank time) must be the same on
every rank. Writes ``<out>/tuning<rank>.json``."""

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)

from ffsd_fast.step import tuning  # noqa: E402
from ffsd_fast.step.distributed import close_world, init_world  # noqa: E402

# Seconds per step by rank: rank 0 favours "a", rank 1 "b"; the slowest rank's times are a 5, b 4, c 6: "b" wins.
CLOCKS = [{"a": 1.0, "b": 4.0, "c": 6.0}, {"a": 5.0, "b": 2.0, "c": 3.0}]


def main() -> None:
    world = init_world("cpu")
    builders = {name: (lambda: lambda images, labels: None) for name in ("a", "b", "c")}
    clock = lambda name, run: (run(), CLOCKS[world.rank][name])[1]  # noqa: E731
    result = tuning.choose(builders, lambda: (torch.zeros(1), torch.zeros(1)), clock, world=world)
    with open(os.path.join(sys.argv[1], f"tuning{world.rank}.json"), "w", encoding="utf-8") as fh:
        json.dump({"choice": result.choice, "seconds": result.seconds_per_step}, fh)
    close_world(world)


if __name__ == "__main__":
    main()
