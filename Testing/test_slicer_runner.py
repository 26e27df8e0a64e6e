"""WorkerRunner with real child processes: events, ok/failed/oom results, cooperative cancel,
killing the process tree after the grace period, the heartbeat watchdog, and the pure command
builders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from QGSegmentationLib.engine.events import validate_stream
from QGSegmentationLib.slicer import runner as runner_mod
from QGSegmentationLib.engine.cancel import (PARENT_CHECK_INTERVAL_S, PARENT_PID_VARIABLE, CancelToken,
                                             parent_pid_from_environment, request_cancel)
from QGSegmentationLib.errors import CancelledError
from QGSegmentationLib.slicer.runner import (DEFAULT_GRACE_S, WorkerRunner, advice_for, clear_stale_cancel,
                                             no_console_window, python_slicer_executable, worker_command,
                                             worker_environment, worker_popen_options)

REPO = Path(__file__).resolve().parents[1]

# A stand-in worker speaking the real protocol through the real EventWriter and cancel token.
CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    from QGSegmentationLib.engine.events import EventWriter
    from QGSegmentationLib.engine.cancel import CancelToken
    mode, run_dir, events = sys.argv[1], sys.argv[2], sys.argv[3]
    w = EventWriter.open(events, run_id="t")
    w.emit("start", command="fake", argv=sys.argv, pid=os.getpid(), run_dir=run_dir)
    token = CancelToken(run_dir)
    if mode == "ok":
        w.stage("training", 1, 2)
        for step in range(1, 4):
            w.progress(step, 3, epoch=step, eta_s=0.1 * (3 - step))
        w.metric("dice", 0.8, step=3, split="validation")
        w.emit("done", status="ok", exit_code=0, outputs={"checkpoint": "run/best.pt"}, wall_s=0.1)
        sys.exit(0)
    if mode == "cooperative":
        w.heartbeat_thread(0.2)
        for step in range(1, 10000):
            if token.requested:
                w.emit("error", kind="cancelled", message="cancel file seen", hint=None)
                w.emit("done", status="cancelled", exit_code=3, outputs={"checkpoint": "x"}, wall_s=1)
                w.close()
                sys.exit(3)
            w.progress(step, 10000)
            time.sleep(0.05)
    if mode == "stubborn":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open(os.path.join(run_dir, "grandchild.pid"), "w").write(str(child.pid))
        w.progress(1, 100)
        time.sleep(120)  # ignores the cancel file
    if mode == "oom":
        w.emit("error", kind="oom", message="CUDA out of memory", hint="patch 96")
        w.emit("done", status="failed", exit_code=4, outputs={}, wall_s=0.1)
        sys.exit(4)
    if mode == "silent":
        time.sleep(120)
    if mode == "stray":  # a stray line amid good events, written in one go
        w.stage("training", 1, 1)
        with open(events, "ab") as fh:
            fh.write(b"not json\\n\\xff\\xfe\\n")
        w.emit("done", status="ok", exit_code=0, outputs={"checkpoint": "run/best.pt"}, wall_s=0.1)
        sys.exit(0)
    if mode == "crash":
        raise SystemExit(1)
    if mode == "no_done":
        sys.exit(0)
""")


def make_runner(tmp_path, mode, parent_pid=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "fake_worker.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "run"
    events = tmp_path / "events.jsonl"
    env = worker_environment(os.environ, REPO, parent_pid)
    command = [sys.executable, str(script), mode, str(run_dir), str(events)]
    return WorkerRunner(command, run_dir, events, env=env)


def _dead(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    if status.exists():  # a zombie (state Z) is dead; nothing reaps it in some containers
        return "\nState:\tZ" in status.read_text()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ok_run_reports_events_and_outputs(tmp_path):
    r = make_runner(tmp_path, "ok").start()
    result = r.wait(timeout_s=30)
    assert result.status == "ok" and result.exit_code == 0 and result.error is None
    assert result.outputs == {"checkpoint": "run/best.pt"}
    validate_stream(r.events)
    assert [e["step"] for e in r.events if e["event"] == "progress"] == [1, 2, 3]
    assert r.latest("metric")["value"] == 0.8
    assert r.poll().finished and r.result() is result
    assert (tmp_path / "run" / "worker.log").exists()


def test_poll_never_blocks_and_result_waits_for_the_end(tmp_path):
    r = make_runner(tmp_path, "silent").start()
    t0 = time.monotonic()
    update = r.poll()
    assert time.monotonic() - t0 < 0.5 and not update.finished
    with pytest.raises(RuntimeError, match="not finished"):
        r.result()
    r.kill()
    result = r.wait(timeout_s=10)
    assert result.status == "cancelled" and result.killed and result.outputs == {}


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_cancel_is_honoured_with_exit_3_and_nothing_to_import(tmp_path):
    r = make_runner(tmp_path, "cooperative").start()
    deadline = time.monotonic() + 10
    while not any(e["event"] == "progress" for e in r.events):
        r.poll()
        assert time.monotonic() < deadline, "worker produced no progress"
        time.sleep(0.05)
    t0 = time.monotonic()
    r.cancel(grace_s=10)
    assert (tmp_path / "run" / "CANCEL").exists()
    result = r.wait(timeout_s=10)
    assert time.monotonic() - t0 < 10
    assert result.status == "cancelled" and result.exit_code == 3 and not result.killed
    assert result.outputs == {}  # the done event listed a checkpoint: not passed on
    assert result.error.kind == "cancelled"
    assert "nothing from it was imported" in result.error.advice


def stubborn_worker(tmp_path):
    """A started worker that ignores its cancel file, and the pid of the child it started."""
    r = make_runner(tmp_path, "stubborn").start()
    pid_file = tmp_path / "run" / "grandchild.pid"
    deadline = time.monotonic() + 15
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "stubborn worker did not start its child"
        time.sleep(0.05)
    return r, int(pid_file.read_text())


@pytest.mark.skipif(os.name == "nt", reason="process groups")
def test_worker_ignoring_cancel_is_killed_with_its_children(tmp_path):
    r, grandchild = stubborn_worker(tmp_path)
    r.cancel(grace_s=0.5)
    assert not r.poll().finished  # still inside the grace period
    result = r.wait(timeout_s=10)
    assert result.status == "cancelled" and result.killed and result.outputs == {}
    deadline = time.monotonic() + 5
    while not _dead(grandchild):
        assert time.monotonic() < deadline, "grandchild survived the tree kill"
        time.sleep(0.05)


def test_oom_maps_to_kind_oom_exit_4_and_advice(tmp_path):
    r = make_runner(tmp_path, "oom").start()
    result = r.wait(timeout_s=30)
    assert result.status == "failed" and result.exit_code == 4
    assert result.error.kind == "oom" and result.outputs == {}
    assert "smaller patch size or batch size" in result.error.advice
    assert "patch 96" in result.error.advice  # the worker's hint is kept


def test_crash_without_events_and_exit_0_without_done_are_failures(tmp_path):
    crash = make_runner(tmp_path / "a", "crash").start().wait(timeout_s=30)
    assert crash.status == "failed" and crash.exit_code == 1 and crash.error.kind == "other"
    silent_ok = make_runner(tmp_path / "b", "no_done").start().wait(timeout_s=30)
    assert silent_ok.status == "failed" and "no 'done' event" in silent_ok.error.message


def test_unresponsive_watchdog(tmp_path):
    r = make_runner(tmp_path, "silent").start()
    try:
        assert not r.is_unresponsive(timeout_s=5)
        deadline = time.monotonic() + 10
        while not r.events:  # the start event, then silence
            r.poll()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1.0)
        r.poll()
        assert r.seconds_since_last_event() >= 1.0
        assert r.is_unresponsive(timeout_s=0.5)
        r.keep_waiting()
        assert not r.is_unresponsive(timeout_s=0.5)
    finally:
        r.kill()
        r.wait(timeout_s=10)
    assert not r.is_unresponsive(timeout_s=0.0)  # a finished worker is never "unresponsive"


def test_heartbeats_keep_the_watchdog_quiet(tmp_path):
    r = make_runner(tmp_path, "cooperative").start()
    try:
        time.sleep(1.0)
        r.poll()
        assert r.seconds_since_last_event() < 0.6
    finally:
        r.cancel(grace_s=5)
        r.wait(timeout_s=10)


def test_start_errors_and_empty_command(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        WorkerRunner([], tmp_path, tmp_path / "e.jsonl")
    with pytest.raises(RuntimeError, match="could not start the worker"):
        WorkerRunner([str(tmp_path / "missing-exe")], tmp_path, tmp_path / "e.jsonl").start()


def test_command_builders_are_pure():
    assert python_slicer_executable("/opt/Slicer/bin", "linux") == str(Path("/opt/Slicer/bin/PythonSlicer"))
    assert python_slicer_executable("C:/Slicer/bin", "win32").endswith("PythonSlicer.exe")
    cmd = worker_command("/opt/Slicer/bin/PythonSlicer", ["train", "--seed", 3])
    assert cmd == ["/opt/Slicer/bin/PythonSlicer", "-m", "QGSegmentationLib.cli.main", "train", "--seed", "3"]
    with pytest.raises(ValueError):
        worker_command("", [])
    env = worker_environment({"PYTHONPATH": os.pathsep.join(["/a", "/lib"]), "X": "1"}, "/lib")
    assert env["PYTHONPATH"].split(os.pathsep) == ["/lib", "/a"] and env["X"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_advice_per_kind():
    assert "CPU" in advice_for("cuda_unavailable") or "cpu" in advice_for("cuda_unavailable")
    assert "images/a.nrrd" in advice_for("data", "images/a.nrrd: not a 3D image")
    assert "worker.log" in advice_for("something new", "boom")
    assert set(runner_mod.ERROR_ADVICE) >= {"oom", "cuda_unavailable", "data", "other", "cancelled"}


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_cancel_file_left_by_a_cancelled_worker_does_not_stop_the_next_one(tmp_path):
    request_cancel(tmp_path / "run")  # what Cancel (or Slicer closing during the run) left behind
    r = make_runner(tmp_path, "cooperative").start()
    assert not (tmp_path / "run" / "CANCEL").exists()
    deadline = time.monotonic() + 10
    while sum(e["event"] == "progress" for e in r.events) < 3:  # it keeps going: not cancelled at once
        assert not r.poll().finished, r.result()
        assert time.monotonic() < deadline, "worker produced no progress"
        time.sleep(0.05)
    r.cancel(grace_s=10)
    result = r.wait(timeout_s=10)
    assert result.status == "cancelled" and result.exit_code == 3 and not result.killed
    assert clear_stale_cancel(tmp_path / "run") and not clear_stale_cancel(tmp_path / "run")


def test_the_cancel_grace_outlasts_a_validation_pass():
    """A CPU validation pass takes tens of seconds; killing before the worker's own checkpoint
    would lose the work since the last one."""
    assert DEFAULT_GRACE_S >= 60


@pytest.mark.skipif(os.name == "nt", reason="process groups")
def test_a_tree_that_outlives_the_kill_is_polled_again_not_left_cancelling(tmp_path, monkeypatch):
    """The first kill does not take (a slow taskkill, a process in uninterruptible I/O): poll()
    must not raise TimeoutExpired (the panel's timer would stop, stuck at "Cancelling"); a later
    poll kills again and finishes."""
    r, grandchild = stubborn_worker(tmp_path)
    real_kill, kills = runner_mod.kill_process_tree, []

    def first_kill_does_not_take(process):  # stands in for a tree slower to die than KILL_WAIT_S
        kills.append(process.pid)
        if len(kills) > 1:
            real_kill(process)

    monkeypatch.setattr(runner_mod, "kill_process_tree", first_kill_does_not_take)
    monkeypatch.setattr(runner_mod, "KILL_WAIT_S", 0.2)
    r.cancel(grace_s=0)
    update = r.poll()  # raised subprocess.TimeoutExpired before
    assert not update.finished and len(kills) == 1
    result = r.wait(timeout_s=10)
    assert len(kills) == 2 and result.status == "cancelled" and result.killed
    deadline = time.monotonic() + 5
    while not _dead(grandchild):
        assert time.monotonic() < deadline, "grandchild survived the tree kill"
        time.sleep(0.05)


def test_workers_open_no_console_window_on_windows():
    create_no_window = 0x08000000
    assert no_console_window("nt") == {"creationflags": create_no_window}
    assert no_console_window("posix") == {}
    windows = worker_popen_options("nt")
    assert windows["creationflags"] & create_no_window and windows["creationflags"] & 0x00000200  # + own group
    assert "start_new_session" not in windows
    assert worker_popen_options("posix") == {"start_new_session": True}


def test_a_failure_names_the_stage_log(tmp_path):
    crash = make_runner(tmp_path, "crash").start().wait(timeout_s=30)
    log = tmp_path / "run" / "worker.log"
    assert crash.error.log == str(log) and str(log) in crash.error.advice
    assert "in its folder inside the run folder" in advice_for("other", "boom")


def _ended_pid() -> int:
    """The pid of a process that has run and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.skipif(os.name == "nt", reason="process groups")
def test_stop_gives_a_worker_seconds_to_save_then_kills_its_tree(tmp_path):
    """When the panel goes away (Slicer closing, the module reloaded) its worker must not live on:
    a cooperative worker stops on its cancel file; one that ignores it is killed with its children
    once the short shutdown grace has passed, however long the panel's cancel grace is."""
    r = make_runner(tmp_path / "cooperative", "cooperative").start()
    deadline = time.monotonic() + 15
    while not any(e["event"] == "progress" for e in r.events):
        r.poll()
        assert time.monotonic() < deadline, "worker produced no progress"
        time.sleep(0.05)
    result = r.stop(grace_s=10)
    assert result.status == "cancelled" and result.exit_code == 3 and not result.killed
    r, grandchild = stubborn_worker(tmp_path / "stubborn")
    r.cancel(grace_s=DEFAULT_GRACE_S)  # the panel's Cancel came first: its grace is a minute
    t0 = time.monotonic()
    result = r.stop(grace_s=0.5)
    assert time.monotonic() - t0 < 5
    assert result.status == "cancelled" and result.killed
    deadline = time.monotonic() + 5
    while not (_dead(r.pid) and _dead(grandchild)):
        assert time.monotonic() < deadline, "the worker's tree survived stop()"
        time.sleep(0.05)
    assert make_runner(tmp_path / "never", "ok").stop() is None


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_worker_whose_slicer_has_ended_stops_as_if_cancelled(tmp_path):
    """The worker runs in its own process group, so a Slicer crash takes nothing with it: it stops
    by itself (after saving) once the process named in its environment has ended."""
    assert worker_environment({}, REPO)[PARENT_PID_VARIABLE] == str(os.getpid())
    r = make_runner(tmp_path, "cooperative", parent_pid=_ended_pid()).start()
    result = r.wait(timeout_s=20)
    assert result.status == "cancelled" and result.exit_code == 3 and not result.killed
    assert not (tmp_path / "run" / "CANCEL").exists()


def test_the_cancel_token_watches_its_parent_process_at_most_every_two_seconds(tmp_path):
    now = [0.0]
    alive = CancelToken(tmp_path, parent_pid=os.getpid(), clock=lambda: now[0])
    assert not alive.requested
    ended = _ended_pid()
    token = CancelToken(tmp_path, parent_pid=ended, clock=lambda: now[0])
    assert token.requested and token.parent_gone
    with pytest.raises(CancelledError, match=f"pid {ended}"):
        token.check()
    alive.parent_pid = ended  # now it is gone: seen at the next check, not before
    now[0] = PARENT_CHECK_INTERVAL_S / 2
    assert not alive.requested
    now[0] = PARENT_CHECK_INTERVAL_S
    assert alive.requested
    assert parent_pid_from_environment({PARENT_PID_VARIABLE: "12"}) == 12
    assert parent_pid_from_environment({PARENT_PID_VARIABLE: "x"}) is None
    assert parent_pid_from_environment({}) is None
    assert CancelToken(tmp_path, parent_pid=None).parent_pid == parent_pid_from_environment()


def test_a_stray_line_in_the_events_is_skipped_not_the_events_around_it(tmp_path):
    """One malformed line (a print that reached the events file, bytes that are not UTF-8) used to
    discard every event read with it, `done` included, turning a finished run into a failure."""
    r = make_runner(tmp_path, "stray").start()
    result = r.wait(timeout_s=30)
    assert result.status == "ok" and result.outputs == {"checkpoint": "run/best.pt"}
    assert [e["event"] for e in r.events] == ["start", "stage", "done"]
    assert len(r.protocol_warnings) == 2 and all("events.jsonl" in w for w in r.protocol_warnings)
