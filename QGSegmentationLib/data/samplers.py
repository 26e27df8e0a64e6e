"""Endless, seeded patch samplers: 3D patches or 2D slices, with nnU-Net style foreground
oversampling, and the two-stream pairing (labeled + unlabeled) semi-supervised methods use.

A sampler's whole future is determined by its generator state, which `state_dict()` exports (as
strings and ints, safe for JSON and `torch.load(weights_only=True)`), so a resumed run draws
exactly the batches the interrupted run would have drawn.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError
from .augment import Augmenter
from .cache import PreparedCase

MODES = ("3d", "2d")
#: Foreground voxels remembered per class and case (a seeded subsample), as in nnU-Net.
MAX_FOREGROUND_LOCATIONS = 10_000


def rng_state(rng: np.random.Generator) -> dict:
    """The generator state with its 128-bit integers as strings."""
    state = rng.bit_generator.state
    return {"bit_generator": state["bit_generator"],
            "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}


def set_rng_state(rng: np.random.Generator, saved: dict) -> None:
    rng.bit_generator.state = {"bit_generator": saved["bit_generator"],
                               "state": {k: int(v) for k, v in saved["state"].items()},
                               "has_uint32": int(saved["has_uint32"]), "uinteger": int(saved["uinteger"])}


def _foreground_locations(label: np.ndarray, seed: int) -> list:
    """Per foreground class present: an (n, 3) array of voxel indices (z, y, x), subsampled."""
    rng = np.random.default_rng(seed)
    flat = label.ravel()
    counts = np.bincount(flat)
    per_class = []
    for value in np.flatnonzero(counts[1:]) + 1:
        where = np.flatnonzero(flat == value)
        if where.size > MAX_FOREGROUND_LOCATIONS:
            where = np.sort(rng.choice(where, MAX_FOREGROUND_LOCATIONS, replace=False))
        per_class.append(np.stack(np.unravel_index(where, label.shape), axis=1))
    return per_class


def _crop(volume: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value) -> np.ndarray:
    """volume[start:start+size] over the last len(size) axes, padded with `pad_value` where the
    window leaves the volume (start may be negative)."""
    lead = volume.ndim - len(size)
    out = np.full(volume.shape[:lead] + tuple(size), pad_value, dtype=volume.dtype)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for axis, (begin, n) in enumerate(zip(start, size)):
        extent = volume.shape[lead + axis]
        lo, hi = max(begin, 0), min(begin + n, extent)
        src.append(slice(lo, hi))
        dst.append(slice(lo - begin, hi - begin))
    out[tuple(dst)] = volume[tuple(src)]
    return out


class PatchSampler:
    """Endless iterator of batches `{"image": (B,1,*patch) float32, "label": (B,*patch) int64,
    "case": [ids]}` ("label" only when `with_labels`).

    mode "3d": patch_size (z, y, x) windows; mode "2d": one z slice, patch_size (y, x) window.
    With probability `fg_ratio` a sample is centred on a foreground voxel of a randomly chosen
    class present in the case, moved along each axis by up to `center_jitter` of the patch
    (0: the voxel is the window's centre); otherwise the window is uniformly random.
    Volumes smaller than the patch are padded (image: the case minimum, label: 0)."""

    def __init__(self, cases: Sequence[PreparedCase], patch_size: Sequence[int], batch_size: int,
                 mode: str = "3d", fg_ratio: float = 0.33, augment: bool = True, seed: int = 0,
                 with_labels: bool = True, augmenter: Augmenter | None = None, center_jitter: float = 0.25):
        if mode not in MODES:
            raise ConfigError(f"sampler mode must be one of {MODES}, got {mode!r}")
        n_spatial = 3 if mode == "3d" else 2
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != n_spatial or min(patch) < 1:
            raise ConfigError(f"patch_size for mode '{mode}' needs {n_spatial} positive sizes "
                              f"({'z, y, x' if n_spatial == 3 else 'y, x'}), got {tuple(patch_size)}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= float(fg_ratio) <= 1.0:
            raise ConfigError(f"fg_ratio must be in [0, 1], got {fg_ratio}")
        if not 0.0 <= float(center_jitter) <= 0.5:
            raise ConfigError(f"center_jitter must be in [0, 0.5] (a fraction of the patch), got {center_jitter}")
        if not cases:
            raise ConfigError("the sampler got no cases")
        if with_labels:
            unlabeled = [c.id for c in cases if c.label is None]
            if unlabeled:
                raise ConfigError(f"labeled sampler got cases without labels: {unlabeled[:5]}")
        self.cases = list(cases)
        self.patch_size = patch
        self.batch_size = int(batch_size)
        self.mode = mode
        self.fg_ratio = float(fg_ratio)
        self.center_jitter = float(center_jitter)
        self.with_labels = bool(with_labels)
        self.augmenter = (augmenter or Augmenter()) if augment else None
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self.batches_drawn = 0
        self._pad_values = [float(c.image.min()) for c in self.cases]
        self._foreground = [
            _foreground_locations(c.label, seed=self.seed * 100_003 + i)
            if (self.with_labels and c.label is not None) else []
            for i, c in enumerate(self.cases)]

    # ----------------------------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import torch

        images, labels, ids = [], [], []
        for _ in range(self.batch_size):
            image, label, case_id = self.sample()
            images.append(image)
            labels.append(label)
            ids.append(case_id)
        self.batches_drawn += 1
        batch = {"image": torch.from_numpy(np.stack(images)), "case": ids}
        if self.with_labels:
            batch["label"] = torch.from_numpy(np.stack(labels).astype(np.int64))
        return batch

    def sample(self) -> tuple:
        """One (image (1,*patch) float32, label (*patch) uint8 or None, case id)."""
        rng = self._rng
        index = int(rng.integers(len(self.cases)))
        case = self.cases[index]
        force_foreground = rng.random() < self.fg_ratio and bool(self._foreground[index])
        center = self._foreground_voxel(index) if force_foreground else None
        volume_shape = case.image.shape[1:]
        if self.mode == "3d":
            start = self._window_start(volume_shape, self.patch_size, center)
            image = _crop(case.image, start, self.patch_size, self._pad_values[index])
            label = (_crop(case.label, start, self.patch_size, 0) if self.with_labels else None)
        else:
            z = int(center[0]) if center is not None else int(rng.integers(volume_shape[0]))
            start = self._window_start(volume_shape[1:], self.patch_size,
                                       None if center is None else center[1:])
            image = _crop(case.image[:, z], start, self.patch_size, self._pad_values[index])
            label = (_crop(case.label[z], start, self.patch_size, 0) if self.with_labels else None)
        if self.augmenter is not None:
            image, label = self.augmenter(image, label, rng)
        return image, label, case.id

    def _foreground_voxel(self, index: int) -> np.ndarray:
        per_class = self._foreground[index]
        locations = per_class[int(self._rng.integers(len(per_class)))]
        return locations[int(self._rng.integers(len(locations)))]

    def _window_start(self, shape, patch, center) -> list:
        """Window start per axis: uniform over valid positions (negative = padding before), or
        around `center`, moved by up to `center_jitter` of the patch, kept inside the valid range."""
        starts = []
        for axis, (extent, size) in enumerate(zip(shape, patch)):
            low, high = min(0, extent - size), max(0, extent - size)
            if center is None:
                starts.append(int(self._rng.integers(low, high + 1)))
            else:
                reach = int(size * self.center_jitter)
                jitter = int(self._rng.integers(-reach, reach + 1))
                starts.append(int(np.clip(int(center[axis]) - size // 2 + jitter, low, high)))
        return starts

    # ------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        return {"rng": rng_state(self._rng), "batches_drawn": self.batches_drawn, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self._rng, state["rng"])
        self.batches_drawn = int(state.get("batches_drawn", 0))


class TwoStreamSampler:
    """Pairs a labeled and an (optional) unlabeled sampler: each `next()` gives
    `(labeled_batch, unlabeled_batch or None)`; resumes both streams together."""

    def __init__(self, labeled: PatchSampler, unlabeled: PatchSampler | None = None):
        self.labeled = labeled
        self.unlabeled = unlabeled

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        return next(self.labeled), (next(self.unlabeled) if self.unlabeled is not None else None)

    def state_dict(self) -> dict:
        state = {"labeled": self.labeled.state_dict()}
        if self.unlabeled is not None:
            state["unlabeled"] = self.unlabeled.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.labeled.load_state_dict(state["labeled"])
        if self.unlabeled is not None and "unlabeled" in state:
            self.unlabeled.load_state_dict(state["unlabeled"])


def two_stream(labeled_sampler: PatchSampler, unlabeled_sampler: PatchSampler | None = None
               ) -> TwoStreamSampler:
    """The (labeled, unlabeled) batch pairs of a semi-supervised run."""
    return TwoStreamSampler(labeled_sampler, unlabeled_sampler)
