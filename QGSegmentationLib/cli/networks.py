"""`qgseg networks`: list the segmentation networks of the registry."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("networks", help="list the available segmentation networks",
                                   description="List the segmentation networks `--network` takes, 2D and 3D.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..networks import NETWORKS

    width = max(len(n) for n in NETWORKS.names())
    for entry in NETWORKS.entries():
        print(f"{entry.name:<{width}}  {entry.description}")
    return 0
