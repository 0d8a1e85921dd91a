"""DICOM Part 10 on the receive path, without pydicom: the bytes as they came, checked.

The store keeps exactly the bytes a peer sent. Decoding a 512x512 slice with pydicom
would cost more than writing it, so this module walks an encoded dataset's element
structure once, without decoding values (:func:`scan_dataset`): a truncated dataset or
random bytes is refused (:class:`Undecodable`, 0xC210), a UID that is not a valid DICOM
UID too (:class:`InvalidInstance`, 0xC211), and the few attributes the node needs are
picked up (:class:`HeaderInfo`). :func:`read_part10` splits a file into transfer syntax
and dataset bytes (the watch folder, reconciliation); :func:`file_meta` writes the
preamble and File Meta Information that make the received bytes a Part 10 file.

The errors carry the C-STORE status the SCP answers (:class:`StoreError` and its kinds).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, InvalidUID, clean_uid, validate_uid
from rtstruct.headers import IMAGE_MODALITIES

__all__ = [
    "HeaderInfo",
    "InvalidInstance",
    "OutOfSpace",
    "StoreError",
    "Undecodable",
    "file_meta",
    "read_part10",
    "scan_dataset",
]

IMPLICIT_LE = ImplicitVRLittleEndian
EXPLICIT_LE = ExplicitVRLittleEndian
DEFLATED_LE = DeflatedExplicitVRLittleEndian
EXPLICIT_BE = ExplicitVRBigEndian


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
class HeaderInfo:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str | None
    frame_of_reference_uid: str | None
    patient_id: str | None


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
#: Sequences nested deeper than this are refused: CT, MR and RTSTRUCT nest four or five
#: levels, and pydicom (which reads what the store keeps) recurses per level and needs
#: memory out of all proportion to the bytes for a few hundred.
MAX_SEQUENCE_DEPTH = 32


def _sequence_tags() -> frozenset[int]:
    """The standard attributes whose VR is SQ: what an implicit VR dataset does not say."""
    from pydicom.datadict import DicomDictionary

    return frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


_SQ_TAGS = _sequence_tags()


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
        self.depth = 0  # sequences entered and not yet left

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
            if vr == b"SQ" or (vr is None and tag in _SQ_TAGS):
                # implicit VR: a standard sequence is walked too, so a broken item inside
                # it is found here (not by the first reader of the stored file)
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
        if self.depth >= MAX_SEQUENCE_DEPTH:
            raise _Truncated(f"sequences nested more than {MAX_SEQUENCE_DEPTH} levels deep at byte {pos}")
        self.depth += 1
        try:
            return self._items(pos, end)
        finally:
            self.depth -= 1

    def _items(self, pos: int, end: int) -> int:
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
    """An image's pixel description must agree with itself and with its pixel data.

    Missing Rows/Columns/PixelData in a CT/MR image (what a cut at an element boundary
    leaves: a well-formed but shorter dataset) is :class:`Undecodable` (0xC210). A header
    that contradicts itself: Rows or Columns 0, NumberOfFrames or SamplesPerPixel 0,
    BitsAllocated other than 8, 16 or 32 (1 too for objects other than CT/MR images:
    segmentations and overlays are bit-packed), or native PixelData whose length is not
    Rows x Columns x frames x samples x bytes (plus the one pad byte of an odd length),
    is refused with 0xA900. PS3.4 Annex B (Table B.2-1) has two C-STORE error classes:
    "Cannot understand" (Cxxx) for a dataset the SCP cannot parse, and "Data Set does
    not match SOP Class" (A9xx) for one that parses but is not a valid instance of its
    SOP class; such a header parses and breaks the Image Pixel Module of the CT/MR IOD,
    so it is A900. Encapsulated (compressed) pixel data is not length-checked here.
    """
    contradicts = 0xA900  # PS3.4 Table B.2-1: Error, Data Set does not match SOP Class
    found = walker.found
    modality = (_text(found.get("modality")) or "").upper()
    if "rows" not in found or "columns" not in found:
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
    for name, value in (("Rows", rows), ("Columns", cols), ("NumberOfFrames", frames), ("SamplesPerPixel", spp)):
        if value < 1:
            raise InvalidInstance(f"{name} is {value}: an image has at least 1", status=contradicts)
    valid_bits = (8, 16, 32) if modality in IMAGE_MODALITIES else (1, 8, 16, 32)
    if bits not in valid_bits:
        allowed = ", ".join(str(b) for b in valid_bits[:-1]) + f" or {valid_bits[-1]}"
        raise InvalidInstance(f"BitsAllocated {bits} is not {allowed}", status=contradicts)
    if walker.pixel_length is None:
        raise Undecodable(f"image of {rows}x{cols} pixels has no PixelData (data cut off?)")
    if walker.pixel_length < 0:
        return  # encapsulated: the codec knows the frame sizes, not this walk
    expected = (rows * cols * frames * spp * bits + 7) // 8
    allowed_lengths = {expected, expected + expected % 2}
    if spp == 3 and bits == 8:  # YBR_FULL_422 stores two samples per pixel
        half = rows * cols * frames * 2
        allowed_lengths |= {half, half + half % 2}
    if walker.pixel_length not in allowed_lengths:
        raise InvalidInstance(
            f"PixelData {walker.pixel_length} bytes, {rows}x{cols}x{frames}x{spp} of {bits} bits need {expected}",
            status=contradicts,
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


def file_meta(header: HeaderInfo, transfer_syntax: str, source_aet: str | None) -> bytes:
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


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH", 0x0002, elem) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", 0x0002, elem) + vr + struct.pack("<H", len(value)) + value
