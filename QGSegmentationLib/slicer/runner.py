"""Runs one `qgseg` worker as a child process and watches it without ever blocking the GUI.

The panel calls `poll()` from a timer: it returns the new JSON-lines events (read with
`EventTail`) and, once the process has ended, its final status. `cancel()` first creates the
run's cancel file (the worker saves a checkpoint and exits 3); if the worker is still alive
after the grace period (DEFAULT_GRACE_S), the next `poll()` kills the whole process tree
(PythonSlicer is a launcher: killing only it would leave the real worker running). `start()`
removes a CANCEL file an earlier, cancelled worker left in the run folder, so it cannot stop the
new one at once. `result()` carries outputs only for a run that finished ok, so nothing from a
cancelled or failed run can be imported. On Windows no console window opens for the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ..engine.cancel import PARENT_PID_VARIABLE, remove_stale_cancel, request_cancel
from ..engine.events import EventTail
from ..errors import (EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK,
                      EXIT_OUT_OF_MEMORY)

WORKER_MODULE = "QGSegmentationLib.cli.main"
# Seconds a worker has, after its cancel file appears, to stop by itself before its process tree
# is killed. The worker checks the file between steps, saves a checkpoint and exits 3; a step may
# be a whole validation pass, which takes tens of seconds on a CPU. Killed earlier, the work since
# the last checkpoint would be lost.
DEFAULT_GRACE_S = 60.0
SHUTDOWN_GRACE_S = 5.0  # when the panel goes away, it waits this long before killing the worker
DEFAULT_UNRESPONSIVE_S = 60.0
# Seconds one poll() waits for a killed tree to be gone; when it is not, the next poll looks again.
KILL_WAIT_S = 1.0
# Windows process creation flags (subprocess defines them on Windows only).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


# --- commands (pure functions) -----------------------------------------------------------------
def python_slicer_executable(slicer_bin_dir: str | os.PathLike, platform: str = sys.platform) -> str:
    """Path of Slicer's `PythonSlicer` launcher in `slicer_bin_dir` (Slicer's bin folder)."""
    name = "PythonSlicer.exe" if platform.startswith("win") else "PythonSlicer"
    return str(Path(slicer_bin_dir) / name)


def worker_command(python_executable: str, arguments: Sequence[str]) -> List[str]:
    """[python, -m, QGSegmentationLib.cli.main, *arguments]: the worker, run by the given
    Python (PythonSlicer inside Slicer, sys.executable elsewhere)."""
    if not python_executable:
        raise ValueError("worker command: no Python executable given")
    return [str(python_executable), "-m", WORKER_MODULE, *[str(a) for a in arguments]]


def worker_environment(base_env: Mapping[str, str], library_parent: str | os.PathLike,
                       parent_pid: Optional[int] = None) -> Dict[str, str]:
    """A copy of `base_env` with `library_parent` (the folder holding QGSegmentationLib) first
    on PYTHONPATH and unbuffered output, so the child imports the same backend as the panel, and
    this process's pid (or `parent_pid`) as the one the worker serves: it stops, after saving a
    checkpoint, once that process has ended (`engine.cancel.PARENT_PID_VARIABLE`)."""
    env = dict(base_env)
    parts = [str(library_parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_PID_VARIABLE] = str(parent_pid if parent_pid is not None else os.getpid())
    return env


def no_console_window(os_name: str = os.name) -> Dict[str, Any]:
    """Popen/run keyword arguments that keep a child from opening a console window: a console
    program started from Slicer's GUI on Windows gets a visible one otherwise. {} elsewhere."""
    return {"creationflags": CREATE_NO_WINDOW} if os_name == "nt" else {}


def worker_popen_options(os_name: str = os.name) -> Dict[str, Any]:
    """Popen keyword arguments for a worker: its own process group (so the whole tree can be
    killed: a new session on POSIX, a new process group on Windows), and no console window."""
    if os_name == "nt":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}  # own process group: killpg reaches grandchildren


# --- error advice --------------------------------------------------------------------------------
def _advice_oom(message: str) -> str:
    return ("The device ran out of memory. Use a smaller patch size or batch size, switch to 2D "
            "mode, or choose the CPU as device (slower, but limited only by RAM).")


def _advice_cuda(message: str) -> str:
    return ("No usable CUDA GPU was found by PyTorch. Choose 'cpu' (or 'auto') as device, or "
            "reinstall PyTorch with CUDA support from the Environment section.")


def _advice_data(message: str) -> str:
    return ("A file or option was not accepted: " + (message or "see the log") +
            ". Fix that input (the message names the file) and start again.")


def _advice_cancelled(message: str) -> str:
    return "The run was cancelled; nothing from it was imported."


def _advice_other(message: str) -> str:
    return ("The worker failed: " + (message or "no message") +
            ". For details open the failed stage's worker.log (in its folder inside the run folder: "
            "quality/, run/, second-opinion-run/ or predict-run/) and its events file.")


ERROR_ADVICE: Dict[str, Callable[[str], str]] = {
    "oom": _advice_oom,
    "cuda_unavailable": _advice_cuda,
    "data": _advice_data,
    "cancelled": _advice_cancelled,
    "other": _advice_other,
}
EXIT_CODE_KINDS = {EXIT_OUT_OF_MEMORY: "oom", EXIT_BAD_INPUT: "data", EXIT_CANCELLED: "cancelled",
                   EXIT_FAILURE: "other"}


def advice_for(kind: str, message: str = "") -> str:
    """Plain advice for an error kind (unknown kinds get the generic advice)."""
    return ERROR_ADVICE.get(kind, _advice_other)(message)


# --- results ----------------------------------------------------------------------------------------
@dataclass
class WorkerError:
    kind: str
    message: str
    hint: Optional[str] = None
    log: Optional[str] = None  # the worker's console output (worker.log), set by the runner

    @property
    def advice(self) -> str:
        text = advice_for(self.kind, self.message)
        if self.hint and self.kind != "cancelled":
            text = f"{text} ({self.hint})"
        if self.log and self.kind != "cancelled":
            text = f"{text} Worker log: {self.log}"
        return text


@dataclass
class RunResult:
    """Final state of a finished worker. `outputs` is empty unless status is "ok"."""

    status: str                     # ok / cancelled / failed
    exit_code: Optional[int]
    outputs: Dict[str, str] = field(default_factory=dict)
    error: Optional[WorkerError] = None
    killed: bool = False            # the tree was killed after the cancel grace period
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class PollUpdate:
    events: List[Dict[str, Any]]
    finished: bool
    result: Optional[RunResult] = None
    warnings: List[str] = field(default_factory=list)  # event lines skipped since the last poll


# --- the runner -------------------------------------------------------------------------------------
class WorkerRunner:
    """One worker process: start, poll, cancel, kill, watchdog. `poll()` never blocks (at most
    KILL_WAIT_S once the tree has been killed).

    stdout and stderr go to `<run_dir>/worker.log` (a file, not a pipe nobody reads, which
    would fill up and stall the child). `clock` is injectable for watchdog tests."""

    def __init__(self, command: Sequence[str], run_dir: str | os.PathLike,
                 events_path: str | os.PathLike, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str | os.PathLike] = None, log_path: Optional[str | os.PathLike] = None,
                 clock: Callable[[], float] = time.monotonic):
        if not command:
            raise ValueError("worker command is empty")
        self.command = [str(c) for c in command]
        self.run_dir = Path(run_dir)
        self.events_path = Path(events_path)
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd is not None else None
        self.log_path = Path(log_path) if log_path else self.run_dir / "worker.log"
        self._clock = clock
        self._tail = EventTail(self.events_path)
        self._process: Optional[subprocess.Popen] = None
        self._log_fh = None
        self._started_at: Optional[float] = None
        self._last_event_at: Optional[float] = None
        self._cancel_deadline: Optional[float] = None
        self._killed = False
        self._result: Optional[RunResult] = None
        self.events: List[Dict[str, Any]] = []
        self.error: Optional[WorkerError] = None
        self.done_event: Optional[Dict[str, Any]] = None
        self.protocol_warnings: List[str] = []

    # lifecycle ---------------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def finished(self) -> bool:
        return self._result is not None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_deadline is not None

    def start(self) -> "WorkerRunner":
        if self._process is not None:
            raise RuntimeError("worker already started")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_cancel(self.run_dir)
        self._log_fh = open(self.log_path, "ab")
        try:
            self._process = subprocess.Popen(self.command, stdout=self._log_fh,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=self.env, cwd=self.cwd, **worker_popen_options())
        except OSError as exc:
            self._log_fh.close()
            raise RuntimeError(f"could not start the worker {self.command[0]!r}: {exc}") from None
        self._started_at = self._last_event_at = self._clock()
        return self

    def poll(self) -> PollUpdate:
        """New events since the last call and, once the process ended, the result."""
        if self._process is None:
            raise RuntimeError("worker not started")
        if self._result is not None:
            return PollUpdate([], True, self._result)
        seen_warnings = len(self.protocol_warnings)
        new = self._read_events()
        code = self._process.poll()
        if code is None and self._cancel_deadline is not None and self._clock() >= self._cancel_deadline:
            self.kill()  # again on a later poll when the tree outlived the first kill
            try:
                code = self._process.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                code = None  # not gone yet: the next poll looks again
        if code is None:
            return PollUpdate(new, False, warnings=self.protocol_warnings[seen_warnings:])
        new += self._read_events()  # lines written just before exiting
        self._finish(code)
        return PollUpdate(new, True, self._result, self.protocol_warnings[seen_warnings:])

    def cancel(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Ask the worker to stop (cancel file); `poll()` kills the tree after `grace_s`."""
        if self._process is None or self._result is not None:
            return
        request_cancel(self.run_dir)
        if self._cancel_deadline is None:
            self._cancel_deadline = self._clock() + max(0.0, grace_s)

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> Optional[RunResult]:
        """Stop the worker when its panel goes away (Slicer closing, the module reloaded): ask it
        to stop, give it `grace_s` to save a checkpoint and exit, then kill its tree. Returns its
        result, or None when it had not started or could not be reaped."""
        if self._process is None:
            return None
        if self._result is None:
            self.cancel(grace_s)
            self._cancel_deadline = min(self._cancel_deadline, self._clock() + max(0.0, grace_s))
        try:
            return self.wait(grace_s + KILL_WAIT_S + 1.0)
        except TimeoutError:
            return None

    def kill(self) -> None:
        """Kill the worker and every process it started, now."""
        if self._process is None or self._process.poll() is not None:
            return
        self._killed = True
        kill_process_tree(self._process)

    def wait(self, timeout_s: float, interval_s: float = 0.1) -> RunResult:
        """Poll until the worker finishes (for scripts and tests; the GUI uses a timer)."""
        end = time.monotonic() + timeout_s
        while True:
            update = self.poll()
            if update.finished:
                return update.result  # type: ignore[return-value]
            if time.monotonic() > end:
                raise TimeoutError(f"worker {self.pid} still running after {timeout_s:.0f} s")
            time.sleep(interval_s)

    def result(self) -> RunResult:
        if self._result is None:
            raise RuntimeError("the worker has not finished yet")
        return self._result

    # watchdog ----------------------------------------------------------------------------------
    def seconds_since_last_event(self) -> float:
        if self._last_event_at is None:
            return 0.0
        return self._clock() - self._last_event_at

    def is_unresponsive(self, timeout_s: float = DEFAULT_UNRESPONSIVE_S) -> bool:
        """True when a still-running worker wrote no event (not even a heartbeat) for
        `timeout_s` seconds; the panel then offers Kill / Keep waiting."""
        if self._process is None or self._result is not None:
            return False
        return self.seconds_since_last_event() > timeout_s

    def keep_waiting(self) -> None:
        """Reset the watchdog (the user chose to keep waiting)."""
        self._last_event_at = self._clock()

    # progress summary ----------------------------------------------------------------------------
    def latest(self, event_type: str) -> Optional[Dict[str, Any]]:
        for event in reversed(self.events):
            if event["event"] == event_type:
                return event
        return None

    # internals ------------------------------------------------------------------------------------
    def _read_events(self) -> List[Dict[str, Any]]:
        new = self._tail.poll()  # a stray line is skipped, not the events around it
        self.protocol_warnings += self._tail.rejected
        self._tail.rejected.clear()
        if new:
            self._last_event_at = self._clock()
            self.events.extend(new)
            for event in new:
                if event["event"] == "error":
                    self.error = WorkerError(event["kind"], event.get("message", ""),
                                             event.get("hint"))
                elif event["event"] == "done":
                    self.done_event = event
        return new

    def _finish(self, code: int) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        done = self.done_event or {}
        wall = (self._clock() - self._started_at) if self._started_at is not None else 0.0
        if code == EXIT_OK and done.get("status") == "ok":
            status, error = "ok", None
        elif code == EXIT_OK:
            status = "failed"
            error = WorkerError("other", "the worker exited without reporting completion "
                                         "(no 'done' event in " + str(self.events_path) + ")")
        elif code == EXIT_CANCELLED or self._killed or done.get("status") == "cancelled":
            status = "cancelled"
            error = WorkerError("cancelled", "cancelled" + (" (process tree killed after the "
                                                              "grace period)" if self._killed else ""))
        else:
            status = "failed"
            error = self.error or WorkerError(
                EXIT_CODE_KINDS.get(code, "other"),
                f"the worker exited with code {code} without an error event"
                + (" (killed by a signal: possibly out of memory)" if code < 0 else ""))
        if error is not None:
            error.log = str(self.log_path)
        outputs = dict(done.get("outputs") or {}) if status == "ok" else {}
        self._result = RunResult(status=status, exit_code=code, outputs=outputs, error=error,
                                 killed=self._killed, wall_s=wall)


def clear_stale_cancel(run_dir: str | os.PathLike) -> bool:
    """Remove the CANCEL file an earlier, cancelled worker left in `run_dir` (the panel's Cancel,
    or its cleanup when Slicer closed during a run), so that a worker started there again is not
    stopped at its first step. Returns whether there was one. Call it only before starting a
    worker, never while one runs in `run_dir`."""
    return remove_stale_cancel(run_dir) is not None


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill `process` and its descendants: the process group on POSIX (the worker was started
    in its own session), `taskkill /T /F` on Windows."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                       **no_console_window())
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        process.kill()
