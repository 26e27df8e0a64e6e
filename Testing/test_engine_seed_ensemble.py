"""`qgseg train --seeds N`: N real segmenter trainings on phantom data, written as one ensemble."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
import torch

from QGSegmentationLib.cli.main import main
from QGSegmentationLib.engine.checkpoint import load_checkpoint
from QGSegmentationLib.engine.events import parse_line, validate_stream
from QGSegmentationLib.segmenter import ensemble_segmenters, load_segmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--patch", "16", "32", "32", "--iterations", "4", "--val-every", "2", "--device", "cpu"]


def train(dataset, run, *extra):
    return main(["train", "--dataset", str(dataset), "--run-dir", str(run), *TINY, *extra])


def weights(path):
    return load_checkpoint(path)["networks"]


def test_seeds_train_members_and_write_their_ensemble(phantom_3d, tmp_path, capsys):
    run = tmp_path / "seg"
    assert train(phantom_3d, run, "--seeds", "2", "--seed", "4", "--json") == 0
    events = [parse_line(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    validate_stream(events)
    assert events[-1]["status"] == "ok"
    assert events[-1]["outputs"]["last_checkpoint"] == str(run / "checkpoints" / "last.pt")
    stages = {e["name"].split(":")[0] for e in events if e["event"] == "stage"}
    assert {"seed 4 (1 of 2)", "seed 5 (2 of 2)"} <= stages
    progress = [(e["step"], e["total"]) for e in events if e["event"] == "progress"]
    assert {total for _, total in progress} == {8} and progress[-1][0] == 8  # one bar for both members
    assert [step for step, _ in progress] == sorted(step for step, _ in progress)
    assert (run / "split.json").read_text() == (run / "seed-4" / "split.json").read_text()
    for folder in (run / "seed-4", run / "seed-5", run):  # the members' curves, and all of them in one
        assert (folder / "training_curves.png").stat().st_size > 0

    members = [run / f"seed-{seed}" / "checkpoints" / "last.pt" for seed in (4, 5)]
    assert not torch.equal(*[next(iter(weights(m)[0].values())) for m in members])  # two seeds, two models
    ensemble = load_segmenter(run / "checkpoints" / "last.pt")
    expected = ensemble_segmenters([load_segmenter(m) for m in members])
    image = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ensemble.network(image), expected.network(image), atol=1e-6)
    assert load_checkpoint(run / "checkpoints" / "best.pt")["ensemble_seeds"] == [4, 5]

    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input", str(phantom_3d),
                 "--split", "test", "--output", str(tmp_path / "pred"), "--quiet"]) == 0
    assert len(list((tmp_path / "pred").glob("*.seg.nrrd"))) == 2
    prediction = sitk.ReadImage(str(next((tmp_path / "pred").glob("case_*[0-9].nrrd"))))
    assert prediction.GetDimension() == 3


def test_member_progress_is_progress_of_the_whole_ensemble_with_its_eta():
    import io

    from QGSegmentationLib.engine.events import EventWriter, MemberEvents

    stream = io.StringIO()
    member = MemberEvents(EventWriter(streams=[stream]), "seed 1 (2 of 3): ", share=(1, 3))
    member.progress(5, 10, eta_s=50.0)  # 10 s a step: 5 more here, 10 for the third member
    member.progress(10, 10, eta_s=0.0)
    member.emit("stage", name="train", index=2, total=2)
    first, last, stage = [parse_line(line) for line in stream.getvalue().splitlines()]
    assert (first["step"], first["total"], first["eta_s"]) == (15, 30, 150.0)
    assert (last["step"], last["total"], last["eta_s"]) == (20, 30, None)
    assert stage["name"] == "seed 1 (2 of 3): train"


def test_each_member_is_the_run_its_seed_alone_would_give(phantom_3d, tmp_path):
    assert train(phantom_3d, tmp_path / "seg", "--seeds", "2", "--quiet") == 0
    assert train(phantom_3d, tmp_path / "alone", "--seed", "1", "--quiet") == 0
    member, alone = weights(tmp_path / "seg" / "seed-1" / "checkpoints" / "last.pt"), \
        weights(tmp_path / "alone" / "checkpoints" / "last.pt")
    assert all(torch.equal(value, alone[0][key]) for key, value in member[0].items())


def test_a_cancelled_ensemble_resumes_inside_its_member_and_skips_finished_ones(phantom_3d, tmp_path):
    run = tmp_path / "seg"
    assert train(phantom_3d, run, "--seeds", "2", "--quiet") == 0
    finished = (run / "seed-0" / "checkpoints" / "last.pt").stat().st_mtime_ns
    (run / "CANCEL").write_text("stop")
    assert train(phantom_3d, run, "--seeds", "3", "--quiet") == 3  # seed 2 starts, sees CANCEL, saves
    assert load_checkpoint(run / "seed-2" / "checkpoints" / "last.pt")["iteration"] == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["ensemble_seeds"] == [0, 1]  # untouched
    (run / "CANCEL").unlink()
    assert train(phantom_3d, run, "--seeds", "3", "--quiet") == 0
    assert (run / "seed-0" / "checkpoints" / "last.pt").stat().st_mtime_ns == finished
    assert load_checkpoint(run / "checkpoints" / "last.pt")["ensemble_seeds"] == [0, 1, 2]


def test_a_single_training_refuses_an_ensembles_folder_and_seeds_below_two(phantom_3d, tmp_path, capsys):
    run = tmp_path / "seg"
    assert train(phantom_3d, run, "--seeds", "2", "--quiet") == 0
    capsys.readouterr()
    assert train(phantom_3d, run, "--quiet") == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "ensemble of 2 seeds" in err and "--seeds 2" in err
    assert train(phantom_3d, tmp_path / "none", "--seeds", "0", "--quiet") == 2
    assert "--seeds: give 1 (one model, the default) or 2 or more (an ensemble), not 0" in capsys.readouterr().err
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_a_rerun_with_other_options_goes_on_training_the_members_instead_of_reusing_them(phantom_3d, tmp_path):
    run = tmp_path / "seg"
    assert train(phantom_3d, run, "--seeds", "2", "--quiet") == 0
    assert main(["train", "--dataset", str(phantom_3d), "--run-dir", str(run), *TINY, "--iterations", "6",
                 "--seeds", "2", "--quiet"]) == 0
    assert [load_checkpoint(run / f"seed-{s}" / "checkpoints" / "last.pt")["iteration"] for s in (0, 1)] == [6, 6]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 6
