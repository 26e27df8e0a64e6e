"""bench/la_rebuild_models.py: the rebuild plan covers every frozen model, a rebuilt model is judged
against its record and the evaluation record, and la_blind_check.py accepts a rebuilt model only
with the weights the rebuild reported. The rebuild itself needs the LA data and hours of CPU;
it is run by hand (BENCHMARKS.md section 8)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import load_bench_script


@pytest.fixture(scope="module")
def rebuild():
    return load_bench_script("la_rebuild_models")


@pytest.fixture(scope="module")
def blind():
    return load_bench_script("la_blind_check")


def segmenter_checkpoint(path: Path, weight: float, iteration=3200, best_metric=0.87161, step_time=0.1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"networks": [{"conv.weight": torch.full((2, 3), weight)}], "iteration": iteration,
                "best_iteration": iteration, "best_metric": best_metric,
                "history": [{"iteration": iteration, "step_time_s": step_time}]}, path)
    return path


def test_the_plan_rebuilds_every_frozen_model(rebuild, tmp_path):
    plan = rebuild.Plan(tmp_path, tmp_path / "LA").build()
    commands = " ".join(" ".join(step["command"]) for step in plan.steps)
    frozen = json.loads(rebuild.FROZEN.read_text())
    for name, entry in rebuild.frozen_entries(frozen).items():
        run_dir = entry["path"].split("/checkpoints/")[0]
        assert f"--run-dir {run_dir} " in commands or run_dir.startswith("bench/la_cpu/runs/"), name
        assert entry["record"] or name in frozen["evaluation_record"]["pipeline"], f"{name} has nothing to check"
    assert [s["group"] for s in plan.steps] == sorted((s["group"] for s in plan.steps), key=rebuild.GROUPS.index)


def test_one_thread_g_seeds_run_side_by_side_and_the_rest_in_order(rebuild, tmp_path):
    plan = rebuild.Plan(tmp_path, tmp_path / "LA").build()
    batches = rebuild.side_by_side(plan.steps)
    assert [s for batch in batches for s in batch] == plan.steps
    joined = [[s["name"] for s in batch] for batch in batches if len(batch) > 1]
    assert joined == [["la_g16s80_g48_s2", "la_g16s80_g48_s3"]]


def test_a_batch_runs_its_steps_at_once_marks_them_done_and_names_a_failure(rebuild, tmp_path):
    import sys

    def step(name, code, threads=1):
        return {"group": "g", "name": name, "threads": threads, "done": f"{name}/{rebuild.DONE}",
                "command": [sys.executable, "-c", f"import pathlib, time\npathlib.Path('{name}').mkdir()\n{code}"]}

    # each waits until the other has started: the batch finishes only if they run at the same time
    wait_for = "deadline = time.time() + 30\nwhile not pathlib.Path('{}').exists():\n" \
               "    assert time.time() < deadline, 'ran alone'\n    time.sleep(0.01)"
    batch = [step("a", wait_for.format("b")), step("b", wait_for.format("a"))]
    assert rebuild.run_batch(batch, tmp_path) > 0
    assert (tmp_path / "a" / rebuild.DONE).is_file() and (tmp_path / "b" / rebuild.DONE).is_file()
    assert rebuild.run_batch(batch, tmp_path) == 0.0  # done steps are skipped
    with pytest.raises(SystemExit, match="c failed .exit 3.; rerun"):
        rebuild.run_batch([step("c", "raise SystemExit(3)"), step("d", "pass")], tmp_path)
    assert not (tmp_path / "c" / rebuild.DONE).exists() and (tmp_path / "d" / rebuild.DONE).is_file()


def test_the_study_config_keeps_only_the_needed_unguided_runs(rebuild, tmp_path):
    from QGSegmentationLib.benchmark.config import load_bench_config

    plan = rebuild.Plan(tmp_path, tmp_path / "LA")
    plan.write_study_config()
    config = load_bench_config(tmp_path / "rebuild" / "la_cpu_rebuild.yaml")
    runs = {f"{job.run.label}_seed{job.seed}" for job in config.jobs()}
    assert runs == set(rebuild.G_MASK_SEGMENTERS) | {"sup_seed0"}
    assert not config.needs_quality


def test_weights_digest_ignores_timings_but_not_weights(rebuild, tmp_path):
    a = rebuild.weights_digest(segmenter_checkpoint(tmp_path / "a.pt", 1.0, step_time=0.1))
    b = rebuild.weights_digest(segmenter_checkpoint(tmp_path / "b.pt", 1.0, step_time=0.3))
    c = rebuild.weights_digest(segmenter_checkpoint(tmp_path / "c.pt", 1.0 + 1e-7))
    assert a == b != c


def test_a_record_is_compared_to_the_digits_it_was_written_with(rebuild, tmp_path):
    path = segmenter_checkpoint(tmp_path / "best.pt", 1.0, iteration=3200, best_metric=0.87161)
    assert rebuild.record_problems(path, {"best_iteration": 3200, "best_metric": "0.8716"}) == []
    assert rebuild.record_problems(path, {"best_metric": "0.872"}) == []
    assert rebuild.record_problems(path, {"best_metric": "0.8717"}) == ["best_metric 0.8716, recorded 0.8717"]
    assert rebuild.record_problems(path, {"best_iteration": 2000}) == ["best_iteration 3200, recorded 2000"]
    assert rebuild.record_problems(path, {"epoch": 64}) == ["epoch missing, recorded 64"]


def write_metrics(folder: Path, dice: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("case,dice\n" + "".join(f"{c},{d}\n" for c, d in dice.items()))


def test_the_evaluation_record_checks_pipeline_and_mask_results(rebuild, tmp_path):
    frozen = {"issue2_segmenters": {"p": {}}, "issue3_mask_segmenters": {"m1": {}, "m2": {}},
              "evaluation_record": {"pipeline": {"p": {"t16_dice": "0.85", "all60_dice": "0.875"}},
                                    "masks": {"min_dice": "0.2", "max_dice": "0.9", "below_0.7": 1}}}
    (tmp_path / "la16").mkdir()
    (tmp_path / "la16" / "dataset.json").write_text(json.dumps({"test": [{"image": "imagesTr/a.nrrd"}]}))
    verify = tmp_path / "rebuild" / "verify"
    write_metrics(verify / "p_eval", {"a": 0.85, "b": 0.90})
    write_metrics(verify / "m1_eval", {"a": 0.2, "b": 0.8})
    assert rebuild.evaluation_problems(tmp_path, frozen) == {"not run": ["m2"], "p": []}
    write_metrics(verify / "m2_eval", {"a": 0.9, "b": 0.6})
    problems = rebuild.evaluation_problems(tmp_path, frozen)
    assert problems["m1"] == problems["m2"] == ["the 4 masks' below_0.7 2, recorded 1"]


def test_the_blind_check_accepts_a_rebuilt_model_by_its_weights(blind, rebuild, tmp_path, monkeypatch):
    models = tmp_path / "runs"
    model = segmenter_checkpoint(models / "seg" / "checkpoints" / "best.pt", 1.0)
    listing = tmp_path / "frozen.json"
    listing.write_text(json.dumps({"issue2_segmenters": {"s": {"path": "seg/checkpoints/best.pt", "sha256": "0" * 64}},
                                   "issue3_mask_segmenters": {}, "quality_predictors": {"g": []},
                                   "primary_quality_predictor": "g"}))
    monkeypatch.setattr(blind, "FROZEN", listing)
    with pytest.raises(SystemExit, match=r"(?s)neither the frozen file .* nor a rebuild named.*la_rebuild_models\.py"):
        blind.verify_models(models)
    report = {"s": {"state": "rebuilt", "weights_sha256": rebuild.weights_digest(model),
                    "differences": ["best_metric 0.8671, recorded 0.8716"]}}
    (models / "rebuild_report.json").write_text(json.dumps({"machine": {}, "models": report}))
    accepted = blind.verify_models(models)["issue2_segmenters"]["s"]
    assert accepted["provenance"] == "rebuilt; differs from the original: best_metric 0.8671, recorded 0.8716"
    segmenter_checkpoint(model, 2.0)  # other weights than the rebuild reported
    with pytest.raises(SystemExit, match="nor a rebuild named"):
        blind.verify_models(models)


def test_a_missing_secondary_ensemble_is_left_out(blind, tmp_path, monkeypatch):
    models = tmp_path / "runs"
    primary = segmenter_checkpoint(models / "g" / "best.pt", 1.0)
    listing = tmp_path / "frozen.json"
    listing.write_text(json.dumps({"issue2_segmenters": {}, "issue3_mask_segmenters": {},
                                   "quality_predictors": {
                                       "main": [{"path": "g/best.pt", "sha256": blind.file_digest(primary)}],
                                       "extra": [{"path": "g32/best.pt", "sha256": "0" * 64}]},
                                   "primary_quality_predictor": "main"}))
    monkeypatch.setattr(blind, "FROZEN", listing)
    assert list(blind.verify_models(models)["quality_predictors"]) == ["main"]
    primary.unlink()
    with pytest.raises(SystemExit, match=r"g/best\.pt: missing"):
        blind.verify_models(models)


def test_the_blind_checks_rebuild_groups_exist(blind, rebuild):
    assert set(blind.REBUILD_GROUPS) <= set(rebuild.GROUPS)
    assert "g32" not in blind.REBUILD_GROUPS


def test_a_model_whose_training_has_not_finished_is_not_taken(rebuild, tmp_path):
    segmenter_checkpoint(tmp_path / "la_sup_c" / "checkpoints" / "best.pt", 1.0, iteration=3200, best_metric=0.8716)
    assert rebuild.check_models(tmp_path)["la_sup_c_best"]["state"] == "unfinished"
    (tmp_path / "la_sup_c" / rebuild.DONE).touch()
    entry = rebuild.check_models(tmp_path)["la_sup_c_best"]
    assert entry["state"] == "rebuilt"  # its record matches; the evaluation record was not checked
    assert entry["differences"] == ["evaluation record not checked (the verify group did not run)"]
