"""`qgseg info`: what this installation runs on, for bug reports and for checking that a GPU is used.

Lists Python, the platform, every package the backend needs with its installed version against
the floor it needs (the floors of pyproject.toml, as the Slicer panel checks them), and the device
torch sees, probed in a child Python as the panel does. Exit code 0 when everything needed is
there, 1 otherwise (the problems are listed last).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from .common import HelpFormatter

DESCRIPTION = """\
What this installation runs on: Python, the platform, each package the backend
needs (installed version against its floor in pyproject.toml, as the Slicer
panel checks them) and the device torch sees (probed in a child Python).
Exit code 0 when everything needed is there, 1 otherwise (problems listed last).
"""

EXAMPLES = """\
Examples:
  qgseg info                 # paste the output into a bug report
  qgseg info --json          # the same as one JSON object
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="versions, device and dependency check (for bug reports)",
                                   description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    from .. import __version__
    from ..slicer import environment as env

    statuses = [env.torch_status()] + env.check_requirements(env.REQUIREMENTS)
    device = env.probe_torch(sys.executable)
    problems = [s.describe() for s in statuses if not s.ok] + ([device.summary] if device.error else [])
    if args.json:
        print(json.dumps({"qgseg": __version__, "python": sys.version.split()[0],
                          "packages": [dict(asdict(s), ok=s.ok) for s in statuses],
                          "device": dict(asdict(device), summary=device.summary), "problems": problems}))
    else:
        print(env.diagnostics_text(statuses, device, {"qgseg": __version__}), end="")
        print("all requirements met" if not problems else "problems:\n  " + "\n  ".join(problems))
    return 1 if problems else 0
