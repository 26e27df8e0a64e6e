"""MetaSSL heterogeneous loss: region assignment, adaptive thresholds, weights, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from QGSegmentationLib.ssl.config import SSLConfig
from QGSegmentationLib.ssl.metassl import AdaptiveThresholds, HeterogeneousLoss, region_weights

# one sample, 1 x 4 pixels, 2 classes; channel-first probabilities (B, C, H, W)
PRED = torch.tensor([[0.05, 0.4, 0.97, 0.1], [0.95, 0.6, 0.03, 0.9]]).reshape(1, 2, 1, 4)
REF = torch.tensor([[0.02, 0.3, 0.1, 0.6], [0.98, 0.7, 0.9, 0.4]]).reshape(1, 2, 1, 4)


def test_region_weights_match_the_published_values():
    w = region_weights(50, 0.6, 3)
    assert [round(v, 2) for v in w] == [50.0, 40.29, 8.88, 0.15]
    w = region_weights(85, 0.3, 3)
    assert [round(v, 1) for v in w] == [85.0, 82.7, 68.5, 41.0]


def test_threshold_update_by_hand():
    th = AdaptiveThresholds(init=0.9, momentum=0.5)
    th.update(PRED)
    # class 1 predicted at pixels 0, 1, 3 (0.95, 0.6, 0.9); class 0 at pixel 2 (0.97)
    assert torch.allclose(th.values, torch.tensor([0.5 * 0.9 + 0.5 * 0.97, 0.5 * 0.9 + 0.5 * (2.45 / 3)]))
    # a class predicted nowhere keeps its threshold; values are clipped to <= 1
    high = AdaptiveThresholds(init=1.2, momentum=0.5)
    high.update(torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 2))
    assert torch.allclose(high.values, torch.tensor([1.0, 1.0]))
    assert float(AdaptiveThresholds(0.9).update(torch.tensor([[1.0], [0.0]]).reshape(1, 2, 1))[1]) == pytest.approx(0.9)


def test_regions_and_loss_by_hand():
    """pred thresholds after update: [0.935, 0.8583]; ref: [0.75, 0.88].
    px0 agree, 0.95 > 0.858 and 0.98 > 0.88 -> UC; px1 agree, 0.6 < 0.858 -> US;
    px2 disagree, 0.97 > 0.935 and 0.9 > 0.88 -> DC; px3 disagree, ref 0.6 < 0.75 -> DS."""
    loss = HeterogeneousLoss(region_weights(50, 0.6, 3), ("UC", "US", "DC", "DS"), 0.9, 0.5)
    logits = torch.log(PRED).requires_grad_(True)
    regions = loss.regions(logits, REF)
    expected = {"UC": [1, 0, 0, 0], "US": [0, 1, 0, 0], "DC": [0, 0, 1, 0], "DS": [0, 0, 0, 1]}
    for name, mask in expected.items():
        assert regions[name].flatten().tolist() == mask, name
    assert torch.allclose(loss.ref_thresholds.values, torch.tensor([0.75, 0.88]))

    # fresh thresholds, same batch: region CE (target = ref argmax [1,1,1,0]) / (1 + 1) each
    w = region_weights(50, 0.6, 3)
    ce = [-math.log(0.95), -math.log(0.6), -math.log(0.03), -math.log(0.1)]
    for order, weight_of_region in (
        (("UC", "US", "DC", "DS"), [w[0], w[1], w[2], w[3]]),
        (("UC", "US", "DS", "DC"), [w[0], w[1], w[3], w[2]]),   # DC below DS
    ):
        het = HeterogeneousLoss(w, order, 0.9, 0.5)
        value = het.per_sample(torch.log(PRED).requires_grad_(True), REF)
        hand = sum(wk * c / 2 for wk, c in zip(weight_of_region, ce))
        assert value.shape == (1,) and math.isclose(float(value.detach()), hand, rel_tol=1e-5)


def test_labeled_reference_counts_as_confident_and_gives_gradients():
    het = HeterogeneousLoss.labeled(SSLConfig())
    logits = torch.log(PRED).requires_grad_(True)
    labels = torch.tensor([[[1, 0, 0, 1]]])
    regions = het.regions(logits, labels)
    # pred thresholds [0.935, 0.858]: px0 agree conf -> UC, px1 disagree 0.6 -> DS,
    # px2 agree 0.97 -> UC, px3 agree 0.9 > 0.858 -> UC
    assert regions["UC"].flatten().tolist() == [1, 0, 1, 1]
    assert regions["DS"].flatten().tolist() == [0, 1, 0, 0]
    het.per_sample(logits, labels).sum().backward()
    assert logits.grad.abs().sum() > 0
    assert "ref" not in het.state_dict() and "pred" in het.state_dict()
