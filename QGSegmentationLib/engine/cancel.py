"""Cooperative cancellation through a file in the run folder.

The Slicer panel (or a user) creates `<run_dir>/CANCEL`; the training loop calls
`CancelToken.check()` between iterations, which raises CancelledError after the caller has had
the chance to save a checkpoint (see `requested`)."""

from __future__ import annotations

import os
from pathlib import Path

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


class CancelToken:
    """Polls for the cancel file. Cheap (one stat); call it every iteration."""

    def __init__(self, run_dir: str | os.PathLike | None):
        self.path = cancel_path(run_dir) if run_dir else None

    @property
    def requested(self) -> bool:
        return bool(self.path and self.path.exists())

    def check(self) -> None:
        if self.requested:
            raise CancelledError("cancelled: the run's cancel file was found", hint=str(self.path))

    def clear(self) -> None:
        if self.path and self.path.exists():
            self.path.unlink()
