"""bench/la_blind_check.py: how it reads a folder of blind volumes, refuses development volumes and
changed models, and judges the bars. The full check needs the LA data and the frozen models; it
is run by hand (BENCHMARKS.md section 7)."""

import hashlib
import json
from pathlib import Path

import pytest

from conftest import load_bench_script


@pytest.fixture(scope="module")
def blind():
    return load_bench_script("la_blind_check")


def write_pairs(folder: Path, names, content=b"volume"):
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for name in names:
        (folder / "imagesTr" / name).write_bytes(content + name.encode())
        (folder / "labelsTr" / name).write_bytes(b"label")


def test_folder_layout_pairs_images_with_labels(blind, tmp_path):
    write_pairs(tmp_path, ["b.nrrd", "a.nii.gz"])
    (tmp_path / "imagesTr" / "notes.txt").write_text("not an image")
    assert blind.hidden_cases(tmp_path) == [
        {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"},
        {"image": "imagesTr/b.nrrd", "label": "labelsTr/b.nrrd"}]


def test_test_folders_are_read_too(blind, tmp_path):
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "labelsTs").mkdir()
    for sub in ("imagesTs", "labelsTs"):
        (tmp_path / sub / "x.nrrd").write_bytes(b"x")
    assert blind.hidden_cases(tmp_path) == [{"image": "imagesTs/x.nrrd", "label": "labelsTs/x.nrrd"}]
    with pytest.raises(SystemExit, match="expected a dataset.json"):
        blind.hidden_cases(tmp_path / "imagesTs")


def test_missing_label_is_named(blind, tmp_path):
    write_pairs(tmp_path, ["a.nrrd"])
    (tmp_path / "imagesTr" / "c.nrrd").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"c\.nrrd: no label"):
        blind.hidden_cases(tmp_path)


def test_dataset_json_lists_labeled_cases_only(blind, tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({
        "test": [{"image": "i/1.nrrd", "label": "l/1.nrrd"}],
        "training": [{"image": "i/2.nrrd", "label": "l/2.nrrd"}], "unlabeled": ["i/3.nrrd"]}))
    assert [c["image"] for c in blind.hidden_cases(tmp_path)] == ["i/1.nrrd", "i/2.nrrd"]
    (tmp_path / "dataset.json").write_text(json.dumps({"unlabeled": ["i/3.nrrd"]}))
    with pytest.raises(SystemExit, match="no cases with both"):
        blind.hidden_cases(tmp_path)


def test_development_volumes_are_found_by_content(blind, tmp_path):
    la, hidden = tmp_path / "LA", tmp_path / "hidden"
    write_pairs(la, ["la_001.nrrd", "la_002.nrrd"])
    (la / "dataset.json").write_text(json.dumps({"training": [
        {"image": f"imagesTr/{n}", "label": f"labelsTr/{n}"} for n in ("la_001.nrrd", "la_002.nrrd")]}))
    write_pairs(hidden, ["renamed.nrrd", "new.nrrd"])
    (hidden / "imagesTr" / "renamed.nrrd").write_bytes((la / "imagesTr" / "la_002.nrrd").read_bytes())
    cases = blind.hidden_cases(hidden)
    assert blind.development_overlap(hidden, cases, la) == ["imagesTr/renamed.nrrd"]


def test_a_changed_model_is_refused(blind, tmp_path, monkeypatch):
    model = tmp_path / "runs" / "seg" / "best.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    frozen = {"issue2_segmenters": {"s": {"path": "seg/best.pt", "sha256": good}},
              "issue3_mask_segmenters": {}, "quality_predictors": {"g": []}, "primary_quality_predictor": "g"}
    listing = tmp_path / "frozen.json"
    listing.write_text(json.dumps(frozen))
    monkeypatch.setattr(blind, "FROZEN", listing)
    assert blind.verify_models(tmp_path / "runs")["issue2_segmenters"]["s"]["file"] == str(model)
    model.write_bytes(b"retrained")
    with pytest.raises(SystemExit, match=r"best\.pt: neither the frozen file \(SHA-256 differs\)"):
        blind.verify_models(tmp_path / "runs")
    model.unlink()
    with pytest.raises(SystemExit, match=r"best\.pt: missing"):
        blind.verify_models(tmp_path / "runs")


def test_the_frozen_list_names_every_model_once(blind):
    frozen = json.loads(blind.FROZEN.read_text())
    entries = [e for group in ("issue2_segmenters", "issue3_mask_segmenters") for e in frozen[group].values()]
    entries += [e for members in frozen["quality_predictors"].values() for e in members]
    assert len({e["path"] for e in entries}) == len(entries) == 15
    assert all(len(e["sha256"]) == 64 for e in entries)
    assert frozen["primary_quality_predictor"] in frozen["quality_predictors"]
    assert frozen["second_opinion"] in frozen["issue2_segmenters"]


def test_within_segmenter_correlation(blind, tmp_path):
    rows = ["case,category,class,true_dice,predicted"]
    rows += [f"c{i},runs/masks/good,1,{0.8 + i / 100},{0.7 + i / 50}" for i in range(5)]
    rows += [f"c{i},runs/masks/bad,1,{0.5 + i / 100},{0.9 - i / 100}" for i in range(5)]
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(rows) + "\n")
    within = blind.within_segmenter_pearson(path)
    assert within["good"] == pytest.approx(1.0)
    assert within["bad"] == pytest.approx(-1.0)


def result_with(pipeline_dice, pearson, mae, image_ok=True, seconds=0.2, minimal_dice=None):
    issue2 = {"pipeline_dice": pipeline_dice}
    if minimal_dice is not None:
        issue2["minimal_dice"] = minimal_dice
    return {"issue2": issue2, "issue3": {"score_seconds_median": seconds, "g": {
        "metrics": {"pearson": pearson, "mae": mae}, "image_dependence_ok": image_ok}}}


@pytest.mark.parametrize("arguments, issue2_met, issue3_met", [
    ((0.87, 0.91, 0.05), True, True),
    ((0.85, 0.91, 0.05), False, True),
    ((0.87, 0.89, 0.05), True, False),
    ((0.87, 0.91, 0.07), True, False),
    ((0.87, 0.91, 0.05, False), True, False),
    ((0.87, 0.91, 0.05, True, 1.5), True, False),
    ((0.87, 0.91, 0.05, True, 0.2, 0.88), False, True),
])
def test_verdicts_follow_the_bars(blind, arguments, issue2_met, issue3_met):
    verdicts = blind.verdicts(result_with(*arguments), {"primary_quality_predictor": "g"})
    assert verdicts["issue 2"]["met"] is issue2_met
    assert verdicts["issue 3"]["met"] is issue3_met
