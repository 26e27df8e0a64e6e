"""Cheap, seeded numpy augmentation of training patches.

Spatial transforms (flips) are applied identically to image and label; intensity transforms
(scale, shift, gaussian noise) to the image only. All randomness comes from the generator passed
in, so a sampler that saves its generator state replays the exact same augmented patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; intensities are in normalised (z-score) units."""

    flip_prob: float = 0.5  # per spatial axis
    scale_range: tuple = (0.9, 1.1)
    shift_range: tuple = (-0.1, 0.1)
    noise_prob: float = 0.15
    noise_std_range: tuple = (0.0, 0.1)

    def __post_init__(self):
        for name in ("flip_prob", "noise_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"augmentation {name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("scale_range", "shift_range", "noise_std_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"augmentation {name} must be (low, high) with low <= high")
        if self.scale_range[0] <= 0 or self.noise_std_range[0] < 0:
            raise ConfigError("augmentation scales and noise levels must be positive")


class Augmenter:
    """`(image (C, *spatial), label (*spatial) | None, rng) -> (image, label)`."""

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig()

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        cfg = self.config
        n_spatial = image.ndim - 1
        flips = [axis for axis in range(n_spatial) if rng.random() < cfg.flip_prob]
        if flips:
            image = np.flip(image, axis=tuple(a + 1 for a in flips))
            if label is not None:
                label = np.flip(label, axis=tuple(flips))
        scale = rng.uniform(*cfg.scale_range)
        shift = rng.uniform(*cfg.shift_range)
        image = image * np.float32(scale) + np.float32(shift)
        if rng.random() < cfg.noise_prob:
            sigma = rng.uniform(*cfg.noise_std_range)
            image = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = None if label is None else np.ascontiguousarray(label)
        return image, label
