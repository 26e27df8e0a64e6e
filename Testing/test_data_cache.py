"""CaseStore: each file decoded once per process and once per machine; stale entries never used."""

from __future__ import annotations

import os

import numpy as np
import pytest

from QGSegmentationLib.data import io
from QGSegmentationLib.data.cache import CaseStore
from QGSegmentationLib.data.dataset import load_dataset
from QGSegmentationLib.data.phantom import make_phantom_dataset
from QGSegmentationLib.data.preprocess import PreprocessConfig, Preprocessor
from QGSegmentationLib.errors import DataError


@pytest.fixture
def spec(tmp_path):
    return load_dataset(make_phantom_dataset(tmp_path / "ds", n_labeled=2, n_unlabeled=1, shape=(8, 12, 12)))


@pytest.fixture
def read_counter(monkeypatch):
    """Counts real decodes of image and label files (the real readers still run)."""
    calls = []
    real_image, real_label = io.read_image, io.read_label

    def read_image(path):
        calls.append(str(path))
        return real_image(path)

    def read_label(path, allowed_labels=None):
        calls.append(str(path))
        return real_label(path, allowed_labels)

    monkeypatch.setattr(io, "read_image", read_image)
    monkeypatch.setattr(io, "read_label", read_label)
    return calls


CONFIG = PreprocessConfig(target_spacing=(1.5, 1.5, 1.5))


def test_memory_cache_decodes_each_file_once(spec, read_counter):
    store = CaseStore(Preprocessor(CONFIG))
    refs = list(spec.training) + list(spec.unlabeled)
    first = store.load_many(refs, progress=False)
    second = store.load_many(refs, progress=False)
    assert len(read_counter) == 5 and len(set(read_counter)) == 5  # 3 images + 2 labels
    assert all(a is b for a, b in zip(first, second))
    assert store.stats["memory_hits"] == 3
    case = first[0]
    assert case.image.shape[0] == 1 and case.image.dtype == np.float32
    assert case.label.shape == case.image.shape[1:] and case.label.dtype == np.uint8
    assert case.geometry.spacing == (1.5, 1.5, 1.5) and case.geometry.shape == case.label.shape
    assert case.original_geometry == io.read_geometry(spec.training[0].image)
    assert first[2].label is None and first[2].label_path is None


def test_disk_cache_is_shared_and_keyed_by_file_and_config(spec, tmp_path, read_counter):
    cache_dir = tmp_path / "cache"
    refs = list(spec.training)
    first = CaseStore(Preprocessor(CONFIG), cache_dir).load_many(refs, progress=False)
    assert len(read_counter) == 4 and len(list(cache_dir.glob("*.npz"))) == 2
    assert not [p for p in cache_dir.iterdir() if not p.name.endswith(".npz")]  # no temp files

    fresh = CaseStore(Preprocessor(CONFIG), cache_dir)  # a new process on the same machine
    again = fresh.load_many(refs, progress=False)
    assert len(read_counter) == 4 and fresh.stats["disk_hits"] == 2
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.geometry == b.geometry and a.original_geometry == b.original_geometry

    other_config = CaseStore(Preprocessor(PreprocessConfig()), cache_dir)
    other_config.load(refs[0])
    assert len(read_counter) == 6  # new configuration: decoded again

    stat = os.stat(refs[1].image)
    os.utime(refs[1].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    CaseStore(Preprocessor(CONFIG), cache_dir).load(refs[1])
    assert len(read_counter) == 8  # edited file: decoded again


def test_corrupt_cache_entry_is_rebuilt(spec, tmp_path, read_counter):
    cache_dir = tmp_path / "cache"
    store = CaseStore(Preprocessor(CONFIG), cache_dir)
    original = store.load(spec.training[0])
    (entry,) = list(cache_dir.glob("*.npz"))
    entry.write_bytes(b"not a zip")
    rebuilt = CaseStore(Preprocessor(CONFIG), cache_dir).load(spec.training[0])
    np.testing.assert_array_equal(rebuilt.image, original.image)
    assert len(read_counter) == 4


def test_label_problems_surface_with_file_names(spec):
    store = CaseStore(Preprocessor(CONFIG), allowed_labels=[0])
    with pytest.raises(DataError, match="not declared in dataset.json"):
        store.load(spec.training[0])
