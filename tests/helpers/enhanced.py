"""Multi-frame (enhanced) CT and MR instances made from a single-frame series, for tests.

* :func:`write_enhanced` builds a true Enhanced CT / Enhanced MR Image Storage instance by
  hand with pydicom: the frames of the series in one Pixel Data, with the functional groups
  of PS3.3 C.7.6.16 (Plane Position per frame; Plane Orientation and Pixel Measures shared
  or per frame; Pixel Value Transformation for CT; Frame Content with the stack and the
  dimension index values) and the Multi-frame Dimension module. The frames can be stored in
  an order other than along the slice normal, which the loader must not trust.
* :func:`write_legacy_converted` uses highdicom's ``LegacyConvertedEnhancedCTImage`` /
  ``LegacyConvertedEnhancedMRImage``, a real converter, for the Legacy Converted classes.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedCTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

#: Top-level attributes copied from the first single-frame image.
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "PatientPosition",
)


def sorted_slices(files: Sequence[Path]) -> list[Dataset]:
    """The datasets of single-frame files, sorted along their slice normal."""
    datasets = [pydicom.dcmread(f) for f in files]
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal))


def _item(**values) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def write_enhanced(
    files: Sequence[Path],
    path: Path,
    *,
    per_frame_geometry: bool = False,
    frame_order: str = "reversed",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    stack_ids: Sequence[str] | None = None,
) -> Path:
    """An Enhanced CT or MR instance (by the files' Modality) holding every slice of ``files``.

    ``per_frame_geometry``: Plane Orientation and Pixel Measures in every frame's item
    instead of the shared item. ``frame_order``: ``"sorted"`` (along the normal),
    ``"reversed"`` or ``"shuffled"`` (a fixed permutation). ``stack_ids``: one StackID per
    sorted slice (default: all ``"1"``).
    """
    slices = sorted_slices(files)
    n = len(slices)
    order = list(range(n))
    if frame_order == "reversed":
        order.reverse()
    elif frame_order == "shuffled":
        order = [int(k) for k in np.random.default_rng(3).permutation(n)]
    elif frame_order != "sorted":
        raise ValueError(f"unknown frame_order {frame_order!r}")
    first = slices[0]
    modality = str(first.Modality)
    ct = modality == "CT"
    sop_class = EnhancedCTImageStorage if ct else EnhancedMRImageStorage
    now = datetime.datetime.now()

    ds = Dataset()
    for keyword in _COPIED:
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.Modality = modality
    ds.SeriesNumber = 5
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if ct else "OTHER", "NONE"]
    ds.ContentQualification = "PRODUCT"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.ManufacturerModelName = "STARDUST test"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "0"
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    if ct:
        ds.AcquisitionNumber = 1
    else:
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = "1.5"
        ds.ResonantNucleus = "1H"
        ds.KSpaceFiltering = "NONE"
        ds.ApplicableSafetyStandardAgency = "IEC"
        ds.MagneticFieldStrength = "1.5"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(first.Rows), int(first.Columns)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(first.PixelRepresentation)
    ds.NumberOfFrames = n

    # Multi-frame Dimension module: the frames are indexed by stack and in-stack position.
    dim_uid = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=pydicom.tag.Tag("StackID"),
                FunctionalGroupPointer=pydicom.tag.Tag("FrameContentSequence"),
            ),
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=pydicom.tag.Tag("InStackPositionNumber"),
                FunctionalGroupPointer=pydicom.tag.Tag("FrameContentSequence"),
            ),
        ]
    )

    thickness = str(first.get("SliceThickness", "") or "1")
    measures = _item(PixelSpacing=list(first.PixelSpacing), SliceThickness=thickness)
    if "SpacingBetweenSlices" in first:
        measures.SpacingBetweenSlices = first.SpacingBetweenSlices
    orientation = _item(ImageOrientationPatient=list(first.ImageOrientationPatient))
    shared = Dataset()
    if not per_frame_geometry:
        shared.PixelMeasuresSequence = DicomSequence([measures])
        shared.PlaneOrientationSequence = DicomSequence([orientation])
    if ct:
        shared.PixelValueTransformationSequence = DicomSequence(
            [
                _item(
                    RescaleIntercept=first.get("RescaleIntercept", "0"),
                    RescaleSlope=first.get("RescaleSlope", "1"),
                    RescaleType="HU",
                )
            ]
        )
        shared.CTImageFrameTypeSequence = DicomSequence(
            [_item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"], PixelPresentation="MONOCHROME",
                   VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE")]
        )  # fmt: skip
    else:
        shared.MRImageFrameTypeSequence = DicomSequence(
            [_item(FrameType=["ORIGINAL", "PRIMARY", "OTHER", "NONE"], PixelPresentation="MONOCHROME",
                   VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
                   ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T1")]
        )  # fmt: skip
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    frames = []
    stacks = list(stack_ids) if stack_ids is not None else ["1"] * n
    for k in order:
        sl = slices[k]
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([_item(ImagePositionPatient=list(sl.ImagePositionPatient))])
        if per_frame_geometry:
            item.PixelMeasuresSequence = DicomSequence([measures])
            item.PlaneOrientationSequence = DicomSequence(
                [_item(ImageOrientationPatient=list(sl.ImageOrientationPatient))]
            )
        in_stack = sum(1 for j in range(k + 1) if stacks[j] == stacks[k])
        item.FrameContentSequence = DicomSequence(
            [
                _item(
                    StackID=stacks[k],
                    InStackPositionNumber=in_stack,
                    DimensionIndexValues=[int(stacks[k]) if stacks[k].isdigit() else 1, in_stack],
                    FrameAcquisitionDateTime=ds.AcquisitionDateTime,
                    FrameReferenceDateTime=ds.AcquisitionDateTime,
                    FrameAcquisitionDuration=1.0,
                )
            ]
        )
        per_frame.append(item)
        frames.append(sl.pixel_array.astype(np.int16 if ds.PixelRepresentation else np.uint16))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    ds["PixelData"].VR = "OW"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_legacy_converted(files: Sequence[Path], path: Path, *, series_instance_uid: str | None = None) -> Path:
    """A Legacy Converted Enhanced CT or MR instance made by highdicom's converter."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage

    slices = sorted_slices(files)
    convert = LegacyConvertedEnhancedCTImage if slices[0].Modality == "CT" else LegacyConvertedEnhancedMRImage
    image = convert(
        slices,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=6,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(path, enforce_file_format=True)
    return path
