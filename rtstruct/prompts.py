"""Prompt ROIs of an RTSTRUCT -> prompts in voxel space (DESIGN.md "Prompt conventions").

| ROI name        | geometry                               | prompt                              |
|-----------------|----------------------------------------|-------------------------------------|
| ``BOX_<target>``| CLOSED_PLANAR contour(s)               | per slice: in-plane bounding box    |
| ``POS_<target>``| POINT, or a tiny contour (its centroid)| positive click                      |
| ``NEG_<target>``| POINT, or a tiny contour (its centroid)| negative click                      |

Names are matched case-insensitively with configurable regular expressions (named group
``target``); ``BOX``, ``BOX_`` and ``box_`` all mean the empty target. Prompts with the
same target (compared case-insensitively) form one :class:`inference.prompts.TargetPrompts`.
Several contours of a target on one slice give one box: their joint bounding box.

Output names: ``GTV_AI`` for the empty target, else ``<target>_AI`` (target cut so the
name has at most 16 characters), and never the name of an ROI already in the structure
set (compared case-insensitively, as TPSs do): a clash gets ``_2``, ``_3``, ...

Everything that is wrong is collected and raised at once as :class:`PromptError`, whose
``reasons`` are one sentence per cause, each naming the ROI: other frame of reference,
missing referenced images, empty ROI, not on an image plane, outside the image, wrong
geometric type, click contour too large, a target with only negative clicks. The most
fundamental cause comes first (frame of reference, then missing images, then the
contours); the contours of one ROI with the same cause make one sentence with counts and
ranges ("ROI 'BOX_': 29 of 30 contours lie outside the image, 3.0-87.0 mm beyond the last
slice ..."), and contours drawn on images that are missing are not listed at all (the
missing images are their cause). A structure set without any prompt ROI is refused too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from inference.prompts import BoxPrompt, PointPrompt, TargetPrompts
from inference.volume import Volume
from rtstruct.rasterize import ContourOutsideVolume, map_contour
from rtstruct.reader import ROI, MissingImagesError, RTStructError, StructureSet, check_references

#: The longest result ROI name the node writes (TPSs show and keep at most 16 characters).
MAX_ROI_NAME_LENGTH = 16


class PromptError(ValueError):
    """Prompts cannot be used; ``reasons`` lists every cause, the most fundamental first,
    each one sentence naming its ROI; the message is these sentences, each ended by a full stop."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__(" ".join(_sentence(r) for r in self.reasons))


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def slice_ranges(slices: Iterable[int]) -> str:
    """``"slice 4"``, ``"slices 3-17"``, ``"slices 3-17, 20, 22-23"``."""
    ks = sorted(set(int(k) for k in slices))
    runs: list[list[int]] = []
    for k in ks:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    return ("slice " if len(ks) == 1 else "slices ") + text


def mm_range(values: Iterable[float]) -> str:
    """``"2.5 mm"`` or ``"2.5-75.0 mm"`` (smallest to largest)."""
    vs = [float(v) for v in values]
    lo, hi = f"{min(vs):.1f}", f"{max(vs):.1f}"
    return f"{lo} mm" if lo == hi else f"{lo}-{hi} mm"


# The order of the causes in a refusal: what makes everything else moot comes first.
_FRAME, _IMAGES, _EMPTY, _CONTOURS, _TARGETS = range(5)


class _Refusals:
    """Sentences with their rank; :meth:`ordered` gives them most fundamental first."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, str]] = []

    def add(self, rank: int, sentence: str) -> None:
        self._items.append((rank, len(self._items), sentence))

    def __bool__(self) -> bool:
        return bool(self._items)

    def ordered(self) -> list[str]:
        return [s for _, _, s in sorted(self._items)]


@dataclass
class _RoiProblems:
    """What is wrong with the contours of one ROI, gathered so that each cause is one
    sentence with counts and ranges instead of one clause per contour."""

    what: str
    n_contours: int
    outside: list[tuple[str, float, str]] = field(default_factory=list)  # (side, mm, message)
    off_image: list[tuple[int, str]] = field(default_factory=list)  # (slice, message)
    others: dict[str, list[str]] = field(default_factory=dict)  # cause -> messages
    on_missing_images: int = 0

    def other(self, cause: str, message: str) -> None:
        self.others.setdefault(cause, []).append(message)

    def sentences(self, n_slices: int, spacing: float, dims: str, kind: str) -> list[str]:
        out = []
        of = f"of {self.n_contours} contours"
        if len(self.outside) == 1:
            out.append(self.outside[0][2])
        elif self.outside:
            parts = []
            sides = [s for s in ("before", "beyond") if any(o[0] == s for o in self.outside)]
            for side in sides:
                mm = [o[1] for o in self.outside if o[0] == side]
                where = "before the first slice" if side == "before" else "beyond the last slice"
                parts.append(f"{len(mm)} at {mm_range(mm)} {where}" if len(sides) > 1 else f"{mm_range(mm)} {where}")
            volume = f"the volume has {n_slices} slice{'s' if n_slices != 1 else ''} of {spacing:g} mm"
            out.append(f"{self.what}: {len(self.outside)} {of} lie outside the image, {' and '.join(parts)} ({volume})")
        if len(self.off_image) == 1:
            out.append(self.off_image[0][1])
        elif self.off_image:
            things = "boxes" if kind == "BOX" else "clicks"
            where = slice_ranges(k for k, _ in self.off_image)
            out.append(
                f"{self.what}: {len(self.off_image)} of {self.n_contours} {things} lie outside the {dims} image ({where})"
            )
        for messages in self.others.values():
            more = f" (and {len(messages) - 1} more of its contours)" if len(messages) > 1 else ""
            out.append(messages[0] + more)
        return out


@dataclass
class PromptConventions:
    """How prompt ROIs are named and what the results are called (all configurable).

    Each pattern is a regular expression matched against the whole ROI name (stripped)
    with a named group ``target``; ``ignore_case`` applies to all three.
    """

    box_pattern: str = r"BOX(?:_(?P<target>.*))?"
    pos_pattern: str = r"POS(?:_(?P<target>.*))?"
    neg_pattern: str = r"NEG(?:_(?P<target>.*))?"
    ignore_case: bool = True
    default_output_name: str = "GTV_AI"
    output_suffix: str = "_AI"
    max_name_length: int = MAX_ROI_NAME_LENGTH
    # A POS_/NEG_ contour larger than this (largest in-plane extent, mm) is not a click.
    max_click_extent_mm: float = 15.0

    def __post_init__(self) -> None:
        flags = re.IGNORECASE if self.ignore_case else 0
        self._compiled = {}
        for kind, pattern in (("BOX", self.box_pattern), ("POS", self.pos_pattern), ("NEG", self.neg_pattern)):
            try:
                compiled = re.compile(pattern, flags)
            except re.error as exc:
                raise ValueError(
                    f"prompt pattern for {kind} {pattern!r} is not a valid regular expression: {exc}"
                ) from exc
            if "target" not in compiled.groupindex:
                raise ValueError(f"prompt pattern for {kind} {pattern!r} needs a named group (?P<target>...)")
            self._compiled[kind] = compiled
        if len(self.default_output_name) > self.max_name_length:
            raise ValueError(f"default output name {self.default_output_name!r} is longer than {self.max_name_length}")
        if len(self.output_suffix) >= self.max_name_length:
            raise ValueError(f"output suffix {self.output_suffix!r} leaves no room for a target name")

    def classify(self, roi_name: str) -> tuple[str, str] | None:
        """``(kind, target)`` with kind ``BOX``/``POS``/``NEG`` for a prompt ROI name, else None."""
        name = roi_name.strip()
        for kind, pattern in self._compiled.items():
            match = pattern.fullmatch(name)
            if match:
                return kind, (match.group("target") or "").strip()
        return None

    def output_name(self, target: str) -> str:
        """The result ROI name for ``target`` before uniqueness: ``GTV_AI`` or ``<target>_AI``."""
        if not target:
            return self.default_output_name
        room = self.max_name_length - len(self.output_suffix)
        return target[:room] + self.output_suffix


DEFAULT_CONVENTIONS = PromptConventions()


def find_prompt_rois(structure_set: StructureSet, conventions: PromptConventions = DEFAULT_CONVENTIONS) -> list[ROI]:
    """The ROIs whose names follow the prompt conventions (no volume needed)."""
    return [roi for roi in structure_set.rois if conventions.classify(roi.name) is not None]


def unique_name(base: str, taken: set[str], max_length: int = MAX_ROI_NAME_LENGTH) -> str:
    """``base``, or ``base_2``, ``base_3``, ... (cut to ``max_length``) not in ``taken``
    (``taken`` holds casefolded names)."""
    if base.casefold() not in taken:
        return base
    n = 2
    while True:
        suffix = f"_{n}"
        candidate = base[: max_length - len(suffix)].rstrip("_ ") + suffix
        if candidate.casefold() not in taken:
            return candidate
        n += 1


def result_roi_names(
    targets: Sequence[str],
    existing: Iterable[str],
    template: str | None = None,
    conventions: PromptConventions = DEFAULT_CONVENTIONS,
) -> list[str]:
    """The result ROI name of each prompt target, in order: the one naming rule of the node.

    ``template`` is a rule's ``output_roi_name``: a fixed name (``GTV-AI``) or one with a
    ``{target}`` placeholder (``{target}_AI``; for the empty target the convention's name
    is used instead). Without a template, the convention's name (``GTV_AI`` or
    ``<target>_AI``). Every name is cut to the conventions' maximum length (16) and is
    never, compared case-insensitively as TPSs do, the name of an ROI in ``existing`` (the
    planner's structure set) or of an earlier target: a clash gets ``_2``, ``_3``, ...
    """
    taken = {name.casefold() for name in existing}
    names = []
    for target in targets:
        if template is None or ("{target}" in template and not target):
            base = conventions.output_name(target)
        else:
            base = template.format(target=target) if "{target}" in template else template
        name = unique_name(base[: conventions.max_name_length], taken, conventions.max_name_length)
        taken.add(name.casefold())
        names.append(name)
    return names


@dataclass
class _Target:
    target: str
    boxes: dict[int, list[float]] = field(default_factory=dict)  # k -> [i0, j0, i1, j1]
    points: list[PointPrompt] = field(default_factory=list)
    source_rois: list[str] = field(default_factory=list)
    failed: bool = False


def _inside_plane(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return (rows >= -0.5) & (rows <= shape[1] - 0.5) & (cols >= -0.5) & (cols <= shape[2] - 0.5)


def extract_prompts(
    structure_set: StructureSet,
    volume: Volume,
    conventions: PromptConventions = DEFAULT_CONVENTIONS,
    *,
    allow_frame_of_reference_only: bool = False,
) -> list[TargetPrompts]:
    """Prompts of ``structure_set`` in the voxel space of ``volume``, one per target.

    Raises :class:`PromptError` listing every reason the prompts cannot be used. Unless
    ``allow_frame_of_reference_only``, the RTSTRUCT must also reference the volume's
    series and every image it references must be in the volume
    (:func:`rtstruct.reader.check_references`).
    """
    prompt_rois = find_prompt_rois(structure_set, conventions)
    label = structure_set.label or structure_set.sop_instance_uid
    if not prompt_rois:
        names = ", ".join(repr(r.name) for r in structure_set.rois) or "none"
        raise PromptError(
            [
                f"RTSTRUCT {label!r} has no prompt ROIs (names like BOX_<target>, POS_<target>, "
                f"NEG_<target>); its ROIs: {names}"
            ]
        )

    geometry = volume.geometry
    dims = f"{geometry.shape[1]}x{geometry.shape[2]}"
    refusals = _Refusals()
    targets: dict[str, _Target] = {}
    single_for = structure_set.frame_of_reference_uids[0] if len(structure_set.frame_of_reference_uids) == 1 else None

    def roi_frame(roi: ROI) -> str | None:
        return roi.frame_of_reference_uid or single_for

    # The images first: when they are missing, that is the cause of everything after it.
    other_frame = any(
        roi_frame(roi) is not None and roi_frame(roi) != volume.frame_of_reference_uid for roi in prompt_rois
    )
    missing: set[str] = set()
    if not allow_frame_of_reference_only and not other_frame:
        try:
            check_references(structure_set, volume)
        except MissingImagesError as exc:
            refusals.add(_IMAGES, str(exc))
            missing = set(exc.missing)
        except RTStructError as exc:
            refusals.add(_FRAME if "frame of reference" in str(exc).split(":")[0] else _IMAGES, str(exc))

    for roi in prompt_rois:
        kind, target = conventions.classify(roi.name)  # type: ignore[misc]
        what = f"ROI {roi.name!r}"
        entry = targets.setdefault(target.casefold(), _Target(target=target))
        entry.source_rois.append(roi.name)
        roi_for = roi_frame(roi)
        if roi_for is None:
            refusals.add(_FRAME, f"{what} names no frame of reference: cannot tell where it is")
            entry.failed = True
            continue
        if roi_for != volume.frame_of_reference_uid:
            refusals.add(
                _FRAME,
                f"{what} is on another frame of reference ({roi_for}) than the images ({volume.frame_of_reference_uid})",
            )
            entry.failed = True
            continue
        if not roi.contours:
            refusals.add(_EMPTY, f"{what} is empty (no contours)")
            entry.failed = True
            continue
        problems = _RoiProblems(what, len(roi.contours))
        for n, contour in enumerate(roi.contours, start=1):
            refs = contour.referenced_sop_instance_uids
            if missing and refs and all(u in missing for u in refs):
                problems.on_missing_images += 1  # said by the missing-images sentence
                continue
            cwhat = f"{what} contour {n}" if len(roi.contours) > 1 else what
            gtype = contour.geometric_type
            if kind == "BOX" and gtype not in ("CLOSED_PLANAR", "OPEN_PLANAR"):
                problems.other(
                    "type", f"{cwhat} is a {gtype} contour; a box prompt is drawn as a CLOSED_PLANAR contour"
                )
                continue
            if kind != "BOX" and gtype not in ("POINT", "CLOSED_PLANAR", "OPEN_PLANAR"):
                problems.other("type", f"{cwhat} is a {gtype} contour; a click is a POINT or a tiny planar contour")
                continue
            try:
                mapped = map_contour(contour, geometry, cwhat)
            except ContourOutsideVolume as exc:
                problems.outside.append((exc.side, exc.distance_mm, str(exc)))
                continue
            except RTStructError as exc:
                problems.other("plane", str(exc))
                continue
            k = mapped.slice_index
            rows, cols = mapped.rows, mapped.cols
            if kind == "BOX":
                inside = _inside_plane(rows, cols, geometry.shape)
                i0, i1 = float(rows.min()), float(rows.max())
                j0, j1 = float(cols.min()), float(cols.max())
                if i1 < -0.5 or j1 < -0.5 or i0 > geometry.shape[1] - 0.5 or j0 > geometry.shape[2] - 0.5:
                    problems.off_image.append(
                        (k, f"{cwhat} is outside the image: its box lies entirely outside the {dims} slice {k}")
                    )
                    continue
                if not inside.all():
                    # Partly outside: keep the part on the image.
                    i0, j0 = max(i0, 0.0), max(j0, 0.0)
                    i1, j1 = min(i1, geometry.shape[1] - 1.0), min(j1, geometry.shape[2] - 1.0)
                box = entry.boxes.get(k)
                entry.boxes[k] = (
                    [i0, j0, i1, j1]
                    if box is None
                    else [min(box[0], i0), min(box[1], j0), max(box[2], i1), max(box[3], j1)]
                )
            else:
                if gtype == "POINT":
                    centres = np.column_stack([rows, cols])
                else:
                    extent = contour.points.max(axis=0) - contour.points.min(axis=0)
                    size = float(np.linalg.norm(extent))
                    if size > conventions.max_click_extent_mm:
                        problems.other(
                            "large",
                            f"{cwhat} is {size:.1f} mm across, too large for a click (at most "
                            f"{conventions.max_click_extent_mm:g} mm): draw a point or a small circle",
                        )
                        continue
                    centres = np.array([[rows.mean(), cols.mean()]])
                inside = _inside_plane(centres[:, 0], centres[:, 1], geometry.shape)
                if not inside.all():
                    i, j = centres[~inside][0]
                    problems.off_image.append(
                        (
                            k,
                            f"{cwhat} is outside the image: the click at row {i:.1f}, column {j:.1f} "
                            f"is not on the {dims} slice {k}",
                        )
                    )
                    continue
                for i, j in centres:
                    entry.points.append(PointPrompt(slice_index=k, i=float(i), j=float(j), positive=(kind == "POS")))
        sentences = problems.sentences(geometry.shape[0], geometry.spacing[0], dims, kind)
        for sentence in sentences:
            refusals.add(_CONTOURS, sentence)
        if sentences or problems.on_missing_images:
            entry.failed = True

    for entry in targets.values():
        if not entry.failed and not entry.boxes and not any(p.positive for p in entry.points):
            shown = entry.target or "(empty target)"
            refusals.add(
                _TARGETS,
                f"target {shown!r} (ROI {', '.join(repr(r) for r in entry.source_rois)}) has only negative "
                f"clicks: it needs a BOX_ or POS_ ROI",
            )

    if refusals:
        raise PromptError(refusals.ordered())

    entries = list(targets.values())
    names = result_roi_names([e.target for e in entries], structure_set.roi_names, None, conventions)
    results = []
    for entry, name in zip(entries, names):
        results.append(
            TargetPrompts(
                target=entry.target,
                output_name=name,
                boxes=[BoxPrompt(k, *entry.boxes[k]) for k in sorted(entry.boxes)],
                points=sorted(entry.points, key=lambda p: (p.slice_index, not p.positive, p.i, p.j)),
                source_rois=list(entry.source_rois),
            )
        )
    return results
