"""The JSON-lines events protocol between a `qgseg` worker and whoever watches it (the Slicer panel).

One JSON object per line, UTF-8, flushed after each line. Every event has:
    "event": one of EVENT_TYPES, "time": seconds since the epoch (float), "run": run id (str)
and per type:
    start     command (str), argv (list), pid (int), run_dir (str)
    stage     name (str), index (int, 1-based), total (int)   -- e.g. "quality predictor" 1/3
    progress  step (int), total (int), epoch (int|null), eta_s (float|null), stage (str|null)
    metric    name (str), value (float), step (int|null), split ("train"|"validation"|null)
    case_done case (str), outputs (dict of str->str), metrics (dict, may be empty)
    heartbeat (nothing more; written at least every HEARTBEAT_INTERVAL_S seconds while alive)
    note      message (str)   -- worth telling the user, not a problem (e.g. the planned spacing)
    warning   message (str)
    error     kind ("oom"|"cuda_unavailable"|"data"|"other"|"cancelled"), message (str), hint (str|null)
    done      status ("ok"|"cancelled"|"failed"), exit_code (int), outputs (dict), wall_s (float)

A well-formed stream starts with `start` and ends with exactly one `done`. `parse_line` validates
one line; `read_events` reads a file written so far, tolerating a truncated last line (the
writer may be mid-write). This module is pure Python so the Slicer side can import it cheaply.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Tuple

PROTOCOL_VERSION = 1
HEARTBEAT_INTERVAL_S = 5.0

REQUIRED_FIELDS: Dict[str, tuple] = {
    "start": ("command",),
    "stage": ("name", "index", "total"),
    "progress": ("step", "total"),
    "metric": ("name", "value"),
    "case_done": ("case",),
    "heartbeat": (),
    "note": ("message",),
    "warning": ("message",),
    "error": ("kind", "message"),
    "done": ("status", "exit_code"),
}
EVENT_TYPES = tuple(REQUIRED_FIELDS)
ERROR_KINDS = ("oom", "cuda_unavailable", "data", "other", "cancelled")
DONE_STATUSES = ("ok", "cancelled", "failed")


class ProtocolError(ValueError):
    """A line that is not a valid event."""


def parse_line(line: str) -> Dict[str, Any]:
    """Parse and validate one JSON line into an event dict; raise ProtocolError if invalid."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {line[:80]!r} ({exc})") from None
    if not isinstance(event, dict):
        raise ProtocolError(f"event is not an object: {line[:80]!r}")
    kind = event.get("event")
    if kind not in REQUIRED_FIELDS:
        raise ProtocolError(f"unknown event type {kind!r}")
    missing = [k for k in REQUIRED_FIELDS[kind] + ("time",) if k not in event]
    if missing:
        raise ProtocolError(f"{kind} event lacks {', '.join(missing)}")
    if kind == "error" and event["kind"] not in ERROR_KINDS:
        raise ProtocolError(f"unknown error kind {event['kind']!r}")
    if kind == "done" and event["status"] not in DONE_STATUSES:
        raise ProtocolError(f"unknown done status {event['status']!r}")
    return event


def read_events(path: str | os.PathLike, strict: bool = True) -> List[Dict[str, Any]]:
    """All complete events in `path`. A last line without its newline is ignored (still being
    written); any other invalid line raises ProtocolError when strict, else is skipped."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is incomplete or empty
    events = []
    for line in complete:
        if not line.strip():
            continue
        try:
            events.append(parse_line(line))
        except ProtocolError:
            if strict:
                raise
    return events


def validate_stream(events: List[Dict[str, Any]]) -> None:
    """Raise ProtocolError unless the stream starts with `start` and ends with one `done`."""
    if not events or events[0]["event"] != "start":
        raise ProtocolError("stream does not begin with a start event")
    dones = [i for i, e in enumerate(events) if e["event"] == "done"]
    if dones != [len(events) - 1]:
        raise ProtocolError("stream must end with exactly one done event")


class EventTail:
    """Incremental reader for a growing events file (the panel polls it from a timer).

    `poll()` returns the new complete events since the last call; never blocks. A line that is
    not a valid event (a stray print, bytes that are not UTF-8) is skipped and described in
    `rejected`; the events around it still arrive."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self.rejected: List[str] = []

    def poll(self) -> List[Dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        out = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                out.append(parse_line(raw.decode("utf-8")))
            except (ProtocolError, UnicodeDecodeError) as exc:
                self.rejected.append(f"{self.path.name}: skipped a line that is not an event "
                                     f"({exc}): {raw[:80]!r}")
        return out


@dataclass
class EventWriter:
    """Writes events to zero or more streams (a file and/or stdout). Thread-safe.

    `heartbeat_thread()` starts a daemon thread that writes a heartbeat every
    HEARTBEAT_INTERVAL_S seconds until `close()`."""

    run_id: str = ""
    streams: List[IO[str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _owned: List[IO[str]] = field(default_factory=list, repr=False)
    _thread: Optional[threading.Thread] = field(default=None, repr=False)
    done_written: bool = False
    #: Also shows each warning to the person at the terminal (the CLI sets it): a warning only in
    #: the event stream would reach the Slicer panel but never a user without --events.
    echo: Optional[Callable[[str], None]] = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, to_stdout: bool = False, run_id: str = ""):
        writer = cls(run_id=run_id)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a", encoding="utf-8")
            writer.streams.append(fh)
            writer._owned.append(fh)
        if to_stdout:
            writer.streams.append(sys.stdout)
        return writer

    @property
    def enabled(self) -> bool:
        return bool(self.streams)

    def emit(self, event: str, **fields: Any) -> Dict[str, Any]:
        if event not in REQUIRED_FIELDS:
            raise ProtocolError(f"unknown event type {event!r}")
        record = {"event": event, "time": round(time.time(), 3), "run": self.run_id, **fields}
        missing = [k for k in REQUIRED_FIELDS[event] if k not in record]
        if missing:
            raise ProtocolError(f"{event} event lacks {', '.join(missing)}")
        line = json.dumps(record, default=_json_default, allow_nan=False)
        with self._lock:
            if self.done_written:
                return record
            for stream in self.streams:
                stream.write(line + "\n")
                stream.flush()
            if event == "done":
                self.done_written = True
        return record

    # convenience wrappers -------------------------------------------------------------------
    def stage(self, name: str, index: int, total: int) -> None:
        self.emit("stage", name=name, index=index, total=total)

    def progress(self, step: int, total: int, epoch: int | None = None, eta_s: float | None = None,
                 stage: str | None = None) -> None:
        self.emit("progress", step=step, total=total, epoch=epoch,
                  eta_s=None if eta_s is None else round(float(eta_s), 1), stage=stage)

    def metric(self, name: str, value: float, step: int | None = None, split: str | None = None) -> None:
        self.emit("metric", name=name, value=float(value), step=step, split=split)

    def note(self, message: str) -> None:
        self.emit("note", message=message)

    def warning(self, message: str) -> None:
        self.emit("warning", message=message)
        if self.echo is not None:
            self.echo(f"warning: {message}")

    def heartbeat_thread(self, interval: float = HEARTBEAT_INTERVAL_S) -> None:
        if self._thread is not None or not self.enabled:
            return

        def beat():
            while not self._stop.wait(interval):
                self.emit("heartbeat")

        self._thread = threading.Thread(target=beat, name="qgseg-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        for fh in self._owned:
            fh.close()
        self._owned.clear()


class MemberEvents:
    """A run's event writer, with each stage name prefixed by the ensemble member it belongs to
    ("seed 5 (2 of 4): epochs"), so a progress display can say which member is training.

    With `share=(k, n)` (member k of n, counted from 0, each reporting one progress stream of the
    same length) progress is of the whole ensemble: member k's step s of T is step k*T + s of n*T,
    and the ETA covers the members still to come at the current member's pace."""

    def __init__(self, events, prefix: str, share: Optional[Tuple[int, int]] = None):
        self._events, self._prefix, self._share = events, prefix, share

    # EventWriter's wrappers, so that they go through this emit
    stage = EventWriter.stage
    progress = EventWriter.progress

    def emit(self, event: str, **fields: Any) -> Dict[str, Any]:
        if event == "stage":
            fields["name"] = f"{self._prefix}{fields.get('name', '')}"
        if event == "progress" and self._share:
            fields.update(self._of_the_ensemble(int(fields["step"]), int(fields["total"]), fields.get("eta_s")))
        return self._events.emit(event, **fields)

    def _of_the_ensemble(self, step: int, total: int, eta_s: Optional[float]) -> Dict[str, Any]:
        k, n = self._share
        remaining = (n - k) * total - step
        eta = None if eta_s is None or step >= total else round(float(eta_s) * remaining / (total - step), 1)
        return {"step": k * total + step, "total": n * total, "eta_s": eta}

    def __getattr__(self, attribute):
        return getattr(self._events, attribute)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def iter_lines(events: Iterable[Dict[str, Any]]) -> Iterable[str]:
    """Serialise events back to lines (used to record/replay streams in tests)."""
    for e in events:
        yield json.dumps(e)
