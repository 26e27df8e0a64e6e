"""Entry point of the `qgseg` command line (also `python -m QGSegmentationLib.cli.main`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .. import __version__
from .common import HelpFormatter

COMMAND_MODULES = ("train", "predict", "evaluate", "ssl", "quality", "demo", "plan", "networks", "bench", "info",
                   "job")

DESCRIPTION = """\
QGSegmentation: quality-guided semi-supervised segmentation of medical images.

Typical session:
  qgseg demo                                   # synthetic data, end to end, a few minutes on CPU
  qgseg quality train --dataset D.json --run-dir runs/g
  qgseg ssl train --dataset runs/g/split.json --method mt --guidance qar,qw \\
                  --quality-checkpoint runs/g/checkpoints/best.pt --run-dir runs/seg
  qgseg predict --checkpoint runs/seg/checkpoints/best.pt --input D.json --split unlabeled \\
                --quality-checkpoint runs/g/checkpoints/best.pt --output preds/
  qgseg predict --checkpoint runs/seg/checkpoints/best.pt --input D.json --split test --output preds_test/
  qgseg evaluate --predictions preds_test/ --dataset D.json --split test
  qgseg info                                   # versions, device, dependency check

Exit codes: 0 ok, 1 other failure, 2 bad input, 3 cancelled, 4 out of memory.
Run `qgseg COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgseg", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"qgseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue  # command group not shipped in this build
            raise
        module.register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for manifests and the start event
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..engine import distributed
    from ..engine.manifest import remember_commit

    remember_commit()
    code = int(args.func(args) or 0)
    if distributed.joined_process_group():  # a torchrun worker: see exit_worker
        distributed.exit_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
