"""``dicom-node convert``: DICOM cases to one NPZ file per case.

Every image series with an RTSTRUCT on it (see :mod:`.cases`) becomes one compressed
NPZ file holding:

=========================  =================================================================
``imgs``                   the image, (z, y, x), original values as loaded (HU for CT;
                           int16 or float32, see :func:`rtstruct.series.load_series`)
``gts``                    label map, same shape; uint8 (uint16 beyond 255 labels);
                           label ``n`` is the ``n``-th selected ROI, 0 is background
``label_names``            the selected ROI names, in label order (str array)
``spacing``                (dz, dy, dx) in mm
``origin``                 patient (x, y, z) of the centre of voxel [0, 0, 0] (first slice)
``direction``              3x3, rows = unit vectors of the z, y, x index axes
                           (see :mod:`inference.geometry`)
``modality``               "CT" or "MR"
``patient``                which cases share a patient (``dicom-node finetune`` never splits
                           them): the PatientID, or with ``--pseudonymize`` a pseudonym
                           ``patient_0001`` ... that is the same for every case of one patient
                           in one conversion (``pseudonym_map.csv`` maps it back)
``series_instance_uid``,   only without ``--pseudonymize``, as are
``study_instance_uid``,    ``sop_instance_uids`` (per slice) and
``frame_of_reference_uid`` ``rtstruct_sop_instance_uids``
=========================  =================================================================

ROIs that overlap cannot all keep every voxel in one label map: the *smaller* ROI wins
the shared voxels (a GTV inside an organ or an oedema stays whole), and the report says
how many voxels each larger ROI lost. So that nothing is lost, such a file also holds
``roi_masks``: every selected ROI's whole mask, bit-packed along x,
``np.unpackbits(roi_masks, axis=-1, count=nx).astype(bool)`` -> (labels, z, y, x);
``dicom-node study`` uses it when present.

Without ``--pseudonymize`` files are ``OUT/<dataset>/<PatientID>_<modality>_s<series
number>_<uid hash>.npz``. With it, files are ``OUT/case_0001.npz`` ... (no folder, no
identifier, no UID in the file), and ``OUT/pseudonym_map.csv`` maps each case to its
dataset, source folder, PatientID, StudyInstanceUID and SeriesInstanceUID. That map and
``OUT/convert_report.csv`` (every case and everything skipped, with the reason) name
the sources: keep them with the archive, share only the NPZ files.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicom_node.research.cases import CaseLoadError, DicomCase, Scan, load_dicom_case, pack_labels, scan

log = logging.getLogger(__name__)

REPORT_NAME = "convert_report.csv"
MAP_NAME = "pseudonym_map.csv"
REPORT_FIELDS = [
    "case",
    "dataset",
    "status",
    "reason",
    "file",
    "labels",
    "label_voxels",
    "shape",
    "spacing",
    "modality",
    "source",
    "warnings",
]
MAP_FIELDS = ["case", "patient", "dataset", "source", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"]


@dataclass
class ConvertTask:
    """One case to convert (picklable: it goes to a worker process)."""

    index: int
    case: DicomCase
    case_name: str
    out_path: Path
    roi_pattern: str | None
    pseudonymize: bool
    patient: str = ""  # the NPZ's ``patient`` field


@dataclass
class ConvertRow:
    case: str
    dataset: str
    status: str  # "converted" | "skipped"
    reason: str = ""
    file: str = ""
    labels: str = ""
    label_voxels: str = ""
    shape: str = ""
    spacing: str = ""
    modality: str = ""
    source: str = ""
    warnings: str = ""


@dataclass
class ConvertSummary:
    out: Path
    rows: list[ConvertRow] = field(default_factory=list)

    @property
    def converted(self) -> list[ConvertRow]:
        return [r for r in self.rows if r.status == "converted"]

    @property
    def skipped(self) -> list[ConvertRow]:
        return [r for r in self.rows if r.status != "converted"]


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert_case(task: ConvertTask) -> ConvertRow:
    """Convert one case; never raises (a failure becomes a skipped row with the reason)."""
    case = task.case
    row = ConvertRow(
        case=task.case_name,
        dataset=case.dataset,
        status="skipped",
        modality=case.series.modality,
        source=case.source,
    )
    try:
        regex = re.compile(task.roi_pattern) if task.roi_pattern else None
        loaded = load_dicom_case(case, regex)
        labels, overlap_notes = pack_labels(loaded.labels, "gts")
        gts = labels["gts"]
        vol = loaded.volume
        g = vol.geometry
        arrays: dict[str, np.ndarray] = {
            "imgs": vol.array,
            **labels,
            "spacing": np.asarray(g.spacing, dtype=np.float64),
            "origin": np.asarray(g.origin, dtype=np.float64),
            "direction": np.asarray(g.direction, dtype=np.float64),
            "modality": np.array(vol.modality),
            "patient": np.array(task.patient),
        }
        if not task.pseudonymize:
            arrays.update(
                series_instance_uid=np.array(vol.series_instance_uid),
                study_instance_uid=np.array(vol.study_instance_uid),
                frame_of_reference_uid=np.array(vol.frame_of_reference_uid),
                sop_instance_uids=np.array(vol.sop_instance_uids, dtype=str),
                rtstruct_sop_instance_uids=np.array([r.sop_instance_uid for r in case.rtstructs], dtype=str),
            )
        save_npz(task.out_path, arrays)
        row.status = "converted"
        row.file = str(task.out_path)
        row.labels = ";".join(loaded.label_names)
        row.label_voxels = ";".join(str(int((gts == n).sum())) for n in range(1, len(loaded.labels) + 1))
        row.shape = "x".join(str(s) for s in g.shape)
        row.spacing = "x".join(f"{s:.4g}" for s in g.spacing)
        row.warnings = "; ".join(loaded.warnings + overlap_notes)
    except CaseLoadError as exc:
        row.reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
        log.debug("conversion of %s failed", task.case_name, exc_info=True)
        row.reason = f"{type(exc).__name__}: {exc}"
    return row


def plan(found: Scan, out: Path, roi_pattern: str | None, pseudonymize: bool) -> list[ConvertTask]:
    """The conversion tasks, in the scan's deterministic order, with their output names."""
    tasks = []
    width = max(4, len(str(len(found.cases))))
    used: set[Path] = set()
    pseudonyms: dict[str, str] = {}
    for index, case in enumerate(found.cases):
        pid = case.series.patient_id or f"anon-{case.name}"
        if pseudonymize:
            patient = pseudonyms.setdefault(pid, f"patient_{len(pseudonyms) + 1:0{width}d}")
        else:
            patient = case.series.patient_id or "anon"
        if pseudonymize:
            name = f"case_{index + 1:0{width}d}"
            path = out / f"{name}.npz"
        else:
            name = case.name
            path = out / case.dataset / f"{name}.npz"
            n = 2
            while path in used:  # two series with identical names (should not happen)
                path = out / case.dataset / f"{name}-{n}.npz"
                n += 1
        used.add(path)
        tasks.append(ConvertTask(index, case, name, path, roi_pattern, pseudonymize, patient))
    return tasks


def run_tasks(tasks: list[ConvertTask], jobs: int, progress: bool) -> list[ConvertRow]:
    """Convert every task, ``jobs`` at a time; rows in task order whatever the finishing order."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="converting", unit="case")
    rows: list[ConvertRow | None] = [None] * len(tasks)
    try:
        if jobs <= 1 or len(tasks) <= 1:
            for t in tasks:
                rows[t.index] = convert_case(t)
                if bar:
                    bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(convert_case, t): t for t in tasks}
                for fut in as_completed(futures):
                    t = futures[fut]
                    try:
                        rows[t.index] = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a worker died (e.g. out of memory)
                        rows[t.index] = ConvertRow(
                            t.case_name,
                            t.case.dataset,
                            "skipped",
                            reason=f"worker failed: {type(exc).__name__}: {exc}",
                            source=t.case.source,
                        )
                    if bar:
                        bar.update(1)
    finally:
        if bar:
            bar.close()
    return [r for r in rows if r is not None]


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    roi_pattern: str | None = None,
    pseudonymize: bool = False,
    jobs: int = 1,
    dataset_name: str | None = None,
    progress: bool = True,
) -> ConvertSummary:
    """Convert every case under ``src`` into ``out``; see the module doc."""
    if roi_pattern:
        re.compile(roi_pattern)  # a bad regex fails here, before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = scan(src, dataset_name=dataset_name, progress=progress, jobs=jobs)
    tasks = plan(found, out, roi_pattern, pseudonymize)
    log.info("convert: %d cases, %d other items skipped while scanning", len(tasks), len(found.skipped))
    rows = run_tasks(tasks, jobs, progress)
    for skip in found.skipped:
        rows.append(ConvertRow(case="", dataset=skip.dataset, status="skipped", reason=skip.reason, source=skip.source))
    for npz in found.npz:
        rows.append(
            ConvertRow(
                case=npz.name,
                dataset=npz.dataset,
                status="skipped",
                reason="already an NPZ file: not converted",
                source=str(npz.path),
            )
        )
    summary = ConvertSummary(out=out, rows=rows)
    _write_csv(out / REPORT_NAME, REPORT_FIELDS, [vars(r) for r in rows])
    if pseudonymize:
        _write_csv(
            out / MAP_NAME,
            MAP_FIELDS,
            [
                {
                    "case": t.case_name,
                    "patient": t.patient,
                    "dataset": t.case.dataset,
                    "source": t.case.source,
                    "PatientID": t.case.series.patient_id,
                    "StudyInstanceUID": t.case.series.study_uid,
                    "SeriesInstanceUID": t.case.series.series_uid,
                }
                for t in tasks
            ],
        )
    return summary
