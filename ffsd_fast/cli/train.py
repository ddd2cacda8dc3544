"""``ffsd-train``: flags (and ``-c config.yaml``) → a resolved configuration (a resumed run's own) → one run; bad
input is one line."""

import sys

from ffsd_fast.errors import UserError
from ffsd_fast.trainer.config import parse_command, resolve
from ffsd_fast.trainer.resume import resumed_config
from ffsd_fast.trainer.run import train


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, given = parse_command(argv)
        # --resume PATH: the run's saved configuration, with what the command may change of it.
        train(resolve(resumed_config(cfg, given)), given)
    except UserError as error:
        print(f"ffsd-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
