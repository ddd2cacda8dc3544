"""``python -m ffsd_fast.report RUNS_DIR``: the entry point; the report is ``ffsd_fast.cli.report``."""

import sys

from ffsd_fast.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
