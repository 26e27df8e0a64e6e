"""Geometry-exact reading and writing of images, label maps and Slicer segmentation files.

Every read validates what the rest of the package assumes (a 3D single-component scalar volume,
finite intensities, integer labels within the declared classes) and turns each violation into a
`DataError` naming the file and the problem. Every write is atomic and keeps the exact geometry.

Arrays are in numpy order (z, y, x); `Geometry` keeps SimpleITK's (x, y, z) order.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..fileio import atomic_path

#: File name endings read and written, longest first so `.seg.nrrd` wins over `.nrrd`.
IMAGE_EXTENSIONS = (".nii.gz", ".nrrd", ".nii", ".mha", ".mhd")
SEGMENTATION_EXTENSION = ".seg.nrrd"
LABEL_EXTENSIONS = (SEGMENTATION_EXTENSION,) + IMAGE_EXTENSIONS
#: Written formats: single-file only (a .mhd header would point at a temporary data file name).
WRITE_EXTENSIONS = (".nii.gz", ".nrrd", ".nii", ".mha")
MAX_LABEL_VALUE = 255  # labels are stored as uint8


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a volume in SimpleITK conventions: size/spacing/origin in (x, y, z) order,
    direction as the row-major 3x3 direction-cosine matrix flattened to 9 numbers."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if not (len(self.size) == len(self.spacing) == len(self.origin) == 3 and len(self.direction) == 9):
            raise ValueError(f"Geometry needs 3 sizes/spacings/origins and 9 direction values, got {self}")

    @classmethod
    def from_sitk(cls, image_or_reader) -> "Geometry":
        """Geometry of a `sitk.Image` or of a `sitk.ImageFileReader` after `ReadImageInformation`."""
        return cls(tuple(image_or_reader.GetSize()), tuple(image_or_reader.GetSpacing()),
                   tuple(image_or_reader.GetOrigin()), tuple(image_or_reader.GetDirection()))

    @classmethod
    def identity(cls, shape_zyx: Sequence[int]) -> "Geometry":
        """Unit spacing, zero origin, identity direction for an array of numpy shape (z, y, x)."""
        return cls(tuple(int(s) for s in reversed(tuple(shape_zyx))), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))

    @property
    def shape(self) -> tuple:
        """Numpy shape (z, y, x) of a volume on this grid."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def apply(self, image):
        """Stamp spacing, origin and direction onto a `sitk.Image` of the same size; returns it."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {tuple(image.GetSize())} does not match geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def index_to_physical(self, index_xyz: Sequence[float]) -> np.ndarray:
        """Physical (x, y, z) position of a continuous voxel index given in (x, y, z) order."""
        scaled = np.asarray(index_xyz, dtype=np.float64) * np.asarray(self.spacing)
        return np.asarray(self.origin) + self.direction_matrix @ scaled

    def differences(self, other: "Geometry", tol: float = 1e-4) -> list:
        """Human-readable list of what differs; spacing/origin tolerance is `tol` times the
        largest voxel spacing, direction tolerance is `tol` absolute.

        NIfTI stores spacing and origin as float32: an origin far from zero (-1523.3 mm) is
        rounded by more than `tol` x a fine spacing, so each origin coordinate may also differ by
        FLOAT32_ORIGIN_EPS times its magnitude (a few float32 roundings) and still match the
        same grid written to NRRD. Values are printed with enough digits to show the difference."""
        problems = []
        if self.size != other.size:
            problems.append(f"size {_fmt(self.size)} vs {_fmt(other.size)}")
        scale = tol * max(max(self.spacing), max(other.spacing), 1e-12)
        if not np.allclose(self.spacing, other.spacing, rtol=0, atol=scale):
            problems.append("spacing " + _fmt_pair(self.spacing, other.spacing))
        magnitude = np.maximum(np.abs(self.origin), np.abs(other.origin))
        origin_tol = np.maximum(scale, FLOAT32_ORIGIN_EPS * magnitude)
        if not np.all(np.abs(np.subtract(self.origin, other.origin)) <= origin_tol):
            problems.append("origin " + _fmt_pair(self.origin, other.origin))
        if not np.allclose(self.direction, other.direction, rtol=0, atol=tol):
            problems.append("direction " + _fmt_pair(self.direction, other.direction))
        return problems

    def almost_equal(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return not self.differences(other, tol)

    def describe(self) -> str:
        return (f"size {_fmt(self.size)} (x,y,z), spacing {_fmt(self.spacing)} mm, "
                f"origin {_fmt(self.origin)} mm, direction {_fmt(self.direction)}")

    def to_dict(self) -> dict:
        """Plain lists, for JSON files and `torch.load(weights_only=True)` checkpoints."""
        return {"size": list(self.size), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Geometry":
        return cls(data["size"], data["spacing"], data["origin"], data["direction"])


#: Relative origin tolerance for float32 storage (NIfTI): 4 float32 epsilons, i.e. a few roundings.
FLOAT32_ORIGIN_EPS = 4 * float(np.finfo(np.float32).eps)


def _fmt(values, digits: int = 6) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in values) + ")"


def _fmt_pair(first, second) -> str:
    """'(a, b, c) vs (d, e, f)' with the fewest significant digits (at least 6) at which every
    differing value prints differently, so a message never shows two identical tuples."""
    for digits in range(6, 18):
        if all(f"{a:.{digits}g}" != f"{b:.{digits}g}" for a, b in zip(first, second) if a != b):
            break
    return f"{_fmt(first, digits)} vs {_fmt(second, digits)}"


def file_extension(path: str | os.PathLike) -> str:
    """The recognised extension of `path` (lower case, e.g. '.nii.gz', '.seg.nrrd') or ''."""
    name = Path(path).name.lower()
    for ext in LABEL_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return ""


def case_id_from_path(path: str | os.PathLike) -> str:
    """File name without its recognised extension: 'imagesTr/la_003.nii.gz' -> 'la_003'."""
    name = Path(path).name
    ext = file_extension(path)
    return name[: len(name) - len(ext)] if ext else Path(path).stem


#: Where a folder of label maps (predictions, masks of another tool) is searched for one case's
#: file, in this order: qgseg writes `<case>.nrrd` (beside a `<case>.seg.nrrd` for Slicer); other
#: tools (nnU-Net, MONAI) write NIfTI; a Slicer-exported `.seg.nrrd` alone is taken last.
CASE_FILE_SEARCH_ORDER = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd", SEGMENTATION_EXTENSION)


#: nnU-Net names input channel c of case X `X_000c`, and its segmentation of them `X`.
NNUNET_CHANNEL_SUFFIX = "_0000"


def find_case_file(folder: str | os.PathLike, case_id: str) -> Optional[Path]:
    """`<folder>/<case_id><ext>` for the first extension of CASE_FILE_SEARCH_ORDER that exists;
    without one, the same search under the case's other nnU-Net name: `X` for an image id
    `X_0000` (nnU-Net's segmentation of it), `X_0000` for `X` (qgseg's output for nnU-Net's image).
    Two label maps of one case in different formats (`X.nrrd` and `X.nii.gz`, left by two runs)
    are a DataError: which one is meant cannot be guessed. The `.seg.nrrd` that `qgseg predict`
    writes beside each label map is the same segmentation and is used only when it is alone."""
    folder = Path(folder)
    suffix = NNUNET_CHANNEL_SUFFIX
    names = [case_id, case_id[: -len(suffix)] if case_id.endswith(suffix) else case_id + suffix]
    for name in names:
        found = [folder / f"{name}{ext}" for ext in CASE_FILE_SEARCH_ORDER if (folder / f"{name}{ext}").is_file()]
        plain = [path for path in found if not path.name.endswith(SEGMENTATION_EXTENSION)]
        if len(plain) > 1:
            raise DataError(f"{folder}: case {case_id!r} has {len(plain)} files: "
                            f"{', '.join(path.name for path in plain)}; which one is meant cannot be told",
                            hint="move the ones not meant out of the folder")
        if found:
            return found[0]
    return None


def case_file_pattern(case_id: str = "<case>") -> str:
    """How error messages name the files `find_case_file` looks for: '<case>.nrrd (or .nii.gz, ...)'."""
    return f"{case_id}{CASE_FILE_SEARCH_ORDER[0]} (or {', '.join(CASE_FILE_SEARCH_ORDER[1:])})"


def _check_extension(path: Path, allowed: Sequence[str], what: str) -> None:
    ext = file_extension(path)
    if ext not in allowed:
        raise DataError(f"{path}: unsupported file type for {what} "
                        f"(supported: {', '.join(allowed)})")


def _reader(path: Path, what: str):
    """A SimpleITK reader with the header read and checked: 3D, one scalar component."""
    import SimpleITK as sitk

    if not path.exists():
        raise DataError(f"{path}: {what} file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: {what} path is not a file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read {what} file, it is corrupt or not a valid "
                        f"{file_extension(path) or 'image'} file{_itk_reason(exc, path)}") from None
    dimension = reader.GetDimension()
    components = reader.GetNumberOfComponents()
    if dimension == 2:
        raise DataError(f"{path}: {what} is a 2D image (size {_fmt(reader.GetSize())}); "
                        "only 3D volumes are supported for now",
                        hint="stack 2D slices into a 3D volume before training")
    if dimension != 3:
        raise DataError(f"{path}: {what} is a {dimension}D image (size {_fmt(reader.GetSize())}); "
                        "only 3D single-channel volumes are supported",
                        hint="split multi-channel or time-series data into separate 3D volumes")
    if components != 1 and file_extension(path) == SEGMENTATION_EXTENSION:
        raise DataError(f"{path}: segmentation has {components} layers (overlapping segments); "
                        "only single-layer .seg.nrrd files are supported",
                        hint="in Slicer, export the segmentation to a labelmap volume and save that")
    if components != 1:
        raise DataError(f"{path}: {what} has {components} components per voxel (vector/colour "
                        "image); only single-component scalar volumes are supported")
    return reader


#: The errno text ITK appends to read failures of files that exist (a stale errno, e.g. of a
#: truncated .mha): it would tell the user the file is missing, so it is left out.
_STALE_ITK_REASON = "Reason: No such file or directory"


def _itk_reason(exc: Exception, path: Path | None = None) -> str:
    """' (<informative last line of an ITK exception message>)', or '' when that line is the
    misleading 'No such file or directory' of a file that exists."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    if reason == _STALE_ITK_REASON and path is not None and Path(path).exists():
        return ""
    return f" ({reason})"


def _execute(reader, path: Path, what: str):
    """Decode the voxels, after checking that a NIfTI file holds all of them (ITK's NIfTI reader
    fills the missing part of a truncated file with zeros instead of failing, and so does the
    MetaImage reader of SimpleITK 2.3, which Slicer 5.8 ships)."""
    check_nifti_complete(path, what)
    check_metaimage_complete(path, what)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read {what} voxel data, the file is corrupt or "
                        f"truncated{_itk_reason(exc, path)}") from None


# The NIfTI header fields the completeness check reads, told apart by sizeof_hdr (the first int32):
# NIfTI-1 (348): dim int16[8] at 40, bitpix int16 at 72, vox_offset float32 at 108;
# NIfTI-2 (540): bitpix int16 at 14, dim int64[8] at 16, vox_offset int64 at 168.
_NIFTI1_SIZE, _NIFTI2_SIZE = 348, 540
_GZIP_CHUNK = 1 << 20  # bytes decompressed at a time when counting a .nii.gz's payload


def _nifti_expected_bytes(header: bytes) -> Optional[int]:
    """vox_offset + voxels x bytes per voxel from a NIfTI-1 or -2 header (either byte order);
    None when the header is not one this check understands (ITK then has the last word)."""
    for endian in "<>":
        if len(header) >= 4 and struct.unpack(endian + "i", header[:4])[0] == _NIFTI1_SIZE:
            if len(header) < _NIFTI1_SIZE:
                return None
            dim = struct.unpack_from(endian + "8h", header, 40)
            bitpix = struct.unpack_from(endian + "h", header, 72)[0]
            offset = struct.unpack_from(endian + "f", header, 108)[0]
            break
        if len(header) >= 4 and struct.unpack(endian + "i", header[:4])[0] == _NIFTI2_SIZE:
            if len(header) < _NIFTI2_SIZE:
                return None
            bitpix = struct.unpack_from(endian + "h", header, 14)[0]
            dim = struct.unpack_from(endian + "8q", header, 16)
            offset = struct.unpack_from(endian + "q", header, 168)[0]
            break
    else:
        return None
    n_dims = dim[0]
    if not 1 <= n_dims <= 7 or bitpix <= 0 or not offset >= 0:
        return None
    extents = dim[1:n_dims + 1]
    if any(d <= 0 for d in extents):
        return None
    return int(offset) + (int(np.prod(extents, dtype=np.int64)) * int(bitpix) + 7) // 8


def _truncated(path: Path, what: str, have: int, expected: int) -> DataError:
    return DataError(f"{path}: {what} file is truncated: {have} of {expected} bytes "
                     "(header and voxel data) are present",
                     hint="copy or download the file again; the missing voxels would read as zeros")


def _gzip_trailer_size(path: Path) -> Optional[int]:
    """The uncompressed size (mod 2^32) a gzip file's last member records in its last 4 bytes.
    A file cut short ends inside its compressed data instead, where these bytes match the expected
    size by chance only (about 1 in 4e9); a mismatch (or a file of several gzip members) is
    settled by counting the decompressed bytes."""
    try:
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            return struct.unpack("<I", handle.read(4))[0]
    except OSError:
        return None


def check_nifti_complete(path: str | os.PathLike, what: str = "image") -> None:
    """DataError when a .nii / .nii.gz file holds fewer bytes than its header declares.

    `.nii`: the file size against vox_offset + voxels x bytes per voxel. `.nii.gz`: the size the
    gzip trailer records, and where that does not match, the payload decompressed in chunks and
    counted (nothing is kept; a stream that ends early, or a broken one, is truncated or
    corrupt). Other formats are left to ITK, whose readers fail on them."""
    import gzip
    import zlib

    path = Path(path)
    ext = file_extension(path)
    if ext == ".nii":
        with open(path, "rb") as handle:
            expected = _nifti_expected_bytes(handle.read(_NIFTI2_SIZE))
        size = path.stat().st_size
        if expected is not None and size < expected:
            raise _truncated(path, what, size, expected)
    elif ext == ".nii.gz":
        count = 0
        try:
            with gzip.open(path, "rb") as stream:
                header = stream.read(_NIFTI2_SIZE)
                count = len(header)
                expected = _nifti_expected_bytes(header)
                if expected is None or _gzip_trailer_size(path) == expected % (1 << 32):
                    return  # the stream's own record of its length: a whole file (the usual case)
                while count < expected:
                    chunk = stream.read(min(_GZIP_CHUNK, expected - count))
                    if not chunk:
                        break
                    count += len(chunk)
        except EOFError:
            raise _truncated(path, what, count, expected) from None
        except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{path}: cannot read {what} file, the compressed data is corrupt "
                            f"({exc})") from None
        if count < expected:
            raise _truncated(path, what, count, expected)


# Bytes per component of MetaImage element types (MetaIO's MET_ValueTypeSize); others are not checked.
_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_MET_HEADER_LIMIT = 1 << 16  # a MetaImage header is text lines, far shorter than this


def _metaimage_header(path: Path) -> tuple:
    """({key: value} of a MetaImage header up to ElementDataFile, byte offset of the data after it);
    ({}, 0) when the file does not start like one."""
    with open(path, "rb") as handle:
        head = handle.read(_MET_HEADER_LIMIT)
    fields, offset = {}, 0
    for raw in head.splitlines(keepends=True):
        offset += len(raw)
        key, equals, value = raw.decode("latin-1").partition("=")
        if not equals:
            return {}, 0
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, offset
    return {}, 0


def _metaimage_payload_bytes(fields: Mapping[str, str]) -> Optional[int]:
    """Bytes the header says its voxel data holds (compressed: CompressedDataSize); None when the
    header is one this check does not understand (ITK then has the last word)."""
    if fields.get("HeaderSize", "0") not in ("0", ""):
        return None
    if fields.get("CompressedData", "False").lower() == "true":
        size = fields.get("CompressedDataSize")
        return int(size) if size and size.isdigit() else None
    element = _MET_SIZES.get(fields.get("ElementType", ""))
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return None
    if element is None or not dims or min(dims) < 1:
        return None
    return int(np.prod(dims, dtype=np.int64)) * channels * element


def check_metaimage_complete(path: str | os.PathLike, what: str = "image") -> None:
    """DataError when a .mha (or the data file of a .mhd) holds fewer bytes than its header
    declares. SimpleITK 2.3's MetaImage reader only prints a warning for such a file and returns
    it with the missing voxels unset; later versions raise."""
    path = Path(path)
    ext = file_extension(path)
    if ext not in (".mha", ".mhd"):
        return
    fields, offset = _metaimage_header(path)
    payload = _metaimage_payload_bytes(fields)
    data_file = fields.get("ElementDataFile", "")
    if payload is None:
        return
    if data_file == "LOCAL":
        have, expected, where = path.stat().st_size, offset + payload, path
    elif ext == ".mhd" and data_file and " " not in data_file and (path.parent / data_file).is_file():
        where = path.parent / data_file
        have, expected = where.stat().st_size, payload
    else:
        return  # a list or pattern of data files, or a missing one (ITK reports that)
    if have < expected:
        raise _truncated(where, what, have, expected)


def _positive_spacing(geometry: Geometry) -> Geometry:
    """The same grid with every spacing positive: a negative spacing (NIfTI pixdim < 0) becomes
    its magnitude with that axis's direction column negated, as ITK's full read reports it."""
    if all(s >= 0 for s in geometry.spacing):
        return geometry
    direction = list(geometry.direction)
    for axis, step in enumerate(geometry.spacing):
        if step < 0:
            for row in range(3):
                direction[3 * row + axis] = -direction[3 * row + axis]
    return Geometry(geometry.size, tuple(abs(s) for s in geometry.spacing), geometry.origin,
                    tuple(direction))


def read_geometry(path: str | os.PathLike, what: str = "image") -> Geometry:
    """Header-only read: the geometry of a 3D scalar volume, without decoding voxels.

    Normalised like a full read (`read_image`): ITK's header-only NIfTI read reports a negative
    pixdim as a negative spacing, the full read as a flipped direction."""
    path = Path(path)
    _check_extension(path, LABEL_EXTENSIONS, what)
    return _positive_spacing(Geometry.from_sitk(_reader(path, what)))


def _image_reader(path: Path):
    """A reader of an intensity volume with its header read and checked (type, 3D scalar, real)."""
    import SimpleITK as sitk

    if file_extension(path) == SEGMENTATION_EXTENSION:
        raise DataError(f"{path}: is a Slicer segmentation (.seg.nrrd), not an intensity image")
    _check_extension(path, IMAGE_EXTENSIONS, "an image")
    reader = _reader(path, "image")
    if "complex" in sitk.GetPixelIDValueAsString(reader.GetPixelID()):
        raise DataError(f"{path}: image has complex voxels; only real-valued volumes are supported")
    return reader


def check_image_file(path: str | os.PathLike) -> Geometry:
    """What `read_image` checks without decoding the voxels (header, type, a NIfTI or MetaImage
    cut short): a batch job checks every input this way before it writes anything."""
    path = Path(path)
    reader = _image_reader(path)
    check_nifti_complete(path, "image")
    check_metaimage_complete(path, "image")
    return _positive_spacing(Geometry.from_sitk(reader))


def read_image(path: str | os.PathLike) -> tuple:
    """Read an intensity volume: (float32 array (z, y, x), Geometry). Rejects NaN/Inf."""
    import SimpleITK as sitk

    path = Path(path)
    image = _execute(_image_reader(path), path, "image")
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        n_bad = int(array.size - np.isfinite(array).sum())
        raise DataError(f"{path}: image contains {n_bad} NaN or infinite voxel values")
    return array, Geometry.from_sitk(image)


def read_label(path: str | os.PathLike, allowed_labels: Iterable[int] | None = None) -> tuple:
    """Read a label map (.nrrd/.nii[.gz]/.mha/.mhd or single-layer Slicer .seg.nrrd whose voxel
    values are the labels): (uint8 array (z, y, x), Geometry).

    Values must be integers in 0..255 and, when `allowed_labels` is given, among them."""
    import SimpleITK as sitk

    path = Path(path)
    _check_extension(path, LABEL_EXTENSIONS, "a label map")
    reader = _reader(path, "label")
    image = _execute(reader, path, "label")
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all():
            raise DataError(f"{path}: label map contains NaN or infinite values")
        fractional = array != np.round(array)
        if fractional.any():
            example = array[fractional].flat[0]  # str(): shortest round-trip form, 1.000001 not "1"
            raise DataError(f"{path}: label map has non-integer values (e.g. {example!s}); "
                            "labels must be whole numbers 0..n_classes-1",
                            hint="this looks like an intensity image or a probability map, "
                                 "not a label map")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high > MAX_LABEL_VALUE:
        raise DataError(f"{path}: label values must lie in 0..{MAX_LABEL_VALUE}, "
                        f"found range {low:g}..{high:g}")
    labels = array.astype(np.uint8, copy=False)
    if allowed_labels is not None:
        allowed = {int(v) for v in allowed_labels}
        present = present_labels(labels)
        unknown = sorted(set(present) - allowed)
        if unknown:
            raise DataError(f"{path}: label values {unknown} are not declared in dataset.json "
                            f"labels (declared: {sorted(allowed)})")
    return labels, Geometry.from_sitk(image)


def present_labels(labels: np.ndarray) -> list:
    """Sorted label values occurring in a uint8 label array (bincount: faster than np.unique)."""
    counts = np.bincount(labels.ravel(), minlength=1)
    return [int(v) for v in np.flatnonzero(counts)]


def check_same_geometry(image_geom: Geometry, label_geom: Geometry, image_path="image",
                        label_path="label", tol: float = 1e-4, roles: Sequence[str] = ("image", "label"),
                        hint: str | None = None) -> None:
    """Raise a DataError describing how the label's voxel grid differs from the image's.

    `roles` names the two files in the message (default an image and its label; e.g. a
    reference and a prediction); the message starts with the second file, the one to fix."""
    problems = image_geom.differences(label_geom, tol)
    if problems:
        grid, fitted = roles
        raise DataError(f"{label_path}: {fitted} geometry does not match {grid} {image_path}: "
                        + "; ".join(f"{p} ({grid} vs {fitted})" for p in problems),
                        hint=hint or f"resample the {fitted} onto the {grid} grid, e.g. with Slicer's "
                                     "'Resample Scalar/Vector/DWI Volume' using nearest neighbour")


def _label_image(array: np.ndarray, geometry: Geometry, path: Path):
    """Validated uint8 sitk.Image of a label array placed on `geometry`."""
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.shape != geometry.shape:
        raise DataError(f"{path}: label array shape {array.shape} (z,y,x) does not match the "
                        f"geometry {geometry.shape} (z,y,x)")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"{path}: label array must hold integers, got dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() > MAX_LABEL_VALUE):
            raise DataError(f"{path}: label values must lie in 0..{MAX_LABEL_VALUE}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    return geometry.apply(image)


def _write_atomic(image, path: Path) -> Path:
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as exc:
            raise DataError(f"{path}: cannot write file{_itk_reason(exc)}") from None
    return path


def write_label(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Atomically write a uint8 label map (z, y, x) with exact geometry (.nrrd/.nii[.gz]/.mha)."""
    path = Path(path)
    if file_extension(path) == SEGMENTATION_EXTENSION:
        raise DataError(f"{path}: use write_segmentation for Slicer .seg.nrrd files")
    _check_extension(path, WRITE_EXTENSIONS, "writing a label map")
    return _write_atomic(_label_image(array, geometry, path), path)


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Atomically write a float32 scalar volume (z, y, x) with exact geometry."""
    import SimpleITK as sitk

    path = Path(path)
    _check_extension(path, WRITE_EXTENSIONS, "writing an image")
    array = np.asarray(array, dtype=np.float32)
    if array.shape != geometry.shape:
        raise DataError(f"{path}: image array shape {array.shape} does not match the geometry "
                        f"{geometry.shape} (z,y,x)")
    return _write_atomic(geometry.apply(sitk.GetImageFromArray(array)), path)


# Slicer's GenericAnatomyColors for the first labels, used when no colour is given.
DEFAULT_SEGMENT_COLORS = (
    (0.501961, 0.682353, 0.501961), (0.945098, 0.839216, 0.568627), (0.694118, 0.478431, 0.396078),
    (0.435294, 0.721569, 0.823529), (0.847059, 0.396078, 0.309804), (0.866667, 0.509804, 0.396078),
    (0.564706, 0.933333, 0.564706), (0.752941, 0.407843, 0.345098), (0.862745, 0.960784, 0.078431),
    (0.305882, 0.247059, 0.000000),
)


def _segment_extent(bbox) -> str:
    """Slicer extent 'xmin xmax ymin ymax zmin zmax' of a (z, y, x) slice tuple; empty: 0 -1 ..."""
    if bbox is None:
        return "0 -1 0 -1 0 -1"
    z, y, x = bbox
    return f"{x.start} {x.stop - 1} {y.start} {y.stop - 1} {z.start} {z.stop - 1}"


def _clean_header_text(text: str) -> str:
    return " ".join(str(text).split())


def _normalise_color(color, path: Path, value: int) -> tuple:
    rgb = tuple(float(c) for c in color)
    if len(rgb) != 3:
        raise DataError(f"{path}: colour of segment {value} must have 3 components, got {rgb}")
    if max(rgb) > 1.0:  # given as 0..255
        rgb = tuple(c / 255.0 for c in rgb)
    return rgb


def segmentation_metadata(array: np.ndarray, names: Mapping[int, str],
                          colors: Mapping[int, Sequence[float]] | None = None,
                          path: Path = Path("segmentation")) -> dict:
    """The Slicer segmentation NRRD header fields for a single-layer label map.

    One segment per named non-zero label (and per unnamed non-zero value present in `array`,
    auto-named 'Segment_<value>'); segment extents are the voxel bounding boxes."""
    from scipy import ndimage

    array = np.asarray(array, dtype=np.uint8)
    values = sorted({int(v) for v in names if int(v) != 0} | set(present_labels(array)) - {0})
    boxes = ndimage.find_objects(array) if values else []
    meta = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, value in enumerate(values):
        named = value in names or str(value) in names
        name = names.get(value, names.get(str(value))) if named else f"Segment_{value}"
        given = colors is not None and value in colors
        color = (_normalise_color(colors[value], path, value) if given
                 else DEFAULT_SEGMENT_COLORS[(value - 1) % len(DEFAULT_SEGMENT_COLORS)])
        bbox = boxes[value - 1] if value - 1 < len(boxes) else None
        prefix = f"Segment{index}_"
        meta.update({
            prefix + "ID": f"Segment_{value}",
            prefix + "Name": _clean_header_text(name),
            prefix + "NameAutoGenerated": "0" if named else "1",
            prefix + "Color": " ".join(f"{c:.6f}" for c in color),
            prefix + "ColorAutoGenerated": "0" if given else "1",
            prefix + "LabelValue": str(value),
            prefix + "Layer": "0",
            prefix + "Extent": _segment_extent(bbox),
            prefix + "Tags": "Segmentation.Status:inprogress|",
        })
    return meta


def write_segmentation(path: str | os.PathLike, array: np.ndarray, geometry: Geometry,
                       names: Mapping[int, str], colors: Mapping[int, Sequence[float]] | None = None
                       ) -> Path:
    """Atomically write a Slicer-loadable `.seg.nrrd`: a uint8 label map whose header carries
    the segment names, colours, label values and extents (single layer, binary labelmap)."""
    path = Path(path)
    if file_extension(path) != SEGMENTATION_EXTENSION:
        raise DataError(f"{path}: a Slicer segmentation file name must end with .seg.nrrd")
    image = _label_image(array, geometry, path)
    for key, value in segmentation_metadata(array, names, colors, path).items():
        image.SetMetaData(key, value)
    return _write_atomic(image, path)


def read_segmentation_names(path: str | os.PathLike) -> dict:
    """{label value: segment name} from a Slicer .seg.nrrd header (single layer)."""
    reader = _reader(Path(path), "segmentation")
    keys = set(reader.GetMetaDataKeys())
    names = {}
    index = 0
    while f"Segment{index}_LabelValue" in keys:
        value = int(reader.GetMetaData(f"Segment{index}_LabelValue"))
        key = f"Segment{index}_Name"
        names[value] = reader.GetMetaData(key) if key in keys else f"Segment_{value}"
        index += 1
    return names

