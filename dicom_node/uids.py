"""DICOM UID validation (PS3.5 section 9.1).

A UID is at most 64 characters of numeric components separated by ``.``; a component is
``0`` or a number without leading zeros, and no component is empty. The node uses UIDs
as file and directory names, so a UID is validated *before* it touches a path: a value
such as ``../../etc`` or ``1.2..3`` is refused, never sanitised.
"""

from __future__ import annotations

import re

__all__ = [
    "InvalidUID",
    "MAX_UID_LENGTH",
    "is_valid_uid",
    "validate_uid",
    "clean_uid",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
]

MAX_UID_LENGTH = 64
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")


class InvalidUID(ValueError):
    """A value that is not a DICOM UID; the message says which attribute and why."""


def clean_uid(value: object) -> str:
    """The UID text without the trailing NUL/space padding of the UI value representation."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).rstrip("\x00 ")


def _problem(text: str) -> str | None:
    if not text:
        return "is empty"
    if len(text) > MAX_UID_LENGTH:
        return f"is {len(text)} characters long (at most {MAX_UID_LENGTH})"
    if _UID.fullmatch(text):
        return None
    bad = sorted({c for c in text if not (c.isdigit() or c == ".")})
    if bad:
        return "contains characters other than digits and '.': " + " ".join(repr(c) for c in bad[:5])
    if "." not in text:
        return "has a single component (a UID is root.suffix)"
    if text.startswith(".") or text.endswith(".") or ".." in text:
        return "has an empty component"
    return "has a component with a leading zero"


def is_valid_uid(value: object) -> bool:
    """True when ``value`` (after removing UI padding) is a valid DICOM UID."""
    return _problem(clean_uid(value)) is None


def validate_uid(value: object, what: str = "UID") -> str:
    """The cleaned UID, or :class:`InvalidUID` naming ``what`` and the problem.

    The offending value is shown shortened and with ``repr`` so that control characters
    or path separators are visible in logs.
    """
    text = clean_uid(value)
    problem = _problem(text)
    if problem is not None:
        shown = text if len(text) <= 70 else text[:67] + "..."
        raise InvalidUID(f"{what} {shown!r} is not a valid DICOM UID: it {problem}")
    return text


#: Implementation Class UID of this node (file meta information, association negotiation);
#: a fixed UID derived under pydicom's root for the name of this software.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.22469733921191025485742532382374209453"
IMPLEMENTATION_VERSION_NAME = "STARDUST_010"
