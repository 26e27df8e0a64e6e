"""VQM sample reuse across epochs (the CPU speed-up of g's training) keeps targets and varies views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from QGSegmentationLib.data.phantom import make_phantom_case
from QGSegmentationLib.errors import ConfigError
from QGSegmentationLib.quality import train as qtrain


def dataset(reuse):
    cases = []
    for i in range(2):
        image, label = make_phantom_case((16, 24, 24), seed=i)
        cases.append(qtrain.VolumeCase(f"c{i}", image, label, (1.0, 1.0, 1.0)))
    vqm = qtrain._make_vqm_config({}, 0.0)
    spec = qtrain.SampleSpec("3d", (16, 16, 16), 1, vqm, 0.3, True, False, True)
    return qtrain.VQMDataset(cases, spec, 3, seed=5, reuse_epochs=reuse)


def test_reused_samples_are_made_once_per_pool(monkeypatch):
    calls = []
    real = qtrain.generate_sample
    monkeypatch.setattr(qtrain, "generate_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = dataset(reuse=3)
    seen = {}
    for epoch in range(3):
        data.epoch = epoch
        for index in range(len(data)):
            item = data[index]
            seen.setdefault(index, []).append(item)
    assert len(calls) == len(data)  # one pool of samples served for three epochs
    for items in seen.values():
        first = items[0]
        for later in items[1:]:
            assert torch.equal(later["target"], first["target"])
            # the same voxels, at most flipped: identical sums, identical sorted values
            assert torch.allclose(later["mask"].sum(), first["mask"].sum())
            assert torch.equal(later["image"].flatten().sort().values, first["image"].flatten().sort().values)
    data.epoch = 3
    data[0]
    assert len(calls) == len(data) + 1  # a new pool starts


def test_without_reuse_every_epoch_is_fresh():
    data = dataset(reuse=1)
    data.epoch = 0
    a = data[0]
    data.epoch = 1
    b = data[0]
    assert not torch.equal(a["mask"], b["mask"]) or not torch.equal(a["target"], b["target"])


def test_reuse_epochs_must_be_positive():
    with pytest.raises(ConfigError):
        qtrain.QualityTrainConfig.from_dict({"reuse_epochs": 0})
