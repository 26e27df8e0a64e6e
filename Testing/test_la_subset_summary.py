"""bench/la_subset_summary.py: the T16 / H44 / within-segmenter split of a quality evaluation
that BENCHMARKS.md §6 reports, checked on rows whose metrics are known by construction."""

import csv
import json

import numpy as np
import pytest

from conftest import load_bench_script


@pytest.fixture(scope="module")
def summary():
    return load_bench_script("la_subset_summary")


def rows_of(cases, true, predicted, second=None):
    rows = []
    for i, (case, t, p) in enumerate(zip(cases, true, predicted)):
        row = {"case": case, "category": f"runs/masks/seg{i % 2}", "class": "1",
               "true_dice": str(t), "predicted": str(p)}
        if second is not None:
            row["second_opinion_dice"] = str(second[i])
        rows.append(row)
    return rows


def test_test_split_cases_are_read_from_the_dataset_json(summary, tmp_path):
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"test": [{"image": "imagesTs/la_001_X.nrrd", "label": "l.nrrd"}]}))
    assert summary.cases_of_test_list(dataset) == {"la_001_X"}


def test_subsets_split_by_the_test_list_and_metrics_match_by_construction(summary):
    cases = ["t1", "t2", "t3", "t4", "h1", "h2", "h3", "h4", "h5", "h6"]
    true = np.array([0.9, 0.8, 0.6, 0.5, 0.95, 0.85, 0.75, 0.65, 0.55, 0.45])
    predicted = true.copy()
    predicted[4:] += 0.1  # exact on the test cases, 0.1 too high on the others (same ranking)
    result = summary.summarise(rows_of(cases, true, predicted), test={"t1", "t2", "t3", "t4"})
    g = result["g"]
    assert (g["all"]["n"], g["T16"]["n"], g["H44"]["n"]) == (10, 4, 6)
    assert g["T16"]["mae"] == pytest.approx(0.0) and g["H44"]["mae"] == pytest.approx(0.1)
    assert g["all"]["mae"] == pytest.approx(0.06)
    assert g["H44"]["pearson"] == pytest.approx(1.0) and g["H44"]["spearman"] == pytest.approx(1.0)
    assert g["H44"]["auroc_failure"] == pytest.approx(1.0)  # 0.65, 0.55, 0.45 are failures, ranked lowest
    assert set(g["within_segmenter_H44"]) == {"seg0", "seg1"}
    assert all(r == pytest.approx(1.0) for r in g["within_segmenter_H44"].values())
    assert "second opinion" not in result


def test_second_opinion_is_summarised_when_the_run_had_one(summary):
    cases = ["a", "b", "c", "d", "e", "f"]
    true = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    second = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # ranks them backwards
    result = summary.summarise(rows_of(cases, true, true, second), test=set())
    assert result["second opinion"]["all"]["pearson"] == pytest.approx(-1.0)
    assert result["g"]["all"]["pearson"] == pytest.approx(1.0)
    assert result["g"]["T16"] == {"n": 0}  # no test list given: every case is in H44
    assert result["mean of both"]["all"]["mae"] == pytest.approx(np.mean(np.abs((np.add(true, second) / 2) - true)))
    lower = np.minimum(true, second)
    assert result["lower of both"]["all"]["mae"] == pytest.approx(np.mean(np.abs(lower - true)))
    assert set(result["g"]["within_segmenter_all"]) == {"seg0", "seg1"}


def test_command_line_prints_every_subset_and_the_image_dependence(summary, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = rows_of(["a", "b", "c", "d", "e", "f"], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                   [0.85, 0.8, 0.72, 0.6, 0.55, 0.3])
    with open(run / "quality_evaluation_rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run / "quality_evaluation.json").write_text(json.dumps({"image_dependence": {
        "pearson_black": 0.1, "pearson_shuffled": 0.2, "pearson_real": 0.9, "image_dependence_ok": True}}))
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"test": [{"image": "a.nrrd"}, {"image": "b.nrrd"}]}))
    summary.main([str(run), "--test-split", str(dataset)])
    out = capsys.readouterr().out
    assert "T16 n=  2" in out and "H44 n=  4" in out and "all n=  6" in out
    assert "r blacked-out 0.10, other image 0.20" in out and "passes" in out


def test_a_segmentation_evaluation_is_split_by_subset(summary, tmp_path, capsys):
    run = tmp_path / "seg_eval"
    run.mkdir()
    values = {"la_031_x": (0.4, 20.0), "a": (0.9, 2.0), "b": (0.8, 4.0), "c": (0.85, 3.0)}
    (run / "metrics.csv").write_text("case,dice,hd95\n" + "".join(f"{c},{d},{h}\n" for c, (d, h) in values.items()))
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"test": [{"image": "imagesTr/la_031_x.nrrd"}, {"image": "imagesTr/a.nrrd"}]}))
    summary.main([str(run), "--test-split", str(dataset)])
    out = capsys.readouterr().out
    t16, h44 = np.array([0.4, 0.9]), np.array([0.8, 0.85])
    assert f"T16 n= 2  Dice {t16.mean():.4f} ± {t16.std(ddof=1):.4f}" in out
    assert f"H44 n= 2  Dice {h44.mean():.4f} ± {h44.std(ddof=1):.4f}" in out
    assert "HD95 7.25 mm (median 3.50), cases under 0.8: 1" in out
    assert "la_031_x 0.400" in out
