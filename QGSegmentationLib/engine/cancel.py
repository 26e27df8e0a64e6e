"""Cooperative cancellation: a file in the run folder, or Ctrl-C.

The Slicer panel (or a user) creates `<run_dir>/CANCEL`; the training loop calls
`CancelToken.check()` between iterations, which raises CancelledError after the caller has had
the chance to save a checkpoint (see `requested`). Inside `CancelToken.catching_interrupts()` the
first Ctrl-C does the same (the loop stops at its next check, after saving); a second one stops at
once, as Ctrl-C normally does."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import CancelledError

CANCEL_FILE_NAME = "CANCEL"


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


class CancelToken:
    """Polls for the cancel file (one stat; call it every iteration) and for Ctrl-C."""

    def __init__(self, run_dir: str | os.PathLike | None):
        self.path = cancel_path(run_dir) if run_dir else None
        self.interrupted = False

    @property
    def requested(self) -> bool:
        return self.interrupted or bool(self.path and self.path.exists())

    def check(self) -> None:
        if self.requested:
            raise self.error()

    def error(self) -> CancelledError:
        """What the stop reports: what asked for it, and how to go on."""
        cause = "Ctrl-C" if self.interrupted else f"the cancel file {self.path}"
        return CancelledError(f"stopped by {cause}",
                              hint="run the same command again to resume from the last checkpoint")

    @contextmanager
    def catching_interrupts(self, say: Optional[Callable[[str], None]] = None) -> Iterator[None]:
        """While inside, the first Ctrl-C (SIGINT) sets `interrupted` instead of raising at a
        random point of a step (a half-done optimizer step cannot be saved); the loop's next check
        saves and stops. A second Ctrl-C raises KeyboardInterrupt at once. Only the main thread
        can handle signals: elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        previous = signal.getsignal(signal.SIGINT)

        def on_interrupt(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            say("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)")

        signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
