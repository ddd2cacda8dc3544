"""The trainer's entry point for ``torchrun ffsd_fast/train.py …`` and ``python -m ffsd_fast.train …``.

Run as a script, this file's folder comes first on ``sys.path``; nothing is edited there. Every import below is
absolute (``ffsd_fast.…``, found where the package is installed), and the folder holds only the package's own layers
(``data``, ``models``, ``method``, ``step``, ``trainer``, ``cli``, ``errors``, ``files``), names that neither torch nor
any other dependency imports as a top-level module. The trainer itself is ``ffsd_fast.cli.train``.
"""

import sys

from ffsd_fast.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
