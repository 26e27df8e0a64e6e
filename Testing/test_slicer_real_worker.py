"""The real `qgseg` worker, started exactly as the panel starts it (job folder, argument builder,
worker command and environment, WorkerRunner), on tiny phantom data: a valid event stream that
ends in done; cancel honoured within 10 s with exit 3 and nothing to import; an injected out of
memory reported as kind oom with exit 4."""

from __future__ import annotations

import os
import sys
import time

import pytest

from QGSegmentationLib.data.phantom import make_phantom_dataset
from QGSegmentationLib.engine.events import validate_stream
from QGSegmentationLib.slicer.jobs import TrainingOptions, create_job_folder, train_arguments
from QGSegmentationLib.slicer.runner import WorkerRunner, worker_command, worker_environment

from conftest import REPO


def start_worker(tmp_path, iterations: int, extra_env=None) -> WorkerRunner:
    folder = create_job_folder(tmp_path / "out")
    make_phantom_dataset(folder.root, n_labeled=2, n_unlabeled=0, n_validation=1, shape=(16, 32, 32), seed=4)
    options = TrainingOptions(architecture="unet", ssl_method="sup", guidance_qar=False, guidance_qw=False,
                              iterations=iterations, batch_size=1, patch_size=32, device="cpu")
    command = worker_command(sys.executable, train_arguments(folder, options))
    env = worker_environment({**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}, REPO)
    return WorkerRunner(command, folder.run_dir, folder.train_events, env=env).start()


def poll_until(runner: WorkerRunner, predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        update = runner.poll()
        if predicate(update):
            return update
        time.sleep(0.1)
    raise AssertionError(f"condition not reached in {timeout_s} s; events: {[e['event'] for e in runner.events]}")


def test_real_worker_event_stream_ends_in_done(tmp_path):
    runner = start_worker(tmp_path, iterations=3)
    poll_until(runner, lambda u: u.finished, 300)
    result = runner.result()
    assert result.ok and result.exit_code == 0, runner.error
    validate_stream(runner.events)
    assert {"start", "stage", "progress", "metric", "done"} <= {e["event"] for e in runner.events}
    assert result.outputs["best_checkpoint"].endswith("best.pt")


def test_real_worker_cancel_within_10_s(tmp_path):
    runner = start_worker(tmp_path, iterations=100000)
    poll_until(runner, lambda u: any(e["event"] == "progress" for e in runner.events), 300)
    asked = time.monotonic()
    runner.cancel(grace_s=10)
    poll_until(runner, lambda u: u.finished, 30)
    assert time.monotonic() - asked < 10
    result = runner.result()
    assert result.status == "cancelled" and result.exit_code == 3 and not result.killed
    assert result.outputs == {}  # nothing from a cancelled run is imported
    assert runner.events[-1]["event"] == "done" and runner.events[-1]["status"] == "cancelled"


def test_real_worker_out_of_memory_is_kind_oom_exit_4(tmp_path):
    runner = start_worker(tmp_path, iterations=3, extra_env={"QGSEG_INJECT_FAULT": "oom"})
    poll_until(runner, lambda u: u.finished, 300)
    result = runner.result()
    assert result.exit_code == 4 and result.status == "failed" and result.outputs == {}
    assert result.error.kind == "oom"
    assert "patch" in result.error.advice or "batch" in result.error.advice
