"""Read an RT Structure Set into plain Python objects.

:func:`read_rtstruct` turns an RTSTRUCT file (or an already parsed dataset) into a
:class:`StructureSet`: its ROIs with number, name, colour, interpreted type, generation
algorithm and contours in patient coordinates (LPS, mm), plus everything it references:
frames of reference, image series and single images.

Reading is lenient about what does not matter (a missing colour, an ROI without
observations, an unknown geometric type) and strict about what would make the content
wrong (contour data that is not a list of x/y/z triplets, non-finite coordinates, more contour points than ``limits.max_contour_points`` of
:mod:`inference.limits`): those raise :class:`RTStructError` with a message that names the
ROI (or the limit) and says why.
Nothing here needs the images; mapping onto a volume is :mod:`rtstruct.rasterize`,
:mod:`rtstruct.prompts` and :func:`check_references`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue

from inference.limits import InputTooLarge, input_limits
from rtstruct.headers import DicomFileError, FileKind, kind_of, read_header

if TYPE_CHECKING:  # pragma: no cover
    from inference.volume import Volume

log = logging.getLogger(__name__)


class RTStructError(ValueError):
    """Not an RTSTRUCT, or content that cannot be used; the message says why."""


class MissingImagesError(RTStructError):
    """Images the RTSTRUCT references are not in the volume: ``missing`` (their SOP
    Instance UIDs, in reference order) of ``total`` referenced."""

    def __init__(self, message: str, missing: Sequence[str], total: int):
        super().__init__(message)
        self.missing = list(missing)
        self.total = total


@dataclass
class Contour:
    """One contour: ``points`` is (N, 3) float64 patient coordinates (x, y, z) in mm."""

    points: np.ndarray
    geometric_type: str
    referenced_sop_instance_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 3)


@dataclass
class ROI:
    """One structure: its StructureSetROI item, its ROIContour item and its observation."""

    number: int
    name: str
    color: tuple[int, int, int] | None = None
    interpreted_type: str | None = None
    frame_of_reference_uid: str | None = None
    generation_algorithm: str | None = None
    contours: list[Contour] = field(default_factory=list)

    @property
    def geometric_types(self) -> set[str]:
        """The ContourGeometricType values of its contours (empty for an empty ROI)."""
        return {c.geometric_type for c in self.contours}

    @property
    def is_empty(self) -> bool:
        return not self.contours

    def __repr__(self) -> str:
        return (
            f"ROI(number={self.number}, name={self.name!r}, contours={len(self.contours)}, "
            f"types={sorted(self.geometric_types)})"
        )


@dataclass
class StructureSet:
    """The content of one RTSTRUCT instance.

    ``referenced_image_uids`` holds every image SOP Instance UID referenced anywhere
    (RTReferencedSeries > ContourImageSequence and every contour's ContourImageSequence),
    in first-seen order; ``referenced_images_by_series`` maps each referenced series to
    the images its RTReferencedSeries item lists.
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    label: str
    frame_of_reference_uids: list[str] = field(default_factory=list)
    referenced_series_uids: list[str] = field(default_factory=list)
    referenced_image_uids: list[str] = field(default_factory=list)
    rois: list[ROI] = field(default_factory=list)
    referenced_images_by_series: dict[str, list[str]] = field(default_factory=dict)

    def roi(self, name: str) -> ROI:
        """The ROI called ``name`` (exact match first, then case-insensitive)."""
        for r in self.rois:
            if r.name == name:
                return r
        matches = [r for r in self.rois if r.name.casefold() == name.casefold()]
        if len(matches) == 1:
            return matches[0]
        names = ", ".join(repr(r.name) for r in self.rois) or "none"
        raise KeyError(f"no ROI named {name!r} in structure set {self.label!r} (ROIs: {names})")

    @property
    def roi_names(self) -> list[str]:
        return [r.name for r in self.rois]


# ---------------------------------------------------------------------------------------
def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _optional_text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = _text(ds, keyword)
    return value or None


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise RTStructError(f"{what} is not an integer: {value!r}") from exc


def _color(value) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        parts = [int(round(float(v))) for v in values]
    except (TypeError, ValueError):
        return None
    if len(parts) != 3:
        return None
    return tuple(min(255, max(0, p)) for p in parts)  # type: ignore[return-value]


def _image_uids(seq) -> list[str]:
    uids = []
    for item in seq or []:
        uid = item.get("ReferencedSOPInstanceUID")
        if uid:
            uids.append(str(uid))
    return uids


def _read_dataset(source) -> pydicom.Dataset:
    if isinstance(source, pydicom.Dataset):
        return source
    path = Path(source)
    if not path.is_file():
        raise RTStructError(f"{path}: no such file")
    try:
        return read_header(path, stop_before_pixels=False)
    except DicomFileError as exc:
        raise RTStructError(str(exc)) from None


def _contour_values(item, where: str) -> np.ndarray:
    """ContourData as float64 values. Read from a file, the element is still its stored
    string: numpy parses it in one call (a Python float per number through pydicom's DS
    would take about 13 times the memory and 5 times the time of a 2-million-point
    RTSTRUCT); a value that is not a number is refused as pydicom would refuse it."""
    raw = item.get_item("ContourData") if "ContourData" in item else None
    if raw is None:
        raise RTStructError(f"{where}: ContourData is missing")
    stored = raw.value
    try:
        if isinstance(raw, RawDataElement) and isinstance(stored, (bytes, bytearray)):
            text = bytes(stored).strip(b" \x00")
            return np.array(text.split(b"\\"), dtype=np.float64) if text else np.empty(0)
        value = item.get("ContourData")  # in memory already (or stored oddly): pydicom's values
        if value is not None and not isinstance(value, (list, tuple, MultiValue)):
            value = [value]
        values = None if value is None else np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RTStructError(f"{where}: ContourData holds a value that is not a number ({exc})") from exc
    if values is None:
        raise RTStructError(f"{where}: ContourData is missing")
    return values


def _contour(item, roi_label: str, index: int) -> Contour:
    where = f"ROI {roi_label}, contour {index + 1}"
    gtype = _text(item, "ContourGeometricType").upper()
    if not gtype:
        raise RTStructError(f"{where}: ContourGeometricType is missing")
    values = _contour_values(item, where)
    if values.size == 0 or values.size % 3:
        raise RTStructError(f"{where}: ContourData has {values.size} values, not a whole number of x/y/z triplets")
    if not np.all(np.isfinite(values)):
        raise RTStructError(f"{where}: ContourData holds non-finite values")
    points = values.reshape(-1, 3)
    declared = item.get("NumberOfContourPoints")
    if declared is not None:
        try:
            declared_n = int(declared)
        except (TypeError, ValueError):
            declared_n = None
        if declared_n is not None and declared_n != len(points):
            log.warning(
                "%s: NumberOfContourPoints is %s but ContourData holds %d points; using ContourData",
                where,
                declared,
                len(points),
            )
    return Contour(
        points=points,
        geometric_type=gtype,
        referenced_sop_instance_uids=tuple(_image_uids(item.get("ContourImageSequence"))),
    )


def read_rtstruct(source: str | Path | pydicom.Dataset) -> StructureSet:
    """Read an RTSTRUCT from a path or a parsed dataset; :class:`RTStructError` if unusable."""
    ds = _read_dataset(source)
    try:
        return _parse(ds)
    except RTStructError:
        raise
    except Exception as exc:  # a corrupt element deep in a sequence: say so, do not crash
        where = f"{source}: " if not isinstance(source, pydicom.Dataset) else ""
        raise RTStructError(f"{where}RTSTRUCT content cannot be read ({type(exc).__name__}: {exc})") from exc


def _parse(ds: pydicom.Dataset) -> StructureSet:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = _text(ds, "Modality")
    if kind_of(sop_class, modality) is not FileKind.RTSTRUCT:
        what = ds.get("SOPClassUID")
        name = getattr(what, "name", None) or sop_class or "no SOP Class UID"
        raise RTStructError(f"not an RT Structure Set: SOP class {name}, modality {modality or 'none'}")
    if "StructureSetROISequence" not in ds and "ROIContourSequence" not in ds:
        raise RTStructError("RTSTRUCT has neither StructureSetROISequence nor ROIContourSequence: no ROIs to read")

    # -- references ------------------------------------------------------------------
    frames: list[str] = []
    series: list[str] = []
    images: list[str] = []
    by_series: dict[str, list[str]] = {}
    for fr in ds.get("ReferencedFrameOfReferenceSequence") or []:
        uid = _text(fr, "FrameOfReferenceUID")
        if uid and uid not in frames:
            frames.append(uid)
        for study in fr.get("RTReferencedStudySequence") or []:
            for se in study.get("RTReferencedSeriesSequence") or []:
                suid = _text(se, "SeriesInstanceUID")
                if not suid:
                    continue
                if suid not in series:
                    series.append(suid)
                uids = _image_uids(se.get("ContourImageSequence"))
                listed = by_series.setdefault(suid, [])
                listed.extend(u for u in dict.fromkeys(uids) if u not in listed)
                images.extend(uids)

    # -- ROIs ------------------------------------------------------------------------
    rois: dict[int, ROI] = {}
    limits, points = input_limits(), 0
    for item in ds.get("StructureSetROISequence") or []:
        number = _int(item.get("ROINumber"), "ROINumber of a StructureSetROISequence item")
        if number in rois:
            raise RTStructError(f"ROI number {number} is defined twice in StructureSetROISequence")
        for_uid = _optional_text(item, "ReferencedFrameOfReferenceUID")
        rois[number] = ROI(
            number=number,
            name=_text(item, "ROIName"),
            frame_of_reference_uid=for_uid,
            generation_algorithm=_optional_text(item, "ROIGenerationAlgorithm"),
        )
        if for_uid and for_uid not in frames:
            frames.append(for_uid)

    for item in ds.get("ROIContourSequence") or []:
        number = _int(item.get("ReferencedROINumber"), "ReferencedROINumber of a ROIContourSequence item")
        roi = rois.get(number)
        if roi is None:
            log.warning(
                "ROIContourSequence refers to ROI number %d, which StructureSetROISequence does not define;"
                " kept with an empty name",
                number,
            )
            roi = rois[number] = ROI(number=number, name="")
        label = f"{roi.name!r} (number {number})"
        roi.color = _color(item.get("ROIDisplayColor"))
        for index, citem in enumerate(item.get("ContourSequence") or []):
            contour = _contour(citem, label, index)
            points += len(contour.points)
            try:
                limits.check_contour_points(points)
            except InputTooLarge as exc:
                raise RTStructError(str(exc)) from None
            roi.contours.append(contour)
            images.extend(contour.referenced_sop_instance_uids)

    for item in ds.get("RTROIObservationsSequence") or []:
        number = item.get("ReferencedROINumber")
        try:
            roi = rois.get(int(number))
        except (TypeError, ValueError):
            roi = None
        if roi is not None and roi.interpreted_type is None:
            roi.interpreted_type = _optional_text(item, "RTROIInterpretedType")

    seen: set[str] = set()
    unique_images = [u for u in images if not (u in seen or seen.add(u))]
    return StructureSet(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        label=_text(ds, "StructureSetLabel"),
        frame_of_reference_uids=frames,
        referenced_series_uids=series,
        referenced_image_uids=unique_images,
        rois=list(rois.values()),
        referenced_images_by_series=by_series,
    )


# ---------------------------------------------------------------------------------------
def check_references(
    structure_set: StructureSet,
    volume: Volume,
    *,
    allow_frame_of_reference_only: bool = False,
) -> None:
    """Check that ``volume`` holds the images ``structure_set`` was drawn on.

    Raises :class:`RTStructError` with the reason when the frame of reference differs,
    when the RTSTRUCT references no image series at all (only a frame of reference),
    when it references other series than the volume's, or when images it references
    are missing from the volume ("97 of 98 referenced images are missing ...": a
    :class:`MissingImagesError`, which lists them).

    With ``allow_frame_of_reference_only`` only the frame of reference must match (the
    fallback for RTSTRUCTs whose image references are absent or stale; contours are
    still checked against the image planes when they are mapped).

    A multi-frame image (Enhanced CT/MR) is referenced by its SOP Instance UID, with or
    without ReferencedFrameNumber: it is present when the volume holds its frames (a
    volume holds every frame of the instances it is built from, or refuses to load). The
    frame numbers are not needed to place a contour, which is mapped onto the frame whose
    plane it lies on, as a single-frame contour is mapped onto its slice.
    """
    label = structure_set.label or structure_set.sop_instance_uid
    for_uid = volume.frame_of_reference_uid
    if structure_set.frame_of_reference_uids and for_uid not in structure_set.frame_of_reference_uids:
        raise RTStructError(
            f"RTSTRUCT {label!r} is on frame of reference {', '.join(structure_set.frame_of_reference_uids)}, "
            f"the images are on {for_uid}"
        )
    if allow_frame_of_reference_only:
        return
    if not structure_set.referenced_series_uids:
        frames = ", ".join(structure_set.frame_of_reference_uids) or "none"
        raise RTStructError(
            f"RTSTRUCT {label!r} references no image series (only frame of reference {frames}): "
            "cannot tell which images it was drawn on"
        )
    if volume.series_instance_uid not in structure_set.referenced_series_uids:
        raise RTStructError(
            f"RTSTRUCT {label!r} references series {', '.join(structure_set.referenced_series_uids)}, "
            f"not the images' series {volume.series_instance_uid}"
        )
    wanted = list(structure_set.referenced_images_by_series.get(volume.series_instance_uid, []))
    wanted_set = set(wanted)
    for roi in structure_set.rois:
        for contour in roi.contours:
            for uid in contour.referenced_sop_instance_uids:
                if uid not in wanted_set:
                    wanted_set.add(uid)
                    wanted.append(uid)
    present = set(volume.sop_instance_uids)
    missing = [u for u in wanted if u not in present]
    if missing:
        raise MissingImagesError(
            f"RTSTRUCT {label!r}: {len(missing)} of {len(wanted)} referenced images are missing from the "
            f"series (first missing: {missing[0]})",
            missing,
            len(wanted),
        )
