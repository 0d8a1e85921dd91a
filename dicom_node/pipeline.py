"""The one-shot segmentation chain: images + prompt RTSTRUCT in, result RTSTRUCT out.

``load_series -> read_rtstruct -> extract_prompts -> get_engine(...).segment per target ->
write_rtstruct`` (one ROI per target, algorithm name and version from the engine's result).
``dicom-node segment`` calls :func:`segment_case`, the node's worker :func:`run_case`,
and the research ``study`` command :func:`segment_targets` (the engine step all of them
share) on prompts it simulates. Every problem of the *input* raises
:class:`CaseError` whose message says which input and what is wrong; anything else
(a bug, out of memory) propagates unchanged.

Also :func:`load_roi_mask` for ``dicom-node evaluate``: an ROI of an RTSTRUCT rasterised
on a volume, with clear refusals (unknown ROI name with the list of names, other frame
of reference, empty ROI).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from inference.engine import SegmentationResult, SegmentOptions
    from inference.prompts import TargetPrompts
    from inference.volume import Volume
    from rtstruct.reader import StructureSet

log = logging.getLogger(__name__)


class CaseError(ValueError):
    """The input of a case cannot be used; ``stage`` says where it failed
    ("images", "prompts", "segmentation", "write", "roi")."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


@dataclass
class TargetResult:
    target: TargetPrompts
    roi_name: str
    result: SegmentationResult


@dataclass
class CaseResult:
    volume: Volume
    dataset: Any  # rtstruct.writer.RTStructureSet (a pydicom Dataset)
    targets: list[TargetResult]
    load_seconds: float = 0.0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def load_volume(images: str | Path | Iterable[str | Path], *, series_instance_uid: str | None = None) -> Volume:
    """:func:`inference.volume.load_series` with its refusals as :class:`CaseError`."""
    from inference.volume import VolumeError, load_series

    if isinstance(images, (str, Path)) and not Path(images).exists():
        raise CaseError("images", f"image folder {str(images)!r} does not exist")
    try:
        return load_series(images, series_instance_uid=series_instance_uid)
    except VolumeError as exc:
        raise CaseError("images", f"image series unusable: {exc}") from None


def read_structure_set(path: str | Path, what: str = "RTSTRUCT") -> StructureSet:
    """:func:`rtstruct.read_rtstruct` with its refusals as :class:`CaseError`."""
    from rtstruct.reader import RTStructError, read_rtstruct

    p = Path(path)
    if not p.exists():
        raise CaseError("prompts", f"{what} {str(path)!r} does not exist")
    if p.is_dir():
        raise CaseError("prompts", f"{what} {str(path)!r} is a folder, not an RTSTRUCT file")
    try:
        return read_rtstruct(p)
    except RTStructError as exc:
        raise CaseError("prompts", f"{what} unusable: {exc}") from None


def load_prompts(
    volume: Volume,
    prompt_rtstruct: str | Path,
    *,
    conventions=None,
    allow_frame_of_reference_only: bool = False,
) -> list[TargetPrompts]:
    """The prompt targets of ``prompt_rtstruct`` in ``volume``'s voxel space."""
    from rtstruct.prompts import DEFAULT_CONVENTIONS, PromptError, extract_prompts

    structure_set = read_structure_set(prompt_rtstruct, "prompt RTSTRUCT")
    try:
        return extract_prompts(
            structure_set,
            volume,
            conventions or DEFAULT_CONVENTIONS,
            allow_frame_of_reference_only=allow_frame_of_reference_only,
        )
    except PromptError as exc:
        raise CaseError("prompts", f"prompts refused: {exc}") from None


def segment_case(
    images: str | Path | Iterable[str | Path],
    prompt_rtstruct: str | Path,
    engine_name: str = "classic",
    engine_config: Mapping[str, Any] | None = None,
    options: SegmentOptions | None = None,
    *,
    color: tuple[int, int, int] = (255, 0, 0),
    roi_names: Mapping[str, str] | None = None,
    conventions=None,
    allow_frame_of_reference_only: bool = False,
    series_instance_uid: str | None = None,
    volume: Volume | None = None,
) -> tuple[Any, list[TargetResult]]:
    """Segment every target of a prompt RTSTRUCT and write the result RTSTRUCT.

    ``engine_config`` goes to :func:`inference.engine.get_engine` (hashable values;
    ``None`` values are dropped so that engine defaults apply). ``roi_names`` maps a
    target (``<target>`` of ``BOX_<target>``) to its output ROI name (default: the
    target's ``output_name``, ``GTV_AI`` or ``<target>_AI``). Pass ``volume`` when it is
    already loaded (``images`` is then ignored).

    Returns ``(dataset, results)``: the RTSTRUCT (save with
    ``dataset.save_as(path, enforce_file_format=True)``) and one :class:`TargetResult`
    per target. :func:`run_case` returns the same with timings.
    """
    case = run_case(
        images,
        prompt_rtstruct,
        engine_name,
        engine_config,
        options,
        color=color,
        roi_names=roi_names,
        conventions=conventions,
        allow_frame_of_reference_only=allow_frame_of_reference_only,
        series_instance_uid=series_instance_uid,
        volume=volume,
    )
    return case.dataset, case.targets


def build_engine(engine_name: str, engine_config: Mapping[str, Any] | None = None):
    """The process-wide engine (:func:`inference.engine.get_engine`): ``None`` values of
    ``engine_config`` are dropped so that engine defaults apply. An unknown engine, a bad
    setting or an unusable checkpoint is a :class:`CaseError`."""
    from inference.engine import SegmentationError, get_engine

    config = {k: v for k, v in (engine_config or {}).items() if v is not None}
    try:
        return get_engine(engine_name, **config)
    except (ValueError, SegmentationError) as exc:
        raise CaseError("segmentation", f"engine {engine_name!r} cannot be used: {exc}") from None


def segment_targets(
    volume: Volume,
    targets: Iterable[TargetPrompts],
    engine_name: str = "classic",
    engine_config: Mapping[str, Any] | None = None,
    options: SegmentOptions | None = None,
    *,
    roi_names: Mapping[str, str] | None = None,
) -> tuple[list[TargetResult], list[str]]:
    """Segment in-memory prompt targets on ``volume``: the engine step shared by the node's
    worker, ``dicom-node segment`` and the research ``study``. Returns one
    :class:`TargetResult` per target and the engines' warnings (prefixed with the ROI name)."""
    from inference.engine import SegmentationError, SegmentOptions

    options = options or SegmentOptions()
    engine = build_engine(engine_name, engine_config)
    results: list[TargetResult] = []
    warnings: list[str] = []
    for target in targets:
        label = target.output_name if not target.target else f"{target.target!r} ({target.output_name})"
        try:
            result = engine.segment(volume, target, options)
        except SegmentationError as exc:
            raise CaseError("segmentation", f"segmentation of target {label} failed: {exc}") from None
        name = (roi_names or {}).get(target.target, target.output_name)
        results.append(TargetResult(target=target, roi_name=name, result=result))
        warnings += [f"{name}: {w}" for w in result.warnings]
        log.info(
            "target %s: %d slices, %.1f s, %s",
            name,
            int(result.mask.any(axis=(1, 2)).sum()),
            result.seconds,
            result.algorithm_name,
        )
    return results, warnings


def run_case(
    images,
    prompt_rtstruct,
    engine_name: str = "classic",
    engine_config: Mapping[str, Any] | None = None,
    options: SegmentOptions | None = None,
    *,
    color: tuple[int, int, int] = (255, 0, 0),
    roi_names: Mapping[str, str] | None = None,
    conventions=None,
    allow_frame_of_reference_only: bool = False,
    series_instance_uid: str | None = None,
    volume: Volume | None = None,
    targets: list[TargetPrompts] | None = None,
) -> CaseResult:
    """:func:`segment_case`, returning a :class:`CaseResult` (volume, timings, warnings).
    Pass ``targets`` when the prompts are already extracted from ``prompt_rtstruct``."""
    from rtstruct.reader import RTStructError
    from rtstruct.writer import RoiMask, write_rtstruct

    t0 = time.perf_counter()
    if volume is None:
        volume = load_volume(images, series_instance_uid=series_instance_uid)
    if targets is None:
        targets = load_prompts(
            volume,
            prompt_rtstruct,
            conventions=conventions,
            allow_frame_of_reference_only=allow_frame_of_reference_only,
        )
    load_seconds = time.perf_counter() - t0
    results, warnings = segment_targets(volume, targets, engine_name, engine_config, options, roi_names=roi_names)
    rois = [
        RoiMask(
            name=r.roi_name,
            mask=r.result.mask,
            color=tuple(color),
            interpreted_type="GTV",
            algorithm_name=r.result.algorithm_name,
            algorithm_version=str(r.result.engine_version),
            description=f"{r.result.algorithm_name}, mode {r.result.mode}",
        )
        for r in results
    ]
    try:
        dataset = write_rtstruct(volume, rois)
    except RTStructError as exc:
        raise CaseError("write", f"result RTSTRUCT cannot be written: {exc}") from None
    return CaseResult(
        volume=volume,
        dataset=dataset,
        targets=results,
        load_seconds=load_seconds,
        seconds=time.perf_counter() - t0,
        warnings=warnings,
    )


# -- evaluation -----------------------------------------------------------------------


def pick_roi(structure_set: StructureSet, name: str | None, what: str):
    """The ROI ``name`` (exact, then case-insensitive), or the only non-empty ROI when
    ``name`` is None. :class:`CaseError` lists the ROIs otherwise."""
    names = ", ".join(repr(r.name) for r in structure_set.rois) or "none"
    if name is not None:
        try:
            return structure_set.roi(name)
        except KeyError:
            raise CaseError("roi", f"{what} has no ROI named {name!r}; its ROIs: {names}") from None
    candidates = [r for r in structure_set.rois if not r.is_empty and "CLOSED_PLANAR" in r.geometric_types]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CaseError("roi", f"{what} has no ROI with closed contours; its ROIs: {names}")
    raise CaseError("roi", f"{what} has {len(candidates)} ROIs with contours: name one (ROIs: {names})")


def load_roi_mask(structure_set: StructureSet, roi, volume: Volume, what: str) -> np.ndarray:
    """``roi`` rasterised on ``volume`` (refused: other frame of reference, empty, off-plane)."""
    from rtstruct.rasterize import rasterize_roi
    from rtstruct.reader import RTStructError

    frame = roi.frame_of_reference_uid or (
        structure_set.frame_of_reference_uids[0] if len(structure_set.frame_of_reference_uids) == 1 else None
    )
    if frame is not None and frame != volume.frame_of_reference_uid:
        raise CaseError(
            "roi",
            f"{what} ROI {roi.name!r} is on frame of reference {frame}, the images on "
            f"{volume.frame_of_reference_uid}: it was not drawn on these images",
        )
    try:
        return rasterize_roi(roi, volume.geometry)
    except RTStructError as exc:
        raise CaseError("roi", f"{what}: {exc}") from None
