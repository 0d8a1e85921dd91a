"""Find the cases in a folder of DICOM files (headers only) and load them.

A *case* is one CT or MR image series plus the RTSTRUCT(s) drawn on it. :func:`scan`
walks a folder recursively and reads every file's header (``stop_before_pixels``):

* image files are grouped into series by SeriesInstanceUID;
* each RTSTRUCT is attached to the series it references (RTReferencedSeriesSequence);
  when that series is not in the folder, to the image series on its frame of reference
  (the one nearest to it in the folder tree when there are several);
* what cannot become a case is returned as a :class:`Skip` with the reason: an
  unreadable or corrupt file, an RTSTRUCT whose series and frame of reference are not
  found (a folder without images, another frame of reference), an RTSTRUCT whose frame
  of reference differs from its referenced series, an image series without RTSTRUCT,
  a folder without any DICOM.

The *dataset* of a case is the first folder below the scanned root that holds its images
and RTSTRUCTs (the root's own name when they lie directly in it or in different first
folders, as in a single case with ``CT/`` and ``RTSTRUCT/`` folders), unless a dataset
name is given. So ``SRC/<dataset>/<anything below>`` is the layout for several datasets.

:func:`load_dicom_case` then reads the volume (:func:`rtstruct.series.load_series`) and
rasterises the selected ROIs (:mod:`rtstruct`); :func:`load_npz_case` reads a case
written by ``dicom-node convert``. Both give a :class:`LoadedCase`; :func:`load_cases`
yields every case of a folder that way, one at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.files import files_under
from inference.geometry import Geometry
from inference.volume import Volume
from rtstruct.headers import SINGLE_FRAME_IMAGE_CLASSES, FileInfo, FileKind, file_infos
from rtstruct.series import load_series

log = logging.getLogger(__name__)


class CaseLoadError(ValueError):
    """A case cannot be loaded; the message says why (it becomes the skip reason)."""


# ---------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------
@dataclass
class ImageSeries:
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    patient_id: str
    series_number: str
    files: list[Path] = field(default_factory=list)
    sop_instance_uids: set[str] = field(default_factory=set)

    @property
    def folder(self) -> Path:
        """The deepest folder holding all of its files."""
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))


@dataclass
class StructureRef:
    """What the scan knows of one RTSTRUCT (from :func:`rtstruct.read_rtstruct`)."""

    path: Path
    sop_instance_uid: str
    patient_id: str
    label: str
    frame_of_reference_uids: list[str]
    referenced_series_uids: list[str]
    roi_names: list[str]
    attached_by: str = ""  # "series" or "frame of reference" (set when attached to a series)

    @classmethod
    def of(cls, info: FileInfo) -> StructureRef:
        st = info.structure
        assert st is not None, "an RTSTRUCT's FileInfo carries its StructureInfo"
        return cls(
            path=info.path,
            sop_instance_uid=info.sop_instance_uid,
            patient_id=info.patient_id,
            label=st.label,
            frame_of_reference_uids=list(st.frame_of_reference_uids),
            referenced_series_uids=list(st.referenced_series_uids),
            roi_names=list(st.roi_names),
        )


@dataclass
class DicomCase:
    dataset: str
    series: ImageSeries
    rtstructs: list[StructureRef]
    source: str  # folder of the images, relative to the scanned root

    @property
    def name(self) -> str:
        """A stable, readable case name: patient ID, modality, series number, UID hash."""
        uid_hash = hashlib.sha1(self.series.series_uid.encode()).hexdigest()[:8]
        parts = [self.series.patient_id or "anon", self.series.modality]
        if self.series.series_number:
            parts.append(f"s{self.series.series_number}")
        parts.append(uid_hash)
        return safe_name("_".join(parts))


@dataclass
class Skip:
    """Something found under the root that cannot be a case, and why."""

    dataset: str
    source: str  # a path relative to the scanned root
    reason: str


@dataclass
class NpzCase:
    dataset: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class Scan:
    root: Path
    cases: list[DicomCase] = field(default_factory=list)
    npz: list[NpzCase] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def safe_name(text: str) -> str:
    """``text`` usable as a file name on every system."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")
    return cleaned or "case"


def _dataset_of(root: Path, path: Path, dataset_name: str | None) -> str:
    if dataset_name:
        return dataset_name
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else (root.resolve().name or "dataset")


def _rel(root: Path, path: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else "."


def scan(root: str | os.PathLike, dataset_name: str | None = None, progress: bool = False, jobs: int = 1) -> Scan:
    """Group the DICOM files (and NPZ cases) under ``root`` into cases; see the module doc.
    Headers are read by ``jobs`` worker processes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    result = Scan(root=root)
    files = files_under(root)

    series: dict[str, ImageSeries] = {}
    structures: list[StructureRef] = []
    datasets_seen: set[str] = set()
    top_folders = [] if dataset_name else sorted(p.name for p in root.iterdir() if p.is_dir())
    npz_files = [p for p in files if p.suffix.lower() == ".npz"]
    for path in npz_files:
        dataset = _dataset_of(root, path, dataset_name)
        result.npz.append(NpzCase(dataset, path))
        datasets_seen.add(dataset)
    others = [p for p in files if p.suffix.lower() != ".npz"]
    for info in file_infos(others, jobs=jobs, progress=progress):
        dataset = _dataset_of(root, info.path, dataset_name)
        if info.kind is FileKind.NOT_DICOM and not info.error:
            continue
        datasets_seen.add(dataset)
        if info.kind in (FileKind.ERROR, FileKind.NOT_DICOM):
            result.skipped.append(Skip(dataset, _rel(root, info.path), info.error))
        elif info.kind is FileKind.RTSTRUCT:
            structures.append(StructureRef.of(info))
        elif info.kind is FileKind.IMAGE:
            s = series.get(info.series_uid)
            if s is None:
                s = series[info.series_uid] = ImageSeries(
                    series_uid=info.series_uid,
                    study_uid=info.study_uid,
                    frame_of_reference_uid=info.frame_of_reference_uid,
                    modality=info.modality or "?",
                    patient_id=info.patient_id,
                    series_number=info.series_number,
                )
            s.files.append(info.path)
            s.sop_instance_uids.add(info.sop_instance_uid)

    attached: dict[str, list[StructureRef]] = defaultdict(list)
    for st in structures:
        target, how, reason = _attach(st, series)
        if target is None:
            result.skipped.append(Skip(_dataset_of(root, st.path, dataset_name), _rel(root, st.path), reason))
        else:
            st.attached_by = how
            attached[target].append(st)

    for uid, s in series.items():
        dataset = _dataset_of(root, s.files[0], dataset_name)
        if uid in attached and not dataset_name:
            # the images and their RTSTRUCTs in one first-level folder: that is the dataset;
            # spread over several (SRC = one case with CT/ and RTSTRUCT/ folders): the root's name
            tops = {_dataset_of(root, p, None) for p in [s.files[0], *(st.path for st in attached[uid])]}
            if len(tops) > 1:
                dataset = root.resolve().name or "dataset"
        if uid not in attached:
            result.skipped.append(
                Skip(
                    dataset,
                    _rel(root, s.folder),
                    f"{s.modality} series {uid} ({len(s.files)} files) has no RTSTRUCT on it",
                )
            )
            continue
        case = DicomCase(
            dataset=dataset,
            series=s,
            rtstructs=sorted(attached[uid], key=lambda st: str(st.path)),
            source=_rel(root, s.folder),
        )
        result.cases.append(case)

    for dataset in top_folders:
        if dataset not in datasets_seen:
            result.skipped.append(Skip(dataset, dataset, "no DICOM files found in this folder"))
    result.cases.sort(key=lambda c: (c.dataset, c.source, c.series.series_uid))
    result.npz.sort(key=lambda n: (n.dataset, str(n.path)))
    result.skipped.sort(key=lambda s: (s.dataset, s.source))
    return result


def _attach(st: StructureRef, series: dict[str, ImageSeries]) -> tuple[str | None, str, str]:
    """(series UID or None, how, reason if None) for one RTSTRUCT."""
    for uid in st.referenced_series_uids:
        s = series.get(uid)
        if s is None:
            continue
        if st.frame_of_reference_uids and s.frame_of_reference_uid not in st.frame_of_reference_uids:
            return (
                None,
                "",
                (
                    f"RTSTRUCT is on frame of reference {', '.join(st.frame_of_reference_uids)}, "
                    f"but its referenced series {uid} is on {s.frame_of_reference_uid}"
                ),
            )
        if st.patient_id != s.patient_id:
            return None, "", f"RTSTRUCT and its referenced series {uid} have different Patient IDs"
        return uid, "series", ""
    candidates = [
        s
        for s in series.values()
        if s.frame_of_reference_uid
        and s.frame_of_reference_uid in st.frame_of_reference_uids
        and s.patient_id == st.patient_id
    ]
    if not candidates:
        refs = ", ".join(st.referenced_series_uids) or "none"
        frames = ", ".join(st.frame_of_reference_uids) or "none"
        return (
            None,
            "",
            (
                f"no image series for this RTSTRUCT: neither its referenced series ({refs}) nor a series "
                f"on its frame of reference ({frames}) was found"
            ),
        )

    def closeness(s: ImageSeries) -> tuple[int, str]:
        common = os.path.commonpath([str(st.path.parent), str(s.folder)])
        return (-len(Path(common).parts), s.series_uid)

    return sorted(candidates, key=closeness)[0].series_uid, "frame of reference", ""


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
@dataclass
class LoadedCase:
    """A case in memory: its volume and ground-truth masks (bool, the volume's grid)."""

    name: str
    dataset: str
    volume: Volume
    labels: list[tuple[str, np.ndarray]]
    warnings: list[str] = field(default_factory=list)

    @property
    def label_names(self) -> list[str]:
        return [n for n, _ in self.labels]


def is_prompt_roi(name: str) -> bool:
    """Whether ``name`` follows the node's prompt conventions (``BOX_``, ``POS_``, ``NEG_``)."""
    from rtstruct.prompts import DEFAULT_CONVENTIONS

    return DEFAULT_CONVENTIONS.classify(name) is not None


def roi_selected(name: str, roi_regex: re.Pattern | None) -> bool:
    """Whether an ROI is ground truth to keep: never a prompt ROI; else matches the regex."""
    if is_prompt_roi(name):
        return False
    return roi_regex is None or roi_regex.search(name) is not None


def load_dicom_case(case: DicomCase, roi_regex: re.Pattern | None = None) -> LoadedCase:
    """Read the images and rasterise the selected ROIs of every attached RTSTRUCT.

    ROIs are taken in RTSTRUCT order (by path), then ROI number. An ROI that cannot be
    rasterised (empty, not on the image planes, ...) is left out with a warning; a case
    with no ROI left raises :class:`CaseLoadError`.
    """
    from rtstruct.rasterize import rasterize_roi
    from rtstruct.reader import RTStructError, check_references, read_rtstruct
    from rtstruct.series import VolumeError

    try:
        volume = load_series(case.series.files, series_instance_uid=case.series.series_uid)
    except VolumeError as exc:
        raise CaseLoadError(f"images: {exc}") from exc
    labels: list[tuple[str, np.ndarray]] = []
    notes: list[str] = []
    for ref in case.rtstructs:
        try:
            ss = read_rtstruct(ref.path)
            check_references(ss, volume, allow_frame_of_reference_only=ref.attached_by != "series")
        except RTStructError as exc:
            raise CaseLoadError(f"RTSTRUCT {ref.path.name}: {exc}") from exc
        for roi in sorted(ss.rois, key=lambda r: r.number):
            if not roi_selected(roi.name, roi_regex):
                continue
            try:
                mask = rasterize_roi(roi, volume.geometry)
            except RTStructError as exc:
                notes.append(f"ROI {roi.name!r} left out: {exc}")
                continue
            if not mask.any():
                notes.append(f"ROI {roi.name!r} left out: no voxel inside its contours")
                continue
            name = roi.name
            taken = {n for n, _ in labels}
            n = 2
            while name in taken:  # the same name in two RTSTRUCTs of one series
                name = f"{roi.name}#{n}"
                n += 1
            labels.append((name, mask))
    if not labels:
        wanted = f" matching {roi_regex.pattern!r}" if roi_regex is not None else ""
        detail = f" ({'; '.join(notes)})" if notes else ""
        raise CaseLoadError(f"no usable ground-truth ROI{wanted}{detail}")
    return LoadedCase(case.name, case.dataset, volume, labels, notes)


def volume_from_arrays(
    imgs: np.ndarray,
    spacing,
    origin,
    direction,
    modality: str = "CT",
    series_uid: str = "",
    frame_of_reference_uid: str = "",
) -> Volume:
    """A :class:`Volume` around arrays (an NPZ case): placeholder UIDs where none is known."""
    geometry = Geometry(shape=imgs.shape, spacing=tuple(spacing), origin=origin, direction=direction)
    return Volume(
        array=imgs,
        geometry=geometry,
        sop_instance_uids=tuple(f"npz.{k}" for k in range(imgs.shape[0])),
        modality=modality,
        series_instance_uid=series_uid,
        study_instance_uid="",
        frame_of_reference_uid=frame_of_reference_uid,
        sop_class_uid=SOP_CLASS_OF.get(modality, ""),
        attributes={"Modality": modality},
    )


SOP_CLASS_OF = {v: k for k, v in SINGLE_FRAME_IMAGE_CLASSES.items()}


def label_map(labels: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, list[str]]:
    """(label map, notes): label n = n-th mask; shared voxels go to the smaller mask."""
    if not labels:
        raise ValueError("no labels")
    shape = labels[0][1].shape
    dtype = np.uint8 if len(labels) <= 255 else np.uint16
    gts = np.zeros(shape, dtype=dtype)
    sizes = [int(m.sum()) for _, m in labels]
    order = sorted(range(len(labels)), key=lambda n: (-sizes[n], n))  # largest painted first
    for n in order:
        gts[labels[n][1]] = n + 1
    notes = []
    for n, (name, mask) in enumerate(labels):
        kept = int((gts == n + 1).sum())
        if kept != sizes[n]:
            winners = sorted({labels[int(v) - 1][0] for v in np.unique(gts[mask]) if v and v != n + 1})
            notes.append(
                f"{name!r} overlaps {', '.join(repr(w) for w in winners)}: {sizes[n] - kept} of its "
                f"{sizes[n]} voxels carry the smaller ROI's label"
            )
    return gts, notes


def pack_labels(labels: list[tuple[str, np.ndarray]], key: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """NPZ arrays for named masks: ``key`` (label map, see :func:`label_map`),
    ``label_names`` and, only when masks overlap, ``roi_masks`` (every mask whole,
    bit-packed along x). Returns (arrays, overlap notes)."""
    lmap, notes = label_map(labels)
    arrays = {key: lmap, "label_names": np.array([n for n, _ in labels], dtype=str)}
    if notes:  # keep every ROI whole too, so that nothing is lost
        arrays["roi_masks"] = np.packbits(np.stack([m for _, m in labels]), axis=-1)
    return arrays, notes


def unpack_labels(data: dict[str, np.ndarray], key: str) -> list[tuple[str, np.ndarray]]:
    """Named masks from NPZ arrays written by :func:`pack_labels` (``label_names``
    optional: labels 1..max are then ``label1``...); raises :class:`CaseLoadError`."""
    lmap = data[key]
    if lmap.ndim != 3:
        raise CaseLoadError(f"NPZ {key} must be 3D, has shape {lmap.shape}")
    if "label_names" in data:
        names = [str(n) for n in data["label_names"]]
    else:
        names = [f"label{n}" for n in range(1, int(lmap.max()) + 1)]
    if "roi_masks" in data:
        whole = np.unpackbits(data["roi_masks"], axis=-1, count=lmap.shape[2]).astype(bool)
        if whole.shape != (len(names), *lmap.shape):
            raise CaseLoadError(f"NPZ roi_masks has shape {whole.shape}, expected {(len(names), *lmap.shape)}")
        return [(name, whole[n]) for n, name in enumerate(names)]
    return [(name, lmap == n) for n, name in enumerate(names, start=1)]


def load_npz_case(case: NpzCase, roi_regex: re.Pattern | None = None) -> LoadedCase:
    """Read a case written by ``dicom-node convert`` (see :mod:`.convert` for the fields)."""
    try:
        with np.load(case.path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
        raise CaseLoadError(f"unreadable NPZ: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in ("imgs", "gts", "spacing") if k not in data]
    if missing:
        raise CaseLoadError(f"NPZ lacks {', '.join(missing)}: not written by dicom-node convert")
    imgs, gts = data["imgs"], data["gts"]
    if imgs.ndim != 3 or gts.shape != imgs.shape:
        raise CaseLoadError(f"NPZ imgs {imgs.shape} and gts {gts.shape} must be the same 3D shape")
    origin = data.get("origin", np.zeros(3))
    direction = data.get("direction", np.eye(3))
    modality = str(data["modality"]) if "modality" in data else "CT"
    try:
        volume = volume_from_arrays(
            imgs,
            data["spacing"],
            origin,
            direction,
            modality,
            str(data.get("series_instance_uid", "")),
            str(data.get("frame_of_reference_uid", "")),
        )
    except ValueError as exc:
        raise CaseLoadError(f"NPZ geometry: {exc}") from exc
    labels = []
    notes = []
    for n, (name, mask) in enumerate(unpack_labels(data, "gts"), start=1):
        if not roi_selected(name, roi_regex):
            continue
        if not mask.any():
            notes.append(f"label {n} ({name!r}) has no voxel: left out")
            continue
        labels.append((name, mask))
    if not labels:
        wanted = f" matching {roi_regex.pattern!r}" if roi_regex is not None else ""
        raise CaseLoadError(f"no usable ground-truth label{wanted} in the NPZ")
    return LoadedCase(case.name, case.dataset, volume, labels, notes)


def load_cases(root: str | os.PathLike, roi_regex: re.Pattern | None = None) -> Iterator[LoadedCase]:
    """Every case under ``root`` (:func:`scan`), DICOM cases first, then NPZ ones, each loaded
    when the caller asks for it (one volume in memory at a time). A case that cannot be
    loaded raises :class:`CaseLoadError` (the measurement scripts want every case)."""
    found = scan(root)
    for case in found.cases:
        yield load_dicom_case(case, roi_regex)
    for npz in found.npz:
        yield load_npz_case(npz, roi_regex)
