"""Write 3D masks on a volume as a new RT Structure Set (built on highdicom).

:func:`write_rtstruct` takes a :class:`~inference.volume.Volume` and one or more
:class:`RoiMask` and returns an :class:`RTStructureSet`, a ``highdicom.base.SOPClass``
(so a ``pydicom.Dataset``) ready for ``save_as`` or C-STORE:

* new Series and SOP Instance UIDs (``highdicom.UID()``), patient and study attributes
  copied from ``volume.attributes``, each made valid for its VR by :mod:`rtstruct.conform`
  (truncated; missing or invalid Type 2 attributes are written empty, invalid Type 3 ones
  left out), in the images' SpecificCharacterSet or ISO_IR 192 when the values need it,
  the volume's frame of reference;
* ReferencedFrameOfReferenceSequence > RTReferencedStudySequence >
  RTReferencedSeriesSequence listing every slice of the volume in its
  ContourImageSequence, and a ContourImageSequence with its slice on every contour;
  a slice that is a frame of a multi-frame image (Enhanced or Legacy Converted Enhanced
  CT/MR) is referenced by its instance and ReferencedFrameNumber, one item per frame (see
  "Multi-frame images" below);
* CLOSED_PLANAR contours from sub-pixel marching squares
  (``skimage.measure.find_contours`` at 0.5 on the zero-padded slice mask), simplified
  with a tolerance of 0.25 pixel (see below), mapped to patient coordinates with
  highdicom's ``PixelToReferenceTransformer`` affine of *that slice's own plane*, so every
  point lies on the slice plane (to the 1e-6 mm of the decimal strings);
* decimal strings of at most 16 characters, ROI names and StructureSetLabel of at most
  16 characters (longer ones are refused, never silently cut), RTROIInterpretedType
  ``GTV`` by default, ROIGenerationAlgorithm ``AUTOMATIC`` with the algorithm's name and
  version in ROIGenerationDescription and in ROIDerivationAlgorithmIdentificationSequence.

Holes and several components on one slice
-----------------------------------------
Every boundary of the mask on a slice becomes its own CLOSED_PLANAR contour in the same
ROI: outer boundaries of components, boundaries of holes, boundaries of islands inside
holes. They are meant to be read with the **even-odd (XOR) rule**: a point is inside the
structure when it is enclosed by an odd number of the ROI's contours on that slice. This
is the common convention for several contours of one structure on one slice (an inner
contour cuts a hole, a contour beside another is a second component; the usual
open-source readers combine them with XOR as well), and it is the rule our rasteriser
(:mod:`rtstruct.rasterize`) uses, so mask -> RTSTRUCT -> mask is exact. In addition the
contours are oriented consistently (outer boundaries counter-clockwise, hole boundaries
clockwise, as displayed with rows going down), so a reader that uses the non-zero winding
rule or the contour orientation reaches the same result. No "keyhole" cuts (a zero-width
channel joining a hole to its outer boundary) are made. The import into each TPS has not
been checked here; check it once per site with a ring-shaped structure.

Contour simplification: marching squares gives a vertex on every pixel edge crossed by
the boundary. Vertices are dropped with Douglas-Peucker at 0.25 pixel: every pixel
centre is at least 0.35 pixel (half a diagonal) from the marching-squares boundary, so no
pixel centre changes side and the rasterised mask is unchanged, while straight runs
collapse to their end points.

An empty mask is refused (:class:`~rtstruct.reader.RTStructError`): an ROI without
contours imports as an empty structure, which a planner could mistake for a result.

Multi-frame images
------------------
For a volume built from the frames of Enhanced CT/MR or Legacy Converted Enhanced CT/MR
instances, every Contour Image Sequence item (in RTReferencedSeriesSequence, one per
slice of the volume, and on each contour, its one slice) holds ReferencedSOPClassUID and
ReferencedSOPInstanceUID of the instance plus ReferencedFrameNumber of the frame: the
Image SOP Instance Reference Macro of PS3.3 Table 10-3, which C.8.8.5 (Structure Set) and
C.8.8.6 (ROI Contour) use, makes ReferencedFrameNumber required when a reference applies
to some frames of a multi-frame image. Every point of a contour still lies on its frame's
plane (from the frame's Plane Position and Plane Orientation functional groups, PS3.3
C.7.6.16). A TPS that imported the enhanced images the planner drew on resolves such
references; one that cannot import Enhanced CT/MR at all would not have sent them. Which
TPSs import such an RTSTRUCT has not been checked here (check it once per site, as for
the ring-shaped structure above).

The transfer syntax is Implicit VR Little Endian (highdicom's default): in Explicit VR a
DS element is limited to 64 KiB, which a long contour can exceed.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom
import numpy as np
from highdicom.spatial import PixelToReferenceTransformer
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import RTStructureSetStorage
from pydicom.valuerep import format_number_as_ds
from skimage.measure import approximate_polygon, find_contours

from inference.geometry import Geometry
from inference.volume import Volume
from rtstruct.conform import character_set, conform
from rtstruct.prompts import MAX_ROI_NAME_LENGTH
from rtstruct.reader import RTStructError

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE_PX = 0.25
# RTReferencedStudySequence > ReferencedSOPClassUID: the (retired) Detached Study
# Management SOP Class, which the standard's RT modules have always used there.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

# Attributes copied from volume.attributes beyond the ones SOPClass takes as arguments
# (all of the Patient, General Study and Patient Study modules that make sense to copy).
_EXTRA_PATIENT_STUDY = (
    "IssuerOfPatientID",
    "PatientBirthTime",
    "OtherPatientIDsSequence",
    "PatientComments",
    "StudyDescription",
    "PhysiciansOfRecord",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("stardust-dicom-node")
    except Exception:  # not installed (running from a checkout)
        return "0.1.0"


@dataclass
class RoiMask:
    """One structure to write: a bool (z, y, x) mask on the volume's grid."""

    name: str
    mask: np.ndarray
    color: tuple[int, int, int] = (255, 0, 0)
    interpreted_type: str = "GTV"
    algorithm_name: str = "STARDUST"
    algorithm_version: str = "0"
    description: str | None = None


# ---------------------------------------------------------------------------------------
# mask -> polygons
def _signed_area(poly: np.ndarray) -> float:
    r, c = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(c, np.roll(r, -1)) - np.dot(r, np.roll(c, -1)))


def _drop_collinear(poly: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Remove vertices of a closed polygon that lie on the line through their neighbours."""
    if len(poly) < 4:
        return poly
    prev, nxt = np.roll(poly, 1, axis=0), np.roll(poly, -1, axis=0)
    cross = (poly[:, 0] - prev[:, 0]) * (nxt[:, 1] - prev[:, 1]) - (poly[:, 1] - prev[:, 1]) * (nxt[:, 0] - prev[:, 0])
    keep = np.abs(cross) > eps
    return poly[keep] if keep.sum() >= 3 else poly


def mask_to_polygons(mask2d: np.ndarray, tolerance: float = DEFAULT_TOLERANCE_PX) -> list[np.ndarray]:
    """Boundaries of a 2D bool mask as closed polygons of (row, col) pixel-centre indices.

    Sub-pixel marching squares at 0.5 on the zero-padded mask, so every boundary is
    closed (also at the image border). The last point is not repeated. Polygons are
    simplified with Douglas-Peucker at ``tolerance`` pixel (0 keeps every vertex; keep
    it below 0.35 so that no pixel centre changes side). Outer boundaries come out
    counter-clockwise and hole boundaries clockwise (rows down); read them with the
    even-odd rule.
    """
    if not 0 <= tolerance < 0.35:
        raise ValueError(f"tolerance must be in [0, 0.35) pixel, got {tolerance}")
    padded = np.pad(np.asarray(mask2d, dtype=np.float32), 1)
    polygons = []
    for contour in find_contours(padded, 0.5, fully_connected="low", positive_orientation="high"):
        contour = contour - 1.0
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        contour = _drop_collinear(contour)
        if tolerance > 0 and len(contour) > 4:
            closed = np.vstack([contour, contour[:1]])
            contour = approximate_polygon(closed, tolerance)[:-1]
        if len(contour) < 3:
            continue
        polygons.append(np.ascontiguousarray(contour, dtype=np.float64))
    return polygons


def _format_ds(values: np.ndarray) -> list[str]:
    """Decimal strings of at most 16 characters, fixed point to 1e-6 mm where possible."""
    out = []
    for v in np.asarray(values, dtype=np.float64).ravel():
        s = f"{v:.6f}".rstrip("0").rstrip(".")
        if s in ("-0", ""):
            s = "0"
        if len(s) > 16:
            s = format_number_as_ds(float(v))
        out.append(s)
    return out


def slice_polygons_to_patient(geometry: Geometry, k: int, polygon: np.ndarray) -> np.ndarray:
    """(row, col) indices on slice ``k`` to patient (x, y, z), computed from that slice's
    own plane (its ImagePositionPatient, ImageOrientationPatient and PixelSpacing) with
    highdicom's pixel-to-reference affine."""
    transformer = PixelToReferenceTransformer(
        image_position=geometry.slice_position(k).tolist(),
        image_orientation=geometry.image_orientation,
        pixel_spacing=geometry.pixel_spacing,
    )
    # highdicom's pixel indices are (column, row); it rejects sub-pixel input, so apply
    # its affine directly.
    n = len(polygon)
    homogeneous = np.column_stack([polygon[:, 1], polygon[:, 0], np.zeros(n), np.ones(n)])
    return (homogeneous @ transformer.affine.T)[:, :3]


# ---------------------------------------------------------------------------------------
@dataclass
class _RoiContours:
    number: int
    roi: RoiMask
    contours: list[tuple[int, np.ndarray]]  # (slice index, (N, 3) patient points)


#: Type 2 attributes of the Patient and General Study modules that SOPClass takes as arguments.
_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def copied_attributes(
    attributes: dict[str, Any], keywords: Sequence[str], texts: Sequence[str] = ()
) -> tuple[Any, dict[str, Any]]:
    """(SpecificCharacterSet, keyword -> value) for a result that copies ``keywords`` from
    the images' ``attributes`` and writes ``texts`` of its own: every value made valid for
    its VR by :func:`rtstruct.conform.conform` (None where nothing valid is left: write it
    empty when Type 2, leave it out when Type 3); the character set is the images' own when
    every value encodes in it, else ISO_IR 192. Changes are logged by keyword, never with
    the value."""
    charset = character_set(
        {k: attributes.get(k) for k in ("SpecificCharacterSet", *keywords)}, [t for t in texts if t]
    )
    return charset, {k: conform(k, attributes.get(k), charset) for k in keywords}


def patient_study_arguments(copied: dict[str, Any]) -> dict[str, Any]:
    """highdicom's ``SOPClass`` arguments for the copied Patient and General Study attributes
    (from :func:`copied_attributes`). ``patient_name`` is None: set ``PatientName`` on the
    instance afterwards, as highdicom warns about valid one-component names."""
    return {
        "patient_id": copied["PatientID"],
        "patient_name": None,
        "patient_birth_date": copied["PatientBirthDate"],
        "patient_sex": copied["PatientSex"],
        "accession_number": copied["AccessionNumber"],
        "study_id": copied["StudyID"],
        "study_date": copied["StudyDate"],
        "study_time": copied["StudyTime"],
        "referring_physician_name": copied["ReferringPhysicianName"],
    }


#: Every attribute the RTSTRUCT copies from the images.
_COPIED = (
    *_PATIENT_STUDY,
    *_EXTRA_PATIENT_STUDY,
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "PositionReferenceIndicator",
)


def set_copied(ds: Dataset, copied: dict[str, Any], keywords: Sequence[str]) -> None:
    """Set the Type 3 ``keywords`` that have a value in ``copied`` (from
    :func:`copied_attributes`) on ``ds``, and the PatientIdentityRemoved /
    DeidentificationMethod pair: PatientIdentityRemoved YES requires the de-identification
    method (Type 1C), so the pair is copied only when the images carry the method."""
    for keyword in keywords:
        value = copied.get(keyword)
        if value is not None:
            try:
                setattr(ds, keyword, value)
            except (ValueError, TypeError):
                log.warning("%s of the images cannot be copied: left out", keyword)
    removed = copied.get("PatientIdentityRemoved")
    method = copied.get("DeidentificationMethod")
    if removed is not None and (removed != "YES" or method is not None):
        ds.PatientIdentityRemoved = removed
        if method is not None:
            ds.DeidentificationMethod = method


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise RTStructError(f"{what} must not be empty")
    name = name.strip()
    if len(name) > MAX_ROI_NAME_LENGTH:
        raise RTStructError(
            f"{what} {name!r} has {len(name)} characters; treatment planning systems accept at most "
            f"{MAX_ROI_NAME_LENGTH}: choose a shorter one"
        )
    if "\\" in name:
        raise RTStructError(f"{what} {name!r} contains a backslash, which DICOM does not allow")
    return name


def _image_reference(volume: Volume, k: int) -> Dataset:
    """A Contour Image Sequence item for slice ``k`` (PS3.3 Table 10-3, Image SOP Instance
    Reference Macro): its SOP class and instance, and for a frame of a multi-frame image its
    ReferencedFrameNumber (Type 1C there: required when the reference is to some frames of a
    multi-frame image, here always one frame)."""
    uid, frame = volume.image_reference(k)
    ref = Dataset()
    ref.ReferencedSOPClassUID = volume.sop_class_uid
    ref.ReferencedSOPInstanceUID = uid
    if frame is not None:
        ref.ReferencedFrameNumber = frame
    return ref


class RTStructureSet(highdicom.base.SOPClass):
    """An RT Structure Set instance (SOP class 1.2.840.10008.5.1.4.1.1.481.3).

    Built from a volume and pre-computed contours; most callers want
    :func:`write_rtstruct`, which computes the contours from masks.
    """

    def __init__(
        self,
        volume: Volume,
        rois: Sequence[_RoiContours],
        *,
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        label: str,
        series_description: str,
        structure_set_name: str | None = None,
        manufacturer: str = "STARDUST",
        manufacturer_model_name: str = "STARDUST DICOM node",
        software_versions: str | None = None,
    ) -> None:
        attrs = dict(volume.attributes or {})
        now = datetime.datetime.now()
        texts = [label, series_description, structure_set_name or ""] + [
            t
            for e in rois
            for t in (e.roi.name, e.roi.description or "", e.roi.algorithm_name, e.roi.algorithm_version)
        ]
        charset, copied = copied_attributes(attrs, _COPIED, texts)
        super().__init__(
            study_instance_uid=volume.study_instance_uid,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=RTStructureSetStorage,
            instance_number=instance_number,
            modality="RTSTRUCT",
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions or _software_version(),
            **patient_study_arguments(copied),
            series_description=series_description,
            series_date=now.date(),
            series_time=now.time(),
        )
        # Set directly: highdicom refuses valid multi-valued forms such as ['', 'ISO 2022 IR 87'].
        if charset is not None:
            self.SpecificCharacterSet = charset
        self.PatientName = copied["PatientName"]
        set_copied(self, copied, _EXTRA_PATIENT_STUDY)

        # Frame of Reference module (usage U, but validators expect it): the images' frame.
        self.FrameOfReferenceUID = volume.frame_of_reference_uid
        self.PositionReferenceIndicator = copied["PositionReferenceIndicator"]

        # RT Series: OperatorsName is Type 2.
        self.OperatorsName = None

        # Structure Set module.
        self.StructureSetLabel = label
        if structure_set_name:
            self.StructureSetName = structure_set_name
        self.StructureSetDate = now.strftime("%Y%m%d")
        self.StructureSetTime = now.strftime("%H%M%S")

        image_refs = [_image_reference(volume, k) for k in range(volume.shape[0])]
        series_item = Dataset()
        series_item.SeriesInstanceUID = volume.series_instance_uid
        series_item.ContourImageSequence = DicomSequence(image_refs)
        study_item = Dataset()
        study_item.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
        study_item.ReferencedSOPInstanceUID = volume.study_instance_uid
        study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
        frame_item = Dataset()
        frame_item.FrameOfReferenceUID = volume.frame_of_reference_uid
        frame_item.RTReferencedStudySequence = DicomSequence([study_item])
        self.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])

        ss_rois, roi_contours, observations = [], [], []
        for entry in rois:
            roi = entry.roi
            item = Dataset()
            item.ROINumber = entry.number
            item.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
            item.ROIName = roi.name
            if roi.description:
                item.ROIDescription = roi.description
            item.ROIGenerationAlgorithm = "AUTOMATIC"
            item.ROIGenerationDescription = f"{roi.algorithm_name} {roi.algorithm_version}"[:64]
            item.ROIDerivationAlgorithmIdentificationSequence = highdicom.AlgorithmIdentificationSequence(
                name=roi.algorithm_name[:64],
                family=codes.cid7162.ArtificialIntelligence,
                version=roi.algorithm_version[:64],
            )
            ss_rois.append(item)

            rc = Dataset()
            rc.ROIDisplayColor = [int(v) for v in roi.color]
            contour_items = []
            for number, (k, points) in enumerate(entry.contours, start=1):
                c = Dataset()
                c.ContourImageSequence = DicomSequence([_image_reference(volume, k)])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(points)
                c.ContourNumber = number
                c.ContourData = _format_ds(points)
                contour_items.append(c)
            rc.ContourSequence = DicomSequence(contour_items)
            rc.ReferencedROINumber = entry.number
            roi_contours.append(rc)

            obs = Dataset()
            obs.ObservationNumber = entry.number
            obs.ReferencedROINumber = entry.number
            obs.RTROIInterpretedType = (roi.interpreted_type or "").strip().upper() or None
            obs.ROIInterpreter = None
            observations.append(obs)

        self.StructureSetROISequence = DicomSequence(ss_rois)
        self.ROIContourSequence = DicomSequence(roi_contours)
        self.RTROIObservationsSequence = DicomSequence(observations)


def write_rtstruct(
    volume: Volume,
    rois: Sequence[RoiMask],
    *,
    label: str = "STARDUST_AI",
    series_description: str = "STARDUST AI contours",
    series_number: int = 901,
    instance_number: int = 1,
    structure_set_name: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE_PX,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> RTStructureSet:
    """A new RTSTRUCT on ``volume`` with one ROI per :class:`RoiMask`.

    Raises :class:`~rtstruct.reader.RTStructError` for a mask of the wrong shape, an
    empty mask, a name or label longer than 16 characters, or duplicate ROI names.
    Save it with ``ds.save_as(path, enforce_file_format=True)``.
    """
    if not rois:
        raise RTStructError("no ROIs to write")
    label = _check_name(label, "StructureSetLabel")
    seen: set[str] = set()
    entries = []
    geometry = volume.geometry
    for number, roi in enumerate(rois, start=1):
        name = _check_name(roi.name, "ROI name")
        if name.casefold() in seen:
            raise RTStructError(f"ROI name {name!r} is used twice")
        seen.add(name.casefold())
        mask = np.asarray(roi.mask)
        if mask.shape != geometry.shape:
            raise RTStructError(f"mask of ROI {name!r} has shape {mask.shape}, the volume {geometry.shape}")
        mask = mask.astype(bool, copy=False)
        if not mask.any():
            raise RTStructError(f"mask of ROI {name!r} is empty: nothing to write")
        color = tuple(int(v) for v in roi.color)
        if len(color) != 3 or min(color) < 0 or max(color) > 255:
            raise RTStructError(f"colour of ROI {name!r} must be three values 0..255, got {roi.color}")
        contours: list[tuple[int, np.ndarray]] = []
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            for polygon in mask_to_polygons(mask[k], tolerance):
                contours.append((int(k), slice_polygons_to_patient(geometry, int(k), polygon)))
        clean = RoiMask(
            name=name,
            mask=mask,
            color=color,
            interpreted_type=roi.interpreted_type,
            algorithm_name=roi.algorithm_name,
            algorithm_version=roi.algorithm_version,
            description=roi.description,
        )
        entries.append(_RoiContours(number=number, roi=clean, contours=contours))
        log.debug("ROI %s: %d contours on %d slices", name, len(contours), len({k for k, _ in contours}))
    return RTStructureSet(
        volume,
        entries,
        series_instance_uid=series_instance_uid or highdicom.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or highdicom.UID(),
        instance_number=instance_number,
        label=label,
        series_description=series_description,
        structure_set_name=structure_set_name,
    )
