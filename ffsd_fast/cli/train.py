"""``ffsd-train``: flags (and ``-c config.yaml``) → a resolved configuration → one run; bad input is one line."""

import sys

from ffsd_fast.errors import UserError
from ffsd_fast.trainer.config import parse_args, resolve
from ffsd_fast.trainer.run import train


def main(argv: list[str] | None = None) -> int:
    try:
        train(resolve(parse_args(argv)))
    except UserError as error:
        print(f"ffsd-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
