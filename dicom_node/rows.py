"""Rows of the node's database as typed, immutable values, and the paths they hold.

The modules that share the database (case assembly, the job queue, the workers, the
sender, retention, the CLI) pass these instead of ``sqlite3.Row`` or ``dict``:
:class:`CaseRow`, :class:`JobRow`, :class:`DeliveryRow` (one ``sends`` row) and
:class:`JobSummary` (a line of ``dicom-node jobs list``). ``from_row`` decodes what the
database stores as text: states and other vocabularies become the enums of
:mod:`dicom_node.states`, JSON columns are parsed, and file paths are resolved.

**Paths in the index.** Files under ``data_dir`` (prompt copies, results) are recorded
relative to ``data_dir`` (schema 2, :mod:`dicom_node.migrations`), so that ``data_dir`` can
be moved; :func:`index_path` makes the stored form and :func:`resolve_path` turns it back
into a path under the configured ``data_dir``. A stored absolute path (outside
``data_dir``; should not happen) stays as it is. ``instances.path`` is relative to
``<data_dir>/store`` and is resolved by :class:`dicom_node.store.Store`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.logs import event, get_logger
from dicom_node.states import (
    CaseMode,
    CaseState,
    DeliveryKind,
    DeliveryState,
    InstanceSource,
    JobState,
    NotificationKind,
    NotificationState,
    OutputKind,
)

if TYPE_CHECKING:
    from dicom_node.db import Database

__all__ = [
    "CaseRow",
    "JobRow",
    "DeliveryRow",
    "JobSummary",
    "NotificationRow",
    "index_path",
    "resolve_path",
    "get_case",
    "get_job",
    "get_delivery",
    "deliveries_of",
]

log = get_logger(__name__)

#: the prefix of a folder delivery's ``sends.destination``
FOLDER_PREFIX = "folder:"


def index_path(path: Path | str, data_dir: Path) -> str:
    """How a file under ``data_dir`` is recorded in the index: relative to ``data_dir``.

    A relative ``path`` is taken as relative to ``data_dir`` already. An absolute path
    outside ``data_dir`` is recorded as it is, with a warning (it cannot move with
    ``data_dir``).
    """
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    if p.is_relative_to(data_dir):
        return p.relative_to(data_dir).as_posix()
    event(
        log,
        "index_path_outside_data_dir",
        level=logging.WARNING,
        path=str(p),
        data_dir=str(data_dir),
        note="recorded as an absolute path; it will not follow a move of data_dir",
    )
    return str(p)


def resolve_path(stored: str, data_dir: Path) -> Path:
    """The file a stored index path names: relative ones are under ``data_dir``."""
    p = Path(stored)
    return p if p.is_absolute() else data_dir / p


def _optional(kind, value):
    return None if value is None or value == "" else kind(value)


def _json(text: str | None, default: Any) -> Any:
    return default if text is None or text == "" else json.loads(text)


def _columns(cls, row: sqlite3.Row) -> dict[str, Any]:
    """The row's values for the dataclass's fields (extra columns of a join are ignored)."""
    return {f.name: row[f.name] for f in fields(cls)}


@dataclass(frozen=True)
class CaseRow:
    """One ``cases`` row: a prompt RTSTRUCT and, once ready, the images chosen for it."""

    id: int
    state: CaseState
    reason: str | None
    rtstruct_uid: str
    rtstruct_sha256: str
    prompt_path: Path  # the frozen prompt copy, resolved against data_dir
    study_uid: str | None
    patient_ref: str | None
    ref_series_uids: tuple[str, ...]
    frame_of_reference_uid: str | None
    n_refs: int
    image_series_uid: str | None
    n_images: int | None
    mode: CaseMode | None  # None until the case is ready
    source: InstanceSource | None
    calling_aet: str | None
    called_aet: str | None
    created_at: float
    last_progress_at: float
    ready_at: float | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row, data_dir: Path) -> CaseRow:
        values = _columns(cls, row)
        values.update(
            state=CaseState(row["state"]),
            prompt_path=resolve_path(row["prompt_path"], data_dir),
            ref_series_uids=tuple(_json(row["ref_series_uids"], [])),
            mode=_optional(CaseMode, row["mode"]),
            source=_optional(InstanceSource, row["source"]),
        )
        return cls(**values)


@dataclass(frozen=True)
class JobRow:
    """One ``jobs`` row: the work for a ready case and, when done, its result."""

    id: int
    case_id: int
    state: JobState
    rule: str | None
    action: dict[str, Any]  # the rule's action (JSON in the database)
    explanation: tuple[str, ...]  # why the rule was chosen, one line each
    attempts: int
    lease_owner: str | None
    lease_expires: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result_path: Path | None  # the result RTSTRUCT, resolved against data_dir
    result_sop_uid: str | None
    result_series_uid: str | None
    engine: str | None
    inference_seconds: float | None
    detail: dict[str, Any] | None  # the worker's facts about the result (JSON in the database)
    #: the files of each output (``detail["files"]``, resolved against data_dir; not a column)
    files: dict[str, tuple[Path, ...]] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row, data_dir: Path) -> JobRow:
        values = {f.name: row[f.name] for f in fields(cls) if f.name != "files"}
        detail = _json(row["detail"], None)
        listed = (detail or {}).get("files") or {}
        values.update(
            state=JobState(row["state"]),
            action=_json(row["action"], {}),
            explanation=tuple(_json(row["explanation"], [])),
            result_path=None if row["result_path"] is None else resolve_path(row["result_path"], data_dir),
            detail=detail,
            files={str(k): tuple(resolve_path(p, data_dir) for p in v) for k, v in listed.items()},
        )
        return cls(**values)

    def output_files(self, output: OutputKind | str) -> list[Path]:
        """The files of one output of the result (written by the worker, listed in ``detail``).

        For results of earlier releases, which listed no files, the RTSTRUCT is
        :attr:`result_path`. Empty when the result has no such output.
        """
        if str(output) in self.files:
            return list(self.files[str(output)])
        if not self.files and OutputKind(output) == OutputKind.RTSTRUCT and self.result_path is not None:
            return [self.result_path]
        return []


@dataclass(frozen=True)
class DeliveryRow:
    """One ``sends`` row: the delivery of a job's result to one destination."""

    id: int
    job_id: int
    destination: str  # a destination name, or folder:<path>
    kind: DeliveryKind
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    sent_at: float | None
    output: OutputKind  # which output of the result this row delivers

    @property
    def folder(self) -> Path | None:
        """The export folder of a folder delivery (None for a DICOM destination)."""
        if self.kind != DeliveryKind.FOLDER:
            return None
        return Path(self.destination.removeprefix(FOLDER_PREFIX))

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> DeliveryRow:
        values = _columns(cls, row)
        values.update(
            kind=DeliveryKind(row["kind"]), state=DeliveryState(row["state"]), output=OutputKind(row["output"])
        )
        return cls(**values)


@dataclass(frozen=True)
class NotificationRow:
    """One ``notifications`` row: a failure, and its delivery to the failure webhook."""

    id: int
    kind: NotificationKind
    case_id: int | None
    job_id: int | None
    rule: str | None
    destination: str | None
    output: str | None
    reason: str
    created_at: float
    state: NotificationState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    sent_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> NotificationRow:
        values = _columns(cls, row)
        values.update(kind=NotificationKind(row["kind"]), state=NotificationState(row["state"]))
        return cls(**values)


@dataclass(frozen=True)
class JobSummary:
    """A job with a few facts of its case and its deliveries (``dicom-node jobs list``)."""

    id: int
    case_id: int
    state: JobState
    rule: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    engine: str | None
    inference_seconds: float | None
    patient_ref: str | None
    n_images: int | None
    mode: CaseMode | None
    deliveries: str | None  # "tps=sent, folder:/x=pending"

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobSummary:
        values = _columns(cls, row)
        values.update(state=JobState(row["state"]), mode=_optional(CaseMode, row["mode"]))
        return cls(**values)


# -- loading ---------------------------------------------------------------------------
def get_case(db: Database, case_id: int) -> CaseRow | None:
    row = db.one("SELECT * FROM cases WHERE id = ?", (case_id,))
    return None if row is None else CaseRow.from_row(row, db.data_dir)


def get_job(db: Database, job_id: int) -> JobRow | None:
    row = db.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    return None if row is None else JobRow.from_row(row, db.data_dir)


def get_delivery(db: Database, send_id: int) -> DeliveryRow | None:
    row = db.one("SELECT * FROM sends WHERE id = ?", (send_id,))
    return None if row is None else DeliveryRow.from_row(row)


def deliveries_of(db: Database, job_id: int) -> list[DeliveryRow]:
    return [DeliveryRow.from_row(r) for r in db.query("SELECT * FROM sends WHERE job_id = ? ORDER BY id", (job_id,))]
