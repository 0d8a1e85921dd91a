"""The instance store: received datasets written durably, laid out by validated UIDs.

Layout: ``<data_dir>/store/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
DICOM Part 10 files holding exactly the bytes that were received (preamble and file meta
information added). Every UID is validated (:mod:`dicom_node.uids`) before it is used in a
path; an instance with an invalid UID is refused, never renamed.

:meth:`Store.put` is what the C-STORE handler and the watch folder call. It

1. checks the free space against the configured floor (:class:`OutOfSpace`, 0xA700),
2. walks the encoded dataset once without decoding values (:func:`scan_dataset`): the
   element structure must be complete (a truncated dataset or random bytes is
   :class:`Undecodable`, 0xC210) and the few attributes the node needs are picked up,
3. writes ``.<uid>.dcm.part`` in the series directory, ``fsync``, renames it over the
   final name and ``fsync``s the directory (and new parent directories),
4. records the instance in the index and the arrival log (one transaction),

and only then returns; the handler answers Success after that.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.db import Database
from dicom_node.durable import fsync_dir
from dicom_node.logs import event, get_logger, patient_ref
from dicom_node.states import InstanceSource
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, InvalidUID, clean_uid, validate_uid

__all__ = [
    "Store",
    "StoreError",
    "OutOfSpace",
    "Undecodable",
    "InvalidInstance",
    "Origin",
    "HeaderInfo",
    "StoredInstance",
    "scan_dataset",
    "read_part10",
    "IMAGE_MODALITIES",
]

log = get_logger(__name__)

IMAGE_MODALITIES = ("CT", "MR")

# transfer syntaxes
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"


class StoreError(Exception):
    """An instance cannot be stored; ``status`` is the C-STORE status to answer."""

    status = 0xC001

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class OutOfSpace(StoreError):
    status = 0xA700


class Undecodable(StoreError):
    status = 0xC210


class InvalidInstance(StoreError):
    """Invalid UIDs, or a dataset that contradicts its C-STORE request."""

    status = 0xC211


@dataclass(frozen=True)
class Origin:
    """Where an instance came from (recorded in the index)."""

    source: InstanceSource = InstanceSource.DICOM
    assoc_id: str | None = None
    calling_aet: str | None = None
    called_aet: str | None = None
    peer: str | None = None


@dataclass(frozen=True)
class HeaderInfo:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str | None
    frame_of_reference_uid: str | None
    patient_id: str | None


@dataclass(frozen=True)
class StoredInstance:
    header: HeaderInfo
    path: Path
    size: int
    sha256: str | None  # None for images (see put)
    received_at: float
    replaced: bool


# --------------------------------------------------------------------------------------
# A structural walk of an encoded dataset (no value decoding)
# --------------------------------------------------------------------------------------
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ALL_VRS = _LONG_VRS | {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"US",
}
_WANTED = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080060: "modality",
    0x00100020: "patient_id",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
    0x00200052: "frame_of_reference_uid",
    0x00280002: "samples_per_pixel",
    0x00280008: "number_of_frames",
    0x00280010: "rows",
    0x00280011: "columns",
    0x00280100: "bits_allocated",
}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class _Truncated(Exception):
    pass


class _Walker:
    def __init__(self, data: bytes | memoryview, implicit: bool, little: bool) -> None:
        self.data = memoryview(data)
        self.n = len(self.data)
        self.implicit = implicit
        e = "<" if little else ">"
        self.u16 = struct.Struct(e + "H").unpack_from
        self.u32 = struct.Struct(e + "L").unpack_from
        self.found: dict[str, bytes] = {}
        self.pixel_length: int | None = None  # None: absent; -1: encapsulated

    def _tag(self, pos: int) -> int:
        if pos + 4 > self.n:
            raise _Truncated(f"element tag cut off at byte {pos}")
        return (self.u16(self.data, pos)[0] << 16) | self.u16(self.data, pos + 2)[0]

    def dataset(self, pos: int, end: int, top: bool) -> int:
        """Walk elements from ``pos`` to ``end`` (or to an item delimiter when end < 0)."""
        last_tag = -1
        while pos < (end if end >= 0 else self.n):
            tag = self._tag(pos)
            if tag == _ITEM_END and end < 0:
                return pos + 8
            if tag in (_ITEM, _ITEM_END, _SEQ_END):
                raise _Truncated(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}")
            if tag <= last_tag:
                raise _Truncated(f"elements out of order at byte {pos} (tag {tag >> 16:04X},{tag & 0xFFFF:04X})")
            last_tag = tag
            if self.implicit:
                if pos + 8 > self.n:
                    raise _Truncated(f"element header cut off at byte {pos}")
                vr = None
                length = self.u32(self.data, pos + 4)[0]
                pos += 8
            else:
                if pos + 8 > self.n:
                    raise _Truncated(f"element header cut off at byte {pos}")
                vr = bytes(self.data[pos + 4 : pos + 6])
                if vr not in _ALL_VRS:
                    raise _Truncated(f"unknown value representation {vr!r} at byte {pos}")
                if vr in _LONG_VRS:
                    if pos + 12 > self.n:
                        raise _Truncated(f"element header cut off at byte {pos}")
                    length = self.u32(self.data, pos + 8)[0]
                    pos += 12
                else:
                    length = self.u16(self.data, pos + 6)[0]
                    pos += 8
            limit = end if end >= 0 else self.n
            if top and tag == 0x7FE00010:
                self.pixel_length = -1 if length == _UNDEFINED else length
            if length == _UNDEFINED:
                if tag == 0x7FE00010 and not self.implicit:
                    pos = self.fragments(pos)
                elif vr == b"UN":  # undefined-length UN holds an implicit VR sequence
                    saved, self.implicit = self.implicit, True
                    try:
                        pos = self.sequence(pos, -1)
                    finally:
                        self.implicit = saved
                else:
                    pos = self.sequence(pos, -1)
                continue
            if pos + length > limit:
                raise _Truncated(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes at byte {pos}, "
                    f"only {limit - pos} left"
                )
            if vr == b"SQ":
                self.sequence(pos, pos + length)
            elif top and tag in _WANTED:
                self.found[_WANTED[tag]] = bytes(self.data[pos : pos + length])
            pos += length
        if end >= 0 and pos != end:
            raise _Truncated(f"dataset overruns its length at byte {pos}")
        if end < 0:
            raise _Truncated("item without delimiter (data cut off)")
        return pos

    def sequence(self, pos: int, end: int) -> int:
        while True:
            if end >= 0 and pos >= end:
                if pos != end:
                    raise _Truncated(f"sequence overruns its length at byte {pos}")
                return pos
            tag = self._tag(pos)
            if pos + 8 > self.n:
                raise _Truncated(f"item header cut off at byte {pos}")
            length = self.u32(self.data, pos + 4)[0]
            pos += 8
            if tag == _SEQ_END:
                if end >= 0:
                    raise _Truncated(f"sequence delimiter inside a defined-length sequence at byte {pos}")
                return pos
            if tag != _ITEM:
                raise _Truncated(f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.dataset(pos, -1, top=False)
            else:
                if pos + length > self.n:
                    raise _Truncated(f"item of {length} bytes cut off at byte {pos}")
                self.dataset(pos, pos + length, top=False)
                pos += length

    def fragments(self, pos: int) -> int:
        while True:
            tag = self._tag(pos)
            if pos + 8 > self.n:
                raise _Truncated(f"fragment header cut off at byte {pos}")
            length = self.u32(self.data, pos + 4)[0]
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise _Truncated(f"bad pixel data fragment at byte {pos - 8}")
            if pos + length > self.n:
                raise _Truncated(f"pixel data fragment of {length} bytes cut off at byte {pos}")
            pos += length


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.decode("latin-1").strip("\x00 ").strip() or None


def scan_dataset(data: bytes | memoryview, transfer_syntax: str) -> HeaderInfo:
    """Check the element structure of an encoded dataset and pick up the node's tags.

    Raises :class:`Undecodable` (structure broken, required attribute absent) or
    :class:`InvalidInstance` (a UID that is not a valid DICOM UID).
    """
    ts = clean_uid(transfer_syntax)
    implicit = ts == IMPLICIT_LE
    little = ts != EXPLICIT_BE
    payload: bytes | memoryview = data
    if ts == DEFLATED_LE:
        try:
            payload = zlib.decompress(bytes(data), -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise Undecodable(f"deflated dataset cannot be inflated: {exc}") from None
    if len(payload) < 8:
        raise Undecodable(f"dataset of {len(payload)} bytes is too short to be DICOM")
    walker = _Walker(payload, implicit=implicit, little=little)
    try:
        walker.dataset(0, len(payload), top=True)
    except _Truncated as exc:
        raise Undecodable(
            f"not a decodable DICOM dataset ({'implicit' if implicit else 'explicit'} VR): {exc}"
        ) from None
    except (struct.error, IndexError) as exc:  # pragma: no cover - defensive
        raise Undecodable(f"not a decodable DICOM dataset: {exc}") from None
    found = walker.found
    _check_pixels(walker, little)
    missing = [k for k in ("sop_class_uid", "sop_instance_uid", "study_uid", "series_uid") if k not in found]
    if missing:
        names = {
            "sop_class_uid": "SOPClassUID",
            "sop_instance_uid": "SOPInstanceUID",
            "study_uid": "StudyInstanceUID",
            "series_uid": "SeriesInstanceUID",
        }
        raise Undecodable("dataset lacks " + ", ".join(names[m] for m in missing))
    try:
        header = HeaderInfo(
            sop_class_uid=validate_uid(_text(found["sop_class_uid"]), "SOPClassUID"),
            sop_instance_uid=validate_uid(_text(found["sop_instance_uid"]), "SOPInstanceUID"),
            study_uid=validate_uid(_text(found["study_uid"]), "StudyInstanceUID"),
            series_uid=validate_uid(_text(found["series_uid"]), "SeriesInstanceUID"),
            modality=(_text(found.get("modality")) or "").upper() or None,
            frame_of_reference_uid=(
                validate_uid(_text(found["frame_of_reference_uid"]), "FrameOfReferenceUID")
                if _text(found.get("frame_of_reference_uid"))
                else None
            ),
            patient_id=_text(found.get("patient_id")),
        )
    except InvalidUID as exc:
        raise InvalidInstance(str(exc)) from None
    return header


def _check_pixels(walker: _Walker, little: bool) -> None:
    """An image must carry all of its native pixel data (a cut at an element boundary
    leaves a well-formed but shorter dataset: caught here)."""
    found = walker.found
    if "rows" not in found or "columns" not in found:
        modality = (_text(found.get("modality")) or "").upper()
        if modality in IMAGE_MODALITIES:
            raise Undecodable(f"{modality} image without Rows/Columns/PixelData (data cut off?)")
        return
    e = "<" if little else ">"
    try:
        rows = struct.unpack(e + "H", found["rows"][:2])[0]
        cols = struct.unpack(e + "H", found["columns"][:2])[0]
        bits = struct.unpack(e + "H", found["bits_allocated"][:2])[0] if "bits_allocated" in found else 16
        spp = struct.unpack(e + "H", found["samples_per_pixel"][:2])[0] if "samples_per_pixel" in found else 1
        frames = int(_text(found.get("number_of_frames")) or 1)
    except (struct.error, ValueError):
        raise Undecodable("image pixel module has unreadable Rows/Columns/BitsAllocated") from None
    if walker.pixel_length is None:
        raise Undecodable(f"image of {rows}x{cols} pixels has no PixelData (data cut off?)")
    if walker.pixel_length >= 0:
        expected = (rows * cols * spp * frames * bits + 7) // 8
        if walker.pixel_length < expected:
            raise Undecodable(
                f"PixelData has {walker.pixel_length} bytes, {rows}x{cols}x{frames} pixels of "
                f"{bits} bits need {expected}"
            )


def read_part10(raw: bytes) -> tuple[str, memoryview, str | None]:
    """(transfer syntax, dataset bytes, source AE title) of a DICOM file's content.

    A Part 10 file (preamble + ``DICM`` + file meta) is split at the end of its meta group;
    a bare dataset without meta is taken as implicit VR little endian. Raises
    :class:`Undecodable` when it is neither.
    """
    view = memoryview(raw)
    if len(raw) >= 132 and raw[128:132] == b"DICM":
        pos = 132
        ts = None
        source_aet = None
        while pos + 8 <= len(raw):
            group, elem = struct.unpack_from("<HH", raw, pos)
            if group != 0x0002:
                break
            vr = raw[pos + 4 : pos + 6]
            if vr in (b"OB", b"UN", b"SQ", b"UT", b"OW"):
                if pos + 12 > len(raw):
                    raise Undecodable("file meta information cut off")
                length = struct.unpack_from("<L", raw, pos + 8)[0]
                start = pos + 12
            else:
                length = struct.unpack_from("<H", raw, pos + 6)[0]
                start = pos + 8
            if start + length > len(raw):
                raise Undecodable("file meta information cut off")
            value = raw[start : start + length]
            if elem == 0x0010:
                ts = _text(value)
            elif elem == 0x0016:
                source_aet = _text(value)
            pos = start + length
        if ts is None:
            raise Undecodable("file meta information has no TransferSyntaxUID")
        return ts, view[pos:], source_aet
    # no preamble: a bare dataset (old ACR-NEMA style files); guess implicit VR LE
    if len(raw) >= 8 and struct.unpack_from("<H", raw, 0)[0] == 0x0008:
        return IMPLICIT_LE, view, None
    raise Undecodable("not a DICOM file (no 'DICM' marker and no dataset at the start)")


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
    def _file_meta(self, header: HeaderInfo, transfer_syntax: str, source_aet: str | None) -> bytes:
        """Preamble, ``DICM`` and the File Meta Information group (explicit VR little endian)."""
        elements = [
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _pad(header.sop_class_uid.encode(), b"\x00")),
            _element(0x0003, b"UI", _pad(header.sop_instance_uid.encode(), b"\x00")),
            _element(0x0010, b"UI", _pad(transfer_syntax.encode(), b"\x00")),
            _element(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID.encode(), b"\x00")),
            _element(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME.encode(), b" ")),
        ]
        if source_aet:
            aet = source_aet.strip()[:16].encode("ascii", "replace")
            elements.append(_element(0x0016, b"AE", _pad(aet, b" ")))
        body = b"".join(elements)
        group_length = _element(0x0000, b"UL", struct.pack("<L", len(body)))
        return b"\x00" * 128 + b"DICM" + group_length + body

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
        meta = self._file_meta(header, clean_uid(transfer_syntax), origin.calling_aet)
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


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH", 0x0002, elem) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", 0x0002, elem) + vr + struct.pack("<H", len(value)) + value


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
