"""bench/la_crossval.py: the five folds' commands, and the cross-validation table read from real
`qgseg evaluate` folders whose Dice values are known by construction."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import load_bench_script, run_cli


@pytest.fixture(scope="module")
def crossval():
    return load_bench_script("la_crossval")


def test_each_fold_splits_trains_and_scores_in_its_own_folder(crossval, tmp_path):
    steps = crossval.fold_steps(3, tmp_path / "LA", minimal=True)
    assert all(s["group"] == "fold3" and s["done"].startswith("fold3/") for s in steps)
    split, train = steps[0]["command"], steps[1]["command"]
    assert split[split.index("--fold") + 1] == "3" and split[split.index("--labeled") + 1] == "16"
    assert "--spacing" not in train and "--patch" not in train  # the planned defaults of §11
    assert train[train.index("--seed") + 1] == "0"
    names = [s["name"] for s in steps]
    assert any("minimal" in n for n in names)
    assert not any("minimal" in s["name"] for s in crossval.fold_steps(3, tmp_path / "LA", minimal=False))
    assert len(steps) == len(crossval.fold_steps(0, tmp_path / "LA", minimal=True))


def write_case(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((0.625, 0.625, 0.625))
    sitk.WriteImage(image, str(folder / f"{name}.nrrd"))


def evaluated(tmp_path, fold_dir, dices):
    """`qgseg evaluate` run on predictions with the given Dice against 10-voxel references."""
    for i, dice in enumerate(dices):
        ref = np.zeros((4, 6, 6), np.uint8)
        ref.flat[:10] = 1
        pred = np.zeros_like(ref)
        kept = int(round(10 * dice / (2 - dice)))  # a subset of k voxels has Dice 2k / (10 + k)
        pred.flat[:kept] = 1
        write_case(tmp_path / "refs", f"c{fold_dir.name}_{i}", ref)
        write_case(fold_dir / "pred", f"c{fold_dir.name}_{i}", pred)
    run_dir = fold_dir / "eval_test"
    result = run_cli("evaluate", "--predictions", str(fold_dir / "pred"), "--references", str(tmp_path / "refs"),
                     "--run-dir", str(run_dir), "--quiet")
    assert result.returncode == 0, result.stderr
    return run_dir


def test_fold_means_spread_bar_and_minimal_script_are_summarised(crossval, tmp_path):
    folds = {}
    for fold, (pipeline, minimal) in enumerate([([1.0, 2 * 8 / 18], [1.0, 2 * 6 / 16]),
                                                ([1.0, 1.0], [2 * 9 / 19, 2 * 9 / 19]),
                                                ([2 * 7 / 17, 2 * 7 / 17], None)]):
        test = crossval.dice_summary(evaluated(tmp_path, tmp_path / f"p{fold}", pipeline))
        mini = crossval.dice_summary(evaluated(tmp_path, tmp_path / f"m{fold}", minimal)) if minimal else None
        folds[fold] = {"test": test, "validation": None, "minimal": mini,
                       "train": {"wall_s": 400.0 + fold, "spacing": [1.25] * 3, "patch": [48] * 3,
                                 "best_iteration": 3200, "best_val_dice": 0.88}}
    assert folds[0]["test"]["worst_dice"] == pytest.approx(16 / 18) and folds[0]["test"]["cases"] == 2
    means = [(1 + 16 / 18) / 2, 1.0, 14 / 17]
    summary = crossval.summarize({**folds, 4: {"test": None, "validation": None, "minimal": None}})
    assert summary["folds"] == [0, 1, 2]
    assert summary["fold_mean"] == pytest.approx(np.mean(means))
    assert summary["fold_std"] == pytest.approx(np.std(means, ddof=1))
    assert summary["pooled_mean"] == pytest.approx(np.mean([1, 16 / 18, 1, 1, 14 / 17, 14 / 17]))
    assert summary["folds_at_bar"] == 2  # 0.944, 1.0 reach 0.86; 0.824 does not
    assert summary["paired_folds"] == 2 and summary["folds_beating_minimal"] == 2
    assert summary["minimal_fold_mean"] == pytest.approx(np.mean([(1 + 12 / 16) / 2, 18 / 19]))
    assert summary["max_train_s"] == 402.0
    table = crossval.report_markdown(json.loads(json.dumps({"machine": {"date": "d", "commit": "c"},
                                                            "folds": folds, "summary": summary})))
    assert "| 2 | 1.25; 48×48×48 | 402 |" in table and "2 of 3" in table


def test_a_candidate_recipe_is_scored_on_validation_volumes_only(crossval, tmp_path):
    steps = crossval.fold_steps(1, tmp_path / "LA", minimal=False, recipe="noflip", splits=("validation",))
    commands = [s["command"] for s in steps]
    assert not any("test" in c for c in commands)  # nothing touches the test volumes
    train = commands[1]
    assert train[train.index("--run-dir") + 1] == "noflip" and any("flip_prob: 0.0" in a for a in train)
    assert "--no-mirror" in commands[2]  # a network trained without flips is not mirrored
    planned = crossval.fold_steps(1, tmp_path / "LA", minimal=False)
    assert "--mirror" in planned[2]["command"] and not any("flip_prob" in a for a in planned[1]["command"])


def test_validation_table_compares_every_recipe_with_planned(crossval):
    validation = lambda dice: {"validation": {"dice": dice}}  # noqa: E731
    empty = {"validation": None}
    folds = {0: {"planned": validation(0.80), "noflip": validation(0.85), "unet5": empty, "unet5_noflip": empty},
             1: {"planned": validation(0.90), "noflip": validation(0.91), "unet5": empty, "unet5_noflip": empty},
             2: {"planned": validation(0.70), "noflip": empty, "unet5": empty, "unet5_noflip": empty}}
    table = crossval.validation_by_recipe(folds)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"planned", "noflip"}
    assert "| 0.8500 |" in rows["planned"]  # mean over folds 0-1, where both ran
    assert "+0.0300 ± 0.0283" in rows["noflip"]  # differences 0.05 and 0.01


def test_selection_volumes_are_the_folds_validation_and_unlabeled_volumes_never_its_test(crossval, tmp_path):
    data = tmp_path / "fold2" / "data"
    (data / "labelsTr").mkdir(parents=True)
    for name in ("v1", "u1", "u2"):
        (data / "labelsTr" / f"{name}.nrrd").write_bytes(b"")
    case = lambda name: {"image": f"imagesTr/{name}.nrrd", "label": f"labelsTr/{name}.nrrd"}  # noqa: E731
    (data / "dataset.json").write_text(json.dumps({
        "name": "LA", "labels": {"0": "background", "1": "la"}, "training": [case("t1")],
        "validation": [case("v1")], "test": [case("x1")], "unlabeled": ["imagesTr/u1.nrrd", "imagesTr/u2.nrrd"]}))
    selection = json.loads(crossval.write_selection(tmp_path / "fold2").read_text())
    assert selection["test"] == [case("v1"), case("u1"), case("u2")] and selection["training"] == [case("t1")]
    (data / "labelsTr" / "u2.nrrd").unlink()
    with pytest.raises(FileNotFoundError, match="u2.nrrd"):
        crossval.write_selection(tmp_path / "fold2")

    steps = crossval.fold_steps(2, tmp_path / "LA", minimal=False, recipe="minimal_like", splits=("selection",))
    assert steps[2]["call"] is crossval.write_selection and steps[2]["done"] == "fold2/data/selection.json"
    predict, evaluate = steps[3]["command"], steps[4]["command"]
    assert predict[predict.index("--input") + 1] == "data/selection.json" and "--no-mirror" in predict
    assert evaluate[evaluate.index("--dataset") + 1] == "data/selection.json"
    assert not any("dataset.json" in arg for s in steps[3:] for arg in s["command"])  # never the test list
    train = steps[1]["command"]
    assert train[train.index("--patch") + 1:train.index("--patch") + 4] == ["32", "64", "64"]
    assert "augment=false" in train and "schedule=constant" in train


def test_selection_table_pools_every_volume_and_names_each_folds_choice(crossval):
    selection = lambda *dices: {"selection": {"per_case": {f"c{i}": d for i, d in enumerate(dices)}}}  # noqa: E731
    empty = {"selection": None}
    folds = {0: {"noflip": selection(0.8, 0.9), "noaug": selection(0.9, 0.9), "unet5": empty},
             1: {"noflip": selection(0.9, 0.9, 0.75), "noaug": selection(0.7, 0.8, 0.9), "unet5": empty},
             2: {"noflip": selection(0.5), "noaug": empty, "unet5": empty}}
    table = crossval.selection_by_recipe(folds)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"noflip", "noaug", "*this fold's choice*"}
    assert "| 0.8500 | 0.8500 | 0.5000 | 0.8500 | 5 |" in rows["noflip"]  # pooled over folds 0-1: 4.25 / 5
    assert "| 0.9000 | 0.8000 | — | 0.8400 | 5 |" in rows["noaug"]
    assert "| noaug | noflip | — |" in rows["*this fold's choice*"]
    reference = {0: {"per_case": {"c0": 1.0, "c1": 0.9}}, 1: None, 2: {"per_case": {"c0": 0.1}}}
    rows = {line.split("|")[1].strip(): line for line in crossval.selection_by_recipe(folds, reference).splitlines()}
    assert "| 0.9500 | — | 0.1000 | 0.9500 | 2 |" in rows["*minimal script (reference)*"]  # pooled: folds 0-1 only
    assert "| noaug | noflip | — |" in rows["*this fold's choice*"]  # the reference is never chosen


def test_last_weights_segment_into_their_own_folders_and_script_internals_train_with_the_scripts_loss(crossval, tmp_path):
    steps = crossval.fold_steps(4, tmp_path / "LA", minimal=False, recipe="script_internals",
                                splits=("selection",), weights="last")
    predict, evaluate = steps[3]["command"], steps[4]["command"]
    assert predict[predict.index("--checkpoint") + 1] == "script_internals/checkpoints/last.pt"
    assert predict[predict.index("--output") + 1] == "script_internals/pred_selection_last"
    assert evaluate[evaluate.index("--run-dir") + 1] == "script_internals/eval_selection_last"
    assert steps[4]["done"] == "fold4/script_internals/eval_selection_last/metrics.csv"
    train = steps[1]["command"]
    assert "loss=dice_ce_bg" in train and "clip_percentiles=[0, 100]" in train and "augment=false" in train
    loss_only = crossval.fold_steps(4, tmp_path / "LA", minimal=False, recipe="script_loss", splits=("selection",))
    assert "loss=dice_ce_bg" in loss_only[1]["command"] and "clip_percentiles=[0, 100]" not in loss_only[1]["command"]
    linear = crossval.fold_steps(4, tmp_path / "LA", minimal=False, recipe="unet5_noflip_linear", splits=("selection",))
    noflip = crossval.fold_steps(4, tmp_path / "LA", minimal=False, recipe="unet5_noflip", splits=("selection",))
    assert linear[1]["command"][:-3] == [*noflip[1]["command"][:-3], "--set", "label_resampling=linear"]  # nothing else
    best = crossval.fold_steps(4, tmp_path / "LA", minimal=False, recipe="script_internals", splits=("selection",))
    assert best[3]["command"][best[3]["command"].index("--checkpoint") + 1] == "script_internals/checkpoints/best.pt"


def test_selection_table_lists_last_weights_as_candidates_of_their_own(crossval):
    scored = lambda *dices: {"per_case": {f"c{i}": d for i, d in enumerate(dices)}}  # noqa: E731
    folds = {0: {"noflip": {"selection": scored(0.8, 0.8), "selection_last": scored(0.9, 0.9)}},
             1: {"noflip": {"selection": scored(0.9, 0.9), "selection_last": scored(0.7, 0.9)}}}
    rows = {line.split("|")[1].strip(): line for line in crossval.selection_by_recipe(folds).splitlines()[2:]}
    assert "| 0.8000 | 0.9000 | 0.8500 | 4 |" in rows["noflip"]
    assert "| 0.9000 | 0.8000 | 0.8500 | 4 |" in rows["noflip, last"]
    assert "| noflip, last | noflip |" in rows["*this fold's choice*"]


def test_a_report_of_the_last_weights_reads_their_own_evaluations(crossval, tmp_path):
    run = tmp_path / "fold0" / "noflip"
    best, last = evaluated(tmp_path, run / "b", [1.0, 1.0]), evaluated(tmp_path, run / "l", [2 * 7 / 17, 1.0])
    best.rename(run / "eval_test")
    last.rename(run / "eval_test_last")
    assert crossval.fold_result(tmp_path / "fold0", "noflip")["test"]["dice"] == pytest.approx(1.0)
    assert crossval.fold_result(tmp_path / "fold0", "noflip", "last")["test"]["dice"] == pytest.approx((14 / 17 + 1) / 2)
    crossval.write_report(tmp_path, "noflip", "last")
    assert "noflip, last weights" in (tmp_path / "crossval-noflip_last.md").read_text()
    assert json.loads((tmp_path / "crossval-noflip_last.json").read_text())["folds"]["0"]["test"]["cases"] == 2


def last_value(command, flag):
    """What argparse keeps for `flag` in `command`: the value after its last occurrence."""
    return [value for name, value in zip(command, command[1:]) if name == flag][-1]


def test_an_ensemble_recipe_trains_each_member_and_segments_with_all_of_them(crossval, tmp_path):
    steps = crossval.fold_steps(2, tmp_path / "LA", minimal=False, recipe="unet5_noflip_linear_pair",
                                splits=("selection",), weights="last")
    trainings = [s["command"] for s in steps if s["name"].startswith("fold 2: train")]
    assert len(trainings) == 2
    for train, seed, folder in zip(trainings, ("0", "1"), ("unet5_noflip_linear_short", "unet5_noflip_linear_short_seed1")):
        assert [last_value(train, flag) for flag in ("--seed", "--iterations", "--run-dir")] == [seed, "2800", folder]
        assert "label_resampling=linear" in train and "flip_prob: 0.0" in " ".join(train)
    predict = next(s["command"] for s in steps if "segment" in s["name"])
    at = predict.index("--checkpoint")
    assert predict[at + 1:at + 3] == ["unet5_noflip_linear_short/checkpoints/last.pt",
                                      "unet5_noflip_linear_short_seed1/checkpoints/last.pt"]
    assert predict[predict.index("--output") + 1] == "unet5_noflip_linear_pair/pred_selection_last"
    combined = crossval.combined_trainings([
        {"wall_s": 400.0, "spacing": [1.25] * 3, "patch": [48] * 3, "best_iteration": 2800, "best_val_dice": 0.8},
        {"wall_s": 450.0, "spacing": [1.25] * 3, "patch": [48] * 3, "best_iteration": 2100, "best_val_dice": 0.9}])
    assert combined["wall_s"] == 850.0 and combined["best_iteration"] == "2800+2100"  # the budget counts both
    assert combined["best_val_dice"] == pytest.approx(0.85)


@pytest.mark.parametrize("ensemble, base, seeds, iterations, centred", [
    ("unet5_noflip_linear_pair", "unet5_noflip_linear_short", ("0", "1"), "2800", False),
    ("unet5_noflip_linear_centred_pair", "unet5_noflip_linear_centred_short", ("0", "1"), "2800", True),
    ("unet5_noflip_linear_triple", "unet5_noflip_linear_2k", ("0", "1", "2"), "2000", False)])
def test_each_seeded_ensemble_trains_its_recipe_once_per_seed(crossval, tmp_path, ensemble, base, seeds,
                                                                iterations, centred):
    steps = crossval.fold_steps(4, tmp_path / "LA", minimal=False, recipe=ensemble, splits=("selection",),
                                weights="last")
    trainings = [s["command"] for s in steps if s["name"].startswith("fold 4: train")]
    folders = [base if seed == "0" else f"{base}_seed{seed}" for seed in seeds]
    assert [[last_value(t, flag) for flag in ("--seed", "--iterations", "--run-dir")] for t in trainings] == \
        [[seed, iterations, folder] for seed, folder in zip(seeds, folders)]
    assert all(("center_jitter=0" in t) == centred for t in trainings)
    assert all(t[:t.index("--seed", t.index("--seed") + 1)] == trainings[0][:trainings[0].index("--run-dir")]
               for t in trainings[1:])  # the members differ in their seed only
    assert crossval.trained_recipes(ensemble) == tuple(folders)
