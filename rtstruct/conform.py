"""Make attributes copied from the input images valid for their VR.

The result instances (RTSTRUCT, SEG, Secondary Capture) copy patient, study and frame of
reference attributes from the images. Exports often carry values the standard does not
allow (a 17-character StudyID, an ISO date ``2023-01-05``, ``male`` as PatientSex, a
control character in an accession number); copied as they are, the result fails
validation (dciodvfy) and some archives refuse it. Every copied value goes through
:func:`conform`, which looks the VR up in pydicom's data dictionary by keyword and:

* strips leading and trailing spaces (and NUL padding);
* removes the characters the VR forbids: control characters (LT, ST, UT and UC keep
  TAB, LF, FF and CR), the backslash in a value (it separates values; it becomes a space),
  and in CS everything but upper-case letters, digits, space and underscore (lower case
  is upper-cased first);
* truncates to the VR's maximum length (SH 16, LO 64, CS 16, AE 16, each PN component
  group 64, ST 1024, LT 10240, ...), counted in bytes of the value encoded in the
  result's character set, so it is also right for the multi-byte sets;
* keeps at most five components in a PN component group and three groups;
* validates DA, TM, DT, AS, IS and DS: an invalid value gives None (written empty when
  the attribute is Type 2, left out when Type 3); a DS number that is valid but longer
  than 16 characters is rewritten to 16;
* handles a multi-valued element per value (and joins values given to a single-valued
  one with a space);
* maps PatientSex ``MALE``/``FEMALE``/``OTHER`` to ``M``/``F``/``O`` and refuses other
  values of PatientSex and PatientIdentityRemoved that are not in their enumeration.

:func:`character_set` chooses SpecificCharacterSet: the images' own when every text the
result carries can be encoded in it, else ISO_IR 192 (UTF-8), with a log line.

Each change is logged at WARNING with the keyword and what was done, never the value (it
may be patient information).
"""

from __future__ import annotations

import datetime
import logging
import re
import warnings
from collections.abc import Iterable
from typing import Any

from pydicom import charset as dicom_charset
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

from rtstruct.series import TYPE2_ATTRIBUTES

log = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"

#: Maximum length of a value (of a component group for PN), per the standard, PS3.5 6.2.
MAX_LENGTH = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UC": None,
    "UT": None,
}

#: Copied attributes that are Type 2 in the result (written empty when not valid); all
#: the others copied are Type 3 (left out when not valid).
TYPE2 = frozenset((*TYPE2_ATTRIBUTES, "PositionReferenceIndicator"))

#: Enumerated values of copied CS attributes.
_ENUMERATED = {
    "PatientSex": {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"},
    "PatientIdentityRemoved": {"YES": "YES", "NO": "NO"},
}

_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_MULTILINE_VRS = {"LT", "ST", "UT", "UC"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_KEEP_LINES = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_CS_FORBIDDEN = re.compile(r"[^A-Z0-9 _]")
_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,6})?)?)?$")
_DT = re.compile(r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,6})?)?)?)?)?)?(?:[+-]\d{4})?$")
_AS = re.compile(r"^\d{3}[DWMY]$")
_IS = re.compile(r"^[+-]?\d+$")
_DS = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def python_encodings(specific_character_set: Any) -> list[str]:
    """Python codecs of a SpecificCharacterSet value (None or '' is the default repertoire)."""
    if specific_character_set in (None, "", []):
        return ["iso8859"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dicom_charset.convert_encodings(specific_character_set)


def _known(specific_character_set: Any) -> bool:
    terms = [specific_character_set] if isinstance(specific_character_set, str) else list(specific_character_set)
    names = set(dicom_charset.python_encoding)
    return all(t.strip() in names or t.strip() == "" for t in terms) and bool(terms)


def encodable(text: str, encodings: list[str]) -> bool:
    """Whether ``text`` can be written in the character set of ``encodings``."""
    if encodings == ["iso8859"]:  # the default repertoire is ASCII (ISO-IR 6)
        return text.isascii()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            dicom_charset.encode_string(text, encodings)
        except (UserWarning, UnicodeError, LookupError, ValueError):
            return False
    return True


def _encoded_length(text: str, encodings: list[str]) -> int:
    if encodings == ["iso8859"] and text.isascii():
        return len(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return len(dicom_charset.encode_string(text, encodings))
        except Exception:  # not encodable: count UTF-8 bytes, the most a character may take
            return len(text.encode("utf-8"))


def _truncate(text: str, limit: int | None, encodings: list[str]) -> str:
    if limit is None or _encoded_length(text, encodings) <= limit:
        return text
    if len(text) > limit:
        text = text[:limit]
    while text and _encoded_length(text, encodings) > limit:
        text = text[:-1]
    return text.rstrip()


def character_set(attributes: dict[str, Any], texts: Iterable[str] = ()) -> Any:
    """SpecificCharacterSet for a result: the images' own when every text can be encoded
    in it, else ISO_IR 192 (logged). None (the default repertoire) when the images have
    none and every text is ASCII."""
    values: list[str] = []
    for keyword, value in attributes.items():
        if keyword == "SpecificCharacterSet":
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        values.extend(v for v in items if isinstance(v, str))
    values.extend(t for t in texts if isinstance(t, str))
    images = attributes.get("SpecificCharacterSet")
    if isinstance(images, (list, tuple)):
        images = [str(t).strip() for t in images]
        if len(images) == 1:
            images = images[0]
    elif isinstance(images, str):
        images = images.strip()
    if images in (None, "", [], [""]):
        if all(v.isascii() for v in values):
            return None
        log.warning(
            "text copied from the images is not ASCII and they have no SpecificCharacterSet: ISO_IR 192 written"
        )
        return UTF8
    if not _known(images):
        log.warning("SpecificCharacterSet of the images is not a defined term: ISO_IR 192 written")
        return UTF8
    encodings = python_encodings(images)
    if all(encodable(v, encodings) for v in values):
        return images
    if images != UTF8:
        log.warning("some text cannot be encoded in the SpecificCharacterSet of the images: ISO_IR 192 written instead")
    return UTF8


def _number_of_values(vm: str) -> tuple[int, int | None]:
    if "-" not in vm:
        return int(vm), int(vm)
    low, high = vm.split("-", 1)
    return int(low), (None if "n" in high else int(high))


def _date_ok(m: re.Match) -> bool:
    try:
        datetime.date(int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1))
    except ValueError:
        return False
    return True


def _time_ok(hh: str | None, mm: str | None, ss: str | None) -> bool:
    return int(hh or 0) < 24 and int(mm or 0) < 60 and int(ss or 0) <= 60


def _one(vr: str, text: str, encodings: list[str], notes: list[str], keyword: str) -> str | None:
    """One value (not multi-valued) made valid for ``vr``; None when it cannot be."""
    if vr == "DA":
        m = _DA.match(text)
        return text if m and _date_ok(m) else _note(notes, "is not a valid DA date")
    if vr == "TM":
        m = _TM.match(text)
        return text if m and _time_ok(*m.groups()) else _note(notes, "is not a valid TM time")
    if vr == "DT":
        m = _DT.match(text)
        ok = m is not None and _date_ok(m) and _time_ok(m.group(4), m.group(5), m.group(6))
        return text if ok else _note(notes, "is not a valid DT date-time")
    if vr == "AS":
        return text if _AS.match(text) else _note(notes, "is not a valid AS age")
    if vr == "IS":
        if not _IS.match(text) or not -(2**31) <= int(text) < 2**31:
            return _note(notes, "is not a valid IS integer")
        if len(text) > 12:
            text = str(int(text))
        return text
    if vr == "DS":
        if not _DS.match(text):
            return _note(notes, "is not a valid DS number")
        if len(text) > 16:
            notes.append("has more than 16 characters, DS allows 16: rewritten")
            text = format_number_as_ds(float(text))
        return text
    if vr not in _TEXT_VRS:
        return text
    cleaned = (_CONTROL_KEEP_LINES if vr in _MULTILINE_VRS else _CONTROL).sub("", text)
    if cleaned != text:
        notes.append("has control characters: removed")
    text = cleaned
    if vr != "UT" and "\\" in text:
        notes.append("has a backslash: replaced by a space")
        text = text.replace("\\", " ")
    if vr == "CS":
        upper = text.upper()
        if upper != text:
            notes.append("has lower-case letters: upper-cased")
        cleaned = _CS_FORBIDDEN.sub("", upper)
        if cleaned != upper:
            notes.append("has characters CS does not allow: removed")
        text = cleaned
    if vr == "PN":
        return _person_name(text, encodings, notes) or None
    limit = MAX_LENGTH.get(vr)
    truncated = _truncate(text.strip(), limit, encodings)
    if truncated != text.strip():
        notes.append(f"has {_encoded_length(text.strip(), encodings)} characters, {vr} allows {limit}: truncated")
    return truncated.strip() or None


def _person_name(text: str, encodings: list[str], notes: list[str]) -> str:
    groups = text.split("=")
    if len(groups) > 3:
        notes.append(f"has {len(groups)} component groups, PN allows 3: the others left out")
        groups = groups[:3]
    out = []
    for group in groups:
        components = group.split("^")
        if len(components) > 5:
            notes.append(f"has {len(components)} components, PN allows 5: the others left out")
            components = components[:5]
        components = [c.strip() for c in components]
        while components and not components[-1]:
            components.pop()
        joined = "^".join(components)
        limit = MAX_LENGTH["PN"]
        if _encoded_length(joined, encodings) > limit:
            notes.append(
                f"has a component group of {_encoded_length(joined, encodings)} characters, PN allows 64: truncated"
            )
            joined = _truncate(joined, limit, encodings).rstrip("^ ")
        out.append(joined)
    while out and not out[-1]:
        out.pop()
    return "=".join(out)


def _note(notes: list[str], what: str) -> None:
    notes.append(what)
    return None


def conform(keyword: str, value: Any, specific_character_set: Any = None, *, source: str = "of the images") -> Any:
    """``value`` of attribute ``keyword`` made valid for its VR and VM; None when nothing
    valid is left (write it empty when Type 2, leave it out when Type 3).

    ``specific_character_set`` is the one the result is written in (lengths are counted
    in its bytes). Changes are logged by keyword, without the value.
    """
    value, notes = conform_quietly(keyword, value, specific_character_set)
    for what in dict.fromkeys(notes):
        log.warning("%s %s %s", keyword, source, what)
    return value


def conform_quietly(keyword: str, value: Any, specific_character_set: Any = None) -> tuple[Any, list[str]]:
    """:func:`conform` without logging: (value, what was done)."""
    notes: list[str] = []
    if value is None or isinstance(value, (bytes, Dataset)):
        return (None if isinstance(value, bytes) else value), notes
    try:
        vr = dictionary_VR(keyword)
        vm = dictionary_VM(keyword)
    except KeyError:
        return value, notes
    if vr in ("SQ", "UI") or vr not in MAX_LENGTH:
        return value, notes
    encodings = python_encodings(specific_character_set)
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    low, high = _number_of_values(vm)
    if high == 1 and len(items) > 1:
        notes.append("has several values, it allows one: joined")
        items = [" ".join(str(v) for v in items)]
    out = []
    for item in items:
        if isinstance(item, float) and vr == "DS":
            text = str(item) if len(str(item)) <= 16 else format_number_as_ds(item)
        else:
            text = str(item)
        text = text.strip(" \x00")
        if not text:
            out.append("")
            continue
        conformed = _one(vr, text, encodings, notes, keyword)
        if conformed is not None and keyword in _ENUMERATED:
            mapped = _ENUMERATED[keyword].get(conformed)
            if mapped is None:
                notes.append(f"is not one of {', '.join(sorted(set(_ENUMERATED[keyword].values())))}")
            elif mapped != conformed:
                notes.append(f"is not one of {', '.join(sorted(set(_ENUMERATED[keyword].values())))}: mapped")
            conformed = mapped
        out.append("" if conformed is None else conformed)
    if high is not None and len(out) > high:
        notes.append(f"has {len(out)} values, it allows {high}: the others left out")
        out = out[:high]
    if not any(out):
        return None, notes
    if len(out) == 1:
        return out[0], notes
    if any(not v for v in out) and vr in ("DA", "TM", "DT", "AS", "IS", "DS"):
        out = [v for v in out if v]
        if len(out) < low:
            return None, notes
        return (out[0] if len(out) == 1 else out), notes
    return out, notes


def conform_dataset(ds: Dataset, specific_character_set: Any = None) -> dict[str, list[str]]:
    """Conform every element of ``ds`` (and of its sequences' items) with a keyword in
    place: an invalid Type 2 value is emptied, an invalid other one removed. Returns what
    was done per keyword (not logged; the caller logs each keyword once)."""
    done: dict[str, list[str]] = {}
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value or []:
                for keyword, notes in conform_dataset(item, specific_character_set).items():
                    done.setdefault(keyword, []).extend(notes)
            continue
        keyword = keyword_for_tag(elem.tag)
        if not keyword or elem.VR in ("UI", "SQ") or elem.VR not in MAX_LENGTH or elem.value in (None, ""):
            continue
        if isinstance(elem.value, bytes):
            continue
        raw = list(elem.value) if elem.VM > 1 else elem.value
        value, notes = conform_quietly(keyword, raw, specific_character_set)
        if not notes:
            continue
        done.setdefault(keyword, []).extend(notes)
        if value is None:
            if keyword in TYPE2:
                ds[elem.tag] = DataElement(elem.tag, elem.VR, "")
            else:
                del ds[elem.tag]
        else:
            ds[elem.tag] = DataElement(elem.tag, elem.VR, value)
    return done


def log_done(done: dict[str, list[str]], source: str = "of the images") -> None:
    """Log what :func:`conform_dataset` did, once per keyword and change."""
    for keyword, notes in done.items():
        for what in dict.fromkeys(notes):
            log.warning("%s %s %s", keyword, source, what)
