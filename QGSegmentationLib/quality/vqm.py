"""Variable-quality masks (VQM): the training targets of the quality predictor (methods.md 1.2).

Per sample one category is drawn, then the reference mask is turned into a candidate mask of known
quality (Dice and IoU against the reference, both empty -> 1):

| category     | p    | what                                                           |
|--------------|------|----------------------------------------------------------------|
| identity     | 0.20 | the reference                                                  |
| single       | 0.28 | one "moderate" corruption, drawn by weight (blob ops included) |
| chained      | 0.18 | 2-3 distinct "chain-allowed" corruptions in sequence           |
| swap         | 0.10 | another case's reference, from the 20% closest in fg volume    |
| heavy        | 0.12 | one "heavy" corruption at heavy severity                       |
| catastrophic | 0.05 | one of inverted / empty / full / random                        |
| blob         | 0.07 | one "blob" corruption                                          |

Before the category draw, with probability `p_weak` a weak-model mask is used when a `weak_pool`
is given (category "weak"). A swap without a usable pool (none given, or no other case in it)
falls back to "single" and is reported as such.

Swap donors: `swap_pool` is a list of `(case_id, mask, fg_volume)`; `fg_volume` must be in the same
unit as `foreground_volume(mask, spacing)` (physical volume = voxel count x voxel volume). A donor
whose shape differs from the target is centre-cropped / zero-padded to the target shape
(`fit_to_shape`); it is not resampled, so pools should hold masks on comparable grids (the
presentation crop of the quality predictor gives every case the same shape).

Label maps: the sampler works on one binary mask; sample each class of a label map separately (or
corrupt all classes at once with `corruptions.corrupt_labelmap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, DataError
from .corruptions import CORRUPTIONS
from .corruptions.base import as_bool_mask, as_spacing
from .dice import mask_dice, mask_iou

CATEGORIES = ("identity", "single", "chained", "swap", "heavy", "catastrophic", "blob")
DEFAULT_PROBABILITIES = {
    "identity": 0.20, "single": 0.28, "chained": 0.18, "swap": 0.10,
    "heavy": 0.12, "catastrophic": 0.05, "blob": 0.07,
}
# category -> (registry tag of its pool, severity passed to the corruption)
_POOLS = {
    "single": ("moderate", "moderate"),
    "chained": ("chain-allowed", "moderate"),
    "heavy": ("heavy", "heavy"),
    "catastrophic": ("catastrophic", "catastrophic"),
    "blob": ("blob", "moderate"),
}

SwapEntry = Tuple[str, np.ndarray, float]
WeakPool = Callable[[np.random.Generator], object]


@dataclass
class VQMConfig:
    """Category probabilities and knobs of the VQM sampler (defaults: the released ones)."""

    probabilities: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PROBABILITIES))
    chain_length: Tuple[int, int] = (2, 3)  # inclusive range of the chained category's length
    swap_fraction: float = 0.20  # donors come from this fraction of the pool closest in volume
    p_weak: float = 0.05  # probability of using a weak-model mask when a weak_pool is given
    weights: Dict[str, float] = field(default_factory=dict)  # per-corruption weight overrides; 0 disables
    unit: Optional[float] = None  # physical length of one paper pixel; None: from the array (base.py)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        probs = dict(self.probabilities)
        unknown = sorted(set(probs) - set(CATEGORIES))
        if unknown:
            raise ConfigError(f"VQMConfig.probabilities: unknown categories {unknown}; known: {list(CATEGORIES)}")
        for name, value in probs.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"VQMConfig.probabilities['{name}'] must be a number >= 0, got {value!r}")
        total = sum(probs.values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"VQMConfig.probabilities must sum to 1, got {total:.6f} ({probs})")
        self.probabilities = {c: float(probs.get(c, 0.0)) for c in CATEGORIES}
        low, high = (tuple(self.chain_length) + (None, None))[:2]
        if not (isinstance(low, int) and isinstance(high, int) and 2 <= low <= high):
            raise ConfigError(f"VQMConfig.chain_length must be (min, max) with 2 <= min <= max, got {self.chain_length!r}")
        self.chain_length = (low, high)
        if not (0.0 < self.swap_fraction <= 1.0):
            raise ConfigError(f"VQMConfig.swap_fraction must be in (0, 1], got {self.swap_fraction!r}")
        if not (0.0 <= self.p_weak <= 1.0):
            raise ConfigError(f"VQMConfig.p_weak must be in [0, 1], got {self.p_weak!r}")
        for name, value in self.weights.items():
            if name not in CORRUPTIONS:
                raise ConfigError(f"VQMConfig.weights: unknown corruption '{name}'; choose from {CORRUPTIONS.names()}")
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"VQMConfig.weights['{name}'] must be a number >= 0, got {value!r}")
        if self.unit is not None and not (self.unit > 0):
            raise ConfigError(f"VQMConfig.unit must be positive, got {self.unit!r}")

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> "VQMConfig":
        """Build from a plain dict (YAML/JSON section); unknown keys raise ConfigError."""
        values = dict(values or {})
        known = {"probabilities", "chain_length", "swap_fraction", "p_weak", "weights", "unit"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"vqm config: unknown keys {unknown}; known: {sorted(known)}")
        if "chain_length" in values:
            values["chain_length"] = tuple(values["chain_length"])
        return cls(**values)

    def weight(self, name: str) -> float:
        return float(self.weights.get(name, CORRUPTIONS.get(name).weight))


@dataclass
class VQMSample:
    """One variable-quality mask and its quality against the reference."""

    mask: np.ndarray
    category: str
    operations: List[str]
    dice: float
    iou: float


def foreground_volume(mask: np.ndarray, spacing=None) -> float:
    """Physical foreground volume (voxel count x voxel volume); the unit of swap-pool volumes."""
    mask = np.asarray(mask)
    return float(np.count_nonzero(mask) * np.prod(as_spacing(spacing, mask.ndim)))


def fit_to_shape(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre-crop and/or zero-pad `mask` to `shape` (same number of dimensions)."""
    if mask.ndim != len(shape):
        raise DataError(f"swap donor has {mask.ndim} dimensions, the target mask {len(shape)}")
    out = np.zeros(tuple(shape), dtype=mask.dtype)
    src, dst = [], []
    for have, want in zip(mask.shape, shape):
        n = min(have, want)
        a, b = (have - n) // 2, (want - n) // 2
        src.append(slice(a, a + n))
        dst.append(slice(b, b + n))
    out[tuple(dst)] = mask[tuple(src)]
    return out


class VQMSampler:
    """Draws variable-quality masks from a reference mask; `seed` makes the stream reproducible."""

    def __init__(self, config: Optional[VQMConfig] = None, seed: Optional[int] = None):
        self.config = config if config is not None else VQMConfig()
        self.config.validate()
        self.rng = np.random.default_rng(seed)
        self._pools: Dict[str, Tuple[List[str], np.ndarray]] = {}
        for category, (tag, _) in _POOLS.items():
            names = [e.name for e in CORRUPTIONS.entries() if tag in e.tags]
            weights = np.array([self.config.weight(n) for n in names], dtype=np.float64)
            keep = weights > 0
            names, weights = [n for n, k in zip(names, keep) if k], weights[keep]
            if self.config.probabilities[category] > 0 and not names:
                raise ConfigError(f"VQM category '{category}' has probability > 0 but no corruption with weight > 0")
            if category == "chained" and self.config.probabilities[category] > 0 and len(names) < self.config.chain_length[0]:
                raise ConfigError(
                    f"VQM chained category needs {self.config.chain_length[0]} distinct corruptions, "
                    f"only {len(names)} have weight > 0"
                )
            self._pools[category] = (names, weights / weights.sum() if weights.size else weights)

    # ---------------------------------------------------------------------------------------

    def sample(self, mask, spacing=None, swap_pool: Optional[Sequence[SwapEntry]] = None,
               weak_pool: Optional[WeakPool] = None, case_id: Optional[str] = None,
               rng: Optional[np.random.Generator] = None) -> VQMSample:
        """Draw one variable-quality mask for the binary reference `mask`.

        `swap_pool`: list of (case_id, mask, fg_volume) for the cross-image swap; entries with
        `case_id` equal to this case are skipped. `weak_pool(rng)` returns a weak-model mask for
        this case (or `(mask, name)`, or None when it has none). `rng` overrides the sampler's own
        generator (e.g. one per data-loader worker).
        """
        reference = as_bool_mask(mask, "mask")
        spacing = as_spacing(spacing, reference.ndim)
        rng = self.rng if rng is None else rng

        if weak_pool is not None and self.config.p_weak > 0 and rng.random() < self.config.p_weak:
            weak = self._weak(weak_pool, reference, rng)
            if weak is not None:
                return self._result(reference, weak[0], "weak", [weak[1]])

        probs = self.config.probabilities
        category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=[probs[c] for c in CATEGORIES]))]
        if category == "identity":
            return self._result(reference, reference.copy(), "identity", [])
        if category == "swap":
            donor = self._swap_donor(reference, spacing, swap_pool, case_id, rng)
            if donor is not None:
                return self._result(reference, donor[1], "swap", [f"swap:{donor[0]}"])
            category = "single"

        names, weights = self._pools[category]
        if category == "chained":
            length = int(rng.integers(self.config.chain_length[0], self.config.chain_length[1] + 1))
            chosen = [names[i] for i in rng.choice(len(names), size=min(length, len(names)), replace=False, p=weights)]
        else:
            chosen = [names[int(rng.choice(len(names), p=weights))]]
        severity = _POOLS[category][1]
        out = reference
        for name in chosen:
            out = CORRUPTIONS.get(name)(out, rng, spacing, severity, unit=self.config.unit)
        return self._result(reference, out, category, chosen)

    # ---------------------------------------------------------------------------------------

    @staticmethod
    def _result(reference, candidate, category, operations) -> VQMSample:
        return VQMSample(candidate, category, list(operations), mask_dice(candidate, reference),
                         mask_iou(candidate, reference))

    @staticmethod
    def _weak(weak_pool, reference, rng):
        produced = weak_pool(rng)
        if produced is None:
            return None
        name = "weak"
        if isinstance(produced, tuple):
            produced, name = produced[0], f"weak:{produced[1]}"
        weak = as_bool_mask(produced, "weak_pool mask")
        if weak.shape != reference.shape:
            raise DataError(f"weak_pool returned a mask of shape {weak.shape}, the reference is {reference.shape}")
        return weak, name

    def _swap_donor(self, reference, spacing, swap_pool, case_id, rng):
        if not swap_pool:
            return None
        pool = [entry for entry in swap_pool if case_id is None or str(entry[0]) != str(case_id)]
        if not pool:
            return None
        volume = foreground_volume(reference, spacing)
        distance = np.array([abs(float(entry[2]) - volume) for entry in pool])
        count = max(1, int(math.ceil(self.config.swap_fraction * len(pool))))
        closest = np.argsort(distance, kind="stable")[:count]
        donor_id, donor_mask, _ = pool[int(closest[rng.integers(count)])]
        donor = as_bool_mask(donor_mask, f"swap_pool mask of case '{donor_id}'")
        return donor_id, fit_to_shape(donor, reference.shape)
