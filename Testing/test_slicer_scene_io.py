"""Scene I/O against real MRML (the slicer-core wheel): geometry-exact export and import, quality
attributes, segment statuses, the review table, and a scene saved and reloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)

import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402

from QGSegmentationLib.slicer import scene_io  # noqa: E402
from QGSegmentationLib.slicer.jobs import CaseEntry, create_job_folder  # noqa: E402
from QGSegmentationLib.slicer.review import ReviewRow, Thresholds  # noqa: E402

SHAPE = (6, 7, 9)  # (z, y, x)
SPACING = (0.7, 1.3, 2.5)  # (i, j, k) mm
ORIGIN_RAS = (12.5, -31.0, 47.25)
ANGLE = math.radians(30.0)


def oblique_ijk_to_ras():
    """Rotation of 30 deg about the S axis, then a tilt of 20 deg about R: every direction
    column has several non-zero components, so any sign or transpose mistake shows."""
    a, b = ANGLE, math.radians(20.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    direction = rx @ rz
    m = np.eye(4)
    m[:3, :3] = direction * np.asarray(SPACING)  # columns scaled by spacing
    m[:3, 3] = ORIGIN_RAS
    return m, direction


def _vtk_matrix(m):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def add_volume(scene, name, array, matrix, cls="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    node.SetIJKToRASMatrix(_vtk_matrix(matrix))
    scene_io._set_volume_array(node, array)
    node.CreateDefaultDisplayNodes()
    return node


def add_segmentation(scene, volume, masks):
    """A reference segmentation with one segment per (name, mask) in order."""
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} reference")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, mask in masks:
        segment = scene_io._import_binary(scene, slicer, volume, mask, seg, name)
        segment.SetName(name)
    return seg


def expected_lps(matrix):
    """By hand: LPS = diag(-1,-1,1) RAS; spacing = column norms; direction = unit columns."""
    flip = np.diag([-1.0, -1.0, 1.0])
    origin = flip @ matrix[:3, 3]
    direction = flip @ matrix[:3, :3] / np.asarray(SPACING)
    return SPACING, tuple(origin), tuple(direction.ravel())


@pytest.fixture()
def headless():
    return scene_io.HeadlessScene()


@pytest.fixture()
def masks():
    rng = np.random.default_rng(3)
    organ = np.zeros(SHAPE, np.uint8)
    organ[1:5, 2:6, 1:7] = 1
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[2:4, 0:2, 6:9] = 1  # disjoint from organ, touches an edge
    image = rng.normal(100, 20, SHAPE).astype(np.float32)
    return image, organ, lesion


def assert_geometry(itk_image, matrix):
    spacing, origin, direction = expected_lps(matrix)
    np.testing.assert_allclose(itk_image.GetSpacing(), spacing, atol=1e-5)
    np.testing.assert_allclose(itk_image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(itk_image.GetDirection(), direction, atol=1e-5)


def test_lps_geometry_matches_hand_computation():
    matrix, _ = oblique_ijk_to_ras()
    spacing, origin, direction = scene_io.lps_geometry(matrix)
    exp_spacing, exp_origin, exp_direction = expected_lps(matrix)
    np.testing.assert_allclose(spacing, exp_spacing)
    np.testing.assert_allclose(origin, (-12.5, 31.0, 47.25))
    np.testing.assert_allclose(direction, exp_direction)


def test_export_dataset_volumes_and_labels_keep_voxels_and_geometry(headless, masks, tmp_path):
    scene = headless.scene
    image, organ, lesion = masks
    matrix, _ = oblique_ijk_to_ras()
    vol_a = add_volume(scene, "CT A", image, matrix)
    seg_a = add_segmentation(scene, vol_a, [("organ", organ), ("lesion", lesion)])
    # Second case lists its segments in the other order: label values must still match names.
    vol_b = add_volume(scene, "CT B", image[::-1].copy(), matrix)
    seg_b = add_segmentation(scene, vol_b, [("lesion", lesion[::-1].copy()), ("organ", organ[::-1].copy())])
    vol_c = add_volume(scene, "CT C", image + 5, matrix)
    folder = create_job_folder(tmp_path, run_id="job")
    cases = [CaseEntry("CT_A", vol_a.GetID(), "CT A", "labeled", seg_a.GetID()),
             CaseEntry("CT_B", vol_b.GetID(), "CT B", "labeled", seg_b.GetID()),
             CaseEntry("CT_C", vol_c.GetID(), "CT C", "unlabeled")]
    done = []
    dataset_json, names = scene_io.export_dataset(scene, cases, folder, on_case=lambda *a: done.append(a))
    assert done == [(1, 3, "CT_A"), (2, 3, "CT_B"), (3, 3, "CT_C")]  # the panel's progress, case by case
    assert names == ["organ", "lesion"]
    desc = json.loads(dataset_json.read_text())
    assert desc["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert desc["training"] == [{"image": "images/CT_A.nrrd", "label": "labels/CT_A.nrrd"},
                                {"image": "images/CT_B.nrrd", "label": "labels/CT_B.nrrd"}]
    assert desc["unlabeled"] == ["images/CT_C.nrrd"]

    img = sitk.ReadImage(str(folder.image_path("CT_A")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), image)
    assert_geometry(img, matrix)
    lab = sitk.ReadImage(str(folder.label_path("CT_A")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), organ * 1 + lesion * 2)
    assert_geometry(lab, matrix)
    lab_b = sitk.GetArrayFromImage(sitk.ReadImage(str(folder.label_path("CT_B"))))
    np.testing.assert_array_equal(lab_b, organ[::-1] * 1 + lesion[::-1] * 2)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder.image_path("CT_C")))),
                                  image + 5)
    # The voxel (i, j, k) = (2, 3, 4) sits where IJK-to-RAS says, in LPS.
    ras = matrix @ np.array([2, 3, 4, 1.0])
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((2, 3, 4)),
                               (-ras[0], -ras[1], ras[2]), atol=1e-4)
    # No temporary nodes left behind.
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_export_rejects_labeled_case_without_reference_and_unknown_segment(headless, masks, tmp_path):
    scene = headless.scene
    image, organ, _ = masks
    matrix, _ = oblique_ijk_to_ras()
    vol = add_volume(scene, "CT", image, matrix)
    seg = add_segmentation(scene, vol, [("organ", organ)])
    folder = create_job_folder(tmp_path)
    with pytest.raises(scene_io.SceneIOError, match="no reference segmentation"):
        scene_io.export_dataset(scene, [CaseEntry("CT", vol.GetID(), "CT", "labeled")], folder)
    with pytest.raises(scene_io.SceneIOError, match="'organ' is not one of the labels"):
        scene_io.export_labelmap(scene, seg, vol, tmp_path / "x.nrrd", ["liver"])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    vol.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(scene_io.SceneIOError, match="harden the transform"):
        scene_io.write_volume(vol, tmp_path / "y.nrrd")


def write_itk_label(path, label, matrix, metadata=None):
    spacing, origin, direction = expected_lps(matrix)
    img = sitk.GetImageFromArray(label.astype(np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    for key, value in (metadata or {}).items():
        img.SetMetaData(key, value)
    sitk.WriteImage(img, str(path), True)


def test_import_prediction_voxels_geometry_names_and_hierarchy(headless, masks, tmp_path):
    scene = headless.scene
    image, organ, lesion = masks
    matrix, _ = oblique_ijk_to_ras()
    vol = add_volume(scene, "CT A", image, matrix)
    path = tmp_path / "CT_A.nrrd"
    write_itk_label(path, organ + 2 * lesion, matrix)
    seg = scene_io.import_prediction(scene, path, vol, segment_names=["organ", "lesion", "vessel"],
                                     case="CT_A", run_id="r1")
    assert seg.GetName() == "CT A QGSeg"
    arrays = scene_io.segment_arrays(seg, vol)
    assert list(arrays) == ["organ", "lesion", "vessel"]
    np.testing.assert_array_equal(arrays["organ"], organ)
    np.testing.assert_array_equal(arrays["lesion"], lesion)
    assert arrays["vessel"].sum() == 0  # named but not predicted: present and empty
    segmentation = seg.GetSegmentation()
    tag = scene_io.ATTR_PREFIX + "LabelValue"
    assert [scene_io.segment_tag(segmentation.GetNthSegment(i), tag) for i in range(3)] == ["1", "2", "3"]
    np.testing.assert_allclose(segmentation.GetNthSegment(0).GetColor(), scene_io.DEFAULT_COLORS[0])
    # Reference geometry is the volume's.
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == vol.GetID()
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == sh.GetItemByDataNode(vol)
    assert seg.GetAttribute(scene_io.ATTR_RUN_ID) == "r1"
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    center = scene_io.segmentation_center_ras(seg)
    assert center is not None and all(math.isfinite(c) for c in center)


def test_a_prediction_follows_its_volume_s_transform(headless, masks, tmp_path):
    """The worker segments the volume's own grid; when the volume sits under a transform
    (registered, or moved while the run went on), the segmentation follows it, and the panel jumps
    to the transformed centre, where the views show it."""
    scene = headless.scene
    image, organ, lesion = masks
    matrix, _ = oblique_ijk_to_ras()
    vol = add_volume(scene, "CT A", image, matrix)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 40.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(shift)
    vol.SetAndObserveTransformNodeID(transform.GetID())
    path = tmp_path / "CT_A.nrrd"
    write_itk_label(path, organ + 2 * lesion, matrix)
    seg = scene_io.import_prediction(scene, path, vol, segment_names=["organ", "lesion"])
    assert seg.GetTransformNodeID() == transform.GetID()
    np.testing.assert_array_equal(scene_io.segment_arrays(seg, vol)["organ"], organ)
    untransformed = scene_io.import_prediction(scene, path, add_volume(scene, "CT B", image, matrix))
    moved, still = scene_io.segmentation_center_ras(seg), scene_io.segmentation_center_ras(untransformed)
    np.testing.assert_allclose(np.subtract(moved, still), (40.0, 0.0, 0.0), atol=1e-6)


def test_import_seg_nrrd_header_names_and_grid_mismatch(headless, masks, tmp_path):
    scene = headless.scene
    image, organ, lesion = masks
    matrix, _ = oblique_ijk_to_ras()
    vol = add_volume(scene, "CT", image, matrix)
    path = tmp_path / "CT.seg.nrrd"
    write_itk_label(path, organ + 2 * lesion, matrix, {
        "Segment0_ID": "s1", "Segment0_Name": "liver", "Segment0_LabelValue": "1",
        "Segment0_Color": "1 0 0", "Segment1_ID": "s2", "Segment1_Name": "tumour",
        "Segment1_LabelValue": "2", "Segment1_Color": "0 0 1"})
    assert scene_io.read_seg_nrrd_segments(path) == {1: ("liver", (1.0, 0.0, 0.0)),
                                                      2: ("tumour", (0.0, 0.0, 1.0))}
    seg = scene_io.import_prediction(scene, path, vol)
    arrays = scene_io.segment_arrays(seg, vol)
    assert list(arrays) == ["liver", "tumour"]
    np.testing.assert_array_equal(arrays["tumour"], lesion)
    np.testing.assert_allclose(seg.GetSegmentation().GetNthSegment(1).GetColor(), (0, 0, 1))
    shifted = matrix.copy()
    shifted[:3, 3] += 1.0
    bad = tmp_path / "shifted.nrrd"
    write_itk_label(bad, organ, shifted)
    with pytest.raises(scene_io.SceneIOError, match="differs from volume"):
        scene_io.import_prediction(scene, bad, vol)


def test_import_backend_seg_nrrd_writer_output(headless, masks, tmp_path):
    """Contract with the worker: a .seg.nrrd written by data.io.write_segmentation (what
    `qgseg predict` writes) on the volume's oblique grid imports voxel for voxel."""
    io = pytest.importorskip("QGSegmentationLib.data.io")
    scene = headless.scene
    image, organ, lesion = masks
    matrix, _ = oblique_ijk_to_ras()
    vol = add_volume(scene, "CT", image, matrix)
    spacing, origin, direction = expected_lps(matrix)
    geometry = io.Geometry(size=SHAPE[::-1], spacing=spacing, origin=origin, direction=direction)
    path = tmp_path / "CT.seg.nrrd"
    io.write_segmentation(path, (organ + 2 * lesion).astype(np.uint8), geometry,
                          names={1: "liver", 2: "tumour"}, colors={1: (1.0, 0.0, 0.0), 2: (0.0, 1.0, 0.0)})
    seg = scene_io.import_prediction(scene, path, vol)
    arrays = scene_io.segment_arrays(seg, vol)
    assert list(arrays) == ["liver", "tumour"]
    np.testing.assert_array_equal(arrays["liver"], organ)
    np.testing.assert_array_equal(arrays["tumour"], lesion)
    np.testing.assert_allclose(seg.GetSegmentation().GetNthSegment(1).GetColor(), (0, 1, 0), atol=1e-3)


def test_quality_status_table_and_scene_round_trip(headless, masks, tmp_path):
    scene = headless.scene
    image, organ, lesion = masks
    matrix, _ = oblique_ijk_to_ras()
    thresholds = Thresholds(low=0.7, high=0.85)
    rows = []
    for case, scores in (("A", {"organ": 0.91, "lesion": 0.55}), ("B", {"organ": 0.88, "lesion": 0.86})):
        vol = add_volume(scene, f"CT {case}", image, matrix)
        path = tmp_path / f"{case}.nrrd"
        write_itk_label(path, organ + 2 * lesion, matrix)
        seg = scene_io.import_prediction(scene, path, vol, ["organ", "lesion"], case=case, run_id="r7")
        worst = scene_io.apply_quality(seg, scores, thresholds, run_id="r7")
        assert worst == min(scores.values())
        rows.append(ReviewRow(case=case, volume=vol.GetName(), volume_id=vol.GetID(),
                              segmentation=seg.GetName(), segmentation_id=seg.GetID(),
                              scores=scores, run_id="r7"))
    rows[0].second_opinion = {"organ": 0.93, "lesion": 0.42}  # only A's run had a second-opinion model
    seg_a = scene.GetNodeByID(rows[0].segmentation_id)
    seg_b = scene.GetNodeByID(rows[1].segmentation_id)
    assert scene_io.segment_statuses(seg_a) == {"organ": "notstarted", "lesion": "flagged"}
    assert scene_io.quality_from_attributes(seg_a) == pytest.approx({"organ": 0.91, "lesion": 0.55})
    rows[1].status, rows[1].comment = "approved", "looks right"
    scene_io.apply_review_status(seg_b, "approved", "looks right")
    assert set(scene_io.segment_statuses(seg_b).values()) == {"completed"}
    table = scene_io.write_review_table(scene, rows)
    assert scene_io.write_review_table(scene, rows) is table  # found again, not duplicated
    back = scene_io.read_review_table(table)
    assert [(r.case, r.status, r.comment, r.run_id) for r in back] == [
        ("A", "unreviewed", "", "r7"), ("B", "approved", "looks right", "r7")]
    assert back[0].scores == pytest.approx({"organ": 0.91, "lesion": 0.55})
    assert back[0].second_opinion == pytest.approx({"organ": 0.93, "lesion": 0.42}) and back[1].second_opinion == {}

    for suffix in (".mrb", ".mrml"):
        saved = scene_io.save_scene(scene, tmp_path / "saved" / f"review{suffix}")
        other = scene_io.HeadlessScene()
        scene_io.load_scene(other.scene, saved)
        table2 = scene_io.find_review_table(other.scene)
        assert table2 is not None, suffix
        rows2 = scene_io.read_review_table(table2)
        assert [(r.case, r.status, r.comment) for r in rows2] == [
            ("A", "unreviewed", ""), ("B", "approved", "looks right")]
        assert rows2[0].scores == pytest.approx(rows[0].scores)
        assert rows2[0].second_opinion == pytest.approx(rows[0].second_opinion) and rows2[0].agreement == 0.42
        seg2 = other.scene.GetNodeByID(rows2[0].segmentation_id)
        assert seg2 is not None and seg2.GetAttribute(scene_io.ATTR_QUALITY) == "0.550000"
        assert scene_io.segment_statuses(seg2)["lesion"] == "flagged"
        vol2 = other.scene.GetNodeByID(rows2[0].volume_id)
        np.testing.assert_array_equal(scene_io.segment_arrays(seg2, vol2)["organ"], organ)
        np.testing.assert_allclose(scene_io.ijk_to_ras(vol2), matrix, atol=1e-4)


def test_a_review_table_edited_by_hand_reads_back_or_names_the_bad_row(headless):
    """The review table is an ordinary table node: a status typed in the Tables module as
    "Approved " reads back as approved; one that is no status names its row, case and value."""
    scene = headless.scene
    rows = [ReviewRow(case=c, volume=f"CT {c}", volume_id="v", segmentation=f"CT {c} QGSeg",
                      segmentation_id="s", scores={"organ": 0.8}) for c in ("A", "B")]
    table = scene_io.write_review_table(scene, rows)
    columns = table.GetTable()
    status = [columns.GetColumnName(c) for c in range(columns.GetNumberOfColumns())].index("status")
    table.GetTable().SetValue(0, status, vtk.vtkVariant("Approved "))
    assert [r.status for r in scene_io.read_review_table(table)] == ["approved", "unreviewed"]
    table.GetTable().SetValue(1, status, vtk.vtkVariant("ok"))
    with pytest.raises(scene_io.SceneIOError, match=r"row 2 \(case 'B'\): status 'ok' is not one of"):
        scene_io.read_review_table(table)


def test_an_approved_result_is_exported_as_the_reference_of_a_labeled_case(headless, masks, tmp_path):
    """'Use approved as labeled': the next training's labels are the reviewed segmentation, as edited."""
    scene = headless.scene
    image, organ, lesion = masks
    matrix, _ = oblique_ijk_to_ras()
    vol = add_volume(scene, "CT A", image, matrix)
    write_itk_label(tmp_path / "A.nrrd", organ + 2 * lesion, matrix)
    result = scene_io.import_prediction(scene, tmp_path / "A.nrrd", vol, ["organ", "lesion"], case="CT_A", run_id="r1")
    edited = organ.copy()
    edited[1, 2, 1] = 0  # the reviewer's fix in the Segment Editor, before approving
    segment = result.GetSegmentation().GetSegment(result.GetSegmentation().GetSegmentIdBySegmentName("organ"))
    result.GetSegmentation().RemoveSegment(segment)
    scene_io._import_binary(scene, slicer, vol, edited, result, "organ").SetName("organ")
    scene_io.apply_review_status(result, "approved")
    folder = create_job_folder(tmp_path / "next", run_id="next")
    _, names = scene_io.export_dataset(scene, [CaseEntry("CT_A", vol.GetID(), "CT A", "labeled", result.GetID())],
                                       folder)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder.label_path("CT_A"))))
    assert sorted(names) == ["lesion", "organ"]
    np.testing.assert_array_equal(label, edited * (names.index("organ") + 1) + lesion * (names.index("lesion") + 1))
    assert not np.array_equal(edited, organ)


def test_show_only_segmentation(headless, masks, tmp_path):
    scene = headless.scene
    image, organ, _ = masks
    matrix, _ = oblique_ijk_to_ras()
    segs = []
    for name in ("a", "b"):
        vol = add_volume(scene, name, image, matrix)
        segs.append(add_segmentation(scene, vol, [("organ", organ)]))
    scene_io.show_only_segmentation(scene, segs[1])
    assert [s.GetDisplayNode().GetVisibility() for s in segs] == [0, 1]


LA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"


@pytest.mark.la
@pytest.mark.skipif(not (LA_ROOT / "dataset.json").exists(), reason="../shared/data/LA not present")
def test_la_volume_export_import_round_trip(headless, tmp_path):
    desc = json.loads((LA_ROOT / "dataset.json").read_text())
    entry = desc["training"][0]
    scene = headless.scene
    image = sitk.ReadImage(str(LA_ROOT / entry["image"]))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(LA_ROOT / entry["label"])))
    matrix = np.eye(4)
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = flip @ np.asarray(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing())
    matrix[:3, 3] = flip @ np.asarray(image.GetOrigin())
    vol = add_volume(scene, "LA", sitk.GetArrayFromImage(image), matrix)
    seg = add_segmentation(scene, vol, [("left atrium", (label == 1).astype(np.uint8))])
    folder = create_job_folder(tmp_path)
    scene_io.export_dataset(scene, [CaseEntry("LA", vol.GetID(), "LA", "labeled", seg.GetID())], folder)
    out_image = sitk.ReadImage(str(folder.image_path("LA")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out_image), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(out_image.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out_image.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder.label_path("LA")))), label)
    imported = scene_io.import_prediction(scene, folder.label_path("LA"), vol, ["left atrium"])
    np.testing.assert_array_equal(scene_io.segment_arrays(imported, vol)["left atrium"], label == 1)


def test_the_panels_plan_from_scene_volumes_equals_the_workers_from_exported_files(headless, masks, tmp_path):
    """The Advanced section's hint plans from the volume nodes; the worker plans from the files
    the job exports. Both must see the same sizes and spacings, so both choose the same."""
    from QGSegmentationLib.data.planning import make_plan, plan_for_dataset
    from QGSegmentationLib.slicer.jobs import TrainingOptions, plan_hint

    scene = headless.scene
    image, organ, lesion = masks
    matrix, _ = oblique_ijk_to_ras()
    coarse = matrix.copy()
    coarse[:3, :3] *= 2.0  # a second volume with twice the spacing
    vol_a = add_volume(scene, "CT A", image, matrix)
    vol_b = add_volume(scene, "CT B", image, coarse)
    vol_c = add_volume(scene, "CT C", image, matrix)
    seg_a = add_segmentation(scene, vol_a, [("organ", organ)])
    seg_b = add_segmentation(scene, vol_b, [("organ", organ)])
    cases = [CaseEntry("CT_A", vol_a.GetID(), "CT A", "labeled", seg_a.GetID()),
             CaseEntry("CT_B", vol_b.GetID(), "CT B", "labeled", seg_b.GetID()),
             CaseEntry("CT_C", vol_c.GetID(), "CT C", "unlabeled")]
    fingerprint = scene_io.volumes_fingerprint(scene, [vol_a.GetID(), vol_b.GetID(), "vtkMRMLScalarVolumeNode999"])
    assert fingerprint.sizes == (tuple(reversed(SHAPE)),) * 2
    np.testing.assert_allclose(fingerprint.spacings, [SPACING, tuple(2 * s for s in SPACING)])
    folder = create_job_folder(tmp_path, run_id="job")
    dataset_json, _ = scene_io.export_dataset(scene, cases, folder)
    for mode in ("3d", "2d"):
        for device in ("cpu", "cuda"):
            panel, worker = make_plan(fingerprint, mode, device), plan_for_dataset(dataset_json, mode, device)
            assert panel.patch_size == worker.patch_size
            np.testing.assert_allclose(panel.target_spacing, worker.target_spacing)
    hint = plan_hint(TrainingOptions(device="cpu"), fingerprint, gpu_available=None)
    cpu = make_plan(fingerprint, "3d", "cpu")
    assert hint.startswith("auto on the CPU: spacing") and "x".join(map(str, cpu.patch_size)) in hint
    assert "from 2 labeled volumes" in hint
    assert scene_io.volumes_fingerprint(scene, []) is None


def add_multicomponent_volume(scene, name, array, cls):
    """A volume whose voxels have array.shape[-1] components (z, y, x, c), e.g. an RGB image."""
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass(cls, name)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    values = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).reshape(-1, array.shape[-1]), deep=True)
    image.GetPointData().SetScalars(values)
    node.SetAndObserveImageData(image)
    return node


def test_cases_are_single_component_scalar_volumes(headless, masks):
    """An RGB (vector) volume is a vtkMRMLScalarVolumeNode too: listed, it failed Train."""
    scene = headless.scene
    image, organ, _ = masks
    matrix, _ = oblique_ijk_to_ras()
    ct = add_volume(scene, "CT", image, matrix)
    add_volume(scene, "reference", organ, matrix, cls="vtkMRMLLabelMapVolumeNode")
    rgb = add_multicomponent_volume(scene, "photo", np.stack([organ] * 3, axis=-1), "vtkMRMLVectorVolumeNode")
    assert rgb.IsA("vtkMRMLScalarVolumeNode") and rgb.GetImageData().GetNumberOfScalarComponents() == 3
    three = add_multicomponent_volume(scene, "three components", np.stack([image] * 3, axis=-1),
                                      "vtkMRMLScalarVolumeNode")  # a plain scalar node, all the same
    assert three.GetImageData().GetNumberOfScalarComponents() == 3
    pending = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "still loading")  # no image yet: listed
    for cls in ("vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode"):
        scene.AddNewNodeByClass(cls, f"a {cls} not loaded yet")  # never one component per voxel
    assert [n.GetName() for n in scene_io.case_volumes(scene)] == ["CT", "still loading"]
    assert scene_io.case_volumes(scene)[0] is ct and pending.GetImageData() is None


def test_a_case_is_found_by_node_id_and_name_not_in_another_scene(headless, masks):
    """Node IDs start again after the scene is closed: the run's volume ID names another volume."""
    scene = headless.scene
    image, _, _ = masks
    matrix, _ = oblique_ijk_to_ras()
    ct = add_volume(scene, "CT chest", image, matrix)
    case = CaseEntry("CT_chest", ct.GetID(), "CT chest", "unlabeled")
    assert scene_io.case_volume(scene, case) == (ct, "")
    scene.Clear(0)
    other = add_volume(scene, "MR knee", image, matrix)
    assert other.GetID() == case.volume_id  # the same ID, another volume
    node, why = scene_io.case_volume(scene, case)
    assert node is None and "'MR knee', not the run's volume 'CT chest'" in why and "Import finished run" in why
    scene.RemoveNode(other)
    node, why = scene_io.case_volume(scene, case)
    assert node is None and "is not in the scene" in why
