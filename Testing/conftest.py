"""Shared fixtures: tiny synthetic datasets (no real data needed) and CLI helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LA_ROOT = REPO.parent / "shared" / "data" / "LA"


def pytest_collection_modifyitems(config, items):
    """Skip GPU-only tests without CUDA and LA tests without the data, with a reason."""
    cuda = None
    for item in items:
        if "gpu" in item.keywords:
            if cuda is None:
                try:
                    import torch

                    cuda = torch.cuda.is_available()
                except ImportError:
                    cuda = False
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "la" in item.keywords and not (LA_ROOT / "dataset.json").exists():
            item.add_marker(pytest.mark.skip(reason=f"LA data not found at {LA_ROOT}"))


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (small networks run faster so and results do not depend
    on the core count), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def phantom_3d(tmp_path_factory) -> Path:
    """dataset.json of a tiny binary 3D phantom: 3 labeled, 1 validation, 4 unlabeled, 2 test."""
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("phantom3d")
    return make_phantom_dataset(root, n_labeled=3, n_unlabeled=4, n_validation=1, n_test=2,
                                shape=(16, 32, 32), seed=1)


@pytest.fixture(scope="session")
def phantom_multiclass(tmp_path_factory) -> Path:
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("phantom_mc")
    return make_phantom_dataset(root, n_labeled=2, n_unlabeled=2, n_validation=1, n_test=1,
                                shape=(16, 32, 32), n_classes=3, seed=2)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Run `python -m QGSegmentationLib.cli.main ARGS` as a real child process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "QGSegmentationLib.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)


def load_bench_script(name: str):
    """Import `bench/<name>.py` (bench scripts are not a package) so tests can call its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
