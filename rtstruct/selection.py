"""Which images of a series make one volume: the largest geometrically consistent set.

A case whose references are stale takes every image that shares the referenced
SeriesInstanceUID (or frame of reference). Real series carry strays with that UID: a
localizer, a secondary capture or dose report, a re-sent slice, a damaged instance with
Rows 1. :func:`select_consistent` keeps the images that form one stack and says, by
count and reason, what it left out ("3 files of 1x512 instead of 512x512 (Rows x
Columns)", "1 image of ImageType LOCALIZER (scout views)"), so that
:func:`rtstruct.series.load_series` (``select_consistent=True``), the node's worker,
``dicom-node segment`` and the research tools build the volume from the rest instead of
refusing the whole series.

It works on headers read by :func:`rtstruct.headers.read_header` (any objects with a
``path`` and a pydicom ``ds``) and is pure: no file is read, nothing is logged. Each
image is left out at the first of these steps it fails:

1. **SOP class**: a single-frame CT or MR image class
   (:data:`rtstruct.headers.SINGLE_FRAME_IMAGE_CLASSES`) with at most one frame. Other
   classes are left out by name; multi-frame (enhanced) objects are left out when the
   series has single-frame images, and kept untouched (no further step) when it has
   none: then there is nothing to choose among, and the loader decides.
2. **Modality**: the modality of the most images (of their SOP class); the others are
   left out ("2 images of modality MR in a CT series").
3. **Image type**: ImageType containing ``LOCALIZER`` (scout views).
4. **Geometry present**: ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
   Rows and Columns present and numeric.
5. **One geometry**: the images are grouped by frame of reference, orientation (within
   :data:`rtstruct.series.ORIENTATION_TOLERANCE`), Rows x Columns and PixelSpacing
   (relative :data:`rtstruct.series.PIXEL_SPACING_TOLERANCE`), the loader's tolerances;
   the largest group is kept (ties: the group met first), every other one is named by
   how it differs.
6. **One instance per position**: images at one position along the slice normal (within
   the loader's duplicate tolerance) with different SOP Instance UIDs keep one: the one
   of the acquisition most images belong to (AcquisitionNumber, EchoNumbers,
   TemporalPositionIdentifier), then the newest (InstanceCreation/Content date and
   time), then the lowest SOP Instance UID. Files that repeat one SOP Instance UID are
   one instance (the loader reads it once).

What remains may still not be a volume (a missing slice, non-uniform spacing, another
patient's image): the loader refuses that as before. Selection never hides such faults.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rtstruct.headers import MULTI_FRAME_IMAGE_CLASSES, SINGLE_FRAME_IMAGE_CLASSES, sop_class_name

__all__ = ["HeaderLike", "LeftOut", "Selection", "select_consistent"]


class HeaderLike(Protocol):
    """What selection needs of one file: its path and its header (a pydicom Dataset)."""

    path: Path
    ds: Any


H = TypeVar("H", bound=HeaderLike)


@dataclass(frozen=True)
class LeftOut:
    """Files left out for one reason; ``reason`` starts with their ``count``
    ("1 image of ImageType LOCALIZER (scout views)"). ``paths``: the files, where known."""

    reason: str
    count: int
    paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Selection:
    """The images kept (in input order) and those left out, one :class:`LeftOut` per reason."""

    kept: tuple
    left_out: tuple[LeftOut, ...]

    @property
    def n_left_out(self) -> int:
        return sum(item.count for item in self.left_out)

    def describe(self) -> str:
        """The reasons in one line, separated by "; "."""
        return "; ".join(item.reason for item in self.left_out)


def select_consistent(headers: Sequence[H], *, spacing_tolerance: float | None = None) -> Selection:
    """The largest geometrically consistent set of ``headers`` (see the module doc).

    ``spacing_tolerance`` is the loader's (a fraction of the slice spacing; default
    :data:`rtstruct.series.DEFAULT_SPACING_TOLERANCE`): images closer than it along the
    slice normal are at one position.
    """
    from rtstruct.series import DEFAULT_SPACING_TOLERANCE

    tolerance = DEFAULT_SPACING_TOLERANCE if spacing_tolerance is None else spacing_tolerance
    out = _Reasons()
    rest = _by_sop_class(list(headers), out)
    if rest and all(_is_multi_frame(h) for h in rest):
        return out.selection(rest, headers)
    rest = _by_modality(rest, out)
    rest = _without_localizers(rest, out)
    placed = _with_geometry(rest, out)
    placed = _largest_geometry(placed, out)
    kept = _one_per_position(placed, out, tolerance)
    return out.selection(kept, headers)


# -- the steps ----------------------------------------------------------------------------
class _Reasons:
    """Left-out images collected by reason, in the order the reasons first occur."""

    def __init__(self) -> None:
        self.paths: dict[str, list[Path]] = {}

    def add(self, reason: str, items: Sequence[HeaderLike]) -> None:
        if items:
            self.paths.setdefault(reason, []).extend(h.path for h in items)

    def selection(self, kept: Sequence[HeaderLike], order: Sequence[HeaderLike]) -> Selection:
        chosen = {id(h) for h in kept}
        left = tuple(
            LeftOut(_counted(len(paths), reason), len(paths), tuple(paths)) for reason, paths in self.paths.items()
        )
        return Selection(kept=tuple(h for h in order if id(h) in chosen), left_out=left)


def _counted(n: int, reason: str) -> str:
    """``reason`` with the count in front: ``{files}`` becomes "1 file" / "3 files" (same for images)."""
    return reason.format(files=_n(n, "file"), images=_n(n, "image"))


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _sop_class(h: HeaderLike) -> str:
    return str(h.ds.get("SOPClassUID", "") or "").strip()


def _frames(h: HeaderLike) -> int:
    value = h.ds.get("NumberOfFrames")
    try:
        return int(float(value)) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def _is_multi_frame(h: HeaderLike) -> bool:
    return _sop_class(h) in MULTI_FRAME_IMAGE_CLASSES or _frames(h) > 1


def _by_sop_class(headers: list[HeaderLike], out: _Reasons) -> list[HeaderLike]:
    others: dict[str, list[HeaderLike]] = {}
    multi, single = [], []
    for h in headers:
        uid = _sop_class(h)
        if uid in SINGLE_FRAME_IMAGE_CLASSES and _frames(h) <= 1:
            single.append(h)
        elif uid in SINGLE_FRAME_IMAGE_CLASSES or uid in MULTI_FRAME_IMAGE_CLASSES:
            multi.append(h)
        else:
            others.setdefault(uid, []).append(h)
    for uid, items in others.items():
        name = sop_class_name(uid) if uid else "DICOM without SOPClassUID"
        out.add(f"{{files}} of {name} (not a single-frame CT or MR image)", items)
    if not single:
        return multi
    out.add("{files} with several frames (multi-frame objects among single-frame slices)", multi)
    return single


def _by_modality(headers: list[HeaderLike], out: _Reasons) -> list[HeaderLike]:
    modality = {id(h): SINGLE_FRAME_IMAGE_CLASSES[_sop_class(h)] for h in headers}
    counts = Counter(modality[id(h)] for h in headers)
    if len(counts) <= 1:
        return headers
    main = counts.most_common(1)[0][0]
    for other in counts:
        if other != main:
            out.add(
                f"{{images}} of modality {other} in a {main} series", [h for h in headers if modality[id(h)] == other]
            )
    return [h for h in headers if modality[id(h)] == main]


def _image_type(h: HeaderLike) -> list[str]:
    value = h.ds.get("ImageType")
    if value in (None, ""):
        return []
    items = [value] if isinstance(value, (str, bytes)) else list(value)
    return [str(v).strip().upper() for v in items]


def _without_localizers(headers: list[HeaderLike], out: _Reasons) -> list[HeaderLike]:
    localizers = [h for h in headers if "LOCALIZER" in _image_type(h)]
    out.add("{images} of ImageType LOCALIZER (scout views)", localizers)
    return [h for h in headers if "LOCALIZER" not in _image_type(h)]


@dataclass
class _Placed:
    """An image with its geometry read: what steps 5 and 6 compare."""

    header: HeaderLike
    frame: str
    orientation: tuple[float, ...]
    size: tuple[int, int]
    pixel_spacing: tuple[float, float]
    position: tuple[float, float, float]


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _with_geometry(headers: list[HeaderLike], out: _Reasons) -> list[_Placed]:
    placed: list[_Placed] = []
    for h in headers:
        ds = h.ds
        values: dict[str, tuple[float, ...]] = {}
        fault = None
        for keyword, count in (
            ("ImagePositionPatient", 3),
            ("ImageOrientationPatient", 6),
            ("PixelSpacing", 2),
            ("Rows", 1),
            ("Columns", 1),
        ):
            raw = ds.get(keyword)
            if raw is None or raw == "" or (not isinstance(raw, (str, bytes, int, float)) and len(raw) == 0):
                fault = f"{{files}} without {keyword}"
                break
            numbers = _numbers(raw, count)
            if numbers is None:
                fault = f"{{files}} with an unreadable {keyword}"
                break
            values[keyword] = numbers
        if fault is not None:
            out.add(fault, [h])
            continue
        placed.append(
            _Placed(
                header=h,
                frame=str(ds.get("FrameOfReferenceUID", "") or "").strip(),
                orientation=values["ImageOrientationPatient"],
                size=(int(values["Rows"][0]), int(values["Columns"][0])),
                pixel_spacing=(values["PixelSpacing"][0], values["PixelSpacing"][1]),
                position=tuple(values["ImagePositionPatient"]),  # type: ignore[arg-type]
            )
        )
    return placed


def _same_orientation(a: _Placed, b: _Placed) -> bool:
    from rtstruct.series import ORIENTATION_TOLERANCE

    return max(abs(x - y) for x, y in zip(a.orientation, b.orientation)) <= ORIENTATION_TOLERANCE


def _same_spacing(a: _Placed, b: _Placed) -> bool:
    from rtstruct.series import PIXEL_SPACING_TOLERANCE

    return all(abs(x - y) <= PIXEL_SPACING_TOLERANCE * abs(y) for x, y in zip(a.pixel_spacing, b.pixel_spacing))


def _same_geometry(a: _Placed, b: _Placed) -> bool:
    return a.frame == b.frame and a.size == b.size and _same_orientation(a, b) and _same_spacing(a, b)


def _largest_geometry(placed: list[_Placed], out: _Reasons) -> list[_Placed]:
    groups: list[list[_Placed]] = []
    for p in placed:
        for g in groups:
            if _same_geometry(g[0], p):
                g.append(p)
                break
        else:
            groups.append([p])
    if len(groups) <= 1:
        return placed
    kept = max(groups, key=len)  # max() returns the first of equal groups
    ref = kept[0]
    for g in groups:
        if g is not kept:
            out.add(_how_it_differs(g[0], ref), [p.header for p in g])
    return kept


def _how_it_differs(p: _Placed, ref: _Placed) -> str:
    """The first way a group differs from the kept one, in the words of the issue."""
    if p.size != ref.size:
        return f"{{files}} of {p.size[0]}x{p.size[1]} instead of {ref.size[0]}x{ref.size[1]} (Rows x Columns)"
    if not _same_orientation(p, ref):
        return f"{{files}} in orientation {_vector(p.orientation)} instead of {_vector(ref.orientation)}"
    if not _same_spacing(p, ref):
        return f"{{files}} with PixelSpacing {_vector(p.pixel_spacing)} instead of {_vector(ref.pixel_spacing)} mm"
    return "{files} on another frame of reference"


def _vector(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _one_per_position(placed: list[_Placed], out: _Reasons, tolerance: float) -> list[HeaderLike]:
    from rtstruct.series import POSITION_TOLERANCE_FLOOR_MM

    if len(placed) < 2:
        return [p.header for p in placed]
    o = placed[0].orientation
    row, col = o[:3], o[3:]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    along = {id(p): sum(a * b for a, b in zip(p.position, normal)) for p in placed}
    ordered = sorted(placed, key=lambda p: along[id(p)])
    steps = [along[id(b)] - along[id(a)] for a, b in zip(ordered, ordered[1:])]
    positive = sorted(s for s in steps if s > POSITION_TOLERANCE_FLOOR_MM)
    nominal = positive[len(positive) // 2] if positive else 0.0
    same_place = max(POSITION_TOLERANCE_FLOOR_MM, tolerance * nominal)
    clusters: list[list[_Placed]] = [[ordered[0]]]
    for prev, p in zip(ordered, ordered[1:]):
        if along[id(p)] - along[id(prev)] <= same_place:
            clusters[-1].append(p)
        else:
            clusters.append([p])
    acquisitions = Counter(_acquisition(p.header) for p in placed)
    kept: list[HeaderLike] = []
    repeated: list[HeaderLike] = []
    for cluster in clusters:
        by_uid: dict[str, list[_Placed]] = {}
        for p in cluster:
            by_uid.setdefault(str(p.header.ds.get("SOPInstanceUID", "") or ""), []).append(p)
        if len(by_uid) == 1:
            kept += [p.header for p in cluster]
            continue
        winner = min(by_uid, key=lambda uid: _preference(by_uid[uid][0].header, uid, acquisitions))
        kept += [p.header for p in by_uid[winner]]
        repeated += [p.header for uid, items in by_uid.items() if uid != winner for p in items]
    out.add("{files} at slice positions another image already takes (one image kept per position)", repeated)
    return kept


def _acquisition(h: HeaderLike) -> tuple[str, ...]:
    """What tells acquisitions, echoes and time points of one series apart."""
    return tuple(
        str(h.ds.get(k, "") or "").strip() for k in ("AcquisitionNumber", "EchoNumbers", "TemporalPositionIdentifier")
    )


def _preference(h: HeaderLike, uid: str, acquisitions: Counter) -> tuple:
    """Sort key of the candidates for one position: the smallest is kept."""
    created = "".join(str(h.ds.get(k, "") or "").strip() for k in ("InstanceCreationDate", "InstanceCreationTime"))
    content = "".join(str(h.ds.get(k, "") or "").strip() for k in ("ContentDate", "ContentTime"))
    return (-acquisitions[_acquisition(h)], _newest_first(created or content), uid)


def _newest_first(stamp: str) -> tuple[int, ...]:
    """A key that sorts DICOM date-time strings newest first, and an empty one last."""
    return tuple(-ord(c) for c in stamp) + (1,)
