"""Prompts in voxel space, as the segmentation engines take them.

Coordinates are continuous voxel indices (see :mod:`inference.geometry`): ``i`` is the
row (y), ``j`` the column (x), both at pixel centres; ``slice_index`` is ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BoxPrompt:
    """An in-plane box on slice ``slice_index``; corners inclusive, in pixel-centre units."""

    slice_index: int
    i0: float  # first row
    j0: float  # first column
    i1: float  # last row
    j1: float  # last column

    def __post_init__(self) -> None:
        if self.i1 < self.i0 or self.j1 < self.j0:
            raise ValueError(f"box corners out of order: {self}")

    @property
    def center(self) -> tuple[float, float]:
        return ((self.i0 + self.i1) / 2.0, (self.j0 + self.j1) / 2.0)


@dataclass(frozen=True)
class PointPrompt:
    """A click on slice ``slice_index`` at row ``i``, column ``j``."""

    slice_index: int
    i: float
    j: float
    positive: bool = True


@dataclass
class TargetPrompts:
    """All prompts of one target (one object to segment, one output ROI).

    ``target`` is the ``<target>`` part of ``BOX_<target>`` etc. (may be empty);
    ``output_name`` is the ROI name of the result (``GTV_AI`` or ``<target>_AI``, at most
    16 characters); ``source_rois`` names the prompt ROIs it came from.
    """

    target: str
    output_name: str
    boxes: list[BoxPrompt] = field(default_factory=list)
    points: list[PointPrompt] = field(default_factory=list)
    source_rois: list[str] = field(default_factory=list)

    @property
    def anchor_slices(self) -> list[int]:
        """Slices carrying at least one prompt, sorted."""
        return sorted({b.slice_index for b in self.boxes} | {p.slice_index for p in self.points})

    def is_empty(self) -> bool:
        return not self.boxes and not any(p.positive for p in self.points)
