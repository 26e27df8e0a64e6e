"""Atomic file writes: write to a temporary sibling, fsync, then rename over the target.

A crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it onto `target`.

    The temporary name keeps the target's extension (`suffix`, default the full suffix chain,
    e.g. `.seg.nrrd`) so writers that pick the format from the extension still work. A target that
    cannot be written (a folder of that name, a folder that cannot be made or written to) is a
    DataError naming it, raised before the writer runs where possible."""
    target = Path(target)
    if target.is_dir():
        _cannot_write(target, "a folder of that name exists: name the file to write")
    ext = suffix if suffix is not None else "".join(target.suffixes)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=ext + ".part" if not ext else ext,
                                   dir=target.parent)
    except OSError as exc:
        _cannot_write(target, exc.strerror or str(exc))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_file_mode())  # mkstemp's 0600 would hide it from the group
        try:
            os.replace(tmp_path, target)
        except OSError as exc:
            _cannot_write(target, exc.strerror or str(exc))
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _cannot_write(target: Path, why: str):
    from .errors import DataError

    raise DataError(f"{target}: cannot write it ({why})") from None


def default_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask (read from /proc on
    Linux; elsewhere by setting and restoring it, the only portable way to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(target)


def write_json_atomic(target: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing or malformed file raises DataError naming it and the problem."""
    from .errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
