"""The instance store: received datasets written durably, laid out by validated UIDs.

Layout: ``<data_dir>/store/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
DICOM Part 10 files holding exactly the bytes that were received (preamble and file meta
information added). Every UID is validated (:mod:`dicom_node.uids`) before it is used in a
path; an instance with an invalid UID is refused, never renamed.

:meth:`Store.put` is what the C-STORE handler and the watch folder call. It

1. checks the free space against the configured floor (:class:`OutOfSpace`, 0xA700),
2. walks the encoded dataset once without decoding values
   (:func:`dicom_node.part10.scan_dataset`): the element structure must be complete (a
   truncated dataset or random bytes is :class:`Undecodable`, 0xC210) and the few
   attributes the node needs are picked up,
3. writes ``.<uid>.dcm.part`` in the series directory, ``fsync``, renames it over the
   final name and ``fsync``s the directory (and new parent directories),
4. records the instance in the index and the arrival log (one transaction),

and only then returns; the handler answers Success after that.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.db import Database
from dicom_node.durable import fsync_dir
from dicom_node.logs import event, get_logger, patient_ref
from dicom_node.part10 import (
    HeaderInfo,
    InvalidInstance,
    OutOfSpace,
    StoreError,
    Undecodable,
    file_meta,
    read_part10,
    scan_dataset,
)
from dicom_node.states import InstanceSource
from dicom_node.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES, refusal
from dicom_node.uids import clean_uid
from rtstruct.headers import IMAGE_MODALITIES

__all__ = [
    "HeaderInfo",
    "InvalidInstance",
    "Origin",
    "OutOfSpace",
    "Store",
    "StoreError",
    "StoredInstance",
    "Undecodable",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class Origin:
    """Where an instance came from (recorded in the index)."""

    source: InstanceSource = InstanceSource.DICOM
    assoc_id: str | None = None
    calling_aet: str | None = None
    called_aet: str | None = None
    peer: str | None = None


@dataclass(frozen=True)
class StoredInstance:
    header: HeaderInfo
    path: Path
    size: int
    sha256: str | None  # None for images (see put)
    received_at: float
    replaced: bool


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """Durable instance files plus their SQLite index."""

    def __init__(
        self,
        root: Path,
        db: Database,
        fsync: bool = True,
        min_free_bytes: int = 0,
        secret: bytes | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = db
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.secret = secret
        self._dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self.listeners: list[Callable[[StoredInstance, Origin], None]] = []

    # -- space -------------------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, incoming: int = 0) -> None:
        if self.min_free_bytes <= 0:
            return
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise OutOfSpace(
                f"free disk space {free // 2**20} MiB is below the floor of {self.min_free_bytes // 2**20} MiB "
                "(storage.min_free_mb)"
            )

    # -- directories ---------------------------------------------------------------------
    def _fsync_dir(self, path: Path) -> None:
        if self.fsync:
            fsync_dir(path)

    def _ensure_dir(self, path: Path) -> None:
        if path in self._dirs:
            return
        with self._dirs_lock:
            if path in self._dirs:
                return
            created = []
            p = path
            while not p.exists():
                created.append(p)
                p = p.parent
            path.mkdir(parents=True, exist_ok=True)
            # make each new directory entry durable in its parent
            for new in reversed(created):
                self._fsync_dir(new.parent)
            self._dirs.add(path)

    def relpath(self, header: HeaderInfo) -> Path:
        """``<study>/<series>/<sop>.dcm`` (UIDs already validated by :func:`scan_dataset`)."""
        return Path(header.study_uid) / header.series_uid / f"{header.sop_instance_uid}.dcm"

    # -- writing -------------------------------------------------------------------------
    def put(
        self,
        data: bytes | memoryview,
        transfer_syntax: str,
        origin: Origin,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
    ) -> StoredInstance:
        """Store one encoded dataset durably and index it; see the module docstring."""
        self.check_space(len(data))
        header = scan_dataset(data, transfer_syntax)
        if expected_sop_instance is not None and clean_uid(expected_sop_instance) != header.sop_instance_uid:
            raise InvalidInstance(
                f"the C-STORE request is for SOP Instance {clean_uid(expected_sop_instance)!r} but the dataset "
                f"is {header.sop_instance_uid!r}"
            )
        if expected_sop_class is not None and clean_uid(expected_sop_class) != header.sop_class_uid:
            raise InvalidInstance(
                f"the C-STORE request is for SOP Class {clean_uid(expected_sop_class)} but the dataset "
                f"has {header.sop_class_uid}",
                status=0xA900,
            )
        rel = self.relpath(header)
        final = self.root / rel
        self._ensure_dir(final.parent)
        meta = file_meta(header, clean_uid(transfer_syntax), origin.calling_aet)
        part = final.parent / f".{final.name}.{threading.get_ident()}.part"
        # content hash for prompt RTSTRUCTs and other small objects (case identity); images
        # are not hashed on the receive path (it would cost ~1 ms per 512x512 slice)
        digest = hashlib.sha256(data).hexdigest() if header.modality not in IMAGE_MODALITIES else None
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                _write_all(fd, meta)
                _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            replaced = final.exists()
            os.replace(part, final)
            self._fsync_dir(final.parent)
        except OSError as exc:
            try:
                part.unlink()
            except OSError:
                pass
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfSpace(f"disk full while writing {rel}: {exc.strerror}") from None
            raise StoreError(f"cannot write {rel}: {exc.strerror}", status=0xA701) from None
        size = len(meta) + len(data)
        now = time.time()
        stored = StoredInstance(header, final, size, digest, now, replaced)
        self._index(stored, origin)
        for listener in self.listeners:
            try:
                listener(stored, origin)
            except Exception:  # a listener must never fail a store
                log.exception("store listener failed")
        return stored

    def _index(self, stored: StoredInstance, origin: Origin) -> None:
        h = stored.header
        with self.db.tx() as c:
            c.execute(
                """INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, modality,
                       frame_of_reference_uid, patient_ref, path, size, sha256, received_at, assoc_id, source,
                       calling_aet, called_aet, peer)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(sop_instance_uid) DO UPDATE SET
                       sop_class_uid=excluded.sop_class_uid, study_uid=excluded.study_uid,
                       series_uid=excluded.series_uid, modality=excluded.modality,
                       frame_of_reference_uid=excluded.frame_of_reference_uid, patient_ref=excluded.patient_ref,
                       path=excluded.path, size=excluded.size, sha256=excluded.sha256,
                       received_at=excluded.received_at, assoc_id=excluded.assoc_id, source=excluded.source,
                       calling_aet=excluded.calling_aet, called_aet=excluded.called_aet, peer=excluded.peer""",
                (
                    h.sop_instance_uid,
                    h.sop_class_uid,
                    h.study_uid,
                    h.series_uid,
                    h.modality,
                    h.frame_of_reference_uid,
                    patient_ref(h.patient_id, self.secret),
                    str(stored.path.relative_to(self.root)),
                    stored.size,
                    stored.sha256,
                    stored.received_at,
                    origin.assoc_id,
                    origin.source,
                    origin.calling_aet,
                    origin.called_aet,
                    origin.peer,
                ),
            )
            c.execute(
                "INSERT INTO arrivals (sop_instance_uid, modality, received_at) VALUES (?, ?, ?)",
                (h.sop_instance_uid, h.modality, stored.received_at),
            )

    def import_file(self, path: Path, origin: Origin) -> StoredInstance:
        """Store a DICOM file from disk (the watch folder) exactly like a received instance."""
        raw = Path(path).read_bytes()
        ts, dataset, source_aet = read_part10(raw)
        if clean_uid(ts) not in ACCEPTED_TRANSFER_SYNTAXES:  # what negotiation would not accept
            raise Undecodable(str(refusal(clean_uid(ts))))
        if origin.calling_aet is None and source_aet:
            origin = Origin(origin.source, origin.assoc_id, source_aet, origin.called_aet, origin.peer)
        return self.put(dataset, ts, origin)

    # -- reading -------------------------------------------------------------------------
    def path_of(self, sop_instance_uid: str) -> Path | None:
        row = self.db.one("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return (self.root / row["path"]) if row else None

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    # -- maintenance ---------------------------------------------------------------------
    def reconcile(self) -> dict[str, int]:
        """After a crash or power loss: remove ``.part`` leftovers and index unindexed files.

        A file under its final name was fsync'ed before it was renamed, so it is whole;
        it is re-validated anyway, indexed with ``source='reconcile'`` when its index row is
        missing, and moved aside into ``store/.quarantine`` if it does not parse.
        """
        counts = {"parts_removed": 0, "indexed": 0, "quarantined": 0, "files": 0}
        known = {r["path"] for r in self.db.query("SELECT path FROM instances")}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath).name == ".quarantine":
                dirnames[:] = []
                continue
            for name in filenames:
                full = Path(dirpath) / name
                if name.endswith(".part"):
                    try:
                        full.unlink()
                        counts["parts_removed"] += 1
                    except OSError:
                        pass
                    continue
                if not name.endswith(".dcm"):
                    continue
                counts["files"] += 1
                rel = str(full.relative_to(self.root))
                if rel in known:
                    continue
                try:
                    raw = full.read_bytes()
                    ts, dataset, source_aet = read_part10(raw)
                    header = scan_dataset(dataset, ts)
                    if self.relpath(header) != Path(rel):
                        raise Undecodable(f"file {rel} holds instance {header.sop_instance_uid} of another path")
                except (StoreError, OSError) as exc:
                    qdir = self.root / ".quarantine"
                    qdir.mkdir(exist_ok=True)
                    shutil.move(str(full), qdir / name)
                    counts["quarantined"] += 1
                    event(log, "reconcile_quarantined", level=30, path=rel, why=str(exc))
                    continue
                digest = _sha256(dataset) if header.modality not in IMAGE_MODALITIES else None
                stored = StoredInstance(header, full, len(raw), digest, full.stat().st_mtime, False)
                self._index(stored, Origin(source=InstanceSource.RECONCILE, calling_aet=source_aet))
                counts["indexed"] += 1
        return counts

    def delete_instances(self, uids: list[str]) -> int:
        """Delete files and index rows (retention); returns how many were removed."""
        removed = 0
        for uid in uids:
            row = self.db.one("SELECT path FROM instances WHERE sop_instance_uid = ?", (uid,))
            if row is None:
                continue
            try:
                (self.root / row["path"]).unlink()
            except FileNotFoundError:
                pass
            with self.db.tx() as c:
                c.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (uid,))
            removed += 1
        # prune empty series/study directories
        for study in list(self.root.iterdir()) if self.root.exists() else []:
            if not study.is_dir() or study.name.startswith("."):
                continue
            for series in list(study.iterdir()):
                if series.is_dir() and not any(series.iterdir()):
                    series.rmdir()
                    self._dirs.discard(series)
            if not any(study.iterdir()):
                study.rmdir()
        return removed


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
