"""The one place that reads DICOM file headers and says what a file is.

Everybody who looks at files uses this module: the series loader
(:func:`rtstruct.series.load_series`), the research tools (``convert``, ``study``), the
rule engine and ``dicom-node rules test``; the store and case assembly, which see
instances as bytes on the network path, use its classification (:func:`kind_of`) of the
few attributes they pick up themselves.

* :func:`read_header` reads a file without its pixel data. A file with the Part 10
  preamble is read as such; a *bare* dataset (no preamble, no file meta, as some tools
  write) is accepted when it parses and carries a SOPClassUID. Anything else raises
  :class:`NotDicom` (not DICOM at all) or :class:`CorruptDicom` (DICOM, but truncated or
  broken), each with a message that says which.
* :func:`kind_of` classifies by SOP class and modality: a CT or MR **image**
  (single- or multi-frame; see :data:`SINGLE_FRAME_IMAGE_CLASSES` and
  :data:`MULTI_FRAME_IMAGE_CLASSES`), an **RTSTRUCT**, or **other** DICOM (RTPLAN,
  RTDOSE, SR, secondary capture, ...), which is never part of a case.
* :func:`file_info` does both for one path and never raises: a small, picklable
  :class:`FileInfo` (the research scan reads headers in worker processes). For an
  RTSTRUCT it also carries what a case needs to know of it: frames of reference,
  referenced series and images, ROI names.

UIDs come from pydicom's named constants, never literals.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRColorImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
)

__all__ = [
    "IMAGE_MODALITIES",
    "MULTI_FRAME_IMAGE_CLASSES",
    "NOT_DICOM_SUFFIXES",
    "SINGLE_FRAME_IMAGE_CLASSES",
    "CorruptDicom",
    "DicomFileError",
    "FileInfo",
    "FileKind",
    "NotDicom",
    "StructureInfo",
    "file_info",
    "kind_of",
    "read_header",
    "sop_class_name",
]

#: Modalities of the images a case is segmented on.
IMAGE_MODALITIES = ("CT", "MR")
#: Single-frame image SOP classes a volume is built from, with their modality.
SINGLE_FRAME_IMAGE_CLASSES: dict[str, str] = {CTImageStorage: "CT", MRImageStorage: "MR"}
#: Multi-frame (enhanced) CT/MR SOP classes, with their modality.
MULTI_FRAME_IMAGE_CLASSES: dict[str, str] = {
    EnhancedCTImageStorage: "CT",
    LegacyConvertedEnhancedCTImageStorage: "CT",
    EnhancedMRImageStorage: "MR",
    EnhancedMRColorImageStorage: "MR",
    LegacyConvertedEnhancedMRImageStorage: "MR",
}
#: Files with these suffixes are not DICOM: passed over silently when they do not parse.
NOT_DICOM_SUFFIXES = frozenset(
    {
        ".txt", ".md", ".rst", ".csv", ".tsv", ".json", ".yaml", ".yml", ".xml", ".html", ".pdf",
        ".npz", ".npy", ".png", ".jpg", ".jpeg", ".gif", ".py", ".log", ".zip", ".gz", ".tar", ".nii",
    }
)  # fmt: skip
#: Suffixes that promise DICOM: such a file that does not parse is an error, not noise.
DICOM_SUFFIXES = frozenset({".dcm", ".ima", ".dicom"})


class FileKind(StrEnum):
    IMAGE = "image"  # a CT or MR image (single- or multi-frame)
    RTSTRUCT = "rtstruct"
    OTHER = "other"  # DICOM that is neither (RTPLAN, RTDOSE, SR, ...)
    ERROR = "error"  # looks like DICOM but cannot be read; FileInfo.error says why
    NOT_DICOM = "not-dicom"  # not a DICOM file at all


class DicomFileError(ValueError):
    """A file cannot be read as DICOM; the message names the file and says why (``reason``
    says why alone)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NotDicom(DicomFileError):
    """Neither a Part 10 file nor a bare dataset with a SOPClassUID."""


class CorruptDicom(DicomFileError):
    """A DICOM file that is truncated or broken."""


def read_header(path: str | Path, *, stop_before_pixels: bool = True) -> pydicom.Dataset:
    """The dataset of a DICOM file (without pixel data by default); see the module doc.

    Raises :class:`NotDicom` or :class:`CorruptDicom`; an unreadable file (permissions,
    a folder) is :class:`CorruptDicom` with the OS error.
    """
    path = Path(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        first = exc  # no preamble / DICM prefix: maybe a bare dataset
    except OSError as exc:
        raise CorruptDicom(path, f"cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for truncated data
        raise CorruptDicom(path, f"corrupt DICOM file: {type(exc).__name__}: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # guessing the VRs of a file that may not be DICOM
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception:  # noqa: BLE001 - it is not a bare dataset either
        ds = None
    if ds is not None and "SOPClassUID" in ds:
        return ds
    raise NotDicom(path, f"not a DICOM file ({first})")


def kind_of(sop_class_uid: str | None, modality: str | None) -> FileKind:
    """Image (by SOP class), RTSTRUCT (by SOP class or Modality ``RTSTRUCT``) or other."""
    sop_class = str(sop_class_uid or "").strip()
    mod = str(modality or "").strip().upper()
    if sop_class in SINGLE_FRAME_IMAGE_CLASSES or sop_class in MULTI_FRAME_IMAGE_CLASSES:
        return FileKind.IMAGE
    if sop_class == RTStructureSetStorage or mod == "RTSTRUCT":
        return FileKind.RTSTRUCT
    return FileKind.OTHER


def image_modality(ds: pydicom.Dataset) -> str:
    """The Modality of an image, or the one its SOP class implies when it is missing."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    default = SINGLE_FRAME_IMAGE_CLASSES.get(sop_class) or MULTI_FRAME_IMAGE_CLASSES.get(sop_class, "")
    return str(ds.get("Modality", "") or "").strip().upper() or default


def sop_class_name(uid: str) -> str:
    """A SOP class's name ("CT Image Storage"), or ``SOP class <uid>`` when unknown."""
    name = UID(uid).name
    return name if name and name != uid else f"SOP class {uid}"


@dataclass(frozen=True)
class StructureInfo:
    """What a case needs to know of an RTSTRUCT (read with :func:`rtstruct.read_rtstruct`)."""

    label: str
    frame_of_reference_uids: tuple[str, ...]
    referenced_series_uids: tuple[str, ...]
    referenced_image_uids: tuple[str, ...]
    roi_names: tuple[str, ...]


@dataclass(frozen=True)
class FileInfo:
    """One file, classified. Text fields are "" when the header lacks them."""

    path: Path
    kind: FileKind
    error: str = ""  # ERROR (and NOT_DICOM of a file that promised DICOM): why
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    modality: str = ""
    series_uid: str = ""
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    patient_id: str = ""
    series_number: str = ""
    multi_frame: bool = False
    structure: StructureInfo | None = field(default=None, repr=False)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def file_info(path: str | Path, *, structure_details: bool = True) -> FileInfo:
    """:func:`read_header` and :func:`kind_of` of one file; never raises.

    A file that is not DICOM is ``NOT_DICOM`` (with an ``error`` only when its suffix
    promised DICOM, e.g. ``.dcm``); a corrupt one is ``ERROR``. With
    ``structure_details``, an RTSTRUCT is read in full (its references and ROI names;
    an unusable one is ``ERROR`` with the reason).
    """
    path = Path(path)
    try:
        ds = read_header(path)
    except NotDicom:
        promised = path.suffix.lower() in DICOM_SUFFIXES
        error = "not a readable DICOM file (no DICM prefix, no DICOM header)" if promised else ""
        return FileInfo(path, FileKind.NOT_DICOM, error=error)
    except CorruptDicom as exc:
        return FileInfo(path, FileKind.ERROR, error=exc.reason)
    sop_class = _text(ds, "SOPClassUID")
    kind = kind_of(sop_class, _text(ds, "Modality"))
    common = dict(
        sop_class_uid=sop_class,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        patient_id=_text(ds, "PatientID"),
        series_number=_text(ds, "SeriesNumber"),
    )
    if kind is FileKind.IMAGE:
        if not common["series_uid"]:
            return FileInfo(path, FileKind.ERROR, error="image without SeriesInstanceUID")
        frames = ds.get("NumberOfFrames")
        multi = sop_class in MULTI_FRAME_IMAGE_CLASSES or _int(frames) > 1
        return FileInfo(path, kind, modality=image_modality(ds), multi_frame=multi, **common)
    if kind is FileKind.RTSTRUCT and structure_details:
        from rtstruct.reader import RTStructError, read_rtstruct

        try:
            ss = read_rtstruct(ds)
        except RTStructError as exc:
            return FileInfo(path, FileKind.ERROR, error=f"unusable RTSTRUCT: {exc}")
        info = StructureInfo(
            label=ss.label,
            frame_of_reference_uids=tuple(ss.frame_of_reference_uids),
            referenced_series_uids=tuple(ss.referenced_series_uids),
            referenced_image_uids=tuple(ss.referenced_image_uids),
            roi_names=tuple(ss.roi_names),
        )
        return FileInfo(path, kind, modality="RTSTRUCT", structure=info, **common)
    return FileInfo(path, kind, modality=_text(ds, "Modality").upper(), **common)


def _int(value) -> int:
    try:
        return int(float(value[0] if isinstance(value, (list, tuple)) else value))
    except (TypeError, ValueError, IndexError):
        return 0


def file_infos(files: list[Path], *, jobs: int = 1, progress: bool = False) -> list[FileInfo]:
    """:func:`file_info` of every file, in order; ``jobs`` worker processes for many files."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="reading headers", unit="file", leave=False)
    try:
        if jobs <= 1 or len(files) < 64:
            infos = []
            for path in files:
                infos.append(file_info(path))
                if bar:
                    bar.update(1)
            return infos
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            infos = []
            for info in pool.map(file_info, files, chunksize=32):
                infos.append(info)
                if bar:
                    bar.update(1)
            return infos
    finally:
        if bar:
            bar.close()
