"""The run manifest: everything needed to know what produced a run folder and to reproduce it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator

from .. import __version__
from ..fileio import write_json_atomic


def package_versions() -> Dict[str, str]:
    """Versions of the packages that matter, without importing torch if it is not loaded yet."""
    from importlib import metadata

    out = {"python": platform.python_version(), "qgsegmentation": __version__}
    for dist in ("torch", "monai", "numpy", "scipy", "SimpleITK"):
        try:
            out[dist.lower()] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.lower()] = "not installed"
    if "torch" in sys.modules:
        import torch

        out["cuda_build"] = torch.version.cuda or "none"
        out["cudnn"] = str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "none"
    return out


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout that holds this package (or `path`), if it is a git checkout."""
    where = Path(path) if path else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


_STARTED_AT: Dict[str, str | None] = {}


def remember_commit(path: str | os.PathLike | None = None) -> str | None:
    """Record the checkout's commit now, at the start of a command: its manifest then names the
    code the run started with, even when an editable checkout moves on while it trains."""
    _STARTED_AT["commit"] = git_commit(path)
    return _STARTED_AT["commit"]


def forget_commit() -> None:
    _STARTED_AT.clear()


def write_manifest(run_dir: str | os.PathLike, *, command: list[str], config: Dict[str, Any],
                   device: str, seed: int | None, started: float, status: str,
                   extra: Dict[str, Any] | None = None) -> Path:
    manifest = {
        "command": command,
        "status": status,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_time_s": round(time.time() - started, 2),
        "seed": seed,
        "device": device,
        "versions": package_versions(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": _STARTED_AT["commit"] if "commit" in _STARTED_AT else git_commit(),
        "config": config,
    }
    if extra:
        manifest.update(extra)
    return write_json_atomic(Path(run_dir) / "manifest.json", manifest)


@contextmanager
def recorded_run(run_dir: str | os.PathLike, *, command: list[str], config, device: str,
                 seed: int | None, started: float, extra: Dict[str, Any] | None = None,
                 enabled: bool = True) -> Iterator[Dict[str, Any]]:
    """Write the run's manifest when the block ends, however it ends: status "ok", "cancelled"
    (cancel file, Ctrl-C: a rerun resumes), "failed" if it raised, "interrupted" when a second
    Ctrl-C stopped it at once. `config` (anything with `to_dict()`) is read then, so the values a
    run fills in (the planned spacing and patch) are recorded; the block may set the yielded dict's
    "device" (what "auto" became). `enabled` False (torchrun ranks other than 0) writes nothing, nor does a
    RunFolderError (a refusal to resume another run) where the folder has a manifest already."""
    from ..errors import CancelledError, RunFolderError

    facts = {"device": device}
    status = "interrupted"
    try:
        yield facts
        status = "ok"
    except RunFolderError:  # nothing ran: the manifest of the run the folder holds stays its record
        status = "failed"
        enabled = enabled and not (Path(run_dir) / "manifest.json").exists()
        raise
    except CancelledError:
        status = "cancelled"
        raise
    except Exception:
        status = "failed"
        raise
    finally:
        if enabled:
            write_manifest(run_dir, command=command, config=config.to_dict(), device=str(facts["device"]), seed=seed,
                           started=started, status=status, extra=extra)
