"""Checkpoints: atomic save, safe load (`torch.load(weights_only=True)`), and the folder layout.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts — nothing that needs
unpickling of arbitrary classes — so it loads with weights_only=True everywhere, including in a
Slicer process that should never execute code from a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

from ..errors import DataError
from ..fileio import atomic_path

FORMAT = "qgseg-segmenter"
FORMAT_VERSION = 1


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def member_dir(run_dir: str | os.PathLike, seed: int) -> Path:
    """Where the member trained with `seed` of a seed ensemble (`--seeds N`) keeps its own run."""
    return Path(run_dir) / f"seed-{seed}"


def save_checkpoint(path: str | os.PathLike, state: Dict[str, Any]) -> Path:
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint", map_location="cpu") -> Any:
    """`torch.load(path, weights_only=True)`, or a DataError naming the file and saying what is
    wrong with it (missing, empty, cut short, not a PyTorch file, holding Python objects)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty, not a {what} (a copy or download that did not finish?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad files
        raise DataError(f"{path}: not a readable {what}: {_unreadable_why(exc)}",
                        hint="checkpoints are the .pt files in a run's checkpoints/ folder") from None


def load_checkpoint(path: str | os.PathLike, map_location="cpu", expected_format: str | None = FORMAT) -> Dict[str, Any]:
    path = Path(path)
    state = read_torch_file(path, map_location=map_location)
    if not isinstance(state, dict) or (expected_format and state.get("format") != expected_format):
        found = format_of(state)
        hint = ("this is a quality predictor g, which --quality-checkpoint takes; here a segmenter's "
                "checkpoints/best.pt (from `qgseg train` or `qgseg ssl train`) is expected"
                if str(found).startswith("qgseg-quality") else None)
        raise DataError(f"{path}: expected a {expected_format} checkpoint, found {found!r}", hint=hint)
    return state


def format_of(state: Any) -> str:
    """What a loaded file says it is (its "format"), for error messages."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a checkpoint"
    return state.get("format") or "a file that does not say what it is (not written by QGSegmentation)"


def _unreadable_why(exc: Exception) -> str:
    """One line on why torch.load failed, in terms of the file rather than of torch's internals."""
    import zipfile

    text = " ".join(str(exc).split())
    if isinstance(exc, (EOFError, zipfile.BadZipFile)) or "central directory" in text or "Invalid argument" in text:
        return "it is cut short or damaged (a copy or download that did not finish?)"
    if "Unsupported global" in text:
        return ("it holds Python objects, not only plain data, and such files are not loaded "
                "(weights_only=True): not a QGSegmentation checkpoint")
    return "it is not a PyTorch checkpoint file"


def plain(obj: Any) -> Any:
    """Convert numpy scalars/arrays (e.g. in RNG states) to builtins so weights_only can load them."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def checkpoint_iteration(path: str | os.PathLike) -> int | None:
    """The training iteration a segmenter checkpoint was saved at (None if it does not say):
    two checkpoints of one run with the same iteration hold the same weights."""
    iteration = load_checkpoint(path).get("iteration")
    return int(iteration) if iteration is not None else None
