"""Inference on phantom volumes with tiny randomly initialised networks: probabilities are the
network's softmax, label maps land exactly on the input file's grid, files are written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from QGSegmentationLib.data.io import (Geometry, read_geometry, read_image, read_label,
                                       read_segmentation_names, write_image)
from QGSegmentationLib.data.phantom import make_phantom_case
from QGSegmentationLib.data.preprocess import PreprocessConfig, Preprocessor
from QGSegmentationLib.errors import ConfigError, DataError
from QGSegmentationLib.inference import (ensemble, list_images, predict_dataset, predict_volume,
                                         sliding_window_probs, write_prediction)
from QGSegmentationLib.networks import build_network

torch.set_num_threads(1)


def tiny_net(dims, seed=0, out_channels=2):
    torch.manual_seed(seed)
    return build_network("unet", dims, 1, out_channels, channels=(4, 8, 16), num_res_units=0)


def oblique_geometry(shape_zyx):
    """Anisotropic spacing, non-zero origin and a rotated direction, so nothing is identity."""
    a = math.radians(20.0)
    direction = (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)
    return Geometry(tuple(reversed(shape_zyx)), (0.9, 1.1, 2.0), (-12.5, 30.0, 4.25), direction)


@pytest.fixture
def phantom_file(tmp_path):
    core, _ = make_phantom_case((10, 14, 18), seed=1)
    # a constant border below the phantom's minimum, so foreground cropping has work to do
    image = np.pad(core, ((2, 2), (4, 4), (4, 4)), constant_values=float(core.min()) - 10.0)
    geometry = oblique_geometry(image.shape)
    path = tmp_path / "images" / "phantom_001.nii.gz"
    path.parent.mkdir()
    write_image(path, image, geometry)
    stored = read_geometry(path)  # NIfTI keeps float32 spacing: compare with what the file holds
    _assert_same_grid(stored, geometry, rtol=1e-6)
    return path, stored


def test_single_window_probs_equal_the_network_softmax():
    net = tiny_net(3).eval()
    x = torch.randn(1, 1, 8, 16, 12)
    probs = sliding_window_probs(net, x, roi_size=(8, 16, 12), mode="3d", overlap=0.0)
    with torch.no_grad():
        expected = torch.softmax(net(x), 1)[0]
    assert probs.shape == (2, 8, 16, 12) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-5)


def test_2d_mode_runs_the_2d_network_slice_by_slice():
    net = tiny_net(2).eval()
    volume = torch.randn(1, 1, 5, 16, 12)
    probs = sliding_window_probs(net, volume, roi_size=(16, 12), mode="2d", overlap=0.0,
                                 sw_batch_size=3)
    with torch.no_grad():
        expected = torch.softmax(net(volume[0].permute(1, 0, 2, 3)), 1).permute(1, 0, 2, 3)
    assert probs.shape == (2, 5, 16, 12)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-5)


def test_overlapping_windows_and_padding_give_a_distribution_per_voxel():
    net = tiny_net(3)
    net.train()
    probs = sliding_window_probs(net, np.random.rand(11, 19, 7).astype(np.float32),
                                 roi_size=(8, 8, 8), overlap=0.5)
    assert probs.shape == (2, 11, 19, 7)
    torch.testing.assert_close(probs.sum(0), torch.ones(11, 19, 7), rtol=1e-4, atol=1e-4)
    assert net.training  # the caller's mode is restored


def test_ensemble_averages_the_members_probabilities():
    a, b = tiny_net(3, seed=1).eval(), tiny_net(3, seed=2).eval()
    x = torch.randn(1, 1, 8, 8, 16)
    both = sliding_window_probs(ensemble(a, b), x, (8, 8, 16), overlap=0.0, outputs="probs")
    pa = sliding_window_probs(a, x, (8, 8, 16), overlap=0.0)
    pb = sliding_window_probs(b, x, (8, 8, 16), overlap=0.0)
    torch.testing.assert_close(both, (pa + pb) / 2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pa, pb)


def _assert_same_grid(geometry, expected, rtol=1e-9):
    assert geometry.size == expected.size
    np.testing.assert_allclose(geometry.spacing, expected.spacing, rtol=rtol)
    np.testing.assert_allclose(geometry.origin, expected.origin, atol=1e-5)
    np.testing.assert_allclose(geometry.direction, expected.direction, atol=1e-6)


@pytest.mark.parametrize("config", [
    PreprocessConfig(target_spacing=(1.3, 1.3, 1.5)),
    PreprocessConfig(crop_foreground=True, crop_margin_mm=2.0),
], ids=["respaced", "cropped"])
def test_predict_volume_returns_labels_on_the_original_grid(phantom_file, tmp_path, config):
    path, geometry = phantom_file
    assert Preprocessor(config).target_geometry(*read_image(path)) != geometry  # really resampled
    result = predict_volume(tiny_net(3), path, Preprocessor(config), roi_size=(8, 16, 16),
                            mode="3d", return_probs=True)
    label, probs, out_geometry = result
    assert out_geometry == geometry
    assert label.shape == geometry.shape and label.dtype == np.uint8
    assert probs.shape == (2,) + geometry.shape
    np.testing.assert_array_equal(label, probs.argmax(0))

    written = write_prediction(label, out_geometry, tmp_path / "out", "phantom_001",
                               names=["background", "organ"])
    read_back, read_geometry = read_label(written["label"])
    np.testing.assert_array_equal(read_back, label)
    _assert_same_grid(read_geometry, geometry)
    seg = sitk.ReadImage(written["segmentation"])
    _assert_same_grid(Geometry.from_sitk(seg), geometry)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), label)
    assert read_segmentation_names(written["segmentation"]) == {1: "organ"}
    if config.crop_foreground:  # outside the crop box (border minus 2 mm margin): background
        assert label[0].max() == 0 and label[:, :, :1].max() == 0


def test_predict_volume_in_2d_mode(phantom_file):
    path, geometry = phantom_file
    label, probs, out_geometry = predict_volume(tiny_net(2), path, Preprocessor(), (16, 16),
                                                mode="2d")
    assert probs is None and out_geometry == geometry and label.shape == geometry.shape


def test_predict_dataset_writes_every_case_and_reports_each(tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for i in range(2):
        image, _ = make_phantom_case((8, 16, 16), seed=i)
        write_image(folder / f"case_{i}.nrrd", image, oblique_geometry(image.shape))
    (folder / "notes.txt").write_text("not an image")
    seen = []
    records = predict_dataset(tiny_net(3), folder, Preprocessor(), (8, 16, 16), "3d",
                              out_dir=tmp_path / "pred", names={1: "organ"},
                              callback=seen.append, progress=False)
    assert [r["case"] for r in records] == ["case_0", "case_1"] and seen == records
    for record in records:
        assert set(record) >= {"case", "outputs", "metrics"}
        for key in ("label", "segmentation"):
            assert (tmp_path / "pred" / f"{record['case']}{'.nrrd' if key == 'label' else '.seg.nrrd'}"
                    ).samefile(record["outputs"][key])
    assert not list((tmp_path / "pred").glob(".*"))  # no temporary files left behind


def test_bad_inputs_raise_clear_errors(tmp_path, phantom_file):
    path, _ = phantom_file
    net = tiny_net(3)
    with pytest.raises(ConfigError, match="roi_size"):
        sliding_window_probs(net, torch.zeros(1, 1, 8, 8, 8), (8, 8), mode="3d")
    with pytest.raises(ConfigError, match="mode"):
        sliding_window_probs(net, torch.zeros(1, 1, 8, 8, 8), (8, 8, 8), mode="4d")
    with pytest.raises(DataError, match="shape"):
        sliding_window_probs(net, torch.zeros(2, 1, 8, 8, 8), (8, 8, 8))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(empty)
    with pytest.raises(DataError, match="missing.nrrd"):
        list_images([path, tmp_path / "missing.nrrd"])
    with pytest.raises(DataError, match="phantom_001"):
        predict_dataset(net, [path, path], Preprocessor(), (8, 8, 8), progress=False,
                        out_dir=tmp_path / "o")


@pytest.mark.parametrize("dims", [2, 3])
def test_mirrored_ensemble_averages_the_flipped_predictions(dims):
    """Test-time mirroring: the mean softmax over all 2^d flips (each flipped back), so the result
    is flip-equivariant, which the plain network is not."""
    from QGSegmentationLib.segmenter import MirroredEnsemble

    net = tiny_net(dims).eval()
    x = torch.randn((1, 1) + (16,) * dims)
    with torch.no_grad():
        mirrored = MirroredEnsemble(net)
        probs = torch.exp(mirrored(x))
        axes_sets = [()] + [(a,) for a in range(2, 2 + dims)] + [(a, b) for a in range(2, 2 + dims)
                                                                 for b in range(a + 1, 2 + dims)]
        if dims == 3:
            axes_sets.append((2, 3, 4))
        by_hand = sum(torch.flip(torch.softmax(net(torch.flip(x, ax) if ax else x), 1), ax) if ax
                      else torch.softmax(net(x), 1) for ax in axes_sets) / len(axes_sets)
        assert len(axes_sets) == 2 ** dims
        assert torch.allclose(probs, by_hand, atol=1e-5)
        flipped = torch.flip(x, (2,))
        assert torch.allclose(torch.exp(mirrored(flipped)), torch.flip(probs, (2,)), atol=1e-5)
        plain = torch.softmax(net(x), 1)
        assert not torch.allclose(torch.softmax(net(flipped), 1), torch.flip(plain, (2,)), atol=1e-3)


def test_predict_dataset_refuses_outputs_that_are_inputs_or_a_file_as_folder(tmp_path):
    """Checked before the first case: predicting a folder of .nrrd images into itself would replace
    every image with its label map; a file where the output folder should be fails at once."""
    folder = tmp_path / "images"
    folder.mkdir()
    image, _ = make_phantom_case((8, 16, 16), seed=0)
    path = write_image(folder / "case_0.nrrd", image, oblique_geometry(image.shape))
    before = path.read_bytes()
    net = tiny_net(3)
    with pytest.raises(DataError, match="case_0.nrrd: writing this output would overwrite the input image"):
        predict_dataset(net, folder, Preprocessor(), (8, 16, 16), out_dir=folder, progress=False)
    link = tmp_path / "link"
    link.symlink_to(folder)  # another spelling of the same folder
    with pytest.raises(DataError, match="overwrite the input image"):
        predict_dataset(net, [path], Preprocessor(), (8, 16, 16), out_dir=link, progress=False)
    assert path.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["case_0.nrrd"]
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(DataError, match="taken: the output folder is an existing file"):
        predict_dataset(net, folder, Preprocessor(), (8, 16, 16), out_dir=taken, progress=False)
