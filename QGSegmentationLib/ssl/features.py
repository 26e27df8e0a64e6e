"""Helpers for methods that work on decoder features (contrastive, prototypes)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def features_and_logits(net, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoder features (B, F, *sp') and logits (B, C, *sp) from one forward (networks module)."""
    from ..networks import features_and_logits as run

    return run(net, x)


def to_feature_grid(values: torch.Tensor, feature_shape) -> torch.Tensor:
    """Resample per-pixel values (B, *sp) (labels, masks, entropies) to the features' spatial grid
    by nearest neighbour; unchanged when the grids already match."""
    if tuple(values.shape[1:]) == tuple(feature_shape):
        return values
    out = F.interpolate(values[:, None].float(), size=tuple(feature_shape), mode="nearest")[:, 0]
    return out.to(values.dtype)


def flatten_pixels(features: torch.Tensor) -> torch.Tensor:
    """(B, F, *sp) -> (B * prod(sp), F) in the same order as `values.flatten()` of (B, *sp)."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def batch_index(shape, device) -> torch.Tensor:
    """Sample index of each pixel of a (B, *sp) map, flattened."""
    b = shape[0]
    return torch.arange(b, device=device).repeat_interleave(math.prod(shape[1:]))


def scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    """Mean of `values` per index in 0..size-1 (0 where none), keeping the graph of `like`."""
    sums = torch.zeros(size, device=values.device, dtype=values.dtype).index_add(0, index, values)
    counts = torch.zeros(size, device=values.device, dtype=values.dtype).index_add(
        0, index, torch.ones_like(values))
    return sums / counts.clamp_min(1.0) + 0.0 * like.sum()
