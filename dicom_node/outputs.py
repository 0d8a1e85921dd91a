"""The files of a result, written by the worker under ``results/<job>/``.

Every result has its RTSTRUCT (``RS.<uid>.dcm``) and its QA pictures (``qa/*.png``,
:mod:`dicom_node.qa`). A rule's ``outputs`` (default ``[rtstruct]``) say what is
*delivered*; for ``seg`` the worker also writes a DICOM Segmentation (``SEG.<uid>.dcm``,
:mod:`rtstruct.seg`) and for ``overlay`` the QA pictures as a Secondary Capture series
(``SC.<uid>.dcm``, one per picture, :mod:`rtstruct.secondary_capture`). Every DICOM
file is written atomically and durably (temporary name, fsync, rename; the folder is
fsynced once after the last) before the job is completed, and the job's ``detail`` lists
them per output (relative to ``data_dir``) for the sender and the case page. The PNG
pictures are only renamed into place, not fsynced: they are for the page, and one lost
in a power cut costs a picture, not a delivery (the Secondary Capture files are durable).

QA pictures that cannot be drawn (a bug, not bad input) do not hold back the RTSTRUCT:
the failure is a warning on the case page, unless the rule delivers them (``overlay``),
in which case the job fails like any other unexpected error and is tried again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.durable import fsync_dir, fsync_file
from dicom_node.logs import event, get_logger
from dicom_node.rows import index_path
from dicom_node.states import OutputKind

__all__ = ["ResultFiles", "write_outputs", "write_dataset", "write_bytes"]

log = get_logger(__name__)


@dataclass
class ResultFiles:
    """What :func:`write_outputs` wrote: files per output (relative to data_dir), QA facts, warnings."""

    files: dict[str, list[str]] = field(default_factory=dict)
    qa: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_dataset(ds, path: Path) -> Path:
    """``ds`` to ``path``: temporary name, fsync, rename (the caller fsyncs the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    ds.save_as(tmp, enforce_file_format=True)
    fsync_file(tmp)
    os.replace(tmp, path)
    return path


def write_bytes(data: bytes, path: Path) -> Path:
    """``data`` to ``path`` under a temporary name, then renamed (not fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def _roi_masks(case):
    from rtstruct.writer import RoiMask

    color = tuple(case.dataset.ROIContourSequence[0].ROIDisplayColor)
    return [
        RoiMask(
            name=t.roi_name,
            mask=t.result.mask,
            color=tuple(int(v) for v in color),
            interpreted_type="GTV",
            algorithm_name=t.result.algorithm_name,
            algorithm_version=str(t.result.engine_version),
        )
        for t in case.targets
    ]


def write_outputs(
    result_dir: Path,
    case,
    outputs: list[str],
    window: tuple[float, float] | None,
    image_paths: list[Path],
    data_dir: Path,
) -> ResultFiles:
    """Write the RTSTRUCT, the QA pictures and the outputs the rule asks for (``case``:
    :class:`dicom_node.pipeline.CaseResult`)."""
    out = ResultFiles()
    fresh = not result_dir.exists()
    result_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        fsync_dir(result_dir.parent)
    rs = write_dataset(case.dataset, result_dir / f"RS.{case.dataset.SOPInstanceUID}.dcm")
    out.files[OutputKind.RTSTRUCT] = [index_path(rs, data_dir)]
    color = tuple(int(v) for v in case.dataset.ROIContourSequence[0].ROIDisplayColor)

    pictures = []
    try:
        from dicom_node.qa import qa_pictures

        pictures = qa_pictures(case.volume, case.targets, window, color)
        for picture in pictures:
            write_bytes(picture.png(), result_dir / "qa" / picture.file_name)
            out.qa.append({**picture.facts(), "file": f"qa/{picture.file_name}"})
    except Exception as exc:
        if OutputKind.OVERLAY in outputs:
            raise
        why = f"QA pictures could not be drawn: {type(exc).__name__}: {exc}"
        event(log, "qa_failed", level=logging.ERROR, why=why, exc_info=True)
        out.warnings.append(why)

    if OutputKind.SEG in outputs:
        from rtstruct.seg import write_seg

        seg = write_seg(case.volume, image_paths, _roi_masks(case))
        path = write_dataset(seg, result_dir / f"SEG.{seg.SOPInstanceUID}.dcm")
        out.files[OutputKind.SEG] = [index_path(path, data_dir)]

    if OutputKind.OVERLAY in outputs:
        from rtstruct.secondary_capture import Picture, write_secondary_captures

        captions = [
            f"{p.roi}: slice {p.slice_index + 1} of {p.slice_count}, area {p.area_mm2:.0f} mm2"
            + (", prompted" if p.prompted else "")
            for p in pictures
        ]
        series = write_secondary_captures(
            case.volume, [Picture(p.rgb, p.slice_index, c) for p, c in zip(pictures, captions)]
        )
        out.files[OutputKind.OVERLAY] = [
            index_path(write_dataset(sc, result_dir / f"SC.{sc.SOPInstanceUID}.dcm"), data_dir) for sc in series
        ]
    fsync_dir(result_dir)  # every DICOM file's name, at once
    return out
