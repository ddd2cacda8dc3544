"""``ffsd-export RUN_DIR --out leader.pt``: the product of an FFSD run, the leader's backbone alone.

The file is a plain state dict (no trans-fusion head, no other network). For the ImageNet ResNets it loads into the
stock ``torchvision.models.resnetXX(num_classes=…)`` with ``strict=True``. A baseline run (``--method dml`` or
``independent``) has no leader: its first student is written. Beside it, ``leader.pt.json`` (the ``--out`` path plus
``.json``) says what it is: model, classes, image size, the input normalisation, dataset, method, network, epoch and
the run's commit; ``ffsd-eval leader.pt`` reads it.
"""

import argparse
import json
import sys

from ffsd_fast.errors import UserError
from ffsd_fast.trainer.export import export, sidecar_path
from ffsd_fast.trainer.help_text import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ffsd-export", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("run", help="a run directory (holding checkpoint.pt) or a checkpoint file")
    parser.add_argument(
        "--out", required=True, help="where to write the leader's state dict (.pt); its sidecar is this path plus .json"
    )
    args = parser.parse_args(argv)
    try:
        path = export(args.run, args.out)
    except UserError as error:
        print(f"ffsd-export: error: {error}", file=sys.stderr)
        return 2
    print(f"{written(path)} written to {path}, its description to {sidecar_path(path)}")
    return 0


def written(path: str) -> str:
    """What the export holds, as its sidecar says: the run's deployed network (FFSD's leader, a baseline's first
    student), named as the method names it."""
    with open(sidecar_path(path), encoding="utf-8") as fh:
        meta = json.load(fh)
    return f"the {meta.get('method')} run's deployed network ({meta.get('network')}'s backbone)"


if __name__ == "__main__":
    sys.exit(main())
