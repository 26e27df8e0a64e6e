"""`qgseg bench`: run a whole benchmark study from one YAML config, or regenerate its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from .common import HelpFormatter, RunContext, add_run_options, print_error, run_with_events

EXAMPLES = """
examples:
  qgseg bench bench/la_cpu.yaml --quick                # < 15 min on 2 CPU cores
  qgseg bench bench/la_cpu.yaml --reuse                # the full study; resumes where it stopped
  qgseg bench bench/la_cpu.yaml --reuse --only mt mt+qar,qw
  qgseg bench bench/la_gpu.yaml --device cuda --run-dir runs/bench/la_gpu
  qgseg bench bench/la_cpu.yaml --reuse --test-dataset other/dataset.json   # re-evaluate only
  qgseg bench report runs/bench/la_cpu/results.json --out docs/BENCHMARKS-la_cpu.md

For every run of the config (method x guidance x seed, per data split) the study trains, predicts
the test split with the best-on-validation and the last checkpoint on the original voxel grid,
scores Dice/IoU/HD95/ASD per case and records wall time, peak memory and the median step time in
<run-dir>/results.json (rewritten after each run). It then times each guided method against its
host method and writes <run-dir>/BENCHMARKS.md with figures. The default --run-dir is
runs/bench/<config name> (with -quick appended for --quick), so --reuse finds the earlier study.
Create <run-dir>/CANCEL to stop between runs, <run-dir>/runs/.../CANCEL to stop the current run.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark study from a YAML config (or `bench report RESULTS.json`)",
        description="Reproducible benchmark: train every configured run, evaluate on the test split, "
                    "record results.json and generate the markdown report.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("config", metavar="CONFIG", help="benchmark YAML/JSON config, or the word 'report'")
    parser.add_argument("results", nargs="?", metavar="RESULTS.json", help="with 'report': the results file")
    study = parser.add_argument_group("study")
    study.add_argument("--quick", action="store_true", help="apply the config's `quick` overrides")
    study.add_argument("--reuse", action="store_true",
                       help="skip runs already recorded with the same configuration; resume unfinished ones")
    study.add_argument("--test-dataset", metavar="DATASET.json",
                       help="evaluate on this dataset's test list (or its training list when it has no test list)")
    study.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods or labels (e.g. mt+qar,qw)")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config entry, e.g. --set iterations=100 --set data.la.path=/data/LA")
    study.add_argument("--no-speed", action="store_true", help="skip the step-time comparison")
    report = parser.add_argument_group("report (`qgseg bench report RESULTS.json`)")
    report.add_argument("--out", "--markdown", dest="out", metavar="FILE.md",
                        help="write the markdown here (figures into FILE-figures/); default: print it")
    report.add_argument("--figures", metavar="DIR", help="folder for the report's PNG figures")
    add_run_options(parser, run_dir_default_text="runs/bench/<config name>, -quick added with --quick")
    parser.set_defaults(func=run)


def bench_body(args: argparse.Namespace, ctx: RunContext) -> Dict[str, Any]:
    """Load the config, run (or resume) the study into --run-dir, write results.json + report."""
    from ..benchmark.config import load_bench_config
    from ..benchmark.runner import StudyRunner

    config = load_bench_config(args.config, quick=args.quick, only=args.only, overrides=args.set)
    device = args.device if args.device != "auto" else None
    runner = StudyRunner(config, ctx.run_dir, events=ctx.events, progress=ctx.show_progress, reuse=args.reuse,
                         test_dataset=args.test_dataset, command=study_command(args),
                         device=device, speed=not args.no_speed, say=ctx.say)
    results = runner.run()
    ctx.say(f"results: {results}")
    return {"results": results, "report": ctx.run_dir / "BENCHMARKS.md", "run_dir": ctx.run_dir}


def report_body(args: argparse.Namespace) -> int:
    from ..benchmark.report import write_report
    from ..errors import QGSegError

    try:
        if not args.results:
            from ..errors import ConfigError

            raise ConfigError("qgseg bench report needs the results file: qgseg bench report RESULTS.json [--out FILE.md]")
        written = write_report(args.results, out=args.out, figures_dir=args.figures)
    except QGSegError as exc:
        return print_error(exc)
    if args.out:
        print(f"wrote {written}")
    else:
        sys.stdout.write(written)
    return 0


def default_run_dir(args: argparse.Namespace) -> str:
    """runs/bench/<config stem>[-quick]: stable, so that --reuse finds the earlier study."""
    return str(Path("runs") / "bench" / (Path(args.config).stem + ("-quick" if args.quick else "")))


def run(args: argparse.Namespace) -> int:
    if args.config == "report":
        return report_body(args)
    if args.results:
        from ..errors import EXIT_BAD_INPUT

        print(f"qgseg: error: unexpected argument {args.results!r} (only `qgseg bench report` takes a results file)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_with_events(args, "bench", lambda ctx: bench_body(args, ctx), default_run_dir=default_run_dir(args))


def study_command(args: argparse.Namespace) -> list:
    """The study's command line, rebuilt from the parsed options (for the report)."""
    tail = ["qgseg", "bench", args.config] + (["--quick"] if args.quick else []) + (["--reuse"] if args.reuse else [])
    if args.test_dataset:
        tail += ["--test-dataset", args.test_dataset]
    if args.only:
        tail += ["--only", *args.only]
    for item in args.set:
        tail += ["--set", item]
    if args.no_speed:
        tail.append("--no-speed")
    if args.device != "auto":
        tail += ["--device", args.device]
    return tail + ["--run-dir", str(args.run_dir or default_run_dir(args))]
