"""dataset.json parsing, explicit file lists, validation splits and whole-dataset validation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from QGSegmentationLib.data import io
from QGSegmentationLib.data.dataset import (dataset_from_files, load_dataset, parse_labels,
                                            split_validation, validate_dataset, write_split_file)
from QGSegmentationLib.data.phantom import make_phantom_dataset
from QGSegmentationLib.errors import DataError

SHAPE = (8, 12, 12)


@pytest.fixture
def phantom(tmp_path):
    return make_phantom_dataset(tmp_path / "ds", n_labeled=4, n_unlabeled=2, n_test=1, shape=SHAPE)


def rewrite(json_path, **changes):
    desc = json.loads(json_path.read_text())
    desc.update(changes)
    json_path.write_text(json.dumps(desc))
    return desc


def test_load_phantom_dataset(phantom):
    spec = load_dataset(phantom)
    assert spec.labels == {0: "background", 1: "organ"} and spec.n_classes == 2
    assert [len(spec.training), len(spec.validation), len(spec.test), len(spec.unlabeled)] == [4, 0, 1, 2]
    assert [c.id for c in spec.training] == ["case_000", "case_001", "case_002", "case_003"]
    assert all(c.image.is_file() and c.label.is_file() for c in spec.training)
    assert all(c.label is None for c in spec.unlabeled)
    assert load_dataset(phantom.parent).training == spec.training  # folder works too


def test_nnunet_labels_dot_paths_and_entry_forms(phantom):
    desc = json.loads(phantom.read_text())
    rewrite(phantom, labels={"background": 0, "organ": 1},
            training=[{"image": "./" + e["image"], "label": "./" + e["label"]} for e in desc["training"]],
            unlabeled=[{"image": desc["unlabeled"][0]}, desc["unlabeled"][1]],
            test=[desc["test"][0]["image"]])
    spec = load_dataset(phantom)
    assert spec.labels == {0: "background", 1: "organ"}
    assert spec.training[0].image == phantom.parent / "imagesTr" / "case_000.nrrd"
    assert len(spec.unlabeled) == 2 and spec.test[0].label is None


def test_nnunet_v2_folder_without_training_list(tmp_path):
    root = tmp_path / "Dataset001"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    geometry = io.Geometry.identity(SHAPE)
    for case in ("a", "b"):
        io.write_image(root / "imagesTr" / f"{case}_0000.nii.gz", np.zeros(SHAPE, np.float32), geometry)
        io.write_label(root / "labelsTr" / f"{case}.nii.gz", np.zeros(SHAPE, np.uint8), geometry)
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}))
    spec = load_dataset(root / "dataset.json")
    assert [c.id for c in spec.training] == ["a_0000", "b_0000"]
    assert spec.training[1].label == root / "labelsTr" / "b.nii.gz"


@pytest.mark.parametrize("raw, fragment", [
    ({"1": "organ"}, "0..0 without gaps"),
    ({"0": "bg", "2": "organ"}, "without gaps"),
    ({"0": "background"}, "only background"),
    ({"background": 0, "organ": "x"}, "not an integer"),
    ({"background": 0, "both": [1, 2]}, "region"),
    ([1, 2], "mapping"),
])
def test_bad_labels(raw, fragment):
    with pytest.raises(DataError, match="dataset.json") as info:
        parse_labels(raw, "dataset.json")
    assert fragment in str(info.value)


def expect_error(json_path, *fragments):
    with pytest.raises(DataError) as info:
        load_dataset(json_path)
    message = str(info.value)
    assert str(json_path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_labels_key(phantom):
    desc = json.loads(phantom.read_text())
    del desc["labels"]
    phantom.write_text(json.dumps(desc))
    expect_error(phantom, "missing required key \"labels\"")


def test_entry_without_image_or_label(phantom):
    rewrite(phantom, training=[{"label": "labelsTr/case_000.nrrd"}, {"image": "imagesTr/case_001.nrrd"}])
    expect_error(phantom, "2 problems", "\"training\"[0]: entry has no \"image\" key",
                 "\"training\"[1]: labeled entry has no \"label\" key")


def test_duplicate_case(phantom):
    desc = json.loads(phantom.read_text())
    rewrite(phantom, training=desc["training"] + [desc["training"][0]])
    expect_error(phantom, "duplicate case", "case_000.nrrd")


def test_a_case_id_names_one_case_across_training_and_validation(phantom):
    """split.json lists training and validation cases by id: imagesTr/case_000 and
    imagesVal/case_000 would both be 'case_000', and a run's split file would read back the wrong
    image. Test and unlabeled cases are not addressed by id there and may reuse a name."""
    root = phantom.parent
    for folder in ("imagesVal", "labelsVal", "imagesTs2"):
        (root / folder).mkdir()
    shutil.copy(root / "imagesTr" / "case_003.nrrd", root / "imagesVal" / "case_000.nrrd")
    shutil.copy(root / "labelsTr" / "case_003.nrrd", root / "labelsVal" / "case_000.nrrd")
    shutil.copy(root / "imagesTr" / "case_002.nrrd", root / "imagesTs2" / "case_001.nrrd")
    desc = json.loads(phantom.read_text())
    rewrite(phantom, test=[{"image": "imagesTs2/case_001.nrrd"}])
    assert load_dataset(phantom).test[0].id == "case_001"  # a test case may share a training id
    rewrite(phantom, validation=[{"image": "imagesVal/case_000.nrrd", "label": "labelsVal/case_000.nrrd"}])
    message = expect_error(phantom, "case id 'case_000' names two cases", "imagesTr/case_000.nrrd",
                           "imagesVal/case_000.nrrd", "\"training\"", "\"validation\"", "split.json")
    assert desc["training"][0]["image"] == "imagesTr/case_000.nrrd" and "rename" in message


def test_path_escaping_root(phantom):
    outside = phantom.parent.parent / "outside.nrrd"
    shutil.copy(phantom.parent / "imagesTr" / "case_000.nrrd", outside)
    desc = json.loads(phantom.read_text())
    desc["training"][0]["image"] = "../outside.nrrd"
    desc["training"][1]["label"] = str(outside)
    rewrite(phantom, training=desc["training"])
    with pytest.raises(DataError) as info:
        load_dataset(phantom)
    message = str(info.value)
    assert "\"training\"[0] image: path '../outside.nrrd' points outside the dataset folder" in message
    assert "\"training\"[1] label" in message
    assert info.value.hint.count("ln -s") == 1  # one hint for both problems
    # ... and the hint holds: data linked into the dataset's folder is read through the link
    (phantom.parent / "linked").mkdir()
    (phantom.parent / "linked" / "scan.nrrd").symlink_to(outside)
    desc = json.loads(phantom.read_text())
    desc["training"][0]["image"] = "linked/scan.nrrd"
    desc["training"][1]["label"] = "labelsTr/case_001.nrrd"
    rewrite(phantom, training=desc["training"])
    assert load_dataset(phantom).training[0].image.name == "scan.nrrd"


def test_missing_files_are_all_listed(phantom):
    (phantom.parent / "imagesTr" / "case_001.nrrd").unlink()
    (phantom.parent / "labelsTr" / "case_002.nrrd").unlink()
    expect_error(phantom, "2 problems", "\"training\"[1] image: file 'imagesTr/case_001.nrrd' does not exist",
                 "\"training\"[2] label: file 'labelsTr/case_002.nrrd' does not exist")


def test_no_labeled_cases(phantom):
    rewrite(phantom, training=[])
    expect_error(phantom, "no labeled cases")


def test_invalid_json(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text("{not json")
    expect_error(path, "not valid JSON")


def test_split_validation_is_deterministic(phantom):
    spec = load_dataset(phantom)
    a, b = split_validation(spec, 2, seed=3), split_validation(spec, 2, seed=3)
    assert a.validation == b.validation and len(a.validation) == 2 and len(a.training) == 2
    assert set(a.training).isdisjoint(a.validation)
    assert set(a.training) | set(a.validation) == set(spec.training)
    assert split_validation(a, 1, seed=0) is a  # already has validation cases
    with pytest.raises(DataError, match="at least one must remain"):
        split_validation(spec, 4, seed=0)


def test_a_runs_split_file_reads_back_as_the_dataset_with_its_groups(phantom, tmp_path):
    spec = load_dataset(phantom)
    held_out = split_validation(spec, 1, seed=5)
    path = write_split_file(held_out, tmp_path / "run" / "split.json", written_by="test")
    loaded = load_dataset(path)
    assert loaded.training == held_out.training and loaded.validation == held_out.validation
    assert loaded.test == spec.test and loaded.unlabeled == spec.unlabeled and loaded.labels == spec.labels
    assert loaded.source == path and loaded.root == spec.root
    assert write_split_file(dataset_from_files([spec.training[0].image], [spec.training[0].label]),
                            tmp_path / "none.json", written_by="test") is None  # no dataset.json to name
    assert not (tmp_path / "none.json").exists()
    again = write_split_file(loaded, tmp_path / "run2" / "split.json", written_by="test")  # a run on a split
    assert json.loads(again.read_text())["dataset"] == str(phantom) and load_dataset(again).training == loaded.training


@pytest.mark.parametrize("change,fragment", [
    ({"validation": ["nope_1"]}, "nope_1"),
    ({"training": "case_000"}, "must be a list of case ids"),
    ({"dataset": "missing/dataset.json"}, "does not exist"),
    ({"validation": ["case_000"], "training": ["case_000", "case_001"]}, "both"),
    ({"training": []}, "\"training\" is empty"),
])
def test_bad_split_files_name_the_file_and_the_problem(phantom, tmp_path, change, fragment):
    path = write_split_file(split_validation(load_dataset(phantom), 1, seed=0), tmp_path / "split.json", "test")
    rewrite(path, **change)
    expect_error(path, fragment)


def test_a_split_file_must_name_a_dataset_not_another_split_file(phantom, tmp_path):
    first = write_split_file(split_validation(load_dataset(phantom), 1, seed=0), tmp_path / "a.json", "test")
    second = tmp_path / "b.json"
    second.write_text(json.dumps({**json.loads(first.read_text()), "dataset": str(first)}))
    expect_error(second, "itself a split file")


def test_validate_dataset_summary(phantom):
    spec = load_dataset(phantom)
    report = validate_dataset(spec)
    assert report.cases["training"] == 4 and report.size_min == (12, 12, 8)
    labels = [io.read_label(c.label)[0] for c in spec.training + spec.test]
    assert report.label_voxels[1] == sum(int((lab == 1).sum()) for lab in labels)
    assert report.warnings == []


def test_validate_dataset_lists_every_problem(phantom):
    spec = load_dataset(phantom)
    bad_value = spec.training[0].label
    array, geometry = io.read_label(bad_value)
    array[0, 0, 0] = 5
    io.write_label(bad_value, array, geometry)
    moved = spec.training[1].label
    array, geometry = io.read_label(moved)
    io.write_label(moved, array, io.Geometry(geometry.size, geometry.spacing,
                                             (geometry.origin[0] + 3.0,) + geometry.origin[1:]))
    corrupt = spec.unlabeled[0].image
    corrupt.write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        validate_dataset(spec)
    message = str(info.value)
    assert "3 problems" in message
    assert f"{bad_value}: label values [5] are not declared" in message
    assert f"{moved}: label geometry does not match" in message and "origin" in message
    assert f"{corrupt}: cannot read image file" in message


def test_dataset_from_files(phantom):
    spec = load_dataset(phantom)
    images = [c.image for c in spec.training]
    labels = [c.label for c in spec.training]
    listed = dataset_from_files(images, labels, unlabeled=[c.image for c in spec.unlabeled])
    assert listed.labels == {0: "background", 1: "label_1"}
    assert [c.id for c in listed.training] == [c.id for c in spec.training]
    assert len(listed.unlabeled) == 2
    with pytest.raises(DataError, match="2 images but 1 labels"):
        dataset_from_files(images[:2], labels[:1])
    with pytest.raises(DataError, match="missing.nrrd' does not exist"):
        dataset_from_files([phantom.parent / "missing.nrrd"], labels[:1])


def test_slicer_segmentations_whose_segment_names_swap_the_datasets_labels_are_refused(tmp_path):
    """A .seg.nrrd reference names its segments; when those names are the dataset's label names
    at other values, its classes would be learned swapped. Slicer's default names pass."""
    root = make_phantom_dataset(tmp_path / "ds", n_labeled=2, n_unlabeled=0, shape=SHAPE, n_classes=3).parent
    desc = json.loads((root / "dataset.json").read_text())
    case = desc["training"][0]
    label, geometry = io.read_label(root / case["label"])
    seg = f"labelsTr/{case['image'].split('/')[-1].split('.')[0]}.seg.nrrd"
    case["label"] = seg
    desc["labels"] = {"0": "background", "1": "liver", "2": "tumor"}
    (root / "dataset.json").write_text(json.dumps(desc))
    io.write_segmentation(root / seg, label, geometry, {1: "Segment_1", 2: "Segment_2"})
    assert validate_dataset(load_dataset(root / "dataset.json")).cases["training"] == 2
    io.write_segmentation(root / seg, label, geometry, {1: "Tumor", 2: "liver"})
    with pytest.raises(DataError, match=r"seg.nrrd: segment label values do not match the dataset's labels: "
                                        r"'Tumor' is 1 in the file, 2 in the dataset; 'liver' is 2 in the file, 1"):
        validate_dataset(load_dataset(root / "dataset.json"))
