"""`qgseg demo` end to end with tiny settings: every stage runs and the promised outputs exist."""

from __future__ import annotations

import json

from QGSegmentationLib.engine.events import read_events, validate_stream

from conftest import run_cli


def test_demo_runs_all_stages(tmp_path):
    run = tmp_path / "demo"
    res = run_cli("demo", "--iterations", "4", "--quality-epochs", "1", "--run-dir", str(run),
                  "--events", str(tmp_path / "events.jsonl"), "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    events = read_events(tmp_path / "events.jsonl")
    validate_stream(events)
    stages = [e["name"] for e in events if e["event"] == "stage"]
    assert "train quality predictor" in stages and "segment and score" in stages
    summary = json.loads((run / "demo_summary.json").read_text())
    assert len(summary["cases"]) == 16  # 4 test + 12 unlabeled
    assert all(0.0 <= c["predicted_quality"] <= 1.0 for c in summary["cases"])
    assert all(0.0 <= c["second_opinion_dice"] <= 1.0 for c in summary["cases"])  # the supervised model's view
    assert (run / "overlay.png").stat().st_size > 1000
    assert (run / "review.png").stat().st_size > 1000 and str(run / "review.png") in res.stdout
    assert (run / "mt-qg" / "checkpoints" / "best.pt").exists()
    for sub in ("", "quality", "supervised", "mt-qg"):  # every run folder says what produced it
        manifest = json.loads((run / sub / "manifest.json").read_text())
        assert manifest["status"] == "ok" and manifest["versions"]["torch"] and manifest["config"], sub
    assert len(list((run / "predictions").glob("*.seg.nrrd"))) == 16
    assert "lowest predicted" in res.stdout or "worst predicted" in res.stdout


def test_bad_demo_options_are_refused_before_any_work_and_leave_nothing(tmp_path):
    """--iterations 0 or an unknown --method used to be refused only after the phantom was made
    and g trained (minutes), leaving qgseg_demo/ behind."""
    for bad, said in ((["--iterations", "0"], "--iterations must be >= 1"),
                      (["--quality-epochs", "-1"], "--quality-epochs must be >= 1"),
                      (["--method", "bogus"], "unknown ssl method 'bogus'")):
        res = run_cli("demo", *bad, "--quiet", cwd=tmp_path, timeout=120)
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert list(tmp_path.iterdir()) == []
