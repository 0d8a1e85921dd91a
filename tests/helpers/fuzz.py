"""Seeded fuzzing of the node's C-STORE input: mutated instances, raw C-STORE, junk connections.

:func:`make_inputs` takes real instances (a phantom case's CT slices and prompt RTSTRUCT,
and any further bases, e.g. files from ``../shared/data``) and makes mutated encoded
datasets from them: flipped, inserted and deleted bytes, truncation, broken element and
item lengths, huge lengths, wrong and unknown VRs, elements out of order, bad UIDs,
broken contours, pixel headers that contradict the pixel data, deeply nested sequences,
datasets sent under the wrong transfer syntax and plain garbage. The same seed gives the
same inputs from the same bases, byte for byte (UIDs included), so a failure can be replayed.

Every input has its own SOP Instance UID (unless the mutation is about that UID), so
that what one stored instance holds can be checked against exactly what was sent for it.

:class:`RawSender` C-STOREs the bytes of each input as they are (pynetdicom's chunked
file mode reads the dataset after the file meta and sends it unchanged, so nothing is
re-encoded); :func:`junk_connections` opens a few raw TCP connections that send what a
port scanner or a broken peer sends.
"""

from __future__ import annotations

import random
import socket
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = [
    "Base",
    "FuzzInput",
    "RawSender",
    "base_from_file",
    "junk_connections",
    "make_inputs",
    "part10_bytes",
]

TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid uses
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


# --------------------------------------------------------------------------------------
# inputs and bases
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FuzzInput:
    """One encoded dataset to C-STORE, and what the node must do with it.

    ``sop_class_uid``/``sop_instance_uid`` are what the C-STORE request names (the
    dataset may say something else: that is then part of the mutation).
    ``must_refuse``: the dataset is wrong in a way the node must notice (an invalid UID,
    a cut-off image, garbage); otherwise any answer is acceptable as long as it is an
    answer and Success means stored unchanged.
    """

    index: int
    kind: str
    base: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes
    must_refuse: bool = False

    @property
    def name(self) -> str:
        return f"{self.index:04d}-{self.kind}"


class Base:
    """A real instance to mutate: its dataset, what it is (``CT``, ``MR``, ``RTSTRUCT``), and
    its encodings (made once per transfer syntax: most mutations start from those bytes)."""

    def __init__(self, name: str, dataset: Dataset) -> None:
        self.name = name
        self.dataset = dataset
        self.modality = str(dataset.get("Modality", "")).upper() or "OT"
        self._encoded: dict[tuple[bool, bool], bytes] = {}
        with _lenient_pydicom():
            dataset.walk(lambda _ds, _el: None)  # values decoded once, not in every copy

    def encoded(self, implicit: bool, little: bool) -> bytes:
        key = (implicit, little)
        if key not in self._encoded:
            with _lenient_pydicom():
                self._encoded[key] = _encode(self.dataset, implicit, little)
        return self._encoded[key]


def base_from_file(path: Path, name: str | None = None) -> Base:
    """A base read from a DICOM file (its pixel data kept as encoded bytes)."""
    ds = pydicom.dcmread(path, force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()  # re-encoded per input; the meta is rebuilt
    return Base(name or Path(path).name, ds)


@dataclass(frozen=True)
class _Element:
    """Where one element (or sequence item) sits in an encoded dataset."""

    tag: int
    vr: bytes | None  # None: implicit VR, or an item
    start: int  # first byte of the tag
    length_at: int  # first byte of the length field
    length_size: int  # 2 or 4
    value_at: int
    length: int
    depth: int


def _encode(ds: Dataset, implicit: bool, little: bool) -> bytes:
    """``ds`` encoded without file meta."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    return fp.getvalue()


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _iter_elements(data: bytes, implicit: bool, little: bool) -> Iterator[_Element]:
    """Every element and item of a well-formed encoded dataset, in order (nested ones too)."""
    e = "<" if little else ">"

    def tag_at(pos: int) -> int:
        g, el = struct.unpack_from(e + "HH", data, pos)
        return (g << 16) | el

    def dataset(pos: int, end: int | None, depth: int) -> Iterator[_Element | int]:
        """Yields the elements, then the position after the dataset."""
        while pos < (end if end is not None else len(data)):
            tag = tag_at(pos)
            if tag == 0xFFFEE00D:  # item delimiter of an undefined-length item
                yield pos + 8
                return
            if implicit:
                vr = None
                length = struct.unpack_from(e + "L", data, pos + 4)[0]
                length_at, size, value_at = pos + 4, 4, pos + 8
            else:
                vr = data[pos + 4 : pos + 6]
                if vr in _LONG_VRS:
                    length = struct.unpack_from(e + "L", data, pos + 8)[0]
                    length_at, size, value_at = pos + 8, 4, pos + 12
                else:
                    length = struct.unpack_from(e + "H", data, pos + 6)[0]
                    length_at, size, value_at = pos + 6, 2, pos + 8
            yield _Element(tag, vr, pos, length_at, size, value_at, length, depth)
            if vr == b"SQ" or (implicit and _is_sequence(tag, length)):
                pos = yield from items(value_at, None if length == 0xFFFFFFFF else value_at + length, depth)
            elif length == 0xFFFFFFFF:  # encapsulated pixel data
                pos = yield from items(value_at, None, depth, fragments=True)
            else:
                pos = value_at + length
        yield pos

    def items(pos: int, end: int | None, depth: int, fragments: bool = False):
        while end is None or pos < end:
            tag = tag_at(pos)
            length = struct.unpack_from(e + "L", data, pos + 4)[0]
            if tag == 0xFFFEE0DD:
                return pos + 8
            yield _Element(tag, None, pos, pos + 4, 4, pos + 8, length, depth + 1)
            if fragments:
                pos += 8 + length
            elif length == 0xFFFFFFFF:
                pos = yield from _elements_then_end(dataset(pos + 8, None, depth + 1))
            else:
                yield from _elements_then_end(dataset(pos + 8, pos + 8 + length, depth + 1))
                pos += 8 + length
        return pos

    yield from _elements_then_end(dataset(0, len(data), 0))


def _elements_then_end(walk: Iterator[_Element | int]):
    """Pass on the elements of a dataset walk and return the position it ends at."""
    end = 0
    for x in walk:
        if isinstance(x, int):
            end = x
        else:
            yield x
    return end


def _with_top_value(data: bytes, implicit: bool, little: bool, tag: int, value: bytes) -> bytes:
    """``data`` with the value of top-level element ``tag`` replaced (its length field too)."""
    el = next(x for x in _iter_elements(data, implicit, little) if x.depth == 0 and x.tag == tag)
    fmt = ("<" if little else ">") + ("H" if el.length_size == 2 else "L")
    return data[: el.length_at] + struct.pack(fmt, len(value)) + value + data[el.value_at + el.length :]


def _is_sequence(tag: int, length: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return length == 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# one input in the making
# --------------------------------------------------------------------------------------
class _Draft:
    """One input in the making: a base with a fresh SOP Instance UID, then one mutation.

    Mutations of values go through ``ds`` (a copy of the base's dataset, encoded when
    ``data`` is first read); byte mutations work on ``data``, which without a dataset
    mutation is the base's cached encoding with the new UID put in.
    """

    def __init__(self, base: Base, rng: random.Random, uid: str, ts: str) -> None:
        self.base = base
        self.rng = rng
        self.uid = uid
        self.sop_class = str(base.dataset.SOPClassUID)
        self.request_uid = uid
        self.ts = ts
        self.must_refuse = False
        self._ds: Dataset | None = None
        self._data: bytes | None = None
        self._elements: tuple[bytes, list[_Element]] | None = None
        self.patches: list[tuple[bytes, bytes]] = []  # (placeholder, bytes) replaced after encoding

    @property
    def implicit(self) -> bool:
        return self.ts == ImplicitVRLittleEndian

    @property
    def little(self) -> bool:
        return self.ts != ExplicitVRBigEndian

    @property
    def ds(self) -> Dataset:
        if self._ds is None:
            self._ds = _copy(self.base.dataset)
            self._ds.SOPInstanceUID = self.uid
            self._data = None
        return self._ds

    @property
    def data(self) -> bytes:
        """The (inflated) encoded bytes, made the first time they are asked for."""
        if self._data is None:
            if self._ds is None:
                uid = self.uid.encode() + (b"\x00" if len(self.uid) % 2 else b"")
                encoded = self.base.encoded(self.implicit, self.little)
                self._data = _with_top_value(encoded, self.implicit, self.little, 0x00080018, uid)
            else:
                data = _encode(self._ds, self.implicit, self.little)
                for placeholder, value in self.patches:
                    data = data.replace(placeholder, value.ljust(len(placeholder)))
                self._data = data
        return self._data

    @data.setter
    def data(self, value: bytes) -> None:
        self._data = value

    def elements(self, top: bool = False) -> list[_Element]:
        data = self.data
        if self._elements is None or self._elements[0] is not data:
            self._elements = (data, list(_iter_elements(data, self.implicit, self.little)))
        found = self._elements[1]
        return [x for x in found if x.depth == 0] if top else found

    def pixel_start(self) -> int:
        """Where the pixel data element starts (or the end): mutations of the header aim before it."""
        for el in self.elements(top=True):
            if el.tag == _PIXEL_DATA:
                return el.start
        return len(self.data)

    def finish(self, index: int, kind: str) -> FuzzInput:
        data = self.data
        if self.ts == DeflatedExplicitVRLittleEndian:
            data = _deflate(data)
        return FuzzInput(index, kind, self.base.name, self.sop_class, self.request_uid, self.ts, data, self.must_refuse)


def _copy(ds: Dataset) -> Dataset:
    """A copy deep enough that mutating sequences and values leaves the base alone."""
    import copy

    return copy.deepcopy(ds)


# --------------------------------------------------------------------------------------
# mutations: byte level
# --------------------------------------------------------------------------------------
def _header_position(d: _Draft) -> int:
    """A byte position, mostly in the header part (the part the node walks element by element)."""
    end = d.pixel_start() if d.rng.random() < 0.85 else len(d.data)
    return d.rng.randrange(max(1, end))


def bytes_flip(d: _Draft) -> None:
    buf = bytearray(d.data)
    for _ in range(d.rng.choice((1, 1, 2, 4, 16))):
        pos = _header_position(d)
        buf[pos] ^= 1 << d.rng.randrange(8) if d.rng.random() < 0.5 else d.rng.randrange(1, 256)
    d.data = bytes(buf)


def bytes_insert(d: _Draft) -> None:
    pos = _header_position(d)
    d.data = d.data[:pos] + d.rng.randbytes(d.rng.choice((1, 2, 3, 8, 13))) + d.data[pos:]


def bytes_delete(d: _Draft) -> None:
    pos = _header_position(d)
    d.data = d.data[:pos] + d.data[pos + d.rng.choice((1, 2, 4, 7, 64)) :]


def bytes_zero(d: _Draft) -> None:
    pos = _header_position(d)
    n = d.rng.choice((2, 8, 32, 256))
    d.data = d.data[:pos] + b"\x00" * n + d.data[pos + n :]


def bytes_truncate(d: _Draft) -> None:
    cut = d.rng.randrange(1, len(d.data))
    d.data = d.data[:cut]
    # an image cut anywhere loses (part of) its pixel data, which comes last
    d.must_refuse = d.base.modality in ("CT", "MR")


def bytes_truncate_at_element(d: _Draft) -> None:
    """Cut at an element boundary: well-formed, but what followed is gone."""
    top = d.elements(top=True)
    el = top[d.rng.randrange(1, len(top))]
    d.data = d.data[: el.start]
    d.must_refuse = d.base.modality in ("CT", "MR")


def bytes_garbage(d: _Draft) -> None:
    d.data = d.rng.randbytes(d.rng.choice((8, 100, 1000, 5000)))
    d.must_refuse = True


def bytes_tiny(d: _Draft) -> None:
    d.data = d.rng.randbytes(d.rng.randrange(0, 8))
    d.must_refuse = True


def bytes_part10_as_dataset(d: _Draft) -> None:
    """A whole Part 10 file (preamble, DICM, meta) sent as if it were the dataset."""
    d.data = part10_bytes(d.sop_class, d.request_uid, d.ts, d.data)
    d.must_refuse = True


def bytes_repeat(d: _Draft) -> None:
    """The dataset twice in a row (a sender that appended instead of replacing)."""
    d.data = d.data + d.data
    d.must_refuse = True  # the second copy's elements are out of order


# --------------------------------------------------------------------------------------
# mutations: element structure
# --------------------------------------------------------------------------------------
def _pick(d: _Draft, elements: list[_Element]) -> _Element:
    return elements[d.rng.randrange(len(elements))]


def _set_length(d: _Draft, el: _Element, value: int) -> None:
    e = "<" if d.little else ">"
    fmt = e + ("H" if el.length_size == 2 else "L")
    value &= 0xFFFF if el.length_size == 2 else 0xFFFFFFFF
    d.data = d.data[: el.length_at] + struct.pack(fmt, value) + d.data[el.length_at + el.length_size :]


def length_random(d: _Draft) -> None:
    el = _pick(d, d.elements())
    _set_length(d, el, d.rng.randrange(0, 2 * el.length + 17) if el.length != 0xFFFFFFFF else d.rng.randrange(1 << 16))


def length_off_by(d: _Draft) -> None:
    el = _pick(d, [x for x in d.elements() if x.length != 0xFFFFFFFF])
    _set_length(d, el, el.length + d.rng.choice((-2, -1, 1, 2, 4)))


def length_undefined(d: _Draft) -> None:
    el = _pick(d, [x for x in d.elements() if x.length != 0xFFFFFFFF])
    _set_length(d, el, 0xFFFFFFFF)


def length_huge(d: _Draft) -> None:
    """A length far beyond the data (a 4 GiB claim in a few kB)."""
    candidates = [x for x in d.elements() if x.length_size == 4] or d.elements()
    el = _pick(d, candidates)
    huge = d.rng.choice((0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE, len(d.data) + 2)) if el.length_size == 4 else 0xFFFE
    _set_length(d, el, huge)
    d.must_refuse = huge > len(d.data) - el.value_at


def length_item(d: _Draft) -> None:
    items = [x for x in d.elements() if x.tag == 0xFFFEE000] or d.elements()
    el = _pick(d, items)
    _set_length(d, el, d.rng.choice((0, 1, 7, el.length - 8, el.length + 8, 0xFFFFFFF0)))


def vr_swap(d: _Draft) -> None:
    """An element's VR replaced by another valid one (explicit VR: the header size may change)."""
    if d.implicit:
        d.ts = ExplicitVRLittleEndian
    el = _pick(d, [x for x in d.elements() if x.vr is not None])
    vr = d.rng.choice(
        [b"AE", b"CS", b"DS", b"IS", b"LO", b"OB", b"OW", b"SH", b"SQ", b"UI", b"UL", b"UN", b"US", b"UT"]
    )
    d.data = d.data[: el.start + 4] + vr + d.data[el.start + 6 :]


def vr_unknown(d: _Draft) -> None:
    if d.implicit:
        d.ts = ExplicitVRLittleEndian
    el = _pick(d, [x for x in d.elements() if x.vr is not None])
    vr = d.rng.choice([b"ZZ", b"\x00\x00", b"us", b"  ", b"\xff\xff"])
    d.data = d.data[: el.start + 4] + vr + d.data[el.start + 6 :]


def order_swap(d: _Draft) -> None:
    """Two neighbouring top-level elements exchanged (tags out of ascending order)."""
    top = d.elements(top=True)
    i = d.rng.randrange(len(top) - 1)
    a, b = top[i], top[i + 1]
    end_b = top[i + 2].start if i + 2 < len(top) else len(d.data)
    d.data = d.data[: a.start] + d.data[b.start : end_b] + d.data[a.start : b.start] + d.data[end_b:]


def order_duplicate(d: _Draft) -> None:
    """A top-level element written twice."""
    top = d.elements(top=True)
    i = d.rng.randrange(len(top) - 1)
    a, b = top[i], top[i + 1]
    d.data = d.data[: b.start] + d.data[a.start : b.start] + d.data[b.start :]


def ts_mismatch(d: _Draft) -> None:
    """The dataset encoded in one transfer syntax, sent under another."""
    others = [ts for ts in TRANSFER_SYNTAXES if ts != d.ts and ts != DeflatedExplicitVRLittleEndian]
    d.data  # noqa: B018 - encoded in the draft's own syntax first
    d.ts = d.rng.choice(others)


def deep_sequence(d: _Draft) -> None:
    """A sequence nested ``depth`` levels deep (Content Sequence in Content Sequence ...)."""
    depth = d.rng.choice((8, 64, 200, 1000, 5000, 100_000))
    defined = d.rng.random() < 0.3 and depth <= 5000
    d.data = _with_deep_sequence(d, depth, defined)


def _with_deep_sequence(d: _Draft, depth: int, defined: bool) -> bytes:
    e = "<" if d.little else ">"
    tag = struct.pack(e + "HH", 0x0040, 0xA730)

    def sq_head(n: int) -> bytes:
        return tag + (b"" if d.implicit else b"SQ\x00\x00") + struct.pack(e + "L", n)

    item_head = struct.pack(e + "HHL", 0xFFFE, 0xE000, 0)[:4]
    if defined:
        inner = b""
        for _ in range(depth):
            item = item_head + struct.pack(e + "L", len(inner)) + inner
            inner = sq_head(len(item)) + item
        nested = inner
    else:
        open_level = sq_head(0xFFFFFFFF) + item_head + struct.pack(e + "L", 0xFFFFFFFF)
        close_level = struct.pack(e + "HHL", 0xFFFE, 0xE00D, 0) + struct.pack(e + "HHL", 0xFFFE, 0xE0DD, 0)
        nested = open_level * depth + close_level * depth
    at = next((x.start for x in d.elements(top=True) if x.tag > 0x0040A730), len(d.data))
    return d.data[:at] + nested + d.data[at:]


# --------------------------------------------------------------------------------------
# mutations: values (through pydicom, so the structure stays well-formed)
# --------------------------------------------------------------------------------------
BAD_UIDS = (
    "1.2.840.abc.1",
    "1.2.03.4",
    "1..2.3",
    "1.2.3.",
    ".1.2.3",
    "1.2.3 4",
    "../../../../tmp/stardust-fuzz",
    "1." + "2" * 70,
    "1.2.3\\1.2.4",
    "",
    "1.2.3/4",
    "1.2.-3",
)


def uid_bad(d: _Draft) -> None:
    keyword = d.rng.choice(("SOPInstanceUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))
    if "FrameOfReferenceUID" in d.ds and d.rng.random() < 0.2:
        keyword = "FrameOfReferenceUID"
    value = d.rng.choice(BAD_UIDS)
    if keyword == "FrameOfReferenceUID" and value == "":
        value = "1.2.abc"  # an empty frame of reference is allowed (Type 2 in places)
    setattr(d.ds, keyword, value)
    if keyword == "SOPInstanceUID":
        d.request_uid = value
    d.must_refuse = True


def uid_missing(d: _Draft) -> None:
    del d.ds[d.rng.choice(("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"))]
    d.must_refuse = True


def uid_other_class(d: _Draft) -> None:
    """The dataset says a SOP class other than the one its C-STORE request names."""
    d.ds.SOPClassUID = d.rng.choice(("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.481.5", "1.2.3.4"))
    if d.ds.SOPClassUID == d.sop_class:
        d.ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    d.must_refuse = True


def uid_padded(d: _Draft) -> None:
    """Valid UIDs padded with a space or NUL, as some systems write them."""
    uid = d.request_uid + d.rng.choice((" ", "\x00"))
    d.ds.SOPInstanceUID = uid if len(uid) % 2 == 0 else uid + " "


def _pixel_attr(d: _Draft, keyword: str, value) -> None:
    setattr(d.ds, keyword, value)


def pixels_rows_zero(d: _Draft) -> None:
    _pixel_attr(d, d.rng.choice(("Rows", "Columns")), 0)
    d.must_refuse = True


def pixels_rows_one(d: _Draft) -> None:
    d.ds.Rows = 1  # the pixel data stays that of the full image: far more than 1 row needs
    d.must_refuse = True


def pixels_rows_huge(d: _Draft) -> None:
    d.ds.Rows = 65535
    d.must_refuse = True


def pixels_bits(d: _Draft) -> None:
    d.ds.BitsAllocated = d.rng.choice((0, 1, 12, 64))
    d.must_refuse = True


def pixels_samples(d: _Draft) -> None:
    d.ds.SamplesPerPixel = 3  # pixel data of one sample per pixel
    d.must_refuse = True


def pixels_frames(d: _Draft) -> None:
    value = d.rng.choice(("0", "2", "abc", "-1"))
    if value == "abc":
        d.patches.append((b"86420864", b"abc"))
        value = "86420864"
    d.ds.NumberOfFrames = value
    d.must_refuse = True


def pixels_data_length(d: _Draft) -> None:
    data = bytes(d.ds.PixelData)
    d.ds.PixelData = (
        data[: -d.rng.choice((2, 512))] if d.rng.random() < 0.5 else data + b"\x00" * d.rng.choice((2, 512))
    )
    d.must_refuse = True


def pixels_data_empty(d: _Draft) -> None:
    d.ds.PixelData = b""
    d.must_refuse = True


def pixels_data_missing(d: _Draft) -> None:
    del d.ds.PixelData
    d.must_refuse = True


def value_wrong_vr(d: _Draft) -> None:
    """A standard attribute written with a VR the dictionary does not give it (well-formed)."""
    from pydicom.dataelem import DataElement

    choice = d.rng.randrange(5)
    if choice == 0 and "Rows" in d.ds:
        d.ds[0x00280010] = DataElement(0x00280010, "UL", int(d.ds.Rows))
    elif choice == 1:
        d.ds[0x00080020] = DataElement(0x00080020, "UN", b"20240101")
    elif choice == 2:
        d.ds[0x00100010] = DataElement(0x00100010, "SQ", [])
    elif choice == 3:
        d.ds[0x00080060] = DataElement(0x00080060, "OB", str(d.ds.get("Modality", "CT")).encode() + b" ")
    else:
        d.ds[0x00200013] = DataElement(0x00200013, "FD", 1.5)
    if d.implicit:
        d.ts = ExplicitVRLittleEndian  # a wrong VR only shows in explicit VR


def value_bad_strings(d: _Draft) -> None:
    """Values too long for their VR, bad dates and odd characters (the store does not mind)."""
    d.ds.StudyID = "X" * 40
    d.ds.PatientName = "Ärger^Ölaf=" + "Z" * 80
    d.ds.StudyDate = d.rng.choice(("20241340", "yesterday", "2024-01-01"))
    d.ds.SeriesDescription = "\x1b$B\x00\x07" + "é" * 70
    d.ds.SpecificCharacterSet = d.rng.choice(("ISO_IR 192", "ISO_IR 100", "GB18030", "BOGUS"))


# --------------------------------------------------------------------------------------
# mutations: RTSTRUCT contours
# --------------------------------------------------------------------------------------
def _contours(ds: Dataset) -> list[Dataset]:
    return [c for rc in ds.get("ROIContourSequence", []) for c in rc.get("ContourSequence", [])]


def _random_uid(d: _Draft) -> str:
    return _UID_ROOT + str(d.rng.getrandbits(100))


_PLACEHOLDER = "-98765.4321"


def _non_numeric(d: _Draft, pts: list[str], index: int, text: bytes) -> list[str]:
    """Contour data with one value that is not a number (pydicom would not write it: patched in)."""
    d.patches.append((_PLACEHOLDER.encode(), text))
    return [_PLACEHOLDER if i == index else v for i, v in enumerate(pts)]


def contour_broken(d: _Draft) -> None:
    ds = d.ds
    contours = _contours(ds)
    c = contours[d.rng.randrange(len(contours))] if contours else None
    how = d.rng.randrange(18)
    pts = [str(v) for v in c.ContourData] if c is not None else []
    if c is None or how == 0:
        ds.ROIContourSequence = []
    elif how == 1:
        c.ContourData = pts[:-1]  # not a multiple of 3
    elif how == 2:
        c.NumberOfContourPoints = len(pts) // 3 + 5
    elif how == 3:
        c.ContourData = _non_numeric(d, pts, 4, b"nan")
    elif how == 4:
        c.ContourData = _non_numeric(d, pts, 1, b"abc")
    elif how == 5:
        c.ContourData = []
    elif how == 6:
        c.ContourData, c.NumberOfContourPoints = pts[:3], 1
    elif how == 7:
        c.ContourData = ["1e30" if i % 3 == 0 else v for i, v in enumerate(pts)]
    elif how == 8:  # not planar: z varies within the contour
        c.ContourData = [str(float(v) + 40.0 * (i // 3)) if i % 3 == 2 else v for i, v in enumerate(pts)]
    elif how == 9:
        c.ContourImageSequence[0].ReferencedSOPInstanceUID = _random_uid(d)
    elif how == 10:
        del c.ContourImageSequence
    elif how == 11:
        ds.ROIContourSequence[0].ReferencedROINumber = 99
    elif how == 12:
        ds.ROIContourSequence[0].ContourSequence = []
    elif how == 13:
        c.ContourGeometricType = "BOGUS"
    elif how == 14:
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = _random_uid(d)
        ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = _random_uid(d)
    elif how == 15:
        extra = _copy(ds.StructureSetROISequence[0])
        extra.ROIName = "BOX_other"
        ds.StructureSetROISequence.append(extra)  # two ROIs with the same number
    elif how == 16:
        del ds.ReferencedFrameOfReferenceSequence
    else:
        c.ContourData = _non_numeric(d, pts, 0, d.rng.choice((b"inf", b"1,5", b"--1")))


def contour_huge(d: _Draft) -> None:
    """One contour of 20 000 points (a few MB of text), on the prompt's plane."""
    contours = _contours(d.ds)
    if not contours:
        return
    c = contours[0]
    x0, y0, z0 = (float(v) for v in c.ContourData[:3])
    n = 20_000
    data = []
    for i in range(n):
        data += [f"{x0 + (i % 100) * 0.01:.2f}", f"{y0 + (i // 100) * 0.01:.2f}", f"{z0:.2f}"]
    c.ContourData, c.NumberOfContourPoints = data, n


def rois_renamed(d: _Draft) -> None:
    """Prompt ROI names at the edge of the conventions."""
    names = ("BOX_", "BOX_" + "T" * 60, "box_lower", "POS_", "NEG_", "BOX_Ünïcødé", "BOX_a\\b", "")
    for roi in d.ds.get("StructureSetROISequence", []):
        roi.ROIName = d.rng.choice(names)


# --------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------
Mutation = Callable[[_Draft], None]

#: (kind, mutation, which bases it applies to, how many inputs)
PLAN: tuple[tuple[str, Mutation, tuple[str, ...], int], ...] = (
    ("bytes.flip", bytes_flip, ("CT", "MR", "RTSTRUCT"), 90),
    ("bytes.insert", bytes_insert, ("CT", "MR", "RTSTRUCT"), 20),
    ("bytes.delete", bytes_delete, ("CT", "MR", "RTSTRUCT"), 20),
    ("bytes.zero", bytes_zero, ("CT", "MR", "RTSTRUCT"), 15),
    ("bytes.truncate", bytes_truncate, ("CT", "MR", "RTSTRUCT"), 35),
    ("bytes.truncate_at_element", bytes_truncate_at_element, ("CT", "MR", "RTSTRUCT"), 15),
    ("bytes.garbage", bytes_garbage, ("CT",), 10),
    ("bytes.tiny", bytes_tiny, ("CT",), 5),
    ("bytes.part10_as_dataset", bytes_part10_as_dataset, ("CT", "RTSTRUCT"), 4),
    ("bytes.repeat", bytes_repeat, ("CT", "RTSTRUCT"), 3),
    ("length.random", length_random, ("CT", "MR", "RTSTRUCT"), 30),
    ("length.off_by", length_off_by, ("CT", "MR", "RTSTRUCT"), 25),
    ("length.undefined", length_undefined, ("CT", "MR", "RTSTRUCT"), 10),
    ("length.huge", length_huge, ("CT", "MR", "RTSTRUCT"), 20),
    ("length.item", length_item, ("RTSTRUCT",), 12),
    ("vr.swap", vr_swap, ("CT", "MR", "RTSTRUCT"), 25),
    ("vr.unknown", vr_unknown, ("CT", "MR", "RTSTRUCT"), 10),
    ("order.swap", order_swap, ("CT", "MR", "RTSTRUCT"), 8),
    ("order.duplicate", order_duplicate, ("CT", "MR", "RTSTRUCT"), 6),
    ("ts.mismatch", ts_mismatch, ("CT", "MR", "RTSTRUCT"), 12),
    ("deep.sequence", deep_sequence, ("CT", "RTSTRUCT"), 10),
    ("uid.bad", uid_bad, ("CT", "MR", "RTSTRUCT"), 36),
    ("uid.missing", uid_missing, ("CT", "RTSTRUCT"), 6),
    ("uid.other_class", uid_other_class, ("CT", "RTSTRUCT"), 5),
    ("uid.padded", uid_padded, ("CT", "RTSTRUCT"), 4),
    ("pixels.rows_zero", pixels_rows_zero, ("CT", "MR"), 6),
    ("pixels.rows_one", pixels_rows_one, ("CT", "MR"), 3),
    ("pixels.rows_huge", pixels_rows_huge, ("CT", "MR"), 2),
    ("pixels.bits", pixels_bits, ("CT", "MR"), 5),
    ("pixels.samples", pixels_samples, ("CT", "MR"), 2),
    ("pixels.frames", pixels_frames, ("CT", "MR"), 4),
    ("pixels.data_length", pixels_data_length, ("CT", "MR"), 8),
    ("pixels.data_empty", pixels_data_empty, ("CT", "MR"), 2),
    ("pixels.data_missing", pixels_data_missing, ("CT", "MR"), 2),
    ("value.wrong_vr", value_wrong_vr, ("CT", "MR", "RTSTRUCT"), 8),
    ("value.bad_strings", value_bad_strings, ("CT", "RTSTRUCT"), 4),
    ("contour.broken", contour_broken, ("RTSTRUCT",), 24),
    ("contour.huge", contour_huge, ("RTSTRUCT",), 1),
    ("contour.roi_names", rois_renamed, ("RTSTRUCT",), 3),
)


@contextmanager
def _lenient_pydicom() -> Iterator[None]:
    """pydicom writes values that break their VR without complaint while inputs are made."""
    import warnings

    saved = pydicom_config.settings.writing_validation_mode, pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_config.settings.writing_validation_mode, pydicom_config.settings.reading_validation_mode = saved


def _base_ts(rng: random.Random, base: Base) -> str:
    """Mostly explicit VR little endian; some implicit, big endian and deflated ones."""
    if base.modality == "RTSTRUCT":
        return rng.choice((ImplicitVRLittleEndian, ExplicitVRLittleEndian))
    r = rng.random()
    if r < 0.70:
        return ExplicitVRLittleEndian
    if r < 0.88:
        return ImplicitVRLittleEndian
    return ExplicitVRBigEndian if r < 0.94 else DeflatedExplicitVRLittleEndian


def make_inputs(bases: list[Base], seed: int = 11, scale: float = 1.0) -> list[FuzzInput]:
    """The fuzz inputs for ``bases`` (at least one CT and one RTSTRUCT), in a seeded random order.

    Each entry of :data:`PLAN` gives ``round(count * scale)`` inputs, each from a base of a
    modality the mutation applies to, chosen at random. UIDs are drawn from the seed too.
    """
    rng = random.Random(seed)
    by_modality: dict[str, list[Base]] = {}
    for b in bases:
        by_modality.setdefault(b.modality, []).append(b)
    jobs: list[tuple[str, Mutation, Base]] = []
    for kind, mutation, modalities, count in PLAN:
        pool = [b for m in modalities for b in by_modality.get(m, [])]
        if not pool:
            continue
        for _ in range(max(1, round(count * scale))):
            jobs.append((kind, mutation, rng.choice(pool)))
    rng.shuffle(jobs)
    inputs = []
    with _lenient_pydicom():
        for i, (kind, mutation, base) in enumerate(jobs):
            uid = _UID_ROOT + str(rng.getrandbits(120))
            draft = _Draft(base, random.Random(rng.getrandbits(64)), uid, _base_ts(rng, base))
            mutation(draft)
            inputs.append(draft.finish(i, kind))
    return inputs


# --------------------------------------------------------------------------------------
# sending
# --------------------------------------------------------------------------------------
def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH", 0x0002, elem) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", 0x0002, elem) + vr + struct.pack("<H", len(value)) + value


def part10_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, dataset: bytes) -> bytes:
    """Preamble, ``DICM``, a File Meta group (written here, not validated) and ``dataset`` as is."""
    body = b"".join(
        [
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", sop_class.encode("latin-1")),
            _meta_element(0x0003, b"UI", sop_instance.encode("latin-1")),
            _meta_element(0x0010, b"UI", transfer_syntax.encode()),
            _meta_element(0x0012, b"UI", b"1.2.826.0.1.3680043.8.498.1"),
        ]
    )
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body + dataset


class RawSender:
    """C-STORE of fuzz inputs exactly as encoded, over as few associations as it can.

    One association carries every input; when the node aborts it (or it breaks), the next
    input opens a new one. ``send`` returns the status (``0x0000``...) or ``None`` when no
    response came.
    """

    def __init__(self, port: int, folder: Path, aet: str = "PYNETDICOM", aec: str = "STARDUST") -> None:
        self.port, self.folder, self.aet, self.aec = port, Path(folder), aet, aec
        self.folder.mkdir(parents=True, exist_ok=True)
        self.assoc = None
        self.associations = 0

    def __enter__(self) -> RawSender:
        from pynetdicom import _config

        self._chunked = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's dataset bytes as they are
        return self

    def __exit__(self, *exc) -> None:
        from pynetdicom import _config

        self.close()
        _config.STORE_SEND_CHUNKED_DATASET = self._chunked

    def _connect(self):
        from pynetdicom import AE

        ae = AE(self.aet)
        ae.acse_timeout = ae.network_timeout = 30
        ae.dimse_timeout = 10  # an unanswered request costs this much
        for sop in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.481.3"):
            for ts in TRANSFER_SYNTAXES:  # one context per pair, so that every syntax is accepted
                ae.add_requested_context(sop, ts)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.aec)
        if not assoc.is_established:
            raise AssertionError(f"the node refused an association on {self.port}")
        # without it each request waits for a delayed ACK (40 ms on Linux)
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.associations += 1
        return assoc

    def write(self, item: FuzzInput, request_uid: str | None = None) -> Path:
        path = self.folder / f"{item.name}.dcm"
        uid = item.sop_instance_uid if request_uid is None else request_uid
        path.write_bytes(part10_bytes(item.sop_class_uid, uid, item.transfer_syntax, item.data))
        return path

    def send(self, item: FuzzInput) -> tuple[int | None, str]:
        """(status or None, error comment) for one input."""
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self._connect()
        # an empty Affected SOP Instance UID makes pynetdicom send a request the node's
        # pynetdicom ignores (see test_fuzz's known failures): probed once, elsewhere
        path = self.write(item, None if item.sop_instance_uid else self.fallback_uid(item))
        try:
            status = self.assoc.send_c_store(path)
        except (ValueError, TypeError):
            # pynetdicom will not put an invalid UID into the request: the request names a
            # valid one, the dataset keeps its invalid one (the node compares the two)
            status = self.assoc.send_c_store(self.write(item, self.fallback_uid(item)))
        if "Status" not in status:
            self.close()
            return None, ""
        return int(status.Status), str(status.get("ErrorComment", ""))

    @staticmethod
    def fallback_uid(item: FuzzInput) -> str:
        return _UID_ROOT + "9." + str(item.index)

    def close(self) -> None:
        if self.assoc is not None:
            if self.assoc.is_established:
                self.assoc.release()
            self.assoc = None


# --------------------------------------------------------------------------------------
# protocol abuse: raw junk on the port
# --------------------------------------------------------------------------------------
def _associate_rq_header(length: int) -> bytes:
    return struct.pack(">BBL", 0x01, 0x00, length)


#: what a scanner or a broken peer sends on connecting (name, bytes)
JUNK: tuple[tuple[str, bytes], ...] = (
    ("connect-close", b""),
    ("random-bytes", random.Random(7).randbytes(1500)),
    ("http-get", b"GET / HTTP/1.1\r\nHost: node\r\n\r\n"),
    ("tls-client-hello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 160),
    ("associate-rq-garbage-body", _associate_rq_header(68) + random.Random(8).randbytes(68)),
    ("associate-rq-huge-length", _associate_rq_header(0xFFFFFFF0) + b"\x00\x01\x00\x00"),
    (
        "p-data-without-association",
        struct.pack(">BBL", 0x04, 0x00, 10) + struct.pack(">LBB", 4, 1, 0) + b"\x00\x00\x00\x00",
    ),
    ("unknown-pdu-type", struct.pack(">BBL", 0x09, 0x00, 4) + b"ABCD"),
    ("release-rq-first", struct.pack(">BBL", 0x05, 0x00, 4) + b"\x00\x00\x00\x00"),
)


def junk_connections(port: int, wait: float = 3.0) -> dict[str, str]:
    """Open one TCP connection per :data:`JUNK` entry, send its bytes and see how it ends.

    Returns ``{name: "closed by the node" | "answered N bytes" | "still open after Ns"}``.
    """
    outcome = {}
    for name, payload in JUNK:
        with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
            try:
                if payload:
                    s.sendall(payload)
                else:
                    s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                outcome[name] = f"answered {len(got)} bytes, then closed" if got else "closed by the node"
            except TimeoutError:
                outcome[name] = f"still open after {wait:g} s"
            except OSError as exc:
                outcome[name] = f"connection error: {exc.strerror or exc}"
    return outcome


def abuse_established(port: int, aet: str = "PYNETDICOM", aec: str = "STARDUST") -> dict[str, str]:
    """Malformed PDUs inside a real association (after A-ASSOCIATE-AC), then the socket is dropped."""
    from pynetdicom import AE

    outcome = {}
    payloads = {
        "p-data-bad-pdv-length": struct.pack(">BBL", 0x04, 0x00, 12) + struct.pack(">LBB", 0xFFFF, 1, 0) + b"\x00" * 6,
        "p-data-unknown-context": struct.pack(">BBL", 0x04, 0x00, 12)
        + struct.pack(">LBB", 6, 0xFB, 0x03)
        + b"\x00" * 6,
        "garbage-mid-association": random.Random(9).randbytes(300),
    }
    for name, payload in payloads.items():
        ae = AE(aet)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title=aec)
        if not assoc.is_established:
            outcome[name] = "association refused"
            continue
        sock = assoc.dul.socket.socket
        try:
            sock.sendall(payload)
            outcome[name] = "sent"
        except OSError as exc:
            outcome[name] = f"connection error: {exc.strerror or exc}"
        deadline_ok = _wait(lambda a=assoc: not a.is_established, 5.0)
        outcome[name] += ", association ended by the node" if deadline_ok else ", association still up"
        assoc.abort()
    outcome["c-store-rq-empty-affected-sop-instance"] = _empty_affected_instance(port, aet, aec)
    return outcome


def _empty_affected_instance(port: int, aet: str, aec: str, timeout: float = 3.0) -> str:
    """A C-STORE request whose Affected SOP Instance UID is empty (a broken peer): answered?"""
    from pynetdicom import AE, _config

    ae = AE(aet)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        return "association refused"
    assoc.dimse_timeout = timeout
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", ""
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    saved, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, False
    try:
        status = assoc.send_c_store(ds)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    if assoc.is_established:
        assoc.release()
    if "Status" in status:
        return f"answered 0x{int(status.Status):04X}"
    return f"no response within {timeout:g} s"


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()
