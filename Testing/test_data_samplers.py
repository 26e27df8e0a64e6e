"""PatchSampler / two_stream: shapes, padding, foreground oversampling, determinism and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from QGSegmentationLib.data.augment import AugmentConfig, Augmenter
from QGSegmentationLib.data.cache import PreparedCase
from QGSegmentationLib.data.io import Geometry
from QGSegmentationLib.data.samplers import PatchSampler, two_stream
from QGSegmentationLib.errors import ConfigError


def make_case(case_id, shape, labeled=True, seed=0, fg_box=None):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1,) + shape).astype(np.float32)
    label = None
    if labeled:
        label = np.zeros(shape, np.uint8)
        if fg_box is not None:
            label[fg_box] = 1
    geometry = Geometry.identity(shape)
    return PreparedCase(case_id, image, label, geometry, geometry, Path(f"{case_id}.nrrd"),
                        Path(f"{case_id}_seg.nrrd") if labeled else None)


@pytest.fixture
def cases():
    box = (slice(3, 6), slice(4, 9), slice(5, 8))
    return [make_case("a", (10, 16, 14), seed=1, fg_box=box),
            make_case("b", (12, 12, 20), seed=2, fg_box=box)]


def batches_equal(x, y):
    return (x["case"] == y["case"] and torch.equal(x["image"], y["image"])
            and torch.equal(x.get("label", torch.empty(0)), y.get("label", torch.empty(0))))


def test_3d_batch_shapes_and_types(cases):
    batch = next(PatchSampler(cases, (6, 8, 8), batch_size=3, seed=0))
    assert batch["image"].shape == (3, 1, 6, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (3, 6, 8, 8) and batch["label"].dtype == torch.int64
    assert len(batch["case"]) == 3 and set(batch["case"]) <= {"a", "b"}
    assert set(batch["label"].unique().tolist()) <= {0, 1}


def test_2d_batch_shapes(cases):
    sampler = PatchSampler(cases, (8, 10), batch_size=4, mode="2d", seed=0, with_labels=False)
    batch = next(sampler)
    assert batch["image"].shape == (4, 1, 8, 10) and "label" not in batch


def test_patch_without_augmentation_is_a_window_of_the_volume(cases):
    sampler = PatchSampler(cases[:1], (4, 5, 6), batch_size=1, augment=False, seed=5)
    volume, label = cases[0].image[0], cases[0].label
    for _ in range(5):
        batch = next(sampler)
        patch = batch["image"][0, 0].numpy()
        hits = [(z, y, x) for z in range(10 - 3) for y in range(16 - 4) for x in range(14 - 5)
                if np.array_equal(volume[z:z + 4, y:y + 5, x:x + 6], patch)]
        assert len(hits) == 1
        z, y, x = hits[0]
        np.testing.assert_array_equal(batch["label"][0].numpy(), label[z:z + 4, y:y + 5, x:x + 6])


def test_small_volume_is_padded(cases):
    small = make_case("s", (3, 4, 5), fg_box=(slice(0, 3), slice(0, 4), slice(0, 5)))
    sampler = PatchSampler([small], (6, 6, 6), batch_size=2, augment=False, seed=0)
    batch = next(sampler)
    image, label = batch["image"][:, 0].numpy(), batch["label"].numpy()
    pad = small.image.min()
    for b in range(2):
        inside = label[b] == 1
        assert inside.sum() == 3 * 4 * 5  # the whole volume is inside the patch
        assert np.all(image[b][~inside] == pad)
        np.testing.assert_array_equal(np.sort(image[b][inside]), np.sort(small.image.ravel()))


def test_flips_are_identical_for_image_and_label():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (5, 6, 7)).astype(np.uint8)
    augmenter = Augmenter(AugmentConfig(flip_prob=0.5, scale_range=(1, 1), shift_range=(0, 0), noise_prob=0))
    flipped_any = False
    for _ in range(6):
        image, out_label = augmenter(label[None].astype(np.float32), label, rng)
        np.testing.assert_array_equal(image[0], out_label.astype(np.float32))
        flipped_any |= not np.array_equal(out_label, label)
    assert flipped_any


def test_gamma_keeps_mean_std_and_order_and_inverted_gamma_bends_the_other_way():
    from QGSegmentationLib.data.augment import adjust_gamma

    image = np.linspace(-2, 3, 1000, dtype=np.float32).reshape(1, 10, 10, 10)
    for invert in (False, True):
        out = adjust_gamma(image, 1.5, invert)
        assert out.mean() == pytest.approx(image.mean(), abs=1e-4) and out.std() == pytest.approx(image.std(), rel=1e-4)
        assert np.all(np.diff(out.ravel()) > 0)                  # monotone: the anatomy keeps its order
    middle = image.size // 2
    # gamma > 1 pulls mid intensities down relative to the extremes; on the negated image, up
    assert adjust_gamma(image, 1.5).ravel()[middle] < image.ravel()[middle]
    assert adjust_gamma(image, 1.5, invert=True).ravel()[middle] > image.ravel()[middle]
    np.testing.assert_allclose(adjust_gamma(image, 1.0), image, atol=1e-5)


def test_contrast_scales_around_the_mean_within_the_range():
    from QGSegmentationLib.data.augment import adjust_contrast

    image = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(adjust_contrast(image, 0.5), [[0.75, 1.25, 1.75, 2.25]])
    np.testing.assert_allclose(adjust_contrast(image, 2.0), [[0.0, 0.5, 2.5, 3.0]])  # clipped


def test_a_transform_switched_off_draws_no_random_numbers():
    """gamma/contrast at probability 0 leave the random stream (hence old runs) unchanged."""
    image = np.random.default_rng(1).standard_normal((1, 4, 5, 6)).astype(np.float32)
    old = Augmenter(AugmentConfig())(image, None, np.random.default_rng(3))[0]
    off = Augmenter(AugmentConfig(gamma_range=(2, 3), contrast_range=(2, 2)))(image, None, np.random.default_rng(3))[0]
    on = Augmenter(AugmentConfig(gamma_prob=1.0, contrast_prob=1.0))(image, None, np.random.default_rng(3))[0]
    np.testing.assert_array_equal(old, off)
    assert not np.allclose(old, on)
    with pytest.raises(ConfigError, match="unknown option.*gama_prob"):
        AugmentConfig.from_dict({"gama_prob": 0.3})


def fraction_with_foreground(sampler, n_batches):
    hits = [bool(lab.any()) for _ in range(n_batches) for lab in next(sampler)["label"]]
    return float(np.mean(hits))


def test_foreground_ratio_is_honoured():
    # a single foreground voxel in a 24^3 volume: a uniform 6^3 window contains it with
    # probability (6/19)^3 ~ 3%, a foreground-centred one always
    case = make_case("f", (24, 24, 24), fg_box=(slice(12, 13), slice(7, 8), slice(20, 21)))
    always = fraction_with_foreground(PatchSampler([case], (6, 6, 6), 10, fg_ratio=1.0, seed=0), 5)
    never = fraction_with_foreground(PatchSampler([case], (6, 6, 6), 10, fg_ratio=0.0, seed=0), 20)
    half = fraction_with_foreground(PatchSampler([case], (6, 6, 6), 10, fg_ratio=0.5, seed=0), 20)
    assert always == 1.0
    assert never < 0.15
    assert 0.35 < half < 0.7


def test_zero_center_jitter_puts_the_foreground_voxel_at_the_window_centre():
    case = make_case("f", (24, 24, 24), fg_box=(slice(12, 13), slice(10, 11), slice(11, 12)))
    centred = next(PatchSampler([case], (6, 6, 6), 10, fg_ratio=1.0, augment=False, seed=0, center_jitter=0.0))["label"]
    jittered = next(PatchSampler([case], (6, 6, 6), 10, fg_ratio=1.0, augment=False, seed=0))["label"]
    assert all(label[3, 3, 3] == 1 for label in centred)
    assert not all(label[3, 3, 3] == 1 for label in jittered)


def test_2d_foreground_slices():
    case = make_case("f", (20, 10, 10), fg_box=(slice(7, 9), slice(2, 4), slice(2, 4)))
    sampler = PatchSampler([case], (6, 6), 8, mode="2d", fg_ratio=1.0, seed=0)
    assert fraction_with_foreground(sampler, 3) == 1.0


def test_determinism_and_seed(cases):
    a = PatchSampler(cases, (6, 8, 8), 2, seed=7)
    b = PatchSampler(cases, (6, 8, 8), 2, seed=7)
    c = PatchSampler(cases, (6, 8, 8), 2, seed=8)
    first_a, first_b, first_c = next(a), next(b), next(c)
    assert batches_equal(first_a, first_b)
    assert not batches_equal(first_a, first_c)


@pytest.mark.parametrize("mode, patch", [("3d", (6, 8, 8)), ("2d", (8, 8))])
def test_resume_gives_identical_next_batches(cases, mode, patch):
    sampler = PatchSampler(cases, patch, 2, mode=mode, seed=3)
    for _ in range(3):
        next(sampler)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives JSON (and weights_only) files
    expected = [next(sampler) for _ in range(3)]
    resumed = PatchSampler(cases, patch, 2, mode=mode, seed=3)
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 3
    assert all(batches_equal(x, next(resumed)) for x in expected)


def test_two_stream_resume(cases):
    unlabeled = [make_case("u", (10, 10, 10), labeled=False, seed=9)]

    def build():
        return two_stream(PatchSampler(cases, (6, 8, 8), 2, seed=1),
                          PatchSampler(unlabeled, (6, 8, 8), 3, seed=2, with_labels=False))

    stream = build()
    labeled, unlabeled_batch = next(stream)
    assert "label" in labeled and "label" not in unlabeled_batch and unlabeled_batch["image"].shape[0] == 3
    state = stream.state_dict()
    expected = next(stream)
    resumed = build()
    resumed.load_state_dict(state)
    again = next(resumed)
    assert batches_equal(expected[0], again[0]) and batches_equal(expected[1], again[1])
    assert next(two_stream(PatchSampler(cases, (6, 8, 8), 1)))[1] is None


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(patch_size=(8, 8)), "patch_size"),
    (dict(mode="4d"), "mode"),
    (dict(fg_ratio=1.5), "fg_ratio"),
    (dict(center_jitter=0.6), "center_jitter"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments(cases, kwargs, fragment):
    args = {"cases": cases, "patch_size": (4, 4, 4), "batch_size": 1, **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        PatchSampler(**args)


def test_labeled_sampler_rejects_unlabeled_cases():
    with pytest.raises(ConfigError, match="without labels: \\['u'\\]"):
        PatchSampler([make_case("u", (4, 4, 4), labeled=False)], (4, 4, 4), 1)
