"""The trainer's entry point for ``torchrun ffsd_fast/train.py …`` and ``python -m ffsd_fast.train …``.

Only this and the standard library run before ``main``, and every import below is absolute, so the script's own
folder on ``sys.path`` (where torchrun puts it) shadows nothing: the trainer is ``ffsd_fast.cli.train``.
"""

import sys

from ffsd_fast.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
