"""Reproducible benchmark studies: one YAML config -> trained runs, test metrics, a results.json and
a markdown report regenerated from it (`qgseg bench`).

    from QGSegmentationLib.benchmark import load_bench_config, run_study, render_report
    config = load_bench_config("bench/la_cpu.yaml", quick=True)
    results_path = run_study(config, "runs/bench/la_cpu-quick", reuse=True)
    render_report(results_path, out="BENCHMARKS-section.md")

Importing this package is cheap (no torch): `config` and `report` are pure Python + YAML; the
runner, speed measurements and plots import torch / matplotlib when called.
"""

from __future__ import annotations

from .config import BenchConfig, Job, RunSpec, expand_jobs, load_bench_config  # noqa: F401


def run_study(config, study_dir, **options):
    """Run (or resume) a study; see `runner.StudyRunner`. Returns the results.json path."""
    from .runner import StudyRunner

    return StudyRunner(config, study_dir, **options).run()


def render_report(results_path, out=None, **options):
    """Markdown from a results.json (and figures next to `out`); see `report.write_report`."""
    from .report import write_report

    return write_report(results_path, out=out, **options)
