"""`qgseg quality train --seeds N`: N real g trainings on phantom data, one ensemble file."""

from __future__ import annotations

import pytest
import torch

from QGSegmentationLib.cli.main import main
from QGSegmentationLib.data.phantom import make_phantom_dataset
from QGSegmentationLib.engine.events import parse_line, validate_stream
from QGSegmentationLib.quality.predictor import QualityEnsemble, load_predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--epochs", "1", "--samples-per-case", "2", "--device", "cpu", "--set", "grid_size=[16,16,16]",
        "--set", "batch_size=4", "--set", "weak=null", "--set", "val_samples_per_case=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=3, n_unlabeled=0, shape=(16, 24, 24))


def train(dataset, run, *extra):
    return main(["quality", "train", "--dataset", str(dataset), "--run-dir", str(run), *TINY, *extra])


def test_seeds_train_members_and_write_their_ensemble(dataset, tmp_path, capsys):
    run = tmp_path / "g"
    assert train(dataset, run, "--seeds", "2", "--seed", "5", "--json") == 0
    events = [parse_line(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    validate_stream(events)
    done = events[-1]
    assert done["status"] == "ok" and done["outputs"]["checkpoint"] == str(run / "checkpoints" / "best.pt")
    stages = {e["name"].split(":")[0] for e in events if e["event"] == "stage"}
    assert {"seed 5 (1 of 2)", "seed 6 (2 of 2)"} <= stages
    assert (run / "quality_training_curves.png").stat().st_size > 0

    ensemble = load_predictor(run / "checkpoints" / "best.pt")
    assert isinstance(ensemble, QualityEnsemble) and len(ensemble.members) == 2
    members = [load_predictor(run / f"seed-{seed}" / "checkpoints" / "best.pt") for seed in (5, 6)]
    first = [p for p in members[0].parameters()][0]
    assert not torch.equal(first, [p for p in members[1].parameters()][0])  # two seeds, two models
    image, mask = torch.rand(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    with torch.no_grad():
        expected = (members[0](image, mask) + members[1](image, mask)) / 2
        assert torch.allclose(ensemble(image, mask), expected, atol=1e-6)


def test_a_rerun_trains_only_the_members_not_finished(dataset, tmp_path, capsys):
    run = tmp_path / "g"
    assert train(dataset, run, "--seeds", "2", "--quiet") == 0
    seed0 = run / "seed-0" / "checkpoints" / "best.pt"
    finished = seed0.stat().st_mtime_ns
    retrained = run / "seed-1"
    for path in sorted(retrained.rglob("*"), reverse=True):  # as if the run had stopped before seed 1
        path.rmdir() if path.is_dir() else path.unlink()
    assert train(dataset, run, "--seeds", "2", "--quiet") == 0
    assert seed0.stat().st_mtime_ns == finished
    assert (retrained / "checkpoints" / "best.pt").is_file()
    assert len(load_predictor(run / "checkpoints" / "best.pt").members) == 2


def test_seeds_below_one_are_refused(dataset, tmp_path, capsys):
    assert train(dataset, tmp_path / "g", "--seeds", "0", "--quiet") == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


def test_a_rerun_from_another_folder_finds_the_finished_members(dataset, tmp_path, monkeypatch):
    """Members finished by a run given a relative --run-dir are found by a rerun started elsewhere."""
    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    assert train(dataset, "g", "--seeds", "2", "--quiet") == 0
    monkeypatch.chdir(tmp_path)
    assert train(dataset, tmp_path / "first" / "g", "--seeds", "2", "--quiet") == 0
    assert len(load_predictor(tmp_path / "first" / "g" / "checkpoints" / "best.pt").members) == 2


def test_a_rerun_with_other_options_goes_on_training_its_members_or_refuses_another_network(dataset, tmp_path):
    """As for the segmenter's --seeds: finished members are skipped only when they finished with
    the options asked for now. More epochs resume them; another backbone is refused (exit 2), and
    the ensemble's manifest still records the run the folder holds."""
    import json

    from QGSegmentationLib.quality.train import RESULT_FILE

    run = tmp_path / "g"
    assert train(dataset, run, "--seeds", "2", "--quiet") == 0
    seed0 = run / "seed-0" / "checkpoints" / "best.pt"
    finished = seed0.stat().st_mtime_ns
    assert train(dataset, run, "--seeds", "2", "--quiet") == 0  # the same options: nothing trains
    assert seed0.stat().st_mtime_ns == finished
    assert train(dataset, run, "--seeds", "2", "--quiet", "--epochs", "2") == 0
    for seed in (0, 1):
        assert json.loads((run / f"seed-{seed}" / RESULT_FILE).read_text())["epochs_run"] == 2
    manifest = (run / "manifest.json").read_text()
    assert train(dataset, run, "--seeds", "2", "--quiet", "--epochs", "2", "--backbone", "resnet18") == 2
    assert (run / "manifest.json").read_text() == manifest
