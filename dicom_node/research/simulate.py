"""Simulate the planner's prompt from a ground-truth mask, reproducibly.

A planner draws a box around the tumour on one slice (or clicks inside and around it).
For a validation study we derive that prompt from the clinical contour instead:

* **slice**: ``largest`` = the slice where the ground truth has the largest area (a tie
  goes to the slice nearest the middle of the z-extent, then the lower index);
  ``middle`` = the ground-truth slice nearest the middle of its z-extent.
* **box**: the in-plane bounding box of the ground truth on that slice (pixel centres,
  inclusive, as :class:`~inference.prompts.BoxPrompt` takes it). With ``jitter_mm`` > 0
  each of the four edges moves independently by a uniform random amount in
  ``[-jitter_mm, +jitter_mm]``, converted to pixels with that axis' own spacing
  (rows with ``dy``, columns with ``dx``), then clipped to the image.
* **points**: the first positive click is the ground truth's deepest point (largest
  distance in mm to its border); further positives are drawn from the core (distance at
  least half the maximum); negatives are drawn from a ring outside the ground truth
  (``ring_mm`` from its border), one per angular sector around the centroid so they
  surround it. Jitter does not apply to points.

Every random choice comes from a generator seeded by ``(seed, case, roi)`` (see
:func:`case_rng`): the same seed gives the same prompts whatever the order or subset of
cases a study runs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from inference.prompts import BoxPrompt, PointPrompt, TargetPrompts

PromptKind = Literal["box", "points"]
SliceChoice = Literal["largest", "middle"]


class SimulationError(ValueError):
    """No prompt can be simulated from this ground truth (for example, it is empty)."""


@dataclass(frozen=True)
class PromptSpec:
    """How to simulate one prompt (the study's command-line options)."""

    kind: PromptKind = "box"
    slice: SliceChoice = "largest"
    jitter_mm: float = 0.0
    positives: int = 3
    negatives: int = 3
    ring_mm: tuple[float, float] = (3.0, 10.0)

    def __post_init__(self) -> None:
        if self.kind not in ("box", "points"):
            raise ValueError(f"prompt kind must be 'box' or 'points', got {self.kind!r}")
        if self.slice not in ("largest", "middle"):
            raise ValueError(f"slice must be 'largest' or 'middle', got {self.slice!r}")
        if self.jitter_mm < 0:
            raise ValueError("jitter_mm must be >= 0")
        if self.kind == "points" and self.positives < 1:
            raise ValueError("at least one positive point is needed")
        if self.negatives < 0 or not 0 <= self.ring_mm[0] < self.ring_mm[1]:
            raise ValueError("negatives must be >= 0 and ring_mm an increasing (inner, outer) pair")


def case_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator determined by ``seed`` and string keys (case name, ROI name)."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(k.encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def choose_slice(mask: np.ndarray, how: SliceChoice) -> int:
    """The prompt slice ``k`` of a 3D ``(z, y, x)`` ground-truth mask."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    present = np.flatnonzero(areas)
    if present.size == 0:
        raise SimulationError("ground truth is empty: no slice to prompt")
    middle = (present[0] + present[-1]) / 2.0
    if how == "middle":
        return int(present[np.argmin(np.abs(present - middle))])
    if how == "largest":
        best = present[areas[present] == areas[present].max()]
        return int(best[np.argmin(np.abs(best - middle))])
    raise ValueError(f"unknown slice choice {how!r}")


def bounding_box(mask2d: np.ndarray) -> tuple[float, float, float, float]:
    """(i0, j0, i1, j1) of a non-empty 2D mask: first/last row and column, inclusive."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        raise SimulationError("empty slice: no bounding box")
    return float(rows[0]), float(cols[0]), float(rows[-1]), float(cols[-1])


def simulate_box(
    mask2d: np.ndarray,
    spacing_yx: tuple[float, float],
    jitter_mm: float,
    rng: np.random.Generator,
) -> tuple[float, float, float, float]:
    """The bounding box of ``mask2d``, each edge jittered by U(-jitter, +jitter) mm."""
    i0, j0, i1, j1 = bounding_box(mask2d)
    if jitter_mm > 0:
        dy, dx = spacing_yx
        shifts = rng.uniform(-jitter_mm, jitter_mm, size=4)
        i0 += shifts[0] / dy
        j0 += shifts[1] / dx
        i1 += shifts[2] / dy
        j1 += shifts[3] / dx
    ny, nx = mask2d.shape
    i0, i1 = (float(np.clip(v, 0, ny - 1)) for v in (i0, i1))
    j0, j1 = (float(np.clip(v, 0, nx - 1)) for v in (j0, j1))
    if i1 < i0:  # the jitter crossed the edges of a thin box: collapse to their middle
        i0 = i1 = (i0 + i1) / 2.0
    if j1 < j0:
        j0 = j1 = (j0 + j1) / 2.0
    return i0, j0, i1, j1


def simulate_points(
    mask2d: np.ndarray,
    spacing_yx: tuple[float, float],
    positives: int,
    negatives: int,
    ring_mm: tuple[float, float],
    rng: np.random.Generator,
) -> list[tuple[int, int, bool]]:
    """Clicks ``(i, j, positive)`` on one slice: positives deep inside, negatives around."""
    mask2d = np.asarray(mask2d, dtype=bool)
    if not mask2d.any():
        raise SimulationError("empty slice: no point to click")
    inside = ndimage.distance_transform_edt(mask2d, sampling=spacing_yx)
    deepest = np.unravel_index(int(np.argmax(inside)), mask2d.shape)
    points: list[tuple[int, int, bool]] = [(int(deepest[0]), int(deepest[1]), True)]
    if positives > 1:
        core = np.argwhere(inside >= 0.5 * inside.max())
        core = core[~((core[:, 0] == deepest[0]) & (core[:, 1] == deepest[1]))]
        take = min(positives - 1, len(core))
        for idx in rng.choice(len(core), size=take, replace=False) if take else []:
            points.append((int(core[idx, 0]), int(core[idx, 1]), True))
    if negatives > 0:
        outside = ndimage.distance_transform_edt(~mask2d, sampling=spacing_yx)
        ring = np.argwhere((outside >= max(ring_mm[0], 1e-6)) & (outside <= ring_mm[1]))
        if len(ring):
            centroid = np.argwhere(mask2d).mean(axis=0)
            vec = (ring - centroid) * np.asarray(spacing_yx)
            angle = np.mod(np.arctan2(vec[:, 0], vec[:, 1]), 2 * np.pi)
            sector = np.minimum((angle / (2 * np.pi) * negatives).astype(int), negatives - 1)
            for s in range(negatives):
                members = np.flatnonzero(sector == s)
                if members.size:
                    idx = members[rng.integers(members.size)]
                    points.append((int(ring[idx, 0]), int(ring[idx, 1]), False))
    return points


def simulate_prompts(
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    spec: PromptSpec,
    rng: np.random.Generator,
    target: str = "",
    output_name: str = "GTV_AI",
) -> TargetPrompts:
    """The planner's prompt for a 3D ``(z, y, x)`` ground truth with ``spacing`` (dz, dy, dx)."""
    mask = np.asarray(mask, dtype=bool)
    k = choose_slice(mask, spec.slice)
    spacing_yx = (float(spacing[1]), float(spacing[2]))
    prompts = TargetPrompts(target=target, output_name=output_name, source_rois=["simulated"])
    if spec.kind == "box":
        i0, j0, i1, j1 = simulate_box(mask[k], spacing_yx, spec.jitter_mm, rng)
        prompts.boxes.append(BoxPrompt(slice_index=k, i0=i0, j0=j0, i1=i1, j1=j1))
    else:
        for i, j, positive in simulate_points(mask[k], spacing_yx, spec.positives, spec.negatives, spec.ring_mm, rng):
            prompts.points.append(PointPrompt(slice_index=k, i=float(i), j=float(j), positive=positive))
    return prompts


def describe(prompts: TargetPrompts) -> str:
    """A compact, CSV-friendly text of the prompt (voxel units)."""
    parts = [f"box k={b.slice_index} i={b.i0:.1f}-{b.i1:.1f} j={b.j0:.1f}-{b.j1:.1f}" for b in prompts.boxes]
    parts += [f"{'+' if p.positive else '-'}({p.slice_index},{p.i:.0f},{p.j:.0f})" for p in prompts.points]
    return " ".join(parts)
