"""The segmentation chain, typed: images + prompt RTSTRUCT in, result RTSTRUCT out.

Every caller (the node's worker, ``dicom-node segment``, the research ``study``) goes
through the same steps:

1. :func:`prepare` loads the volume (:func:`rtstruct.series.load_series`), reads the
   prompt RTSTRUCT once and extracts its targets (:func:`rtstruct.prompts.extract_prompts`):
   a :class:`SegmentRequest` (volume, targets, :class:`~inference.engine.EngineSpec`,
   :class:`~inference.engine.SegmentOptions`, :class:`RoiNaming`).
2. :func:`run` segments every target with the engine (:func:`segment_targets`, the step
   ``study`` calls on prompts it simulates), names the result ROIs with the one naming
   rule (:func:`rtstruct.prompts.result_roi_names`: the rule's name, made unique against
   the planner's ROIs) and writes the result RTSTRUCT (:func:`rtstruct.writer.write_rtstruct`).

Every problem of the *input* raises :class:`CaseError` whose message says which input and
what is wrong; anything else (a bug, out of memory) propagates unchanged.

Also :func:`load_roi_mask` for ``dicom-node evaluate``: an ROI of an RTSTRUCT rasterised
on a volume, with clear refusals (unknown ROI name with the list of names, other frame
of reference, empty ROI).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.engine import DEFAULT_ENGINE, EngineSpec, SegmentOptions
from inference.limits import InputTooLarge, input_limits

if TYPE_CHECKING:  # pragma: no cover
    from inference.engine import SegmentationResult
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


@dataclass(frozen=True)
class RoiNaming:
    """How the result ROIs are named and coloured.

    ``template``: a rule's ``output_roi_name`` (``None``: ``GTV_AI`` / ``<target>_AI``);
    ``existing``: the ROI names of the planner's structure set, which a result never takes.
    """

    template: str | None = None
    color: tuple[int, int, int] = (255, 0, 0)
    existing: tuple[str, ...] = ()


@dataclass
class SegmentRequest:
    """One case to segment: what :func:`run` takes."""

    volume: Volume
    targets: list[TargetPrompts]
    engine: EngineSpec = field(default_factory=lambda: EngineSpec(DEFAULT_ENGINE))
    options: SegmentOptions = field(default_factory=SegmentOptions)
    naming: RoiNaming = field(default_factory=RoiNaming)
    conventions: Any = None  # rtstruct.prompts.PromptConventions; None: the defaults

    def roi_names(self) -> list[str]:
        """The result ROI name of each target (see :func:`rtstruct.prompts.result_roi_names`)."""
        from rtstruct.prompts import DEFAULT_CONVENTIONS, result_roi_names

        return result_roi_names(
            [t.target for t in self.targets],
            self.naming.existing,
            self.naming.template,
            self.conventions or DEFAULT_CONVENTIONS,
        )


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
    """:func:`rtstruct.series.load_series` with its refusals as :class:`CaseError`."""
    from rtstruct.series import VolumeError, load_series

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


def extract_targets(
    volume: Volume, structure_set: StructureSet, *, conventions=None, allow_frame_of_reference_only: bool = False
) -> list[TargetPrompts]:
    """The prompt targets of ``structure_set`` in ``volume``'s voxel space."""
    from rtstruct.prompts import DEFAULT_CONVENTIONS, PromptError, extract_prompts

    try:
        targets = extract_prompts(
            structure_set,
            volume,
            conventions or DEFAULT_CONVENTIONS,
            allow_frame_of_reference_only=allow_frame_of_reference_only,
        )
    except PromptError as exc:
        raise CaseError("prompts", f"prompts refused: {exc}") from None
    try:  # every target's mask is held until the result is written
        input_limits().check_targets(len(targets), int(np.prod(volume.shape)))
    except InputTooLarge as exc:
        raise CaseError("prompts", f"prompts refused: {exc}") from None
    return targets


def prepare(
    images: str | Path | Iterable[str | Path] | None,
    prompt_rtstruct: str | Path,
    *,
    engine: EngineSpec | None = None,
    options: SegmentOptions | None = None,
    naming: RoiNaming | None = None,
    conventions=None,
    allow_frame_of_reference_only: bool = False,
    series_instance_uid: str | None = None,
    volume: Volume | None = None,
) -> SegmentRequest:
    """Load the images (unless ``volume`` is given) and the prompts: a :class:`SegmentRequest`.

    The planner's ROI names are taken from the prompt RTSTRUCT into the request's naming,
    so that no result ROI takes one of them.
    """
    if volume is None:
        volume = load_volume(images, series_instance_uid=series_instance_uid)  # type: ignore[arg-type]
    structure_set = read_structure_set(prompt_rtstruct, "prompt RTSTRUCT")
    targets = extract_targets(
        volume, structure_set, conventions=conventions, allow_frame_of_reference_only=allow_frame_of_reference_only
    )
    naming = naming or RoiNaming()
    naming = RoiNaming(naming.template, naming.color, tuple(structure_set.roi_names) + naming.existing)
    return SegmentRequest(
        volume=volume,
        targets=targets,
        engine=engine or EngineSpec(DEFAULT_ENGINE),
        options=options or SegmentOptions(),
        naming=naming,
        conventions=conventions,
    )


def build_engine(spec: EngineSpec):
    """The process-wide engine of ``spec`` (:func:`inference.engine.build`). An unknown
    engine, a bad setting or an unusable checkpoint is a :class:`CaseError`."""
    from inference.engine import SegmentationError, build

    try:
        return build(spec)
    except (ValueError, SegmentationError) as exc:
        raise CaseError("segmentation", f"engine {spec.name!r} cannot be used: {exc}") from None


def segment_targets(
    volume: Volume,
    targets: Sequence[TargetPrompts],
    engine: EngineSpec,
    options: SegmentOptions | None = None,
    *,
    roi_names: Sequence[str] | None = None,
) -> tuple[list[TargetResult], list[str]]:
    """Segment in-memory prompt targets on ``volume``: the engine step shared by the node's
    worker, ``dicom-node segment`` and the research ``study``. ``roi_names`` holds one name
    per target (default: each target's ``output_name``). Returns one :class:`TargetResult`
    per target and the engines' warnings (prefixed with the ROI name)."""
    from inference.engine import SegmentationError

    options = options or SegmentOptions()
    built = build_engine(engine)
    names = list(roi_names) if roi_names is not None else [t.output_name for t in targets]
    results: list[TargetResult] = []
    warnings: list[str] = []
    for target, name in zip(targets, names, strict=True):
        label = target.output_name if not target.target else f"{target.target!r} ({target.output_name})"
        try:
            result = built.segment(volume, target, options)
        except SegmentationError as exc:
            raise CaseError("segmentation", f"segmentation of target {label} failed: {exc}") from None
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


def run(request: SegmentRequest, *, load_seconds: float = 0.0) -> CaseResult:
    """Segment every target of ``request`` and write the result RTSTRUCT."""
    from rtstruct.reader import RTStructError
    from rtstruct.writer import RoiMask, write_rtstruct

    t0 = time.perf_counter()
    results, warnings = segment_targets(
        request.volume, request.targets, request.engine, request.options, roi_names=request.roi_names()
    )
    rois = [
        RoiMask(
            name=r.roi_name,
            mask=r.result.mask,
            color=tuple(request.naming.color),
            interpreted_type="GTV",
            algorithm_name=r.result.algorithm_name,
            algorithm_version=str(r.result.engine_version),
            description=f"{r.result.algorithm_name}, mode {r.result.mode}",
        )
        for r in results
    ]
    try:
        dataset = write_rtstruct(request.volume, rois)
    except RTStructError as exc:
        raise CaseError("write", f"result RTSTRUCT cannot be written: {exc}") from None
    return CaseResult(
        volume=request.volume,
        dataset=dataset,
        targets=results,
        load_seconds=load_seconds,
        seconds=load_seconds + time.perf_counter() - t0,
        warnings=warnings,
    )


def segment_case(images, prompt_rtstruct, **prepare_args) -> CaseResult:
    """:func:`prepare` then :func:`run`: the one-shot chain of ``dicom-node segment`` and the worker."""
    t0 = time.perf_counter()
    request = prepare(images, prompt_rtstruct, **prepare_args)
    return run(request, load_seconds=time.perf_counter() - t0)


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
