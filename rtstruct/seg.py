"""Write the result masks as a DICOM Segmentation (SEG) instance, built with highdicom.

:func:`write_seg` makes one binary SEG on the source image series of a
:class:`~inference.volume.Volume`: one segment per :class:`~rtstruct.writer.RoiMask`
(label = the ROI name, property category "Morphologically Abnormal Structure", type
"Neoplasm", algorithm type AUTOMATIC with the algorithm's name and version as in the
RTSTRUCT, the ROI colour as its recommended display colour), frames only where a segment
is present, each frame referencing its source slice (for a volume of the frames of one
Enhanced CT/MR instance: that instance and its frame, in its frame order; the frames of
several multi-frame instances are refused, as highdicom takes one multi-frame source). highdicom takes patient, study and
frame of reference from the source images' headers, which are read (without pixel data)
from the image files and put in the volume's slice order; their values are made valid for
their VR first (:mod:`rtstruct.conform`), as for the RTSTRUCT. The SEG is a new series and a
new instance. A mask of the wrong shape, an empty mask or an image file that is not a
slice of the volume is refused with :class:`~rtstruct.reader.RTStructError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom
import numpy as np
from highdicom.color import CIELabColor
from highdicom.seg import SegmentAlgorithmTypeValues, Segmentation, SegmentationTypeValues, SegmentDescription
from pydicom.sr.codedict import codes

from inference.volume import Volume
from rtstruct.conform import MAX_LENGTH, character_set, conform_dataset, log_done
from rtstruct.headers import read_header
from rtstruct.reader import RTStructError
from rtstruct.writer import RoiMask, _software_version

__all__ = ["write_seg"]

log = logging.getLogger(__name__)


def _source_images(volume: Volume, image_paths: Sequence[str | Path]) -> list:
    by_uid = {}
    for path in image_paths:
        ds = read_header(path)
        by_uid[str(ds.SOPInstanceUID)] = ds
    missing = [uid for uid in volume.sop_instance_uids if uid not in by_uid]
    if missing:
        raise RTStructError(f"{len(missing)} of the volume's {len(volume.sop_instance_uids)} slices have no image file")
    if volume.multi_frame:  # highdicom segments one multi-frame source image, by its frames
        instances = list(dict.fromkeys(volume.sop_instance_uids))
        if len(instances) > 1:
            raise RTStructError(
                f"a SEG on the frames of {len(instances)} multi-frame instances cannot be written (a SEG "
                "references one multi-frame source image); the RTSTRUCT result references them all"
            )
        return [by_uid[instances[0]]]
    return [by_uid[uid] for uid in volume.sop_instance_uids]


def _in_frame_order(volume: Volume, planes: np.ndarray, frames: int) -> np.ndarray:
    """The (slice, row, column, segment) planes of a volume of frames put in the source
    instance's frame order (highdicom's order for a multi-frame source image)."""
    out = np.zeros((frames, *planes.shape[1:]), dtype=planes.dtype)
    out[np.asarray(volume.frame_numbers) - 1] = planes
    return out


def _conform_sources(sources: list, texts: Sequence[str]) -> object:
    """Make the headers' values valid for their VR in place (highdicom copies the Patient
    and Study modules from them as they are, and refuses some invalid values itself), and
    choose the SEG's SpecificCharacterSet: the images' own when every text encodes in it,
    else ISO_IR 192. Each change is logged once per attribute, never with the value."""
    first = sources[0]
    values: dict[str, object] = {}
    for elem in first:
        if (
            elem.keyword
            and elem.VR in MAX_LENGTH
            and elem.value not in (None, "")
            and not isinstance(elem.value, bytes)
        ):
            values[elem.keyword] = [str(v) for v in elem.value] if elem.VM > 1 else str(elem.value)
    values["SpecificCharacterSet"] = first.get("SpecificCharacterSet")
    charset = character_set(values, texts)
    done: dict[str, list[str]] = {}
    for ds in sources:
        for keyword, notes in conform_dataset(ds, charset).items():
            done.setdefault(keyword, []).extend(notes)
        if str(ds.get("PatientIdentityRemoved", "")) == "YES" and not (
            ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")
        ):
            # YES requires the method (Type 1C): leave the flag out, as in the RTSTRUCT.
            del ds.PatientIdentityRemoved
            done.setdefault("PatientIdentityRemoved", []).append("is YES without the method: left out")
        if charset is None:
            ds.pop("SpecificCharacterSet", None)
        else:
            ds.SpecificCharacterSet = charset
    log_done(done)
    return charset


def write_seg(
    volume: Volume,
    image_paths: Sequence[str | Path],
    rois: Sequence[RoiMask],
    *,
    series_description: str = "STARDUST AI segmentation",
    series_number: int = 902,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Segmentation:
    """A binary DICOM SEG of ``rois`` on the images of ``volume`` (``image_paths``: its files)."""
    if not rois:
        raise RTStructError("no ROIs to write")
    shape = volume.geometry.shape
    planes = np.zeros((shape[0], shape[1], shape[2], len(rois)), dtype=bool)
    descriptions = []
    for number, roi in enumerate(rois, start=1):
        mask = np.asarray(roi.mask)
        if mask.shape != shape:
            raise RTStructError(f"mask of ROI {roi.name!r} has shape {mask.shape}, the volume {shape}")
        if not mask.any():
            raise RTStructError(f"mask of ROI {roi.name!r} is empty: nothing to write")
        planes[..., number - 1] = mask.astype(bool, copy=False)
        descriptions.append(
            SegmentDescription(
                segment_number=number,
                segment_label=roi.name[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Neoplasm,
                algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=highdicom.AlgorithmIdentificationSequence(
                    name=roi.algorithm_name[:64],
                    family=codes.cid7162.ArtificialIntelligence,
                    version=roi.algorithm_version[:64],
                ),
                display_color=CIELabColor.from_rgb(*(int(v) for v in roi.color)),
            )
        )
    sources = _source_images(volume, image_paths)
    if volume.multi_frame:
        planes = _in_frame_order(volume, planes, int(sources[0].NumberOfFrames))
    texts = [series_description] + [t for roi in rois for t in (roi.name, roi.algorithm_name, roi.algorithm_version)]
    charset = _conform_sources(sources, texts)
    seg = Segmentation(
        source_images=sources,
        pixel_array=planes,
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or highdicom.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or highdicom.UID(),
        instance_number=1,
        manufacturer="STARDUST",
        manufacturer_model_name="STARDUST DICOM node",
        software_versions=_software_version(),
        device_serial_number="0",
        content_label="STARDUST_AI",
        content_description=series_description[:64],
        specific_character_set=charset,
    )
    seg.SeriesDescription = series_description
    log.debug("SEG: %d segments on %d frames", len(rois), int(seg.NumberOfFrames))
    return seg
