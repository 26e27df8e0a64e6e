"""`qgseg ssl`: semi-supervised training (`train`) and the list of methods (`methods`)."""

from __future__ import annotations

import argparse

from .common import HelpFormatter, add_run_options, run_with_events
from .train import add_train_options, train_body

EXAMPLES = """
examples:
  qgseg ssl methods
  qgseg ssl train --dataset data/dataset.json --method mt --guidance qar,qw \\
                  --quality-checkpoint runs/g/checkpoints/best.pt --run-dir runs/mt-qg
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("ssl", help="semi-supervised training and its methods",
                                   description="Semi-supervised segmentation with optional quality guidance.",
                                   epilog=EXAMPLES, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="ssl_command", metavar="SUBCOMMAND")
    methods = sub.add_parser("methods", help="list the SSL methods with a one-line description each",
                             description="List the semi-supervised methods `--method` takes, one line each.")
    methods.set_defaults(func=list_methods)
    train = sub.add_parser("train", help="train a segmenter with an SSL method",
                           description="Same options as `qgseg train`; --method defaults to mt.",
                           epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_train_options(train, default_method="mt")
    add_run_options(train)
    train.set_defaults(func=run_train)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def list_methods(args: argparse.Namespace) -> int:
    from ..ssl.methods import METHODS

    width = max(len(n) for n in METHODS.names())
    for entry in METHODS.entries():
        print(f"{entry.name:<{width}}  {entry.description}")
    print("\nquality guidance (any method): --guidance qar | qw | qar,qw  with --quality-checkpoint")
    return 0


def run_train(args: argparse.Namespace) -> int:
    if args.method is None:
        args.method = "mt"
    return run_with_events(args, "ssl-train", lambda ctx: train_body(args, ctx))
