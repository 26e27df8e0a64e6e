"""Strong augmentation and mixing for weak-to-strong consistency."""

from __future__ import annotations

import torch

from QGSegmentationLib.ssl import augment
from QGSegmentationLib.ssl.config import SSLConfig


def test_cutmix_boxes_cover_the_requested_fraction():
    torch.manual_seed(0)
    masks = augment.cutmix_masks((4, 1, 20, 20, 20), (0.1, 0.5), "cpu")
    assert masks.shape == (4, 20, 20, 20) and masks.dtype == torch.bool
    frac = masks.flatten(1).float().mean(1)
    assert ((frac > 0.05) & (frac < 0.6)).all()  # rounding of box sides to whole voxels


def test_mix_takes_the_partner_inside_the_mask():
    x = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    mask = torch.zeros(3, 2, 2, dtype=torch.bool)
    mask[:, 0, 0] = True
    perm = augment.partner_permutation(3, "cpu")
    assert perm.tolist() == [2, 0, 1]
    mixed = augment.mix(x, mask, perm)
    assert mixed[:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0] and mixed[:, 0, 1, 1].tolist() == [0.0, 1.0, 2.0]
    labels = torch.tensor([[[0, 1], [0, 0]], [[0, 0], [1, 1]], [[0, 0], [0, 0]]])
    paste = augment.mixing_masks("copy_paste", x, labels, perm, (0.1, 0.5))
    assert torch.equal(paste, labels[perm] > 0)
    assert not augment.mixing_masks("none", x, labels, perm, (0.1, 0.5)).any()


def test_blur_keeps_constants_and_smooths_noise():
    torch.manual_seed(0)
    constant = torch.full((1, 1, 8, 8, 8), 3.0)
    assert torch.allclose(augment.gaussian_blur(constant, 1.0), constant)
    noise = torch.randn(1, 1, 32, 32)
    blurred = augment.gaussian_blur(noise, 1.0)
    assert blurred.shape == noise.shape and blurred.std() < 0.6 * noise.std()


def test_strong_intensity_changes_each_sample_and_keeps_shape():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    y = augment.strong_intensity(x, SSLConfig(strong_blur_probability=1.0))
    assert y.shape == x.shape and not torch.allclose(x, y)
    same = augment.strong_intensity(x, SSLConfig(strong_brightness=0, strong_contrast=0,
                                                 strong_noise_std=0, strong_blur_probability=0))
    assert torch.equal(same, x)
