"""Write QA pictures as a DICOM Secondary Capture series (highdicom), for PACS that show
neither RTSTRUCT nor SEG.

:func:`write_secondary_captures` makes one Secondary Capture Image instance (RGB, 8 bits)
per picture, all in one new series of the images' study: patient and study attributes are
copied from ``volume.attributes`` and made valid for their VR as for the result RTSTRUCT, ConversionType ``WSD``
(workstation), BurnedInAnnotation ``YES`` (the caption: ROI name, slice number, area;
no patient name or ID), the patient orientation of the slices' rows and columns, and a
SourceImageSequence naming the slice each picture shows. The pictures are cropped and
resampled, so they carry no pixel spacing and no position: they are for looking at, not
for measuring.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom
import numpy as np
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from inference.volume import Volume
from rtstruct.reader import RTStructError
from rtstruct.writer import (
    _EXTRA_PATIENT_STUDY,
    _PATIENT_STUDY,
    _software_version,
    copied_attributes,
    patient_study_arguments,
    set_copied,
)

__all__ = ["Picture", "write_secondary_captures"]

log = logging.getLogger(__name__)

_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z (DICOM patient axes)


@dataclass(frozen=True)
class Picture:
    """One picture to store: an RGB image, the slice it shows, its caption."""

    rgb: np.ndarray  # uint8 (rows, columns, 3)
    slice_index: int
    description: str


def _orientation(direction: np.ndarray) -> str:
    """The patient-orientation letters of a direction (its main axes, largest first)."""
    order = np.argsort(-np.abs(direction))
    letters = [_LETTERS[a][0 if direction[a] > 0 else 1] for a in order if abs(direction[a]) > 0.2]
    return "".join(letters[:3]) or "L"


def write_secondary_captures(
    volume: Volume,
    pictures: Sequence[Picture],
    *,
    series_description: str = "STARDUST AI QA overlays",
    series_number: int = 903,
    series_instance_uid: str | None = None,
) -> list[SCImage]:
    """One Secondary Capture instance per picture, in one new series."""
    if not pictures:
        raise RTStructError("no pictures to write")
    attrs = dict(volume.attributes or {})
    series_uid = series_instance_uid or highdicom.UID()
    direction = np.asarray(volume.geometry.direction, dtype=float)  # rows: normal, column direction, row direction
    orientation = (_orientation(direction[2]), _orientation(direction[1]))
    now = datetime.datetime.now()
    # One character set for the series (every caption counted); conformed values logged once.
    keywords = (*_PATIENT_STUDY, *_EXTRA_PATIENT_STUDY, "PatientIdentityRemoved", "DeidentificationMethod")
    charset, copied = copied_attributes(attrs, keywords, [series_description] + [p.description for p in pictures])
    out = []
    for number, picture in enumerate(pictures, start=1):
        rgb = np.ascontiguousarray(picture.rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise RTStructError(f"picture {number} is not an RGB image (shape {rgb.shape})")
        if not 0 <= picture.slice_index < len(volume.sop_instance_uids):
            raise RTStructError(f"picture {number} shows slice {picture.slice_index}, outside the volume")
        sc = SCImage(
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=volume.study_instance_uid,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=highdicom.UID(),
            instance_number=number,
            manufacturer="STARDUST",
            **patient_study_arguments(copied),
            patient_orientation=orientation,
            series_description=series_description,
            manufacturer_model_name="STARDUST DICOM node",
            software_versions=_software_version(),
        )
        if charset is not None:
            sc.SpecificCharacterSet = charset
        sc.PatientName = copied["PatientName"]
        set_copied(sc, copied, _EXTRA_PATIENT_STUDY)
        sc.ConversionType = "WSD"
        sc.Laterality = None  # Type 2C: the images' laterality is not known here (written empty)
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = picture.description[:10240]
        sc.DerivationDescription = "QA picture: result contour over the image, cropped and resampled"[:1024]
        sc.ContentDate = now.strftime("%Y%m%d")
        sc.ContentTime = now.strftime("%H%M%S")
        source = Dataset()
        source.ReferencedSOPClassUID = volume.sop_class_uid
        uid, frame = volume.image_reference(picture.slice_index)
        source.ReferencedSOPInstanceUID = uid
        if frame is not None:  # a frame of an Enhanced CT/MR instance
            source.ReferencedFrameNumber = frame
        sc.SourceImageSequence = DicomSequence([source])
        out.append(sc)
    return out
