"""`qgseg job run FOLDER`: run a Slicer panel's Train job on this machine (e.g. a GPU server).

The panel's *Prepare for another machine* writes the job folder; this runs its stages (quality
predictor, segmenter, optional second opinion, segment + score) one after the other, each with its
own progress bar, events file and manifest, exactly as the panel would. Rerunning it skips the
finished stages and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import sys

from .common import HelpFormatter, print_error

DESCRIPTION = """\
Run a Slicer panel's Train job folder on this machine, for instance a GPU
server: the stages a Train click runs, one after the other, with paths taken
from where the folder is now. Rerunning the command skips finished stages and
resumes an interrupted one. Copy the folder back and choose it in the panel's
'Import finished run' to see the results and review them.
"""

EXAMPLES = """\
Examples:
  qgseg job run qgseg-runs/run-20261123-101500                 # the job's device (auto: a GPU if any)
  qgseg job run qgseg-runs/run-20261123-101500 --device cuda   # insist on this machine's GPU

Round trip from a laptop to a GPU server:
  scp -r qgseg-runs/run-20261123-101500 gpu:jobs/
  ssh gpu 'qgseg job run jobs/run-20261123-101500 --device cuda'
  scp -r gpu:jobs/run-20261123-101500 qgseg-runs/
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("job", help="run a Slicer panel's job folder on this machine",
                                   description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="job_command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run (or finish) every stage of a Train job folder",
                              description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    run.add_argument("folder", help="the job folder (holds job.json, dataset.json, images/, labels/)")
    run.add_argument("--device", choices=["auto", "cuda", "cpu"],
                     help="where to compute (default: the job's, which 'Prepare for another machine' sets to auto)")
    run.set_defaults(func=run_job)


def run_job(args) -> int:
    from ..errors import QGSegError
    from ..slicer.elsewhere import run_job_folder
    from .main import main

    try:
        return run_job_folder(args.folder, run_stage=main, device=args.device)
    except QGSegError as exc:
        return print_error(exc)
    except ValueError as exc:  # a stage that left no checkpoint, options the pipeline refuses
        print(f"qgseg: error: {exc}", file=sys.stderr)
        return 1
