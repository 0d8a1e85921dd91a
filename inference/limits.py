"""The limits of a segmentation walk and of a case's input size: the one place where they
and their defaults are defined.

A rule's action, ``dicom-node segment``/``study`` options, :class:`inference.engine.SegmentOptions`
(what an engine is called with), :class:`inference.propagation.PropagationParams` (the 2D walk)
and :class:`inference.sam2_video.VideoParams` (SAM2's 3D propagation) all are, or derive
from, :class:`WalkLimits`. Lengths are in mm so that they mean the same on 1 mm and 5 mm
slices.

:class:`InputLimits` bounds what one case may hold (voxels, targets, target x voxel masks,
contour points), so that a case too big for the worker's memory is refused with a reason
before it is loaded, instead of taking the worker down. The loaders check the process's
current limits (:func:`input_limits`); the node's worker sets them from ``node.yaml``'s
``limits:`` section (:func:`set_input_limits`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["InputLimits", "InputTooLarge", "WalkLimits", "input_limits", "set_input_limits"]


@dataclass
class WalkLimits:
    """How far a segmentation may walk from the prompted slices, and when a slice is too small.

    ``margin_mm``: the next slice's box is the previous mask's bounding box grown by this.
    ``prompt_margin_mm``: the planner's box is grown by this before its slice is segmented,
    so that the model sees a box drawn on the tumour's edge as it sees the walk's boxes
    (SAM-family models were trained on boxes looser than the object); 0: the box as drawn.
    ``min_area_mm2``: a slice whose mask is smaller ends the walk (and is not kept).
    ``min_area_fraction``: likewise, below this fraction of the prompted slice's area.
    ``max_extent_mm``: the walk never goes farther than this from a prompted slice.
    ``min_score``: a slice whose predicted IoU (the model's own score; engines without one
    skip this rule) is below this ends the walk; 0 turns the rule off.
    ``max_intensity_shift``: a slice whose mask's mean intensity lies more than this many
    standard deviations from the prompted slice's mask ends the walk; 0 turns it off.
    ``extend_past_outer_prompts``: with prompts on two or more slices, whether the walk
    goes beyond the outermost prompted slices (False: they are the tumour's ends).
    ``ct_rim_mm``: how the walk's slices are finished on a CT: each mask grows by up to this
    many mm into the partial-volume rim towards lung that a soft-tissue window hides
    (:mod:`inference.partial_volume`; engines that see the CT in such a window pass the HU
    values: litemedsam); 0 turns it off.

    The defaults of the stop rules were chosen by measurement (``benchmarks/stop_rules.py``
    and ``dicom-node study``; README "Where a tumour ends").
    """

    margin_mm: float = 3.0
    prompt_margin_mm: float = 3.0
    min_area_mm2: float = 4.0
    min_area_fraction: float = 0.05
    max_extent_mm: float = 120.0
    min_score: float = 0.7
    max_intensity_shift: float = 1.5
    extend_past_outer_prompts: bool = False
    ct_rim_mm: float = 1.5

    def __post_init__(self) -> None:
        if self.margin_mm < 0 or self.prompt_margin_mm < 0 or self.min_area_mm2 < 0 or self.max_extent_mm < 0:
            raise ValueError(
                f"margin_mm, prompt_margin_mm, min_area_mm2 and max_extent_mm must not be negative: {self}"
            )
        if not 0 <= self.min_area_fraction <= 1:
            raise ValueError(f"min_area_fraction must be within [0, 1], got {self.min_area_fraction}")
        if not 0 <= self.min_score <= 1:
            raise ValueError(f"min_score must be within [0, 1], got {self.min_score}")
        if self.ct_rim_mm < 0:
            raise ValueError(f"ct_rim_mm must not be negative, got {self.ct_rim_mm}")
        if self.max_intensity_shift < 0:
            raise ValueError(f"max_intensity_shift must not be negative, got {self.max_intensity_shift}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The limit fields (what every derived parameter object takes over)."""
        return tuple(f.name for f in fields(WalkLimits))

    def limit_values(self) -> dict[str, Any]:
        """The limits of this object as keyword arguments for another :class:`WalkLimits` subclass."""
        return {name: getattr(self, name) for name in WalkLimits.names()}


class InputTooLarge(ValueError):
    """A case's input exceeds an :class:`InputLimits` limit; the message names the value,
    the limit and what to do."""


@dataclass(frozen=True)
class InputLimits:
    """How big one case's input may be.

    ``max_voxels``: slices x rows x columns of the image volume (2**29: 2048 slices of
    512x512, or 512 of 1024x1024; about 1 GiB as int16). ``max_targets``: prompt targets
    in one RTSTRUCT. ``max_mask_voxels``: targets x voxels, the result masks held at once
    (one byte each). ``max_contour_points``: contour points of one RTSTRUCT (all ROIs).
    """

    max_voxels: int = 2**29
    max_targets: int = 50
    max_mask_voxels: int = 2**31
    max_contour_points: int = 10_000_000

    def __post_init__(self) -> None:
        for f in fields(self):
            if int(getattr(self, f.name)) < 1:
                raise ValueError(f"{f.name} must be at least 1, got {getattr(self, f.name)}")

    def check_voxels(self, slices: int, rows: int, cols: int, what: str = "the image series") -> None:
        voxels = int(slices) * int(rows) * int(cols)
        if voxels > self.max_voxels:
            raise InputTooLarge(
                f"{what} has {slices} slices of {rows}x{cols} = {voxels:,} voxels, more than the limit of "
                f"{self.max_voxels:,} (limits.max_voxels): send fewer slices or a smaller matrix, or raise the limit"
            )

    def check_targets(self, targets: int, voxels: int) -> None:
        if targets > self.max_targets:
            raise InputTooLarge(
                f"the prompt RTSTRUCT holds {targets} targets, more than the limit of {self.max_targets} "
                "(limits.max_targets): split the prompts over several RTSTRUCTs, or raise the limit"
            )
        if targets * voxels > self.max_mask_voxels:
            raise InputTooLarge(
                f"{targets} targets on {voxels:,} voxels need {targets * voxels:,} mask voxels, more than the limit "
                f"of {self.max_mask_voxels:,} (limits.max_mask_voxels): send fewer targets per RTSTRUCT, or raise "
                "the limit"
            )

    def check_contour_points(self, points: int) -> None:
        if points > self.max_contour_points:
            raise InputTooLarge(
                f"the RTSTRUCT holds more than {self.max_contour_points:,} contour points "
                f"(limits.max_contour_points; {points:,} read so far): send only the prompt ROIs, or raise the limit"
            )


_current = InputLimits()


def input_limits() -> InputLimits:
    """The input limits of this process (the defaults unless :func:`set_input_limits` changed them)."""
    return _current


def set_input_limits(limits: InputLimits | None = None, **values: int) -> InputLimits:
    """Set this process's input limits: an :class:`InputLimits`, or keyword values over the
    defaults (``set_input_limits()`` restores the defaults). Returns the previous limits."""
    global _current
    previous = _current
    _current = limits if limits is not None else InputLimits(**values)
    return previous
