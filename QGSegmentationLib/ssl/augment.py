"""Strong augmentation on batched tensors for weak-to-strong consistency (FixMatch / UniMatch).

Everything works on (B, 1, *spatial) float tensors already on the device, 2D or 3D, and draws its
randomness from torch's generator (seeded by the engine). Mixing (CutMix, copy-paste) returns the
mixing mask so the same mix can be applied to pseudolabels and confidences.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def _uniform(n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(n, device=like.device, dtype=like.dtype).uniform_(lo, hi)


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape((-1,) + (1,) * (ndim - 1))


def intensity_jitter(x: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    """x * (1 + U(-contrast, contrast)) + U(-brightness, brightness), one draw per sample
    (intensities are normalised, so brightness is in units of the image's standard deviation)."""
    b = x.shape[0]
    scale = _per_sample(1.0 + _uniform(b, -contrast, contrast, x), x.ndim)
    shift = _per_sample(_uniform(b, -brightness, brightness, x), x.ndim)
    return x * scale + shift


def gaussian_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return x + torch.randn_like(x) * std if std > 0 else x


def gaussian_kernel1d(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *spatial) with replicate padding."""
    spatial = x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    k = gaussian_kernel1d(sigma, x.device, x.dtype)
    channels = x.shape[1]
    out = x
    for axis in range(spatial):
        shape = [1] * spatial
        shape[axis] = k.numel()
        weight = k.reshape([1, 1] + shape).repeat(channels, 1, *([1] * spatial))
        pad = [0, 0] * spatial
        pad[2 * (spatial - 1 - axis)] = pad[2 * (spatial - 1 - axis) + 1] = k.numel() // 2
        out = conv(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out


def random_blur(x: torch.Tensor, probability: float, sigma_range: Tuple[float, float]) -> torch.Tensor:
    """Blur each sample with probability p and sigma ~ U(sigma_range)."""
    out = []
    for i in range(x.shape[0]):
        sample = x[i:i + 1]
        if float(torch.rand(())) < probability:
            sample = gaussian_blur(sample, float(torch.empty(()).uniform_(*sigma_range)))
        out.append(sample)
    return torch.cat(out, dim=0)


def strong_intensity(x: torch.Tensor, cfg) -> torch.Tensor:
    """Intensity jitter + Gaussian noise + random blur (the non-mixing part of the strong view)."""
    x = intensity_jitter(x, cfg.strong_brightness, cfg.strong_contrast)
    x = gaussian_noise(x, cfg.strong_noise_std)
    return random_blur(x, cfg.strong_blur_probability, cfg.strong_blur_sigma)


def cutmix_masks(shape: Tuple[int, ...], area_range: Tuple[float, float], device) -> torch.Tensor:
    """(B, *spatial) bool: one random box per sample covering a fraction ~ U(area_range) of it."""
    b, spatial = shape[0], shape[2:]
    masks = torch.zeros((b,) + tuple(spatial), dtype=torch.bool, device=device)
    for i in range(b):
        frac = float(torch.empty(()).uniform_(*area_range))
        side = frac ** (1.0 / len(spatial))
        index = [i]
        for size in spatial:
            length = max(1, min(size, int(round(size * side))))
            start = int(torch.randint(0, size - length + 1, ()))
            index.append(slice(start, start + length))
        masks[tuple(index)] = True
    return masks


def partner_permutation(batch: int, device) -> torch.Tensor:
    """Each sample mixes with the next one (a fixed-point-free permutation when batch > 1)."""
    return torch.roll(torch.arange(batch, device=device), shifts=1)


def mix(tensor: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Where mask (B, *spatial) is True take the partner's values; works for (B,*sp) and (B,C,*sp)."""
    m = mask if tensor.ndim == mask.ndim else mask.unsqueeze(1)
    return torch.where(m, tensor[perm], tensor)


def mixing_masks(kind: str, image: torch.Tensor, pseudolabels: torch.Tensor, perm: torch.Tensor,
                 area_range: Tuple[float, float]) -> torch.Tensor:
    """'cutmix': random boxes; 'copy_paste': the partner's pseudolabel foreground; 'none': empty."""
    if kind == "cutmix":
        return cutmix_masks(tuple(image.shape), area_range, image.device)
    if kind == "copy_paste":
        return pseudolabels[perm] > 0
    return torch.zeros((image.shape[0],) + tuple(image.shape[2:]), dtype=torch.bool, device=image.device)
