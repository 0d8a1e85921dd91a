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
``reasons`` each name the ROI: other frame of reference, empty ROI, not on an image
plane, outside the image, wrong geometric type, click contour too large, a target with
only negative clicks, missing referenced images. A structure set without any prompt
ROI is refused too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from inference.prompts import BoxPrompt, PointPrompt, TargetPrompts
from inference.volume import Volume
from rtstruct.rasterize import map_contour
from rtstruct.reader import ROI, RTStructError, StructureSet, check_references

#: The longest result ROI name the node writes (TPSs show and keep at most 16 characters).
MAX_ROI_NAME_LENGTH = 16


class PromptError(ValueError):
    """Prompts cannot be used; ``reasons`` lists every problem, each naming its ROI."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons))


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
    reasons: list[str] = []
    targets: dict[str, _Target] = {}
    single_for = structure_set.frame_of_reference_uids[0] if len(structure_set.frame_of_reference_uids) == 1 else None

    other_frame = False

    for roi in prompt_rois:
        kind, target = conventions.classify(roi.name)  # type: ignore[misc]
        what = f"ROI {roi.name!r}"
        entry = targets.setdefault(target.casefold(), _Target(target=target))
        entry.source_rois.append(roi.name)
        before = len(reasons)
        roi_for = roi.frame_of_reference_uid or single_for
        if roi_for is None:
            reasons.append(f"{what} names no frame of reference: cannot tell where it is")
        elif roi_for != volume.frame_of_reference_uid:
            other_frame = True
            reasons.append(
                f"{what} is on another frame of reference ({roi_for}) than the images ({volume.frame_of_reference_uid})"
            )
        elif not roi.contours:
            reasons.append(f"{what} is empty (no contours)")
        if len(reasons) > before:
            entry.failed = True
            continue
        for n, contour in enumerate(roi.contours, start=1):
            cwhat = f"{what} contour {n}" if len(roi.contours) > 1 else what
            gtype = contour.geometric_type
            if kind == "BOX" and gtype not in ("CLOSED_PLANAR", "OPEN_PLANAR"):
                reasons.append(f"{cwhat} is a {gtype} contour; a box prompt is drawn as a CLOSED_PLANAR contour")
                continue
            if kind != "BOX" and gtype not in ("POINT", "CLOSED_PLANAR", "OPEN_PLANAR"):
                reasons.append(f"{cwhat} is a {gtype} contour; a click is a POINT or a tiny planar contour")
                continue
            try:
                mapped = map_contour(contour, geometry, cwhat)
            except RTStructError as exc:
                reasons.append(str(exc))
                continue
            k = mapped.slice_index
            rows, cols = mapped.rows, mapped.cols
            if kind == "BOX":
                inside = _inside_plane(rows, cols, geometry.shape)
                i0, i1 = float(rows.min()), float(rows.max())
                j0, j1 = float(cols.min()), float(cols.max())
                if i1 < -0.5 or j1 < -0.5 or i0 > geometry.shape[1] - 0.5 or j0 > geometry.shape[2] - 0.5:
                    reasons.append(f"{cwhat} is outside the image: its box lies entirely outside the {dims} slice {k}")
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
                        reasons.append(
                            f"{cwhat} is {size:.1f} mm across, too large for a click (at most "
                            f"{conventions.max_click_extent_mm:g} mm): draw a point or a small circle"
                        )
                        continue
                    centres = np.array([[rows.mean(), cols.mean()]])
                inside = _inside_plane(centres[:, 0], centres[:, 1], geometry.shape)
                if not inside.all():
                    i, j = centres[~inside][0]
                    reasons.append(
                        f"{cwhat} is outside the image: the click at row {i:.1f}, column {j:.1f} "
                        f"is not on the {dims} slice {k}"
                    )
                    continue
                for i, j in centres:
                    entry.points.append(PointPrompt(slice_index=k, i=float(i), j=float(j), positive=(kind == "POS")))
        if len(reasons) > before:
            entry.failed = True

    for entry in targets.values():
        if not entry.failed and not entry.boxes and not any(p.positive for p in entry.points):
            shown = entry.target or "(empty target)"
            reasons.append(
                f"target {shown!r} (ROI {', '.join(repr(r) for r in entry.source_rois)}) has only negative "
                f"clicks: it needs a BOX_ or POS_ ROI"
            )

    if not allow_frame_of_reference_only and not other_frame:
        try:
            check_references(structure_set, volume)
        except RTStructError as exc:
            reasons.append(str(exc))
    if reasons:
        raise PromptError(reasons)

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
