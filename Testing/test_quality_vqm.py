"""Tests of the VQM sampler (quality/vqm.py) and the mask Dice/IoU helpers (quality/dice.py)."""

from __future__ import annotations

import numpy as np
import pytest

from QGSegmentationLib.errors import ConfigError, DataError
from QGSegmentationLib.quality.corruptions import CORRUPTIONS
from QGSegmentationLib.quality.dice import dice_to_iou, mask_dice, mask_iou
from QGSegmentationLib.quality.vqm import (CATEGORIES, DEFAULT_PROBABILITIES, VQMConfig, VQMSampler,
                                           fit_to_shape, foreground_volume)


def disc(shape=(32, 32), center=(15, 16), radius=8):
    y, x = np.ogrid[: shape[0], : shape[1]]
    return (y - center[0]) ** 2 + (x - center[1]) ** 2 <= radius ** 2


def ball(shape=(16, 24, 24), center=(8, 12, 12), radius=6):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2 <= radius ** 2


def swap_pool(shape=(32, 32), radii=(3, 4, 5, 6, 7, 8, 9, 10, 11, 12)):
    return [(f"case{r}", disc(shape, radius=r), foreground_volume(disc(shape, radius=r))) for r in radii]


def independent_dice(a, b):
    a, b = a.astype(np.int64), b.astype(np.int64)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * (a * b).sum() / denom


# ---------------------------------------------------------------- dice / iou


def test_mask_dice_and_iou_by_hand():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[0, 1, 1, 1]], bool)
    assert mask_dice(a, b) == pytest.approx(2 * 1 / (2 + 3))
    assert mask_iou(a, b) == pytest.approx(1 / 4)
    assert dice_to_iou(mask_dice(a, b)) == pytest.approx(mask_iou(a, b))
    empty = np.zeros((3, 3), bool)
    assert mask_dice(empty, empty) == 1.0 and mask_iou(empty, empty) == 1.0
    assert mask_dice(empty, ~empty) == 0.0 and mask_iou(~empty, empty) == 0.0
    assert mask_dice(np.array([[0, 2]]), np.array([[0, 1]])) == 1.0  # nonzero counts as inside
    with pytest.raises(ValueError, match="same shape"):
        mask_dice(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


# ---------------------------------------------------------------- config


def test_default_config_is_the_released_one():
    config = VQMConfig()
    assert config.probabilities == DEFAULT_PROBABILITIES
    assert sum(config.probabilities.values()) == pytest.approx(1.0)
    assert config.chain_length == (2, 3) and config.p_weak == 0.05 and config.swap_fraction == 0.2


@pytest.mark.parametrize("kwargs,match", [
    ({"probabilities": {**DEFAULT_PROBABILITIES, "identity": 0.3}}, "sum to 1"),
    ({"probabilities": {"identity": 1.2, "single": -0.2}}, ">= 0"),
    ({"probabilities": {"identity": 0.5, "bogus": 0.5}}, "unknown categories"),
    ({"chain_length": (1, 3)}, "chain_length"),
    ({"chain_length": (3, 2)}, "chain_length"),
    ({"swap_fraction": 0.0}, "swap_fraction"),
    ({"p_weak": 1.5}, "p_weak"),
    ({"weights": {"no_such_op": 1.0}}, "unknown corruption"),
    ({"weights": {"erosion": -1.0}}, ">= 0"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VQMConfig(**kwargs)


def test_config_from_dict_and_disabled_pools():
    config = VQMConfig.from_dict({"probabilities": {"identity": 0.5, "heavy": 0.5}, "chain_length": [2, 2]})
    assert config.probabilities["single"] == 0.0 and config.chain_length == (2, 2)
    with pytest.raises(ConfigError, match="unknown keys"):
        VQMConfig.from_dict({"probability": {}})
    no_blob = {name: 0.0 for name in ("gaussian_blob", "equal_ball")}
    with pytest.raises(ConfigError, match="blob"):
        VQMSampler(VQMConfig(weights=no_blob))


# ---------------------------------------------------------------- sampling


def test_frequencies_match_the_configured_probabilities():
    sampler = VQMSampler(VQMConfig(p_weak=0.0), seed=0)
    mask, pool = disc(), swap_pool()
    draws = 3000
    counts = dict.fromkeys(CATEGORIES, 0)
    for _ in range(draws):
        counts[sampler.sample(mask, swap_pool=pool).category] += 1
    for category, p in DEFAULT_PROBABILITIES.items():
        assert abs(counts[category] / draws - p) < 0.03, (category, counts[category] / draws, p)


def test_reported_quality_matches_recomputation_and_categories_follow_their_pools():
    sampler = VQMSampler(VQMConfig(p_weak=0.0), seed=1)
    mask, pool = disc(), swap_pool()
    tags = {e.name: e.tags for e in CORRUPTIONS.entries()}
    seen = set()
    for _ in range(300):
        s = sampler.sample(mask, swap_pool=pool)
        seen.add(s.category)
        assert s.mask.dtype == bool and s.mask.shape == mask.shape
        assert s.dice == pytest.approx(independent_dice(s.mask, mask))
        assert s.iou == pytest.approx(dice_to_iou(s.dice))
        if s.category == "identity":
            assert s.dice == 1.0 and s.operations == [] and np.array_equal(s.mask, mask)
        elif s.category == "chained":
            assert 2 <= len(s.operations) <= 3 and len(set(s.operations)) == len(s.operations)
            assert all("chain-allowed" in tags[op] for op in s.operations)
        elif s.category == "swap":
            assert len(s.operations) == 1 and s.operations[0].startswith("swap:")
        else:
            required = {"single": "moderate", "heavy": "heavy", "catastrophic": "catastrophic", "blob": "blob"}
            assert len(s.operations) == 1 and required[s.category] in tags[s.operations[0]]
    assert seen == set(CATEGORIES)


def test_same_seed_same_samples_and_different_seed_differs():
    mask, pool = ball(), [("a", ball(radius=5), 500.0), ("b", ball(radius=7), 1400.0)]

    def run(seed):
        sampler = VQMSampler(VQMConfig(), seed=seed)
        return [sampler.sample(mask, spacing=(2.0, 1.0, 1.0), swap_pool=pool) for _ in range(25)]

    first, second, other = run(3), run(3), run(4)
    for a, b in zip(first, second):
        assert a.category == b.category and a.operations == b.operations and a.dice == b.dice
        np.testing.assert_array_equal(a.mask, b.mask)
    assert [s.operations for s in first] != [s.operations for s in other]


def test_explicit_rng_overrides_the_sampler_stream():
    mask = disc()
    a = VQMSampler(seed=0).sample(mask, rng=np.random.default_rng(9))
    b = VQMSampler(seed=1).sample(mask, rng=np.random.default_rng(9))
    assert a.operations == b.operations and np.array_equal(a.mask, b.mask)


def test_swap_draws_from_the_closest_fifth_in_volume_and_skips_itself():
    config = VQMConfig(probabilities={"swap": 1.0}, p_weak=0.0)
    sampler = VQMSampler(config, seed=0)
    mask = disc(radius=6)  # volumes of the pool discs grow with the radius; 20% of 10 = 2 donors
    pool = swap_pool()
    donors = {sampler.sample(mask, swap_pool=pool, case_id="case6").operations[0] for _ in range(60)}
    assert donors == {"swap:case5", "swap:case7"}
    with_self = {sampler.sample(mask, swap_pool=pool).operations[0] for _ in range(60)}
    assert with_self <= {"swap:case6", "swap:case5", "swap:case7"} and "swap:case6" in with_self


def test_swap_without_pool_falls_back_to_single_and_donor_shape_is_fitted():
    sampler = VQMSampler(VQMConfig(probabilities={"swap": 1.0}, p_weak=0.0), seed=0)
    s = sampler.sample(disc())
    assert s.category == "single"
    donor = np.zeros((40, 20), bool)
    donor[5:35, 2:18] = True
    s = sampler.sample(disc(), swap_pool=[("big", donor, 480.0)])
    assert s.category == "swap" and s.mask.shape == (32, 32)
    np.testing.assert_array_equal(s.mask, fit_to_shape(donor, (32, 32)))
    fitted = fit_to_shape(donor, (32, 32))  # rows 4..35 of the donor, columns padded by 6 each side
    assert fitted[:, :6].sum() == 0 and fitted[:, 26:].sum() == 0
    np.testing.assert_array_equal(fitted[:, 6:26], donor[4:36])
    with pytest.raises(DataError, match="dimensions"):
        fit_to_shape(np.zeros((2, 2, 2), bool), (2, 2))


def test_weak_pool_is_used_with_probability_p_weak():
    mask = disc()
    weak = disc(radius=5)
    calls = []

    def weak_pool(rng):
        calls.append(rng)
        return weak, "epoch3"

    always = VQMSampler(VQMConfig(p_weak=1.0), seed=0).sample(mask, weak_pool=weak_pool)
    assert always.category == "weak" and always.operations == ["weak:epoch3"]
    assert always.dice == pytest.approx(independent_dice(weak, mask))
    sampler = VQMSampler(VQMConfig(p_weak=0.2), seed=1)
    n_weak = sum(sampler.sample(mask, weak_pool=weak_pool).category == "weak" for _ in range(500))
    assert 0.14 < n_weak / 500 < 0.26
    # a pool without a mask for this case falls through to the synthetic categories
    none = VQMSampler(VQMConfig(p_weak=1.0), seed=0).sample(mask, weak_pool=lambda rng: None)
    assert none.category in CATEGORIES
    with pytest.raises(DataError, match="shape"):
        VQMSampler(VQMConfig(p_weak=1.0), seed=0).sample(mask, weak_pool=lambda rng: np.zeros((3, 3), bool))


def test_edge_masks_and_bad_inputs():
    sampler = VQMSampler(VQMConfig(p_weak=0.0), seed=2)
    for mask in (np.zeros((24, 24), bool), np.ones((12, 16, 16), bool)):
        for _ in range(60):
            s = sampler.sample(mask)
            assert s.mask.shape == mask.shape and 0.0 <= s.dice <= 1.0
            assert s.dice == pytest.approx(independent_dice(s.mask, mask))
    with pytest.raises(DataError, match="binary"):
        sampler.sample(np.array([[0, 3], [1, 0]]))
    with pytest.raises(DataError, match="spacing"):
        sampler.sample(disc(), spacing=(1.0,))


def test_weights_steer_the_single_category():
    config = VQMConfig(probabilities={"single": 1.0}, p_weak=0.0,
                       weights={name: 0.0 for name in CORRUPTIONS.names() if name != "erosion"})
    sampler = VQMSampler(config, seed=0)
    assert {tuple(sampler.sample(disc()).operations) for _ in range(10)} == {("erosion",)}
