"""The review sheet: the planes through each prediction's centre, one row per case, in order."""

from __future__ import annotations

import numpy as np

from QGSegmentationLib.plots import orthogonal_planes, review_sheet


def blob(shape=(20, 30, 40), centre=(5, 20, 10)):
    label = np.zeros(shape, np.uint8)
    z, y, x = centre
    label[z - 2:z + 3, y - 3:y + 4, x - 4:x + 5] = 1
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32) + 3 * label
    return image, label


def test_planes_cut_through_the_label_centre_with_superior_up():
    image, label = blob()
    planes = {name: (picture, mask, aspect) for name, picture, mask, aspect in
              orthogonal_planes(image, label, spacing_zyx=(2.5, 1.0, 0.5))}
    assert planes["axial"][0].shape == (30, 40) and planes["axial"][1].sum() == 7 * 9
    assert planes["coronal"][0].shape == (20, 40) and planes["coronal"][1].sum() == 5 * 9
    assert planes["sagittal"][0].shape == (20, 30) and planes["sagittal"][1].sum() == 5 * 7
    assert (planes["axial"][2], planes["coronal"][2], planes["sagittal"][2]) == (2.0, 5.0, 2.5)
    rows = np.nonzero(planes["coronal"][1].any(axis=1))[0]
    assert list(rows) == [20 - 1 - z for z in (7, 6, 5, 4, 3)]  # flipped: the last slice on top
    empty = orthogonal_planes(image, np.zeros_like(label), (1, 1, 1))
    assert empty[0][1].shape == (30, 40) and not empty[0][2].any()  # the volume's centre instead


def test_review_sheet_has_one_row_per_case(tmp_path):
    import matplotlib.image

    image, label = blob()
    cases = [(f"case {i}", image, label, (1.0, 1.0, 1.0)) for i in range(3)]
    one = matplotlib.image.imread(review_sheet(cases[:1], tmp_path / "one.png"))
    three = matplotlib.image.imread(review_sheet(cases, tmp_path / "three.png"))
    assert three.shape[1] == one.shape[1] and three.shape[0] > 2 * one.shape[0]
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically


def test_metrics_figure_has_one_row_per_class_and_tolerates_a_class_missing_from_a_case(tmp_path):
    import matplotlib.image

    from QGSegmentationLib.plots import metrics_figure

    rows = [{"case": f"c{i}", "dice_1": 0.9 - 0.1 * i, "hd95_1": 2.0 + i, "dice": 0.9} for i in range(5)]
    one = matplotlib.image.imread(metrics_figure(rows, tmp_path / "one.png"))
    rows[0].update({"dice_2": 0.5, "hd95_2": 9.0})  # a second class present in one case only
    two = matplotlib.image.imread(metrics_figure(rows, tmp_path / "two.png"))
    assert two.shape[1] == one.shape[1] and two.shape[0] > 1.5 * one.shape[0]
