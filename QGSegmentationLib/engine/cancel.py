"""Cooperative cancellation: a file in the run folder, Ctrl-C, or the end of the parent process.

The Slicer panel (or a user) creates `<run_dir>/CANCEL`; the training loop calls
`CancelToken.check()` between iterations, which raises CancelledError after the caller has had
the chance to save a checkpoint (see `requested`). Inside `CancelToken.catching_interrupts()` the
first Ctrl-C does the same (the loop stops at its next check, after saving); a second one stops at
once, as Ctrl-C normally does. A worker the panel started also stops this way when Slicer is gone
(`PARENT_PID_VARIABLE`): Slicer closed or crashed, and nobody is left to read its results, while it
would hold the GPU for hours. It runs in its own process group, so nothing else stops it."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import CancelledError

CANCEL_FILE_NAME = "CANCEL"
#: Environment variable naming the process a worker serves (set by the Slicer panel); when that
#: process has ended, the worker stops as if cancelled, after saving a checkpoint.
PARENT_PID_VARIABLE = "QGSEG_PARENT_PID"
#: Seconds between two checks of the parent process (the loop checks its token every step).
PARENT_CHECK_INTERVAL_S = 2.0


def cancel_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CANCEL_FILE_NAME


def request_cancel(run_dir: str | os.PathLike) -> Path:
    """Ask a running worker to stop; returns the cancel file's path."""
    path = cancel_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("cancel requested\n")
    return path


#: Seconds by which a cancel file must predate the process to count as stale (file systems that
#: keep modification times to the second would otherwise make a fresh request look old).
STALE_MARGIN_S = 1.0


def remove_stale_cancel(run_dir: str | os.PathLike, started: float = math.inf) -> Optional[Path]:
    """Remove a cancel file older than `started` (this process's start): one left by an earlier,
    cancelled run, which would otherwise stop a rerun at its first step. A file written since is a
    request to stop this run and stays. Without `started` (before a worker is started in
    `run_dir`) any cancel file there is stale. Returns the removed file's path, or None."""
    path = cancel_path(run_dir)
    try:
        if path.stat().st_mtime >= started - STALE_MARGIN_S:
            return None
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def ignore_interrupts(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C is the main process's to handle (it stops after the
    current step); a worker killed by it would turn that clean stop into a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_exists(pid: int) -> bool:
    """Whether process `pid` is running. POSIX: signal 0 (no signal is sent). Windows: os.kill
    would terminate the process, so the process handle is opened and asked instead."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        access = 0x1000 | 0x00100000  # PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE
        handle = kernel32.OpenProcess(access, False, pid)
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: not signalled yet
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def parent_pid_from_environment(environ=os.environ) -> Optional[int]:
    """The pid in `PARENT_PID_VARIABLE`, or None when unset or not a positive integer."""
    try:
        pid = int(environ.get(PARENT_PID_VARIABLE, ""))
    except ValueError:
        return None
    return pid if pid > 0 else None


class CancelToken:
    """Polls for the cancel file (one stat; call it every iteration), for Ctrl-C, and (at most
    every `PARENT_CHECK_INTERVAL_S`) for the end of the parent process named in the environment."""

    def __init__(self, run_dir: str | os.PathLike | None, parent_pid: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.path = cancel_path(run_dir) if run_dir else None
        self.interrupted = False
        self.signal_name = "Ctrl-C"
        self.parent_pid = parent_pid if parent_pid is not None else parent_pid_from_environment()
        self.parent_gone = False
        self._clock = clock
        self._parent_checked_at = -math.inf

    @property
    def requested(self) -> bool:
        return (self.interrupted or bool(self.path and self.path.exists())
                or self._parent_has_ended())

    def _parent_has_ended(self) -> bool:
        if self.parent_pid is None or self.parent_gone:
            return self.parent_gone
        now = self._clock()
        if now - self._parent_checked_at >= PARENT_CHECK_INTERVAL_S:
            self._parent_checked_at = now
            self.parent_gone = not process_exists(self.parent_pid)
        return self.parent_gone

    def check(self) -> None:
        if self.requested:
            raise self.error()

    def error(self) -> CancelledError:
        """What the stop reports: what asked for it, and how to go on."""
        if self.interrupted:
            cause = self.signal_name
        elif self.parent_gone:
            cause = f"the end of the process that started this worker (pid {self.parent_pid}: Slicer closed?)"
        else:
            cause = f"the cancel file {self.path}"
        return CancelledError(f"stopped by {cause}",
                              hint="run the same command again to resume from the last checkpoint")

    @contextmanager
    def catching_interrupts(self, say: Optional[Callable[[str], None]] = None) -> Iterator[None]:
        """While inside, the first Ctrl-C (SIGINT) or SIGTERM (what a cluster's scheduler or
        `kill` sends before it kills) sets `interrupted` instead of raising at a random point of a
        step (a half-done optimizer step cannot be saved); the loop's next check saves and stops. A
        second one raises KeyboardInterrupt at once. Only the main thread can handle signals:
        elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        names = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
        previous = {signum: signal.getsignal(signum) for signum in names}

        def on_interrupt(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            self.signal_name = names.get(signum, "a signal")
            say(f"\n{self.signal_name}: stopping after this step and saving a checkpoint "
                f"({self.signal_name} again stops at once)")

        for signum in names:
            signal.signal(signum, on_interrupt)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
