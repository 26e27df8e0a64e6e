"""`qgseg plan`: show the spacing and patch size that `--spacing auto --patch auto` would choose."""

from __future__ import annotations

import argparse

from .common import HelpFormatter, print_error

DESCRIPTION = """\
Show what `qgseg train` (and the Slicer panel) choose when spacing and patch size
are left at auto: read the header of every labeled case (nothing is decoded, so
it takes a second), then plan the resampling spacing and the patch size for the
device, as QGSegmentationLib/data/planning.py describes. Training writes the
same plan to <run-dir>/plan.json.
"""

EXAMPLES = """\
examples:
  qgseg plan --dataset data/dataset.json                  # for this machine (a GPU if torch sees one)
  qgseg plan --dataset data/dataset.json --device cuda    # what a GPU server would train with
  qgseg plan --dataset data/dataset.json --mode 2d --output plan.json
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="the spacing and patch size training would choose",
                                   description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", required=True, help="dataset.json (or a run's split.json)")
    parser.add_argument("--mode", choices=["3d", "2d"], default="3d", help="3D patches or 2D slices [3d]")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="plan for this device; auto: CUDA when torch sees a GPU here [auto]")
    parser.add_argument("--output", help="also write the plan as JSON to this file")
    parser.set_defaults(func=run)


def planned_device(name: str) -> str:
    """cuda or cpu; `auto` asks torch (planning for cuda needs no GPU here)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from ..data.planning import describe_plan, plan_for_dataset
    from ..errors import QGSegError
    from ..fileio import write_json_atomic

    try:
        plan = plan_for_dataset(args.dataset, args.mode, planned_device(args.device))
        if args.output:
            write_json_atomic(args.output, plan.to_dict())
    except QGSegError as exc:
        return print_error(exc)
    for line in describe_plan(plan):
        print(line)
    print("the same as: " + " ".join(plan.flags()))
    if args.output:
        print(f"plan written to {args.output}")
    return 0
