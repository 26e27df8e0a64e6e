"""Dual-network method: every loss term has gradients; helpers checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from QGSegmentationLib.ssl.base import SSLConfig
from QGSegmentationLib.ssl.methods import build_method
from QGSegmentationLib.ssl.methods.dualnet import (kl_weighted_per_sample, low_entropy,
                                                   union_pseudolabel)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dims", [2, 3])
def test_every_dualnet_term_has_gradients_in_both_networks(dims):
    from QGSegmentationLib.networks import build_network

    torch.manual_seed(0)
    cfg = SSLConfig(dualnet_networks=("unet", "resunet"), dualnet_proto_fraction=0.05)
    networks = [build_network(n, dims, 1, 2, channels=(4, 8, 16)) for n in cfg.dualnet_networks]
    method = build_method("dualnet", networks, cfg, None)
    shape = (16,) * dims
    labeled = {"image": torch.randn((2, 1) + shape), "label": torch.randint(0, 2, (2,) + shape)}
    unlabeled = {"image": torch.randn((2, 1) + shape)}
    terms = method.terms(labeled, unlabeled)
    for name in ("sup", "cce", "kl", "proto"):
        value = terms[name].sum()
        assert torch.isfinite(value) and float(value.detach()) > 0, name
        for index, net in enumerate(networks):
            params = [p for p in net.parameters() if p.requires_grad]
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            norm = sum(float(g.abs().sum()) for g in grads if g is not None)
            assert norm > 0, f"term {name} gives no gradient to network {index}"


def test_union_pseudolabel_and_entropy_filter_by_hand():
    # 4 voxels, 3 classes: a says [bg, 1, bg, 2]; b says [bg, bg, 2, 1]
    a = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.3, 0.6]]).T[None]
    b = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]]).T[None]
    # voxel 3: sums fg 1: 0.8, fg 2: 0.9 -> 2
    assert union_pseudolabel(a, b).tolist() == [[0, 1, 2, 2]]
    entropy = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7]])
    assert low_entropy(entropy, 40.0).tolist() == [[False, True, False, True, False]]
    assert low_entropy(entropy, 20.0).tolist() == [[False, True, False, False, False]]


def test_kl_weighting_reduces_to_ce_when_the_networks_agree():
    logits = torch.tensor([[[2.0, -1.0]], [[0.0, 1.0]]]).reshape(1, 2, 1, 2)
    value = kl_weighted_per_sample(logits, logits.clone(), temperature=0.5)
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.exp(1) / (math.exp(1) + math.exp(-1)))]
    assert math.isclose(float(value), sum(ce) / 2, rel_tol=1e-5)
