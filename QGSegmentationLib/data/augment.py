"""Cheap, seeded numpy augmentation of training patches.

Spatial transforms (flips) are applied identically to image and label; intensity transforms
(scale, shift, gaussian noise, and optionally nnU-Net-style gamma and contrast changes) to the
image only. All randomness comes from the generator passed in, so a sampler that saves its
generator state replays the exact same augmented patches; a transform whose probability is 0
draws no random numbers, so switching one on never changes the others' stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, check_option_names, check_option_types


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; intensities are in normalised (z-score) units."""

    flip_prob: float = 0.5  # per spatial axis
    scale_range: tuple = (0.9, 1.1)
    shift_range: tuple = (-0.1, 0.1)
    noise_prob: float = 0.15
    noise_std_range: tuple = (0.0, 0.1)
    # gamma: rescale the patch to [0, 1], raise to gamma, map back keeping its mean and std;
    # with gamma_invert_prob it is applied to the negated image (darkens bright structures)
    gamma_prob: float = 0.0
    gamma_range: tuple = (0.7, 1.5)
    gamma_invert_prob: float = 0.0
    # contrast: stretch or squeeze around the patch mean, clipped to the patch's value range
    contrast_prob: float = 0.0
    contrast_range: tuple = (0.75, 1.25)

    @classmethod
    def from_dict(cls, options: dict | None, source: str = "augmentation") -> "AugmentConfig":
        """Build from a mapping of overrides; unknown names raise ConfigError listing the valid ones."""
        options = dict(options or {})
        check_option_names(options, cls, source)
        check_option_types(options, cls, source)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})

    def __post_init__(self):
        for name in ("flip_prob", "noise_prob", "gamma_prob", "gamma_invert_prob", "contrast_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"augmentation {name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("scale_range", "shift_range", "noise_std_range", "gamma_range", "contrast_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"augmentation {name} must be (low, high) with low <= high")
        if min(self.scale_range[0], self.gamma_range[0], self.contrast_range[0]) <= 0 \
                or self.noise_std_range[0] < 0:
            raise ConfigError("augmentation scales, gammas, contrasts and noise levels must be positive")


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
        if cfg.gamma_prob > 0 and rng.random() < cfg.gamma_prob:
            invert = cfg.gamma_invert_prob > 0 and rng.random() < cfg.gamma_invert_prob
            image = adjust_gamma(image, rng.uniform(*cfg.gamma_range), invert)
        if cfg.contrast_prob > 0 and rng.random() < cfg.contrast_prob:
            image = adjust_contrast(image, rng.uniform(*cfg.contrast_range))
        if rng.random() < cfg.noise_prob:
            sigma = rng.uniform(*cfg.noise_std_range)
            image = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = None if label is None else np.ascontiguousarray(label)
        return image, label


def adjust_gamma(image: np.ndarray, gamma: float, invert: bool = False) -> np.ndarray:
    """x -> min + range * ((x - min) / range) ** gamma per channel, then the channel's original
    mean and std restored (nnU-Net's gamma with retained statistics); `invert` applies it to -x."""
    out = np.empty_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        x = -channel if invert else channel
        low, span = float(x.min()), float(x.max() - x.min())
        if span <= 0:
            out[c] = channel
            continue
        y = low + span * np.power((x - low) / span, gamma, dtype=np.float32)
        mean, std = float(x.mean()), float(x.std())
        y = (y - y.mean()) / max(float(y.std()), 1e-8) * std + mean
        out[c] = -y if invert else y
    return out


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """x -> mean + factor * (x - mean) per channel, clipped to the channel's original range."""
    out = np.empty_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        mean = float(channel.mean())
        out[c] = np.clip(mean + np.float32(factor) * (channel - mean), channel.min(), channel.max())
    return out
