"""Catastrophic family: inverted, empty, full and random (Bernoulli 0.5) masks.

They accept any severity (it is ignored) and are drawn only by the "catastrophic" VQM category.
"""

from __future__ import annotations

import numpy as np

from .base import SEVERITIES, Corruption, Grid, register_corruption


class _Catastrophic(Corruption):
    family = "catastrophic"
    severities = ("catastrophic",)
    accepted_severities = SEVERITIES
    chain_allowed = False


@register_corruption
class Inverted(_Catastrophic):
    """Inverted mask (foreground and background swapped)."""

    name = "inverted"

    def apply(self, mask, grid: Grid):
        return ~mask


@register_corruption
class Empty(_Catastrophic):
    """Empty mask."""

    name = "empty"

    def apply(self, mask, grid: Grid):
        return np.zeros_like(mask)


@register_corruption
class Full(_Catastrophic):
    """Full mask (everything foreground)."""

    name = "full"

    def apply(self, mask, grid: Grid):
        return np.ones_like(mask)


@register_corruption
class RandomNoise(_Catastrophic):
    """Random mask: every voxel foreground with probability 0.5."""

    name = "random"

    def draw(self, mask, rng, grid, severity):
        return {"seed": int(rng.integers(2 ** 32))}

    def apply(self, mask, grid: Grid, seed: int = 0, probability: float = 0.5):
        return np.random.default_rng(seed).random(mask.shape) < probability
