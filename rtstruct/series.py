"""A CT or MR image series from DICOM files into an :class:`inference.volume.Volume`.

``load_series`` reads a CT or MR series from files into a :class:`Volume` and refuses,
with a :class:`VolumeError` whose message says exactly what is wrong, anything that is
not one clean, uniformly spaced stack of slices: single-frame images, or the frames of
multi-frame Enhanced CT/MR and Legacy Converted Enhanced CT/MR instances.

Multi-frame images: each instance becomes one header per frame (:func:`_frame_headers`),
with the frame's ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
SliceThickness/SpacingBetweenSlices, RescaleSlope/Intercept/Type, GantryDetectorTilt and
StackID taken from its functional groups (PS3.3 C.7.6.16: the frame's item of the
Per-frame Functional Groups Sequence, else the Shared one), so every check below applies
to frames as to single-frame slices and the frames are sorted along the normal whatever
order they are stored in. Several instances of one series holding different frames of one
stack make one volume. Refused: single-frame and multi-frame images mixed in a series, a
multi-frame image of a single-frame SOP class, NumberOfFrames that does not match the
per-frame items, and an instance with several stacks (StackID values) or several
orientations: one volume is one stack, and which one the prompts were drawn on is not
this loader's guess (the refusal names the stacks). The volume's ``frame_numbers`` say
which frame each slice is.

What is checked, in this order (each refusal names the files or UIDs, never a patient):
no CT/MR image files; several series (``series_instance_uid=`` picks one); multi-frame
images as above; missing Series,
Study, Frame of Reference or SOP Instance UIDs; mixed SOP classes, modalities, studies,
patients or frames of reference; missing ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, Rows or Columns; mixed orientations (cosines differ by more than
:data:`ORIENTATION_TOLERANCE`); mixed sizes; mixed pixel spacing (relative
:data:`PIXEL_SPACING_TOLERANCE`); GantryDetectorTilt other than 0; then, with the slices
sorted along the normal: duplicate positions; missing slices (a gap of about 2, 3, ...
times the usual spacing); non-uniform spacing and positions off the normal (tilted or
sheared stacks), both with the position tolerance described in :func:`load_series`;
a series over the input limit
(``limits.max_voxels``, :mod:`inference.limits`: Rows x Columns x frames from the headers
before a header per frame is made, then slices x rows x columns before the array is
allocated); finally pixel data that cannot be decoded (the message names the transfer syntax and
the pydicom plugins that would decode it). The same SOP Instance in two files is read
once. A single slice takes its spacing from SpacingBetweenSlices or SliceThickness
(1.0 mm with a warning when it has neither). With ``select_consistent=True`` the strays
of a series (localizers, images of another size, orientation or spacing, a second
instance at one position) are left out first, and said so (:mod:`rtstruct.selection`).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, iter_pixels
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from inference.files import files_under
from inference.geometry import Geometry
from inference.limits import InputTooLarge, input_limits
from inference.volume import Volume
from rtstruct.headers import (
    MULTI_FRAME_IMAGE_CLASSES,
    SINGLE_FRAME_IMAGE_CLASSES,
    DicomFileError,
    FileKind,
    image_modality,
    kind_of,
    read_header,
    sop_class_name,
)

__all__ = ["VolumeError", "load_series"]


class VolumeError(ValueError):
    """A series cannot be turned into a volume; the message says why."""


# ---------------------------------------------------------------------------------------
# Loading a series
# ---------------------------------------------------------------------------------------

log = logging.getLogger(__name__)

#: Default tolerance on slice positions, as a fraction of the slice spacing: every slice
#: must lie within ``spacing_tolerance * spacing`` (but at least
#: :data:`POSITION_TOLERANCE_FLOOR_MM`) of where a uniform grid along the slice normal puts
#: it, both along the normal (non-uniform spacing) and across it (gantry tilt / shear).
DEFAULT_SPACING_TOLERANCE = 0.01
#: Absolute floor of the position tolerance, for positions written as rounded decimal strings.
POSITION_TOLERANCE_FLOOR_MM = 0.01
#: Largest difference of direction cosines still counted as the same orientation (~0.006 deg).
ORIENTATION_TOLERANCE = 1e-4
#: Largest relative difference of PixelSpacing still counted as the same spacing.
PIXEL_SPACING_TOLERANCE = 1e-4
#: |GantryDetectorTilt| above this many degrees is a tilted acquisition.
GANTRY_TILT_TOLERANCE_DEG = 0.01

#: Attributes copied from the first slice into ``Volume.attributes`` (if present).
COPIED_ATTRIBUTES = (
    "SpecificCharacterSet",
    # Patient module
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDs",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    # Patient study module
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    # General study module
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "PhysiciansOfRecord",
    # General series / frame of reference / equipment of the images
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "PatientPosition",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "DeviceSerialNumber",
    "SoftwareVersions",
)
#: Type 2 attributes of the Patient and General Study modules: always present in
#: ``Volume.attributes`` ("" when the images lack them), so a writer can copy them as is.
TYPE2_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)

_GEOMETRY_ATTRIBUTES = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


@dataclass
class _Header:
    """What ``load_series`` needs from one file's header, or from one frame of a
    multi-frame file (``frame`` its 1-based number; ``ds`` then holds the file's top-level
    attributes with the frame's functional-group values in their single-frame places,
    see :func:`_frame_headers`)."""

    path: Path
    ds: Any  # pydicom Dataset without pixel data
    frame: int | None = None

    @property
    def sop_class_uid(self) -> str:
        return str(self.ds.get("SOPClassUID", ""))

    @property
    def name(self) -> str:
        """The file's name, with the frame for a frame of a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"

    @property
    def series_uid(self) -> str:
        return str(self.ds.get("SeriesInstanceUID", ""))


def load_series(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    series_instance_uid: str | None = None,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
    select_consistent: bool = False,
    left_out: list | None = None,
) -> Volume:
    """Read one CT or MR series into a :class:`Volume`.

    ``paths`` is a directory (searched recursively; files that are not DICOM, and DICOM
    objects that are not CT/MR images such as RTSTRUCTs, are ignored) or an iterable of
    files (a file named explicitly must be DICOM; non-image objects among them are
    ignored). When the files hold several series, ``series_instance_uid`` selects one.

    Slices are sorted by their position along the slice normal
    (cross(row, column) of ImageOrientationPatient), never by InstanceNumber.
    ``spacing_tolerance`` is the largest allowed distance of a slice from its place on a
    uniform grid, as a fraction of the slice spacing (default 1%, at least
    :data:`POSITION_TOLERANCE_FLOOR_MM` mm), along the normal and across it.

    Values are rescaled with RescaleSlope/RescaleIntercept (Hounsfield units for CT): the
    array is int16 when every slope is 1, every intercept integral and the values fit,
    float32 otherwise.

    With ``select_consistent`` the volume is built from the largest geometrically
    consistent set of the series' images (:func:`rtstruct.selection.select_consistent`:
    strays such as localizers, images of another size, orientation or spacing, a second
    instance at one position are left out) instead of refusing the series for them;
    among files named explicitly, those that are not CT/MR images count as left out too.
    What is left out is appended to ``left_out`` (:class:`rtstruct.selection.LeftOut`
    items, each a reason with its count) when the caller passes a list, which then
    reports it; otherwise it is logged here as one WARNING line. Faults of the kept
    images (a missing slice, non-uniform spacing) are refused as without selection.

    Raises :class:`VolumeError` with a message that names what is wrong and where
    (files, UIDs; never patient names or IDs).
    """
    files, explicit, where = _collect_files(paths)
    headers, skipped = _read_headers(files, explicit)
    series = _select_series(headers, skipped, where, series_instance_uid)
    if select_consistent:
        series = _consistent_part(series, skipped if explicit else Counter(), spacing_tolerance, left_out)
    return _build_volume(series, spacing_tolerance)


def _consistent_part(
    series: list[_Header], not_images: Counter, spacing_tolerance: float, left_out: list | None
) -> list[_Header]:
    """The images :func:`rtstruct.selection.select_consistent` keeps; what it left out
    goes to ``left_out`` or, without a list, to the log."""
    from rtstruct.selection import LeftOut, select_consistent

    chosen = select_consistent(series, spacing_tolerance=spacing_tolerance)
    items = list(chosen.left_out)
    for kind, n in not_images.most_common():
        noun = "file" if n == 1 else "files"
        items.append(LeftOut(f"{n} {noun} of {kind} (not a CT or MR image)", n))
    series_uid = series[0].series_uid or "<no SeriesInstanceUID>"
    if items:
        n_out = sum(item.count for item in items)
        text = "; ".join(item.reason for item in items)
        if left_out is not None:
            left_out.extend(items)
        level = logging.INFO if left_out is not None else logging.WARNING
        log.log(
            level, "series %s: %d image(s) kept, %d file(s) left out: %s", series_uid, len(chosen.kept), n_out, text
        )
    if not chosen.kept:
        raise VolumeError(
            f"no usable image in series {series_uid}: all {_n(len(series))} were left out ({chosen.describe()})"
        )
    return list(chosen.kept)


# -- collecting files -------------------------------------------------------------------
def _collect_files(paths) -> tuple[list[Path], bool, str]:
    if isinstance(paths, (str, os.PathLike)):
        root = Path(paths)
        if root.is_dir():
            files = files_under(root)
            return files, False, f"directory {root}"
        if root.is_file():
            return [root], True, f"file {root}"
        raise VolumeError(f"no such file or directory: {root}")
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise VolumeError(f"no such file: {p}")
    return files, True, f"{len(files)} given files"


def _read_headers(files: list[Path], explicit: bool) -> tuple[list[_Header], Counter]:
    """Headers of the CT/MR image files; counts of what was skipped, by kind."""
    headers: list[_Header] = []
    skipped: Counter = Counter()
    for path in files:
        try:
            ds = read_header(path)
        except DicomFileError:
            if explicit:
                raise VolumeError(f"not a DICOM file: {path}") from None
            skipped["non-DICOM"] += 1
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if kind_of(sop_class, ds.get("Modality")) is FileKind.IMAGE:
            headers.append(_Header(path, ds))
        else:
            skipped[sop_class_name(sop_class) if sop_class else "DICOM without SOPClassUID"] += 1
    if skipped:
        log.info("ignored files that are not CT/MR images: %s", _counts(skipped))
    return headers, skipped


def _select_series(
    headers: list[_Header], skipped: Counter, where: str, series_instance_uid: str | None
) -> list[_Header]:
    if not headers:
        found = f"found {_counts(skipped)}" if skipped else "it holds no files"
        raise VolumeError(f"no CT or MR image files in {where}: {found}")
    by_series: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        by_series[h.series_uid].append(h)
    if series_instance_uid is not None:
        if series_instance_uid not in by_series:
            raise VolumeError(
                f"series {series_instance_uid} is not in {where}; it holds " + _describe_series(by_series)
            )
        return by_series[series_instance_uid]
    if len(by_series) > 1:
        raise VolumeError(
            f"{len(by_series)} image series in {where}: {_describe_series(by_series)}; "
            "pick one with series_instance_uid=<SeriesInstanceUID>"
        )
    return headers


def _describe_series(by_series: dict[str, list[_Header]]) -> str:
    parts = []
    for uid, hs in sorted(by_series.items(), key=lambda kv: -len(kv[1])):
        modality = hs[0].ds.get("Modality", "?")
        desc = str(hs[0].ds.get("SeriesDescription", "") or "")
        parts.append(
            f"{uid or '<no SeriesInstanceUID>'} ({modality}, {_n(len(hs))}{', ' + repr(desc) if desc else ''})"
        )
    return ", ".join(parts)


# -- checks and geometry ----------------------------------------------------------------
def _build_volume(headers: list[_Header], spacing_tolerance: float) -> Volume:
    series_uid = headers[0].series_uid or "<no SeriesInstanceUID>"
    _check_size(headers, series_uid)  # before a header per frame or a pixel is made
    # Multi-frame objects become one header per frame; every check below then applies to
    # the frames as it does to single-frame slices.
    headers = _expand_multi_frame(headers, series_uid)
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        missing = [h.path for h in headers if not str(h.ds.get(keyword, "") or "")]
        if missing:
            raise VolumeError(f"{keyword} missing in {_files(missing)} of series {series_uid}")
    _check_same(headers, "SOPClassUID", series_uid, lambda ds: sop_class_name(str(ds.SOPClassUID)))
    _check_same(headers, "Modality", series_uid)
    _check_same(headers, "StudyInstanceUID", series_uid)
    _check_consistent_identity(headers, series_uid)
    _check_same(headers, "FrameOfReferenceUID", series_uid, label="frames of reference")

    headers = _drop_repeated_instances(headers, series_uid)
    for keyword in _GEOMETRY_ATTRIBUTES:
        missing = [h for h in headers if keyword not in h.ds or h.ds[keyword].value in (None, "", [])]
        if missing:
            raise VolumeError(
                f"{keyword} missing in {_headers(missing)} of series {series_uid}: "
                "the slice geometry cannot be known without it"
            )

    unit = "frame" if headers[0].frame is not None else "file"
    positions = np.array([_floats(h, "ImagePositionPatient", 3) for h in headers])
    orientations = np.array([_floats(h, "ImageOrientationPatient", 6) for h in headers])
    pixel_spacings = np.array([_floats(h, "PixelSpacing", 2) for h in headers])
    sizes = [(int(h.ds.Rows), int(h.ds.Columns)) for h in headers]

    # One orientation.
    reference = orientations[0]
    differs = np.abs(orientations - reference).max(axis=1) > ORIENTATION_TOLERANCE
    if differs.any():
        groups = _group_rows(orientations, ORIENTATION_TOLERANCE)
        desc = "; ".join(
            f"[{', '.join(f'{v:.4g}' for v in orientations[idx[0]])}] in {_n(len(idx), unit)} (e.g. {headers[idx[0]].name})"
            for idx in groups
        )
        raise VolumeError(f"mixed orientations (ImageOrientationPatient) in series {series_uid}: {desc}")
    row_dir, col_dir = reference[:3], reference[3:]
    if not (
        abs(np.linalg.norm(row_dir) - 1) < 1e-3
        and abs(np.linalg.norm(col_dir) - 1) < 1e-3
        and abs(float(row_dir @ col_dir)) < 1e-3
    ):
        raise VolumeError(
            f"ImageOrientationPatient {reference.tolist()} of series {series_uid} is not two orthogonal unit vectors"
        )
    # One size and one pixel spacing.
    size_counts = Counter(sizes)
    if len(size_counts) > 1:
        desc = ", ".join(f"{r}x{c} in {_n(n, unit)}" for (r, c), n in size_counts.most_common())
        odd = next(h.name for h, s in zip(headers, sizes) if s != size_counts.most_common(1)[0][0])
        raise VolumeError(f"mixed image sizes (Rows x Columns) in series {series_uid}: {desc} (e.g. {odd})")
    rel = np.abs(pixel_spacings - pixel_spacings[0]) / pixel_spacings[0]
    if (rel > PIXEL_SPACING_TOLERANCE).any():
        groups = _group_rows(pixel_spacings, PIXEL_SPACING_TOLERANCE * float(pixel_spacings[0].max()))
        desc = ", ".join(f"{pixel_spacings[idx[0]].tolist()} mm in {_n(len(idx), unit)}" for idx in groups)
        raise VolumeError(f"mixed PixelSpacing in series {series_uid}: {desc}")
    if (pixel_spacings[0] <= 0).any():
        raise VolumeError(f"PixelSpacing {pixel_spacings[0].tolist()} of series {series_uid} is not positive")

    # Gantry tilt declared by the scanner.
    for h in headers:
        tilt = _float_or_none(h.ds.get("GantryDetectorTilt"))
        if tilt is not None and abs(tilt) > GANTRY_TILT_TOLERANCE_DEG:
            raise VolumeError(
                f"gantry tilt of {tilt:g} degrees (GantryDetectorTilt) in series {series_uid} "
                f"(e.g. {h.name}): tilted slices do not form a rectilinear volume; "
                "resample the series to an orthogonal grid first"
            )

    # Sort along the slice normal.
    normal = np.cross(row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir))
    normal /= np.linalg.norm(normal)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[k] for k in order]
    positions, along = positions[order], along[order]
    n = len(headers)

    if n == 1:
        slice_spacing = _single_slice_spacing(headers[0], series_uid)
    else:
        slice_spacing = _check_positions(headers, positions, along, normal, series_uid, spacing_tolerance)

    rows, cols = sizes[0]
    geometry = Geometry.from_dicom(positions[0], reference, tuple(pixel_spacings[0]), slice_spacing, (n, rows, cols))
    multi_frame = headers[0].frame is not None
    _check_voxels(n, rows, cols, series_uid)  # the exact count, before the array is allocated
    array = _read_frames(headers, series_uid) if multi_frame else _read_pixels(headers, series_uid)
    first = headers[0].ds
    return Volume(
        array=array,
        geometry=geometry,
        sop_instance_uids=tuple(str(h.ds.SOPInstanceUID) for h in headers),
        frame_numbers=tuple(h.frame for h in headers) if multi_frame else (),
        modality=image_modality(first),
        series_instance_uid=str(first.SeriesInstanceUID),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        sop_class_uid=headers[0].sop_class_uid,
        attributes=_copied_attributes(first),
    )


def _check_positions(
    headers: list[_Header],
    positions: np.ndarray,
    along: np.ndarray,
    normal: np.ndarray,
    series_uid: str,
    spacing_tolerance: float,
) -> float:
    """Check that the sorted slices form a uniform stack along the normal; its spacing."""
    steps = np.diff(along)
    positive = steps[steps > POSITION_TOLERANCE_FLOOR_MM]
    nominal = float(np.median(positive)) if positive.size else 0.0
    dup_tol = max(POSITION_TOLERANCE_FLOOR_MM, spacing_tolerance * nominal)

    # Duplicate positions (different instances at one place).
    dup = np.flatnonzero(steps <= dup_tol)
    if dup.size:
        k = int(dup[0])
        names = f"{headers[k].name} and {headers[k + 1].name}"
        raise VolumeError(
            f"duplicate slice positions in series {series_uid}: {dup.size} pair(s) of slices at the "
            f"same position, first at z={along[k]:.2f} mm ({names}); several acquisitions, echoes "
            "or time points in one series cannot be one volume"
        )

    # Missing slices: a gap of about a whole multiple (>= 2) of the usual spacing.
    ratio = steps / nominal
    gaps = np.flatnonzero((ratio >= 1.5) & (np.abs(ratio - np.round(ratio)) <= 0.25))
    if gaps.size:
        total = int(sum(round(float(ratio[k])) - 1 for k in gaps))
        where = "; ".join(
            f"{round(float(ratio[k])) - 1} between z={along[k]:.2f} and z={along[k + 1]:.2f} mm" for k in gaps[:5]
        ) + ("; ..." if gaps.size > 5 else "")
        raise VolumeError(
            f"{total} slice(s) missing in series {series_uid} (slice spacing {nominal:.4g} mm; "
            f"z is the position along the slice normal): {where}"
        )

    # Uniform spacing: every slice near its place on the grid from the first to the last slice.
    spacing = float(along[-1] - along[0]) / (len(along) - 1)
    tol = max(POSITION_TOLERANCE_FLOOR_MM, spacing_tolerance * spacing)
    grid = along[0] + spacing * np.arange(len(along))
    deviation = np.abs(along - grid)
    if deviation.max() > tol:
        k = int(np.argmax(deviation))
        raise VolumeError(
            f"non-uniform slice spacing in series {series_uid}: steps between slices range from "
            f"{steps.min():.4g} to {steps.max():.4g} mm; the slice at z={along[k]:.2f} mm "
            f"({headers[k].name}) lies {deviation[k]:.3g} mm from a uniform {spacing:.4g} mm "
            f"grid (tolerance {tol:.3g} mm = {100 * spacing_tolerance:.3g}% of the spacing)"
        )

    # Positions along the normal: in-plane offsets mean a tilted (sheared) stack.
    expected = positions[0] + np.outer(along - along[0], normal)
    offset = np.linalg.norm(positions - expected, axis=1)
    if offset.max() > tol:
        k = int(np.argmax(offset))
        step_offset = np.linalg.norm((positions[1:] - positions[:-1]) - np.outer(steps, normal), axis=1)
        j = int(np.argmax(step_offset))
        angle = math.degrees(math.atan2(float(step_offset[j]), float(steps[j])))
        raise VolumeError(
            f"slice positions of series {series_uid} are not along the slice normal (gantry tilt "
            f"or sheared stack): consecutive slices shift up to {step_offset[j]:.3g} mm in-plane "
            f"(about {angle:.2g} degrees), {offset[k]:.3g} mm in total at z={along[k]:.2f} mm "
            f"({headers[k].name}); resample the series to an orthogonal grid first"
        )
    return spacing


def _single_slice_spacing(header: _Header, series_uid: str) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _float_or_none(header.ds.get(keyword))
        if value is not None and value > 0:
            return value
    log.warning(
        "series %s has one slice without SpacingBetweenSlices or SliceThickness: slice spacing set to 1.0 mm",
        series_uid,
    )
    return 1.0


def _drop_repeated_instances(headers: list[_Header], series_uid: str) -> list[_Header]:
    """The same SOP Instance in several files (a copy): keep the first file."""
    seen: dict[tuple[str, int | None], _Header] = {}
    for h in headers:
        seen.setdefault((str(h.ds.SOPInstanceUID), h.frame), h)
    if len(seen) < len(headers):
        log.warning(
            "series %s: %d files repeat a SOP Instance UID already read; using one file each",
            series_uid,
            len(headers) - len(seen),
        )
    return list(seen.values())


def _check_same(headers, keyword, series_uid, show=None, label=None) -> None:
    values = Counter(str(h.ds.get(keyword, "") or "") for h in headers)
    if len(values) > 1:
        label = label or keyword
        if show is not None:
            values = Counter(show(h.ds) for h in headers)
        desc = ", ".join(f"{v or '<missing>'} ({_n(n)})" for v, n in values.most_common())
        raise VolumeError(f"mixed {label} in series {series_uid}: {desc}")


def _check_consistent_identity(headers: list[_Header], series_uid: str) -> None:
    """Patient identity must agree across slices; the values are never shown."""
    for keyword in ("PatientID", "PatientName"):
        values = {str(h.ds.get(keyword, "") or "") for h in headers}
        if len(values) > 1:
            raise VolumeError(
                f"series {series_uid} mixes {len(values)} different {keyword} values: "
                "its files do not belong to one patient"
            )


# -- multi-frame images -------------------------------------------------------------------
#: The functional groups a frame's geometry and values come from, and the attributes each
#: contributes, put where a single-frame image has them (PS3.3 C.7.6.16: a frame's item in
#: PerFrameFunctionalGroupsSequence first, else SharedFunctionalGroupsSequence).
_FRAME_GROUPS: dict[str, tuple[str, ...]] = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "CTAcquisitionDetailsSequence": ("GantryDetectorTilt",),
    "FrameContentSequence": ("StackID", "InStackPositionNumber", "TemporalPositionIndex"),
}
_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def _check_voxels(slices: int, rows: int, cols: int, series_uid: str) -> None:
    try:
        input_limits().check_voxels(slices, rows, cols, f"series {series_uid}")
    except InputTooLarge as exc:
        raise VolumeError(str(exc)) from None


def _check_size(headers: list[_Header], series_uid: str) -> None:
    """Refuse a series whose headers (Rows x Columns x frames, summed) already exceed
    ``limits.max_voxels`` (:mod:`inference.limits`), before anything is built from them."""
    voxels, rows, cols = 0, 0, 0
    for h in headers:
        r, c = _int_or_none(h.ds.get("Rows")) or 0, _int_or_none(h.ds.get("Columns")) or 0
        frames = _int_or_none(h.ds.get("NumberOfFrames")) or 1
        voxels += r * c * max(frames, 1)
        rows, cols = max(rows, r), max(cols, c)
    if rows and cols and voxels > input_limits().max_voxels:
        _check_voxels(math.ceil(voxels / (rows * cols)), rows, cols, series_uid)


def _is_multi_frame(h: _Header) -> bool:
    frames = _int_or_none(h.ds.get("NumberOfFrames"))
    return h.sop_class_uid in MULTI_FRAME_IMAGE_CLASSES or (frames is not None and frames > 1)


def _expand_multi_frame(headers: list[_Header], series_uid: str) -> list[_Header]:
    """The headers with every multi-frame instance replaced by one header per frame.

    A series of single-frame files comes back unchanged. One or several Enhanced / Legacy
    Converted Enhanced CT or MR instances become their frames (several instances of one
    series that hold different frames of one stack make one volume, as single-frame
    files do). Refused: single-frame and multi-frame images mixed in one series; a
    multi-frame image of a single-frame SOP class (no functional groups to place its
    frames); an instance that holds several stacks (StackID).
    """
    multi = [h for h in headers if _is_multi_frame(h)]
    if not multi:
        return headers
    if len(multi) < len(headers):
        raise VolumeError(
            f"series {series_uid} mixes {_n(len(headers) - len(multi), 'single-frame image')} and "
            f"{_n(len(multi), 'multi-frame instance')} ({sop_class_name(multi[0].sop_class_uid)}, e.g. "
            f"{multi[0].path.name}): one volume is either multi-frame images or single-frame images"
        )
    frames: list[_Header] = []
    for h in multi:
        if h.sop_class_uid in SINGLE_FRAME_IMAGE_CLASSES:
            raise VolumeError(
                f"{h.path} is a {sop_class_name(h.sop_class_uid)} with {h.ds.get('NumberOfFrames')} frames "
                f"(series {series_uid}): that SOP class has one frame per instance and no per-frame "
                "positions; send it as single-frame images or as Enhanced CT/MR"
            )
        frames.extend(_frame_headers(h, series_uid))
    _check_one_stack(frames, series_uid)
    return frames


def _frame_headers(h: _Header, series_uid: str) -> list[_Header]:
    """One :class:`_Header` per frame of a multi-frame instance.

    Each frame's dataset holds the instance's top-level attributes (patient, study,
    series, Rows, Columns, ...) without the functional-group sequences, plus the frame's
    position, orientation, pixel spacing, slice thickness, rescale, gantry tilt and stack
    from its functional groups (:data:`_FRAME_GROUPS`); a top-level value of the same
    attribute (Legacy Converted images may carry one) is replaced by the frame's own.
    """
    ds = h.ds
    count = _int_or_none(ds.get("NumberOfFrames"))
    if count is None or count < 1:
        raise VolumeError(
            f"NumberOfFrames missing or not a positive number in {h.path} ({sop_class_name(h.sop_class_uid)}, "
            f"series {series_uid}): its frames cannot be counted"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != count:
        raise VolumeError(
            f"{h.path} has NumberOfFrames {count} but {len(per_frame)} items in PerFrameFunctionalGroupsSequence "
            f"(series {series_uid}): the frames cannot be placed"
        )
    base = Dataset()
    for elem in ds:
        if elem.keyword not in _FUNCTIONAL_GROUPS:
            base[elem.tag] = elem
    meta = getattr(ds, "file_meta", None)
    out = []
    for index in range(count):
        frame = Dataset()
        frame.update(base)
        if meta is not None:
            frame.file_meta = meta
        for group, keywords in _FRAME_GROUPS.items():
            item = _group_item(per_frame[index], group) or _group_item(shared, group)
            if item is None:
                continue
            for keyword in keywords:
                if keyword in item:
                    frame[item[keyword].tag] = item[keyword]
        out.append(_Header(h.path, frame, frame=index + 1))
    return out


def _group_item(groups: Any, sequence: str) -> Any:
    """The single item of functional group ``sequence`` in one functional-groups item."""
    if groups is None or sequence not in groups:
        return None
    seq = groups[sequence].value
    return seq[0] if seq else None


def _check_one_stack(frames: list[_Header], series_uid: str) -> None:
    """An instance whose frames carry several StackID values holds several stacks (e.g.
    an MR with sagittal, coronal and axial stacks, or several slabs): refused, since one
    volume is one stack and which stack the prompts were drawn on is not the loader's
    guess to make."""
    stacks: dict[Path, Counter] = defaultdict(Counter)
    for h in frames:
        stacks[h.path][str(h.ds.get("StackID", "") or "")] += 1
    for path, counts in stacks.items():
        if len(counts) > 1:
            desc = ", ".join(f"StackID {sid or '<none>'}: {_n(n, 'frame')}" for sid, n in sorted(counts.items()))
            raise VolumeError(
                f"{path} holds {len(counts)} stacks of frames ({desc}) in series {series_uid}: one volume is one "
                "stack; export the stack the prompts were drawn on as its own instance or series"
            )


def _read_frames(headers: list[_Header], series_uid: str) -> np.ndarray:
    """The rescaled pixel values of the sorted frames of multi-frame files.

    Each file is decoded frame by frame (from its path, so its whole pixel data is never
    held at once), each frame rescaled with its own functional-group RescaleSlope and
    RescaleIntercept; the array is int16 or float32 as in :func:`_read_pixels`.
    """
    rows, cols = int(headers[0].ds.Rows), int(headers[0].ds.Columns)
    array = np.empty((len(headers), rows, cols), dtype=np.int16)
    int16 = np.iinfo(np.int16)
    by_file: dict[Path, dict[int, int]] = defaultdict(dict)  # path -> {frame index: slice}
    for k, h in enumerate(headers):
        by_file[h.path][int(h.frame) - 1] = k
    for path, slices in by_file.items():
        header = headers[next(iter(slices.values()))].ds
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        if samples != 1:
            raise VolumeError(f"{path} has {samples} samples per pixel: only greyscale images are supported")
        source = _frame_source(path, header, series_uid)
        indices = sorted(slices)
        try:
            with _DECODE_LOG_FILTER.active():
                for index, pixels in zip(indices, iter_pixels(source, indices=indices)):
                    k = slices[index]
                    if pixels.shape != (rows, cols):
                        raise VolumeError(
                            f"frame {index + 1} of {path} has shape {pixels.shape}, expected {rows}x{cols} (Rows x Columns)"
                        )
                    array = _put_slice(array, k, pixels, headers[k].ds, int16)
        except VolumeError:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types here
            raise VolumeError(_decode_failure(path, source if isinstance(source, Dataset) else header, exc)) from exc
    return array


def _frame_source(path: Path, header: Any, series_uid: str) -> Any:
    """What to decode frames from: the path of a Part 10 file (frames read one at a time),
    or the whole dataset of a bare one (its transfer syntax taken from how it was read)."""
    meta = getattr(header, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return path
    ds = pydicom.dcmread(path, force=True)
    _ensure_transfer_syntax(ds)
    if "PixelData" not in ds:
        raise VolumeError(f"no pixel data in {path} (series {series_uid})")
    return ds


def _put_slice(array: np.ndarray, k: int, pixels: np.ndarray, ds: Any, int16: Any) -> np.ndarray:
    """``array[k]`` = ``pixels`` rescaled with ``ds``'s RescaleSlope/Intercept; the array
    (turned into float32 once, when a value needs it) is returned."""
    slope = _float_or_none(ds.get("RescaleSlope"))
    intercept = _float_or_none(ds.get("RescaleIntercept"))
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if array.dtype == np.int16 and slope == 1.0 and intercept == round(intercept):
        values = pixels.astype(np.int32) + int(intercept)
        if values.size == 0 or (values.min() >= int16.min and values.max() <= int16.max):
            array[k] = values
            return array
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    array[k] = pixels.astype(np.float64) * slope + intercept
    return array


# -- pixels -------------------------------------------------------------------------------
def _read_pixels(headers: list[_Header], series_uid: str) -> np.ndarray:
    """The rescaled pixel values of the sorted slices, read one file at a time.

    Native and compressed pixel data alike are decoded by pydicom (compressed through its
    pixel-data plugins, see :mod:`dicom_node.transfer_syntaxes`); a slice that does not
    decode is refused with a sentence naming its transfer syntax (:func:`_decode_failure`).
    The array starts as int16 and turns into float32 (once) at the first slice whose
    slope is not 1, whose intercept is not integral or whose values do not fit.
    """
    rows, cols = int(headers[0].ds.Rows), int(headers[0].ds.Columns)
    array = np.empty((len(headers), rows, cols), dtype=np.int16)
    int16 = np.iinfo(np.int16)
    compressed: Counter = Counter()
    for k, h in enumerate(headers):
        ds = pydicom.dcmread(h.path, force=True)
        _ensure_transfer_syntax(ds)
        if "PixelData" not in ds:
            raise VolumeError(f"no pixel data in {h.path} (series {series_uid})")
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if samples != 1:
            raise VolumeError(f"{h.path} has {samples} samples per pixel: only greyscale images are supported")
        tsuid = _transfer_syntax(ds)
        if tsuid.is_compressed:
            compressed[tsuid] += 1
            _check_codestream_ends(h.path, ds, tsuid)
        try:
            with _DECODE_LOG_FILTER.active():
                pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types here
            raise VolumeError(_decode_failure(h.path, ds, exc)) from exc
        if pixels.shape != (rows, cols):
            raise VolumeError(
                f"pixel data of {h.path} has shape {pixels.shape}, expected {rows}x{cols} (Rows x Columns)"
            )
        array = _put_slice(array, k, pixels, ds, int16)
    if compressed:
        log.info(
            "series %s: compressed pixel data decoded: %s",
            series_uid,
            ", ".join(f"{_n(n)} in {uid.name}" for uid, n in compressed.most_common()),
        )
    return array


#: JPEG, JPEG-LS, JPEG 2000 and HTJ2K: every codestream ends with the marker FFD9 (EOI / EOC).
_MARKER_CODED = frozenset(JPEGTransferSyntaxes + JPEGLSTransferSyntaxes + JPEG2000TransferSyntaxes)


def _check_codestream_ends(path: Path, ds, tsuid: UID) -> None:
    """Refuse a JPEG-family frame whose codestream lacks its end marker.

    libjpeg decodes a codestream that was cut off without an error (the missing part comes
    out as garbage pixels), so a frame must end with FFD9 (after the zero byte that pads a
    fragment to even length). A received dataset cut off inside its pixel data never gets
    here: the store refuses it; this is a sender's encoder or a disk that lost data.
    """
    if tsuid not in _MARKER_CODED:
        return
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    name = f"{tsuid.name} ({tsuid})"
    try:
        ends = [
            frame.rstrip(b"\x00").endswith(b"\xff\xd9")
            for frame in generate_frames(ds.PixelData, number_of_frames=frames)
        ]
    except (ValueError, TypeError, struct.error) as exc:  # broken item tags or offset table
        raise VolumeError(
            f"cannot decode pixel data of {path} ({name}): its encapsulated fragments are broken ({exc})"
        ) from exc
    cut = [k + 1 for k, ok in enumerate(ends) if not ok]
    if cut:
        where = f"frame {cut[0]} of " if frames > 1 else ""
        raise VolumeError(
            f"cannot decode pixel data of {where}{path} ({name}): its codestream has no end marker (FFD9), "
            "the compressed data is cut off or damaged"
        )


class _DecodeLogFilter(logging.Filter):
    """Drops the tracebacks pydicom logs while :func:`_read_pixels` decodes in this thread.

    pydicom logs every exception of a plugin that fails to decode a frame (``LOGGER.exception``,
    at ERROR, with the traceback) before it tries the next plugin. In the node's log that reads
    like a crash; the :class:`VolumeError` raised instead carries each plugin's message.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    @contextmanager
    def active(self):
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(self._local, "on", False) and record.exc_info)


_DECODE_LOG_FILTER = _DecodeLogFilter()
logging.getLogger("pydicom.pixels.decoders.base").addFilter(_DECODE_LOG_FILTER)


def _ensure_transfer_syntax(ds) -> None:
    """A bare dataset (no file meta) gets the transfer syntax it was read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if not little:
        meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _transfer_syntax(ds) -> UID:
    meta = getattr(ds, "file_meta", None)
    return UID(str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")) if meta is not None else UID("")


def _decode_failure(path: Path, ds, exc: Exception) -> str:
    """One sentence: the file, its transfer syntax, and why its pixel data does not decode
    (no decoder at all, no plugin installed, or what each installed plugin reported)."""
    tsuid = _transfer_syntax(ds)
    name = f"{tsuid.name} ({tsuid})" if tsuid and tsuid.name != tsuid else f"transfer syntax {tsuid or 'unknown'}"
    try:
        decoder = get_decoder(tsuid)
    except Exception:  # noqa: BLE001 - no decoder exists for this transfer syntax
        return f"cannot decode pixel data of {path}: pydicom has no decoder for {name}"
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        return (
            f"cannot decode pixel data of {path}: {name} needs a pydicom decoding plugin, none is "
            f"installed ({needs}); install one (e.g. pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg) or decompress the files first (e.g. dcmdjpeg)"
        )
    return f"cannot decode pixel data of {path} ({name}): {_failure_text(exc)}"


def _failure_text(exc: Exception) -> str:
    """pydicom's failure as one clause: ``plugin: message; plugin: message`` when every
    plugin failed (its message lists them on lines of their own), else its first line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].startswith("Unable to decode"):
        return "every decoding plugin failed (" + "; ".join(lines[1:]) + ")"
    return lines[0]


# -- small helpers ------------------------------------------------------------------------
def _copied_attributes(ds) -> dict[str, Any]:
    attributes: dict[str, Any] = {keyword: "" for keyword in TYPE2_ATTRIBUTES}
    for keyword in COPIED_ATTRIBUTES:
        if keyword in ds:
            value = _plain(ds[keyword].value)
            if value is not None:
                attributes[keyword] = value
    return attributes


def _plain(value: Any) -> Any:
    """A pydicom value as a plain Python value (str, int, float, list); None for sequences."""
    if value is None:
        return ""
    if isinstance(value, pydicom.sequence.Sequence):
        return None
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        items = [_plain(v) for v in value]
        return [v for v in items if v is not None]
    if isinstance(value, pydicom.valuerep.DSfloat):
        return float(value)
    if isinstance(value, pydicom.valuerep.IS):
        return int(value)
    if isinstance(value, bytes):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)  # str, PersonName, UID, DA/TM strings


def _floats(h: _Header, keyword: str, count: int) -> list[float]:
    value = h.ds[keyword].value
    try:
        values = [
            float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value])
        ]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{keyword} of {h.path} is not numeric: {value!r}") from exc
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise VolumeError(f"{keyword} of {h.path} must be {count} finite numbers, got {value!r}")
    return values


def _float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _int_or_none(value: Any) -> int | None:
    f = _float_or_none(value)
    return None if f is None else int(f)


def _group_rows(values: np.ndarray, tol: float) -> list[list[int]]:
    """Indices of rows grouped by equality within ``tol``, biggest group first."""
    groups: list[list[int]] = []
    for k, row in enumerate(values):
        for g in groups:
            if np.abs(values[g[0]] - row).max() <= tol:
                g.append(k)
                break
        else:
            groups.append([k])
    return sorted(groups, key=len, reverse=True)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in counter.most_common())


def _n(count: int, noun: str = "file") -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _headers(headers: list[_Header]) -> str:
    """``3 file(s) (a.dcm, b.dcm, c.dcm)`` or, for frames, ``1 frame(s) (x.dcm frame 4)``."""
    unit = "frame" if headers[0].frame is not None else "file"
    shown = ", ".join(h.name for h in headers[:3])
    return f"{len(headers)} {unit}(s) ({shown}{', ...' if len(headers) > 3 else ''})"


def _files(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:3])
    return f"{len(paths)} file(s) ({shown}{', ...' if len(paths) > 3 else ''})"
