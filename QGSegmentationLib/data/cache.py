"""Decode-and-preprocess each case once: per process in memory, per machine in an on-disk cache.

The disk cache is a folder of `.npz` files named by a hash of the image/label paths, their sizes
and modification times and the preprocessing configuration, so editing a file or changing the
configuration can never serve stale data. Cache files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..fileio import atomic_path
from . import io
from .dataset import CaseRef
from .io import Geometry
from .preprocess import Preprocessor

CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PreparedCase:
    """A case ready for sampling: preprocessed arrays plus both voxel grids, so that outputs can
    be mapped back onto `original_geometry` (the file's grid)."""

    id: str
    image: np.ndarray  # float32 (1, z, y, x), normalised
    label: np.ndarray | None  # uint8 (z, y, x) on the same grid, None for unlabeled cases
    geometry: Geometry  # grid of `image` after preprocessing
    original_geometry: Geometry  # grid of the image file
    image_path: Path
    label_path: Path | None = None

    @property
    def labeled(self) -> bool:
        return self.label is not None

    @property
    def shape(self) -> tuple:
        return tuple(self.image.shape[1:])


def _file_signature(path: Path | None):
    if path is None:
        return None
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


class CaseStore:
    """Loads `CaseRef`s into `PreparedCase`s, decoding each file at most once per process and,
    with a `cache_dir`, at most once per machine.

    `stats` counts files decoded from their original format ("decoded_images",
    "decoded_labels"), disk cache hits ("disk_hits") and memory hits ("memory_hits")."""

    def __init__(self, preprocessor: Preprocessor, cache_dir: str | os.PathLike | None = None,
                 allowed_labels: Iterable[int] | None = None):
        self.preprocessor = preprocessor
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.allowed_labels = None if allowed_labels is None else tuple(int(v) for v in allowed_labels)
        self._memory: dict = {}
        self.stats = {"decoded_images": 0, "decoded_labels": 0, "disk_hits": 0, "memory_hits": 0}

    def key(self, ref: CaseRef) -> str:
        """Hash of what determines the prepared arrays: files (path, size, mtime), configuration."""
        payload = {"version": CACHE_FORMAT_VERSION, "image": _file_signature(Path(ref.image)),
                   "label": _file_signature(Path(ref.label) if ref.label else None),
                   "allowed_labels": self.allowed_labels,
                   "config": self.preprocessor.config.to_dict()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def load(self, ref: CaseRef) -> PreparedCase:
        key = self.key(ref)
        case = self._memory.get(key)
        if case is not None:
            self.stats["memory_hits"] += 1
        else:
            case = self._load_disk(key)
            if case is None:
                case = self._decode(ref)
                self._save_disk(key, case)
            self._memory[key] = case
        return case if case.id == ref.id else replace(case, id=ref.id)

    def load_many(self, refs: Sequence[CaseRef], progress: bool = True,
                  desc: str = "loading cases") -> list:
        from tqdm import tqdm

        return [self.load(ref) for ref in tqdm(refs, desc=desc, unit="case", disable=not progress)]

    def clear(self) -> None:
        """Forget the in-memory copies (the disk cache stays)."""
        self._memory.clear()

    # ---------------------------------------------------------------------------------- internals

    def _decode(self, ref: CaseRef) -> PreparedCase:
        image, geometry = io.read_image(ref.image)
        self.stats["decoded_images"] += 1
        label = None
        if ref.label is not None:
            label, label_geometry = io.read_label(ref.label, self.allowed_labels)
            self.stats["decoded_labels"] += 1
            io.check_same_geometry(geometry, label_geometry, ref.image, ref.label)
        image_out, label_out, target = self.preprocessor.case(image, label, geometry)
        return PreparedCase(ref.id, np.ascontiguousarray(image_out[None], dtype=np.float32),
                            None if label_out is None else np.ascontiguousarray(label_out, dtype=np.uint8),
                            target, geometry, Path(ref.image),
                            Path(ref.label) if ref.label is not None else None)

    def _cache_file(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.npz"

    def _save_disk(self, key: str, case: PreparedCase) -> None:
        target = self._cache_file(key)
        if target is None:
            return
        meta = {"id": case.id, "geometry": case.geometry.to_dict(),
                "original_geometry": case.original_geometry.to_dict(),
                "image_path": str(case.image_path),
                "label_path": str(case.label_path) if case.label_path else None}
        arrays = {"image": case.image, "meta": np.array(json.dumps(meta))}
        if case.label is not None:
            arrays["label"] = case.label
        with atomic_path(target, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())

    def _load_disk(self, key: str) -> PreparedCase | None:
        path = self._cache_file(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                image = np.array(data["image"], dtype=np.float32)
                label = np.array(data["label"], dtype=np.uint8) if "label" in data.files else None
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
            return None  # unreadable cache entry: decode again and overwrite it
        self.stats["disk_hits"] += 1
        return PreparedCase(meta["id"], image, label, Geometry.from_dict(meta["geometry"]),
                            Geometry.from_dict(meta["original_geometry"]), Path(meta["image_path"]),
                            Path(meta["label_path"]) if meta["label_path"] else None)
