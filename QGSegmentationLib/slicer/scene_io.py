"""Scene <-> files for the QGSegmentation panel, without Qt and without the Slicer application.

Every function takes the MRML scene (and nodes) as arguments and uses only MRML and logic
classes (`slicer.vtkMRML*`, `slicer.vtkSlicerSegmentationsModuleLogic`), so the same code runs
inside Slicer and against the `slicer-core` wheel in tests. Never `slicer.mrmlScene`,
`slicer.app`, `slicer.modules` or `qt`.

Coordinates: MRML nodes are in RAS, ITK files in LPS. Files are written and read through
Slicer's storage nodes (`vtkMRMLVolumeArchetypeStorageNode`), which convert between the two;
`lps_geometry` gives what a file written from a node must contain (used to check).

Scene-side records of a run:
- a segmentation node per case, named "<volume> QGSeg", its reference geometry the volume,
  parented under the volume in the subject hierarchy, with attributes
  "QGSegmentation.RunId", "QGSegmentation.Case", "QGSegmentation.Quality" (worst segment) and
  "QGSegmentation.Quality.<segment>"; segments below the low threshold get status Flagged,
  approved cases Completed;
- one table node "QGSegmentation review" (case, volume, segmentation, quality per segment,
  status, comment, run id) saved with the scene.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .jobs import CaseEntry, JobFolder, write_dataset_json
from .review import STATUSES, ReviewRow, Thresholds

ATTR_PREFIX = "QGSegmentation."
ATTR_RUN_ID = ATTR_PREFIX + "RunId"
ATTR_CASE = ATTR_PREFIX + "Case"
ATTR_QUALITY = ATTR_PREFIX + "Quality"
ATTR_STATUS = ATTR_PREFIX + "ReviewStatus"
ATTR_COMMENT = ATTR_PREFIX + "Comment"
REVIEW_TABLE_NAME = "QGSegmentation review"
REVIEW_TABLE_ATTR = ATTR_PREFIX + "ReviewTable"
SEGMENTATION_SUFFIX = " QGSeg"
GEOMETRY_TOLERANCE = 1e-4

# Distinct, colour-blind-friendly segment colours (Okabe-Ito), label value 1, 2, ...
DEFAULT_COLORS: Tuple[Tuple[float, float, float], ...] = (
    (0.902, 0.624, 0.0), (0.337, 0.706, 0.914), (0.0, 0.620, 0.451), (0.941, 0.894, 0.259),
    (0.0, 0.447, 0.698), (0.835, 0.369, 0.0), (0.800, 0.475, 0.655),
)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _mrml():
    """The `slicer` module holding MRML classes (Slicer's own, or the slicer-core wheel's)."""
    import slicer  # noqa: WPS433 - deliberately lazy: the rest of this package needs no MRML

    return slicer


class SceneIOError(ValueError):
    """A node or file that cannot be exported/imported; the message names it."""


# --- geometry ------------------------------------------------------------------------------------
def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix as a numpy array."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def lps_geometry(ijk_to_ras_matrix: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """(spacing, origin, direction) that an ITK/LPS file of a volume with this IJK-to-RAS holds:
    spacing = column norms, origin = LPS of voxel (0,0,0), direction = unit columns flipped to
    LPS, row-major 9-tuple as SimpleITK's GetDirection()."""
    m = _RAS_TO_LPS @ np.asarray(ijk_to_ras_matrix, float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise SceneIOError(f"degenerate IJK-to-RAS matrix (zero spacing): {ijk_to_ras_matrix}")
    direction = m[:3, :3] / spacing
    return tuple(spacing.tolist()), tuple(m[:3, 3].tolist()), tuple(direction.ravel().tolist())


def same_geometry(node_a, node_b, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
    """True when both volume nodes have the same dimensions and IJK-to-RAS."""
    dims_a = node_a.GetImageData().GetDimensions() if node_a.GetImageData() else None
    dims_b = node_b.GetImageData().GetDimensions() if node_b.GetImageData() else None
    return dims_a == dims_b and np.allclose(ijk_to_ras(node_a), ijk_to_ras(node_b), atol=tolerance)


def volume_array(volume_node) -> np.ndarray:
    """A copy of the volume's voxels in numpy order (k, j, i) = (z, y, x)."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    if image is None:
        raise SceneIOError(f"volume {volume_node.GetName()!r} has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise SceneIOError(f"volume {volume_node.GetName()!r} has "
                           f"{image.GetNumberOfScalarComponents()} components; only scalar "
                           "volumes are supported")
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(dims[2], dims[1], dims[0]).copy()


def _check_not_transformed(node) -> None:
    if node.GetParentTransformNode() is not None:
        raise SceneIOError(
            f"{node.GetClassName()[7:]} {node.GetName()!r} is under the transform "
            f"{node.GetParentTransformNode().GetName()!r}: harden the transform (Data module, "
            "right-click > Harden transform) so the exported file has the geometry you see")


# --- volumes out --------------------------------------------------------------------------------
def write_volume(volume_node, path: str | os.PathLike) -> Path:
    """Write a scalar or label-map volume node to `path` (.nrrd/.nii.gz/.mha) through a storage
    node (RAS -> LPS handled by Slicer), atomically. The node's own storage node is untouched."""
    slicer = _mrml()
    _check_not_transformed(volume_node)
    if volume_node.GetImageData() is None:
        raise SceneIOError(f"volume {volume_node.GetName()!r} has no image data")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise SceneIOError(f"volume {volume_node.GetName()!r} is not a scalar volume")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.stem}.part{suffix}")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp))
    storage.SetUseCompression(1)
    if not storage.WriteData(volume_node):
        tmp.unlink(missing_ok=True)
        raise SceneIOError(f"could not write volume {volume_node.GetName()!r} to {path}")
    os.replace(tmp, path)
    return path


def collect_label_names(segmentation_nodes: Iterable) -> List[str]:
    """Ordered union of segment names over the reference segmentations: label value i+1 is
    names[i] in every exported label map, so one name means one label across cases."""
    names: List[str] = []
    for node in segmentation_nodes:
        segmentation = node.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            name = segmentation.GetNthSegment(index).GetName()
            if name not in names:
                names.append(name)
    return names


def volumes_fingerprint(scene, volume_ids: Iterable[str]):
    """Sizes and spacings (x, y, z) of the scene's volumes with these IDs, as a
    `data.planning.Fingerprint` (what the worker reads from their exported headers); None when
    none of them holds an image."""
    from ..data.planning import Fingerprint

    sizes, spacings = [], []
    for volume_id in volume_ids:
        node = scene.GetNodeByID(volume_id)
        image = node.GetImageData() if node is not None else None
        if image is not None:
            sizes.append(tuple(int(n) for n in image.GetDimensions()))
            spacings.append(tuple(float(s) for s in node.GetSpacing()))
    return Fingerprint(tuple(sizes), tuple(spacings)) if sizes else None


# --- cases ---------------------------------------------------------------------------------------
# Scalar volume subclasses that hold several components per voxel (vtkMRMLVectorVolumeNode, e.g.
# an RGB image, derives from vtkMRMLTensorVolumeNode) or are references, not images to segment.
_NOT_CASES = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLTensorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode")


def case_volumes(scene) -> list:
    """The scene's volumes the Cases table lists, in scene order: single-component scalar volumes.
    Label maps are references, and RGB/vector, tensor and diffusion-weighted volumes (which are
    vtkMRMLScalarVolumeNodes too) have several components per voxel, which the worker's one-channel
    networks cannot train on. A volume whose image is not loaded yet is listed."""
    volumes = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if any(node.IsA(name) for name in _NOT_CASES):
            continue
        image = node.GetImageData()
        if image is not None and image.GetNumberOfScalarComponents() != 1:
            continue
        volumes.append(node)
    return volumes


def case_volume(scene, case: CaseEntry):
    """(the volume node a job's case was exported from, "") or (None, why it is not in the scene).
    Node IDs start again when a scene is closed, so a node with the case's ID in another scene may
    be another volume: it counts only when its name is still the case's recorded volume name."""
    node = scene.GetNodeByID(case.volume_id) if case.volume_id else None
    if node is None:
        return None, (f"case {case.case}: its volume {case.volume_name!r} ({case.volume_id}) is not in the "
                      "scene; skipped")
    if case.volume_name and node.GetName() != case.volume_name:
        return None, (f"case {case.case}: node {case.volume_id} is {node.GetName()!r}, not the run's volume "
                      f"{case.volume_name!r} (another scene, or renamed); skipped. Load the scene the run "
                      "was started from and import the run folder again ('Import finished run').")
    return node, ""


def export_labelmap(scene, segmentation_node, reference_volume, path: str | os.PathLike,
                    label_names: Sequence[str]) -> Path:
    """Write `segmentation_node` as a label map on `reference_volume`'s exact grid: a segment
    named label_names[i] gets value i+1 (overlaps: later segments win, as in Slicer)."""
    slicer = _mrml()
    _check_not_transformed(segmentation_node)
    _check_not_transformed(reference_volume)
    segmentation = segmentation_node.GetSegmentation()
    ids, values = [], []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        if segment.GetName() not in label_names:
            raise SceneIOError(f"segmentation {segmentation_node.GetName()!r}: segment "
                               f"{segment.GetName()!r} is not one of the labels {list(label_names)}")
        ids.append(segmentation.GetNthSegmentID(index))
        values.append(list(label_names).index(segment.GetName()) + 1)
    if not ids:
        raise SceneIOError(f"reference segmentation {segmentation_node.GetName()!r} has no segments")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "QGSeg export (temporary)")
    try:
        id_array = _string_array(ids)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, id_array, labelmap, reference_volume,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok or labelmap.GetImageData() is None:
            raise SceneIOError(f"could not export segmentation {segmentation_node.GetName()!r} "
                               f"on the grid of {reference_volume.GetName()!r}")
        if not same_geometry(labelmap, reference_volume):
            raise SceneIOError(f"exported label map of {segmentation_node.GetName()!r} does not "
                               f"match the grid of {reference_volume.GetName()!r}")
        # Exported values are 1..len(ids) in `ids` order; map them to the dataset's label values.
        lookup = np.zeros(len(ids) + 1, np.uint8)
        lookup[1:] = values
        exported = volume_array(labelmap)
        _set_volume_array(labelmap, lookup[exported.astype(np.int64)])
        return write_volume(labelmap, path)
    finally:
        scene.RemoveNode(labelmap)


def export_dataset(scene, cases: Sequence[CaseEntry], folder: JobFolder,
                   label_names: Optional[Sequence[str]] = None,
                   on_case: Optional[Callable[[int, int, str], None]] = None) -> Tuple[Path, List[str]]:
    """Export the job's volumes (images/<case>.nrrd) and, for labeled cases, reference label
    maps (labels/<case>.nrrd), then dataset.json. Returns (dataset.json, label names).
    `on_case(k, n, case)` is called after each of the n exported cases (the panel shows progress
    and keeps Slicer responsive there: dozens of large volumes take minutes)."""
    labeled = [c for c in cases if c.role == "labeled"]
    for case in labeled:
        if not case.segmentation_id:
            raise SceneIOError(f"case {case.case!r} ({case.volume_name}) is labeled but has no "
                               "reference segmentation")
    if label_names is None:
        label_names = collect_label_names(_node(scene, c.segmentation_id, c.case) for c in labeled)
    exported = [c for c in cases if c.role != "ignore"]
    for index, case in enumerate(exported, 1):
        volume = _node(scene, case.volume_id, case.case)
        write_volume(volume, folder.image_path(case.case))
        if case.role == "labeled":
            export_labelmap(scene, _node(scene, case.segmentation_id, case.case), volume,
                            folder.label_path(case.case), label_names)
        if on_case is not None:
            on_case(index, len(exported), case.case)
    path = write_dataset_json(folder, exported, label_names)
    return path, list(label_names)


# --- predictions in ------------------------------------------------------------------------------
def read_seg_nrrd_segments(path: str | os.PathLike) -> Dict[int, Tuple[str, Tuple[float, float, float]]]:
    """{label value: (name, colour)} from a Slicer .seg.nrrd header (empty for a plain NRRD).
    Only the text header is read."""
    fields: Dict[str, str] = {}
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break  # end of header
            if ":=" in line:
                key, value = line.split(":=", 1)
                fields[key] = value
    segments: Dict[int, Tuple[str, Tuple[float, float, float]]] = {}
    index = 0
    while f"Segment{index}_ID" in fields or f"Segment{index}_Name" in fields:
        value = int(fields.get(f"Segment{index}_LabelValue", index + 1))
        name = fields.get(f"Segment{index}_Name", f"Segment_{value}")
        try:
            color = tuple(float(c) for c in fields.get(f"Segment{index}_Color", "").split())[:3]
        except ValueError:
            color = ()
        segments[value] = (name, color if len(color) == 3 else DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)])
        index += 1
    return segments


def read_labelmap_node(scene, path: str | os.PathLike, name: str):
    """Read a label map file into a new vtkMRMLLabelMapVolumeNode (LPS -> RAS by Slicer)."""
    slicer = _mrml()
    path = Path(path)
    if not path.exists():
        raise SceneIOError(f"{path}: prediction file not found")
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        raise SceneIOError(f"{path}: could not be read as a label map")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        scene.RemoveNode(node)
        raise SceneIOError(f"{path}: has several components; expected a single label map")
    return node


def import_prediction(scene, path: str | os.PathLike, reference_volume,
                      segment_names: Optional[Sequence[str]] = None,
                      colors: Optional[Sequence[Sequence[float]]] = None,
                      name: Optional[str] = None, case: str = "", run_id: str = ""):
    """Import a predicted label map (.nrrd, or a 3D .seg.nrrd) as a new segmentation node.

    The file must lie on `reference_volume`'s grid (the worker predicts on the original grid);
    label value v becomes segment segment_names[v-1] (else the .seg.nrrd's own name, else
    "Label v") with colors[v-1] (else the file's or a default colour). Every named segment
    exists, empty if nothing was predicted for it, so quality rows line up. The node is
    parented under the volume in the subject hierarchy and under the volume's transform."""
    slicer = _mrml()
    path = Path(path)
    header_segments = read_seg_nrrd_segments(path) if path.name.endswith(".seg.nrrd") else {}
    labelmap = read_labelmap_node(scene, path, f"{reference_volume.GetName()} labels (temporary)")
    try:
        if not same_geometry(labelmap, reference_volume):
            raise SceneIOError(
                f"{path}: grid {labelmap.GetImageData().GetDimensions()} / IJK-to-RAS "
                f"{ijk_to_ras(labelmap).round(4).tolist()} differs from volume "
                f"{reference_volume.GetName()!r} ({reference_volume.GetImageData().GetDimensions()})")
        values = volume_array(labelmap)
        if values.min() < 0 or not np.all(np.equal(np.mod(values, 1), 0)):
            raise SceneIOError(f"{path}: label values must be non-negative integers")
        present = sorted(int(v) for v in np.unique(values) if v > 0)
        n_labels = max([len(segment_names or ())] + present + list(header_segments) or [0])
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{reference_volume.GetName()}{SEGMENTATION_SUFFIX}")
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        segmentation = segmentation_node.GetSegmentation()
        for value in range(1, n_labels + 1):
            seg_name, color = _segment_style(value, segment_names, colors, header_segments)
            if value in present:
                segment = _import_binary(scene, slicer, labelmap, values == value,
                                         segmentation_node, f"{path} label {value}")
            else:
                segment = segmentation.GetSegment(
                    segmentation.AddEmptySegment(f"label_{value}", seg_name, list(color)))
            segment.SetName(seg_name)
            segment.SetColor(*color)
            segment.SetTag(ATTR_PREFIX + "LabelValue", str(value))  # never SetLabelValue: that
            # is the segment's value inside its shared labelmap layer, not the file's label
        if case:
            segmentation_node.SetAttribute(ATTR_CASE, case)
        if run_id:
            segmentation_node.SetAttribute(ATTR_RUN_ID, run_id)
        parent_under(scene, segmentation_node, reference_volume)
        # The worker predicted on the volume's own grid; a volume under a transform (registered,
        # moved during the run) shows its segmentation only if it follows the same transform.
        segmentation_node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        return segmentation_node
    finally:
        scene.RemoveNode(labelmap)


def _import_binary(scene, slicer, like_node, mask: np.ndarray, segmentation_node, what: str):
    """Import one binary mask (on `like_node`'s grid) as a new segment; returns the segment."""
    single = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "QGSeg label (temporary)")
    try:
        single.CopyOrientation(like_node)
        _set_volume_array(single, mask.astype(np.uint8))
        segmentation = segmentation_node.GetSegmentation()
        before = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            single, segmentation_node)
        added = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                 if segmentation.GetNthSegmentID(i) not in before]
        if not ok or len(added) != 1:
            raise SceneIOError(f"{what}: could not be imported as a segment")
        return segmentation.GetSegment(added[0])
    finally:
        scene.RemoveNode(single)


def _segment_style(value, segment_names, colors, header_segments):
    if segment_names and value <= len(segment_names):
        seg_name = segment_names[value - 1]
    elif value in header_segments:
        seg_name = header_segments[value][0]
    else:
        seg_name = f"Label {value}"
    if colors and value <= len(colors):
        color = tuple(float(c) for c in colors[value - 1])[:3]
    elif value in header_segments:
        color = header_segments[value][1]
    else:
        color = DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]
    return seg_name, color


def segment_tag(segment, key: str) -> Optional[str]:
    """A segment tag's value (None when absent); wraps VTK's by-reference GetTag."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def segment_arrays(segmentation_node, reference_volume) -> Dict[str, np.ndarray]:
    """{segment name: binary uint8 mask (z,y,x)} on the reference volume's grid."""
    slicer = _mrml()
    scene = segmentation_node.GetScene()
    out = {}
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "QGSeg read (temporary)")
        try:
            slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, _string_array([segment_id]), labelmap, reference_volume,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
            out[segmentation.GetSegment(segment_id).GetName()] = (volume_array(labelmap) > 0).astype(np.uint8)
        finally:
            scene.RemoveNode(labelmap)
    return out


# --- subject hierarchy and display ----------------------------------------------------------------
def subject_hierarchy_item(scene, node) -> int:
    """The node's subject-hierarchy item, created under the scene item if it has none yet
    (inside Slicer the SH plugins create it; headless nobody does)."""
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def parent_under(scene, child, parent) -> None:
    sh = scene.GetSubjectHierarchyNode()
    sh.SetItemParent(subject_hierarchy_item(scene, child), subject_hierarchy_item(scene, parent))


def show_only_segmentation(scene, segmentation_node) -> None:
    """Make `segmentation_node` the only visible segmentation (review: one case at a time)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        display = node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(node is segmentation_node or node.GetID() == segmentation_node.GetID())


def segmentation_center_ras(segmentation_node) -> Optional[Tuple[float, float, float]]:
    """World RAS centre of the segmentation's non-empty segments (Slicer applies the node's parent
    transform: the centre is where the views show it); None when all are empty."""
    centers = []
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        center = segmentation_node.GetSegmentCenterRAS(segmentation.GetNthSegmentID(index))
        if center is not None and all(math.isfinite(c) for c in center):
            centers.append(center)
    if not centers:
        return None
    return tuple(float(v) for v in np.mean(np.asarray(centers, float), axis=0))


# --- quality, statuses, review table -------------------------------------------------------------
def apply_quality(segmentation_node, scores: Dict[str, float], thresholds: Thresholds,
                  run_id: str = "") -> Optional[float]:
    """Store predicted quality as node attributes and flag segments below `thresholds.low`
    (others NotStarted: not reviewed yet). Returns the worst score."""
    slicer = _mrml()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        score = scores.get(segment.GetName())
        if score is None:
            continue
        segmentation_node.SetAttribute(f"{ATTR_QUALITY}.{segment.GetName()}", f"{score:.6f}")
        poor = thresholds.category(score) == "poor"
        logic.SetSegmentStatus(segment, logic.Flagged if poor else logic.NotStarted)
    worst = min(scores.values()) if scores else None
    if worst is not None:
        segmentation_node.SetAttribute(ATTR_QUALITY, f"{worst:.6f}")
    if run_id:
        segmentation_node.SetAttribute(ATTR_RUN_ID, run_id)
    return worst


def quality_from_attributes(segmentation_node) -> Dict[str, float]:
    prefix = ATTR_QUALITY + "."
    out = {}
    for name in segmentation_node.GetAttributeNames() or ():
        if name.startswith(prefix):
            out[name[len(prefix):]] = float(segmentation_node.GetAttribute(name))
    return out


def apply_review_status(segmentation_node, status: str, comment: str = "") -> None:
    """Reviewer decision -> segment statuses: approved = Completed, flagged = Flagged,
    unreviewed = back to the quality-based status."""
    slicer = _mrml()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation_node.SetAttribute(ATTR_STATUS, status)
    segmentation_node.SetAttribute(ATTR_COMMENT, comment)
    if status == "unreviewed":
        return
    target = logic.Completed if status == "approved" else logic.Flagged
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        logic.SetSegmentStatus(segmentation.GetNthSegment(index), target)


def segment_statuses(segmentation_node) -> Dict[str, str]:
    """{segment name: machine-readable status} (e.g. "flagged", "completed")."""
    slicer = _mrml()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = segmentation_node.GetSegmentation()
    out = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        out[segment.GetName()] = logic.GetSegmentStatusAsMachineReadableString(
            logic.GetSegmentStatus(segment))
    return out


_TEXT_COLUMNS = ("case", "volume", "volume_id", "segmentation", "segmentation_id")
_TAIL_COLUMNS = ("status", "comment", "run_id")
SECOND_OPINION_PREFIX = "second_opinion_"


def find_review_table(scene):
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLTableNode")
        if node.GetAttribute(REVIEW_TABLE_ATTR) == "1":
            return node
    return None


def write_review_table(scene, rows: Sequence[ReviewRow], table_node=None):
    """Write the review rows into one vtkMRMLTableNode (created if needed, found again by its
    attribute): text columns, then quality_<segment> (double) per segment, quality (worst),
    second_opinion_<segment> (double) when a row has a second opinion, status, comment, run_id.
    Returns the table node."""
    import vtk

    table_node = table_node or find_review_table(scene)
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", REVIEW_TABLE_NAME)
        table_node.SetAttribute(REVIEW_TABLE_ATTR, "1")
    segments: List[str] = []
    seconds: List[str] = []
    for row in rows:
        segments += [s for s in row.scores if s not in segments]
        seconds += [s for s in row.second_opinion if s not in seconds]
    numeric = (tuple(f"quality_{s}" for s in segments) + ("quality",)
               + tuple(f"{SECOND_OPINION_PREFIX}{s}" for s in seconds))
    table = vtk.vtkTable()
    columns = {}
    for name in _TEXT_COLUMNS + numeric + _TAIL_COLUMNS:
        array = vtk.vtkDoubleArray() if name in numeric else vtk.vtkStringArray()
        array.SetName(name)
        array.SetNumberOfValues(len(rows))
        table.AddColumn(array)
        columns[name] = array
    for i, row in enumerate(rows):
        for name in _TEXT_COLUMNS + _TAIL_COLUMNS:
            columns[name].SetValue(i, str(getattr(row, name)))
        for s in segments:
            columns[f"quality_{s}"].SetValue(i, row.scores.get(s, float("nan")))
        for s in seconds:
            columns[f"{SECOND_OPINION_PREFIX}{s}"].SetValue(i, row.second_opinion.get(s, float("nan")))
        columns["quality"].SetValue(i, float("nan") if row.quality is None else row.quality)
    table_node.SetAndObserveTable(table)
    for name in columns:
        table_node.SetColumnType(name, vtk.VTK_DOUBLE if name in numeric else vtk.VTK_STRING)
    return table_node


def read_review_table(table_node) -> List[ReviewRow]:
    """Rows back from a review table node (after a scene reload too)."""
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    missing = [c for c in _TEXT_COLUMNS + _TAIL_COLUMNS if c not in names]
    if missing:
        raise SceneIOError(f"table {table_node.GetName()!r} lacks column(s) {', '.join(missing)}")
    rows = []
    for r in range(table.GetNumberOfRows()):
        def text(column):
            return str(table.GetValueByName(r, column).ToString())

        def numbers(prefix):
            values = {n[len(prefix):]: float(table.GetValueByName(r, n).ToDouble())
                      for n in names if n.startswith(prefix)}
            return {s: v for s, v in values.items() if not math.isnan(v)}

        status = text("status").strip().lower() or "unreviewed"  # "Approved" typed in the Tables module
        if status not in STATUSES:
            raise SceneIOError(f"table {table_node.GetName()!r}, row {r + 1} (case {text('case')!r}): "
                               f"status {text('status')!r} is not one of {', '.join(STATUSES)}")
        rows.append(ReviewRow(case=text("case"), volume=text("volume"), volume_id=text("volume_id"),
                              segmentation=text("segmentation"),
                              segmentation_id=text("segmentation_id"), scores=numbers("quality_"),
                              status=status, comment=text("comment"),
                              run_id=text("run_id"), second_opinion=numbers(SECOND_OPINION_PREFIX)))
    return rows


# --- scene files ----------------------------------------------------------------------------------
def save_scene(scene, path: str | os.PathLike) -> Path:
    """Save the scene with its data: `.mrb` (one bundle) or `.mrml` (+ data files beside it)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mrb":
        if not scene.WriteToMRB(str(path)):
            raise SceneIOError(f"{path}: could not write the scene bundle")
        if not zipfile.is_zipfile(path):
            raise SceneIOError(f"{path}: the written scene bundle is not a zip file")
        return path
    if path.suffix != ".mrml":
        raise SceneIOError(f"{path}: scene files end in .mrb or .mrml")
    scene.SetRootDirectory(str(path.parent))
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLStorableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLStorableNode")
        if not node.GetSaveWithScene() or node.GetHideFromEditors() and not node.IsA("vtkMRMLTableNode"):
            continue
        storage = node.GetStorageNode()
        if storage is None:
            if not node.AddDefaultStorageNode():
                continue
            storage = node.GetStorageNode()
        file_name = storage.GetFileName()
        if not file_name:
            extension = storage.GetDefaultWriteFileExtension()
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in node.GetName())
            file_name = str(path.parent / "Data" / f"{safe}_{node.GetID()}.{extension}")
            Path(file_name).parent.mkdir(parents=True, exist_ok=True)
            storage.SetFileName(file_name)
        if not storage.WriteData(node):
            raise SceneIOError(f"{path}: could not write data of node {node.GetName()!r} to {file_name}")
    scene.SetURL(str(path))
    if not scene.Commit():
        raise SceneIOError(f"{path}: could not write the scene file")
    return path


def load_scene(scene, path: str | os.PathLike) -> None:
    """Load an .mrb or .mrml file into `scene` (replacing its content)."""
    path = Path(path)
    if not path.exists():
        raise SceneIOError(f"{path}: scene file not found")
    if path.suffix == ".mrb":
        # vtkMRMLScene.ReadFromMRB needs the application's remote-IO cache; unzipping into a
        # folder that outlives the call (nodes keep their file names) works everywhere.
        if not zipfile.is_zipfile(path):
            raise SceneIOError(f"{path}: not a scene bundle (zip)")
        folder = Path(tempfile.mkdtemp(prefix="qgseg-mrb-"))
        with zipfile.ZipFile(path) as bundle:
            bundle.extractall(folder)
        scenes = sorted(folder.rglob("*.mrml"))
        if not scenes:
            raise SceneIOError(f"{path}: the bundle holds no .mrml scene")
        path = scenes[0]
    scene.SetURL(str(path))
    ok = scene.Connect()
    if not ok:
        raise SceneIOError(f"{path}: could not load the scene")


# --- helpers --------------------------------------------------------------------------------------
def _node(scene, node_id: str, case: str):
    node = scene.GetNodeByID(node_id) if node_id else None
    if node is None:
        raise SceneIOError(f"case {case!r}: node {node_id!r} is not in the scene (deleted?)")
    return node


def _string_array(values: Sequence[str]):
    import vtk

    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def _set_volume_array(volume_node, array: np.ndarray) -> None:
    """Replace a volume node's voxels with `array` (z,y,x), keeping its IJK-to-RAS."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                           array_type=numpy_support.get_vtk_array_type(array.dtype))
    vtk_array.SetName("ImageScalars")
    image.GetPointData().SetScalars(vtk_array)
    volume_node.SetAndObserveImageData(image)


class HeadlessScene:
    """A scene with the application, segmentations and subject-hierarchy logics wired up, as
    Slicer's application does (pattern from trame-slicer's SlicerApp). For tests and scripts
    outside Slicer; inside Slicer use `slicer.mrmlScene` and the modules' logics."""

    def __init__(self):
        slicer = _mrml()
        from vtkmodules.vtkCommonCore import vtkCollection

        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.app_logic.SetSliceLogics(vtkCollection())
        self.app_logic.SetViewLogics(vtkCollection())
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations_logic.SetMRMLScene(self.scene)
        self.segmentations_logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic("Segmentations", self.segmentations_logic)
        self.subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        self.subject_hierarchy_logic.SetMRMLScene(self.scene)
        self.subject_hierarchy_logic.SetMRMLApplicationLogic(self.app_logic)
