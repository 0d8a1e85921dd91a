"""Map RTSTRUCT contours onto a volume's grid and fill them into a mask.

Every contour is mapped with :meth:`inference.geometry.Geometry.patient_to_index`; its
slice is the rounded ``k`` of its points, and every point must lie within half a slice
spacing of that slice's plane (otherwise it is not on an image plane: either off the
slices or not parallel to them) and the slice must exist in the volume. A contour that
fails either test is refused with :class:`~rtstruct.reader.RTStructError` naming the ROI.

Filling follows the **even-odd rule** per slice, sampled at pixel centres: a pixel
centre is inside the ROI when it is enclosed by an odd number of the ROI's
CLOSED_PLANAR contours on that slice (the same as filling each contour on its own and
combining the fills with XOR). So a contour nested inside another is a hole, a contour
inside that hole is an island, and separate contours are separate components. The
writer (:mod:`rtstruct.writer`) encodes masks with exactly this rule, so
mask -> RTSTRUCT -> mask round trips are exact.

The fill is a vectorised scanline: every polygon edge is intersected with the pixel-centre
rows it spans (half-open in the row direction, so vertices are never counted twice) and
each crossing toggles the columns from its position to the right. A pixel centre exactly
on an edge counts as inside on the edge's left/top side and outside on its right/bottom
side (the usual top-left convention), so two contours that share an edge do not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.geometry import Geometry
from rtstruct.reader import ROI, Contour, RTStructError

# A point exactly half a slice from two planes is on the plane; allow for rounding of
# decimal strings (DS values carry about 1e-6 mm).
_PLANE_EPS = 1e-6


class ContourOutsideVolume(RTStructError):
    """A contour whose slice is not in the volume: ``distance_mm`` before the first
    (``side == "before"``) or beyond the last slice (``side == "beyond"``)."""

    def __init__(self, message: str, side: str, distance_mm: float):
        super().__init__(message)
        self.side = side
        self.distance_mm = distance_mm


@dataclass(frozen=True)
class SliceContour:
    """A contour mapped onto slice ``slice_index``: ``rows``/``cols`` are continuous
    pixel-centre indices ``i``/``j``; ``max_offset_mm`` is the largest distance of its
    points from the slice plane."""

    slice_index: int
    rows: np.ndarray
    cols: np.ndarray
    max_offset_mm: float


def map_contour(contour: Contour | np.ndarray, geometry: Geometry, what: str) -> SliceContour:
    """Map one contour (or an (N, 3) array of patient points) onto its slice.

    ``what`` names the contour in error messages (e.g. ``"ROI 'GTV' contour 3"``).
    Raises :class:`RTStructError` when the contour is not on an image plane or lies
    beyond the first or last slice (a :class:`ContourOutsideVolume`, which says how far).
    """
    points = contour.points if isinstance(contour, Contour) else np.asarray(contour, dtype=np.float64)
    points = points.reshape(-1, 3)
    if len(points) == 0:
        raise RTStructError(f"{what} has no points")
    idx = geometry.patient_to_index(points)
    k = idx[:, 0]
    dz = geometry.spacing[0]
    k0 = int(np.rint(k.mean()))
    nz = geometry.shape[0]
    if k0 < 0 or k0 > nz - 1:
        beyond = (-k0 if k0 < 0 else k0 - (nz - 1)) * dz
        side = "before the first" if k0 < 0 else "beyond the last"
        raise ContourOutsideVolume(
            f"{what} is outside the image: it lies about {beyond:.1f} mm {side} slice "
            f"(the volume has {nz} slices of {dz:g} mm)",
            "before" if k0 < 0 else "beyond",
            float(beyond),
        )
    offsets_mm = np.abs(k - k0) * dz
    worst = float(offsets_mm.max())
    if worst > 0.5 * dz + _PLANE_EPS:
        span = float((k.max() - k.min()) * dz)
        if span > 0.5 * dz:
            raise RTStructError(
                f"{what} is not on an image plane: it is not parallel to the slices "
                f"(its points span {span:.2f} mm along the slice normal, more than half the "
                f"slice spacing of {dz:g} mm)"
            )
        raise RTStructError(
            f"{what} is not on an image plane: it lies between slices, up to {worst:.2f} mm from "
            f"slice {k0}, more than half the slice spacing of {dz:g} mm"
        )
    return SliceContour(slice_index=k0, rows=idx[:, 1], cols=idx[:, 2], max_offset_mm=worst)


def _crossings(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the closed polygon's edges cross pixel-centre rows: (row, column) arrays.

    An edge from row r0 to r1 crosses every integer row y with min(r0, r1) <= y < max(r0, r1).
    """
    r0, c0 = rows, cols
    r1, c1 = np.roll(rows, -1), np.roll(cols, -1)
    lo = np.ceil(np.minimum(r0, r1)).astype(np.int64)
    hi = np.ceil(np.maximum(r0, r1)).astype(np.int64)
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    edge = np.repeat(np.arange(len(rows)), counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    y = lo[edge] + offset
    t = (y - r0[edge]) / (r1[edge] - r0[edge])
    x = c0[edge] + t * (c1[edge] - c0[edge])
    return y, x


def fill_contours_even_odd(contours: list[SliceContour], shape: tuple[int, int, int]) -> np.ndarray:
    """Fill mapped contours into a bool (z, y, x) mask with the even-odd rule per slice."""
    mask = np.zeros(shape, dtype=bool)
    height, width = shape[1], shape[2]
    by_slice: dict[int, list[SliceContour]] = {}
    for c in contours:
        if len(c.rows) >= 3:
            by_slice.setdefault(c.slice_index, []).append(c)
    for k, items in by_slice.items():
        ys, xs = zip(*(_crossings(np.asarray(c.rows, float), np.asarray(c.cols, float)) for c in items))
        y, x = np.concatenate(ys), np.concatenate(xs)
        keep = (y >= 0) & (y < height)
        y, x = y[keep], x[keep]
        if not len(y):
            continue
        # A crossing at x toggles every column j >= x; columns past the image are dropped.
        start = np.clip(np.ceil(x), 0, width).astype(np.int64)
        toggles = np.zeros((height, width + 1), dtype=np.int32)
        np.add.at(toggles, (y, start), 1)
        mask[k] = (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)
    return mask


def rasterize_roi(roi: ROI, geometry: Geometry) -> np.ndarray:
    """The ROI as a bool (z, y, x) mask on ``geometry``'s grid (even-odd rule per slice).

    Only CLOSED_PLANAR contours enclose area; POINT and open contours of a mixed ROI
    are ignored. Raises :class:`RTStructError` naming the ROI when it has no contours,
    has no CLOSED_PLANAR contour, or a contour is not on an image plane / outside the
    slices. Contours partly outside the image in-plane are clipped.
    """
    label = f"ROI {roi.name!r}"
    if not roi.contours:
        raise RTStructError(f"{label} is empty (no contours)")
    closed = [c for c in roi.contours if c.geometric_type == "CLOSED_PLANAR"]
    if not closed:
        types = ", ".join(sorted(roi.geometric_types))
        raise RTStructError(f"{label} has no CLOSED_PLANAR contours (only {types}): it encloses no area")
    mapped = []
    for n, contour in enumerate(roi.contours, start=1):
        if contour.geometric_type != "CLOSED_PLANAR":
            continue
        mapped.append(map_contour(contour, geometry, f"{label} contour {n}"))
    return fill_contours_even_odd(mapped, geometry.shape)
