"""`qgseg bench` end to end on the tiny phantom config: real training, prediction, metrics, reuse,
an external test dataset, quality guidance and the regenerated report (each CLI call is a child
process, so the study's thread settings never leak into the test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "bench" / "tiny.yaml"


def qgseg(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "QGSegmentationLib.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def load(study: Path) -> dict:
    return json.loads((study / "results.json").read_text())


def by_key(results: dict) -> dict:
    return {r["key"]: r for r in results["runs"]}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench") / "tiny"
    done = qgseg("bench", str(TINY), "--run-dir", str(folder), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_study_records_every_run_with_metrics_time_memory(study):
    import SimpleITK as sitk

    from QGSegmentationLib.data.dataset import load_dataset

    results = load(study)
    runs = by_key(results)
    assert list(runs) == ["phantom/sup/seed0", "phantom/mt/seed0"]
    spec = load_dataset(study / "data" / "phantom" / "dataset.json")
    test_ids = [c.id for c in spec.test]
    for record in runs.values():
        assert record["status"] == "ok" and record["iterations"] == 4
        assert record["wall_s"] >= record["train_wall_s"] > 0 and record["step_time_s"] > 0
        assert record["peak_memory"]["cpu_rss_mb"] > 50
        assert record["config"]["method"] == record["method"]
        for which in ("best", "last"):
            assert Path(record["checkpoints"][which]).is_file()
            cases = record["evaluation"][which]["cases"]
            assert [c["case"] for c in cases] == test_ids
            dice = [c["dice"] for c in cases]
            assert record["evaluation"][which]["summary"]["dice"]["mean"] == pytest.approx(np.mean(dice))
            assert all(np.isfinite(c["hd95"]) and np.isfinite(c["asd"]) for c in cases)
            assert sorted(p.name for p in (Path(record["predictions"]) / which).glob("*.nrrd"))
        # the last checkpoint is not predicted again when it is also the best one (same weights)
        last = record["evaluation"]["last"]
        assert ("same_as" in last) == (record["best_iteration"] == record["iterations"])
        if "same_as" in last:
            assert last["cases"] == record["evaluation"]["best"]["cases"]
    # the stored metric is the Dice of the written prediction (on the test image's own grid)
    record, ref = runs["phantom/sup/seed0"], spec.test[0]
    pred_img = sitk.ReadImage(str(Path(record["predictions"]) / "best" / f"{ref.id}.nrrd"))
    ref_img = sitk.ReadImage(str(ref.label))
    assert pred_img.GetSize() == ref_img.GetSize() and pred_img.GetSpacing() == pytest.approx(ref_img.GetSpacing())
    pred, truth = sitk.GetArrayFromImage(pred_img) == 1, sitk.GetArrayFromImage(ref_img) == 1
    by_hand = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert record["evaluation"]["best"]["cases"][0]["dice_1"] == pytest.approx(by_hand)
    speed = results["speed"]["methods"]
    assert [s["method"] for s in speed] == ["mt"] and speed[0]["host_steps"] == 20 == speed[0]["guided_steps"]
    assert speed[0]["ratio"] == pytest.approx(speed[0]["guided_step_s"] / speed[0]["host_step_s"])
    assert results["machine"]["cpu_count"] >= 1 and results["command"][:3] == ["qgseg", "bench", str(TINY)]
    report = (study / "BENCHMARKS.md").read_text()
    assert "| phantom | sup | none | 1 |" in report
    assert (study / "BENCHMARKS-figures" / "dice_per_method.png").stat().st_size > 1000


def test_reuse_skips_finished_runs_and_only_reruns_selected(study):
    before = by_key(load(study))
    mtime = Path(before["phantom/mt/seed0"]["checkpoints"]["best"]).stat().st_mtime_ns
    done = qgseg("bench", str(TINY), "--run-dir", str(study), "--quiet", "--reuse")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("skipped (--reuse)") == 3  # two runs and the speed measurement
    after = by_key(load(study))
    assert {k: r["finished"] for k, r in after.items()} == {k: r["finished"] for k, r in before.items()}
    assert Path(after["phantom/mt/seed0"]["checkpoints"]["best"]).stat().st_mtime_ns == mtime
    # without --reuse the selected run trains again; the other record is kept as it was
    time.sleep(1.1)  # the records' timestamps have one-second resolution
    done = qgseg("bench", str(TINY), "--run-dir", str(study), "--quiet", "--only", "sup", "--no-speed")
    assert done.returncode == 0, done.stderr[-3000:]
    again = by_key(load(study))
    assert again["phantom/sup/seed0"]["finished"] != before["phantom/sup/seed0"]["finished"]
    assert again["phantom/mt/seed0"] == after["phantom/mt/seed0"]


def test_speed_rows_are_kept_per_run_and_measured_only_when_new(study):
    """Timing another method (here selected with --only and speed.methods) adds its row and keeps
    the rows measured before, unchanged; asking again measures nothing."""
    before = load(study)["speed"]["methods"]
    assert [row["method"] for row in before] == ["mt"]
    done = qgseg("bench", str(TINY), "--run-dir", str(study), "--quiet", "--reuse", "--only", "sup",
                 "--set", "speed.methods=[mt, pl_t]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "speed: pl_t+qar,qw against" in done.stdout
    rows = load(study)["speed"]["methods"]
    assert [row["method"] for row in rows] == ["mt", "pl_t"] and rows[0] == before[0]
    assert rows[1]["host_steps"] == 20 and rows[1]["fingerprint"] != rows[0]["fingerprint"]
    done = qgseg("bench", str(TINY), "--run-dir", str(study), "--quiet", "--reuse", "--only", "sup",
                 "--set", "speed.methods=[pl_t]")
    assert done.returncode == 0 and "speed: measured already" in done.stdout
    assert load(study)["speed"]["methods"] == rows


def test_external_test_dataset_is_evaluated_without_retraining(study, tmp_path):
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    external = make_phantom_dataset(tmp_path / "ext", n_labeled=2, n_unlabeled=0, shape=(16, 20, 20), seed=7)
    before = by_key(load(study))
    done = qgseg("bench", str(TINY), "--run-dir", str(study), "--quiet", "--reuse", "--no-speed",
                 "--test-dataset", str(external))
    assert done.returncode == 0, done.stderr[-3000:]
    after = by_key(load(study))
    for key, record in after.items():
        assert record["finished"] == before[key]["finished"]          # not retrained
        assert record["test_source"] == f"{external}#training"        # no test list -> training list
        assert record["test_cases"] == ["case_000", "case_001"]
        assert [c["case"] for c in record["evaluation"]["last"]["cases"]] == ["case_000", "case_001"]
        assert Path(record["predictions"]).name.startswith("predictions-")
    mismatched = make_phantom_dataset(tmp_path / "ext3", n_labeled=1, n_unlabeled=0, shape=(16, 20, 20),
                                      n_classes=3, seed=8)
    done = qgseg("bench", str(TINY), "--run-dir", str(study), "--quiet", "--reuse", "--no-speed",
                 "--test-dataset", str(mismatched))
    assert done.returncode == 2 and "same labels" in done.stderr


def test_report_is_regenerated_from_results_json(study, tmp_path):
    results = load(study)
    results["runs"][0]["evaluation"]["best"]["summary"]["dice"]["mean"] = 0.123456  # edit the data...
    edited = tmp_path / "results.json"
    edited.write_text(json.dumps(results))
    out = tmp_path / "BENCH-section.md"
    done = qgseg("bench", "report", str(edited), "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "| phantom | sup | none | 1 | 0.123 |" in text                 # ...and the report follows it
    assert results["commit"] in text and "qgseg bench " + str(TINY) in text
    assert (tmp_path / "BENCH-section-figures" / "validation_curves.png").is_file()
    printed = qgseg("bench", "report", str(edited))
    assert printed.returncode == 0 and "| phantom | mt | none | 1 |" in printed.stdout
    missing = qgseg("bench", "report", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "nope.json" in missing.stderr


def test_guided_run_trains_the_quality_predictor_once_and_links_its_calibration(tmp_path):
    folder = tmp_path / "guided"
    done = qgseg("bench", str(TINY), "--run-dir", str(folder), "--quiet", "--no-speed",
                 "--set", 'runs=[{method: mt, guidance: "qar,qw"}]')
    assert done.returncode == 0, done.stderr[-3000:]
    results = load(folder)
    quality = results["quality"]["phantom/seed0"]
    assert Path(quality["checkpoint"]).is_file()
    (record,) = results["runs"]
    assert record["label"] == "mt+qar,qw" and record["quality_checkpoint"] == quality["checkpoint"]
    assert record["config"]["ssl"]["guidance_qar"] and record["config"]["ssl"]["guidance_qw"]
    case = record["evaluation"]["best"]["cases"][0]
    assert 0.0 <= case["predicted_quality"] <= 1.0 and case["quality_s"] > 0
    report = (folder / "BENCHMARKS.md").read_text()
    assert "quality/phantom/seed0/quality_calibration_validation.png" in report


def test_a_failing_run_is_recorded_and_the_study_goes_on(tmp_path):
    folder = tmp_path / "failing"
    done = qgseg("bench", str(TINY), "--run-dir", str(folder), "--quiet", "--no-speed",
                 "--set", "runs=[{method: sup, train: {network_options: {nonsense: 1}}}, {method: mt}]")
    assert done.returncode == 2, done.stderr[-3000:]          # the failed run's exit code (bad input)
    runs = by_key(load(folder))
    failed = runs["phantom/sup/seed0"]
    assert failed["status"] == "failed" and "nonsense" in failed["error"]
    assert "nonsense" in (Path(failed["run_dir"]) / "error.txt").read_text()
    assert runs["phantom/mt/seed0"]["status"] == "ok"
    assert "| phantom/sup/seed0 | failed |" in (folder / "BENCHMARKS.md").read_text()
