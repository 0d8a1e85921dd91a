"""2D box propagation, independent of the segmentation engine.

An engine supplies a :class:`SliceSegmenter` (one 2D segmentation per call); this module
turns the planner's prompts on one or a few slices into a 3D mask:

1. **Anchors.** Every slice that carries a prompt is an anchor. Each box on it is grown
   by ``prompt_margin_mm`` and segmented (with the points that lie inside the box as
   drawn); positive points outside every box are segmented from the points alone. The
   anchor's mask is the union. The margin makes the model see a box drawn on the
   tumour's edge as it sees every box of the walk (the previous mask's bounding box plus
   ``margin_mm``): SAM-family models were trained on boxes looser than the object, and
   a tight box leaves the prompted slice's mask short of the tumour's edge.
2. **Walk.** From each anchor the front moves slice by slice, "up" (increasing slice
   index ``k``) and "down" (decreasing ``k``). The box for slice ``k +- 1`` is the bounding
   box of the mask on slice ``k`` plus ``margin_mm`` (converted per axis with the in-plane
   spacing: ``margin_mm / dy`` rows, ``margin_mm / dx`` columns), clipped to the image.
3. **Stop** (each reason is reported, human-readable, in ``stop_reasons``), the first of:
   the mask vanishes; its area falls below ``min_area_mm2``; its area falls below
   ``min_area_fraction`` of the anchor's area; the next slice would be farther than
   ``max_extent_mm`` from the anchor along the slice axis; the volume ends; the next
   slice belongs to another anchor (see below); the segmenter raises
   :class:`StopPropagation` (for example because its intensity model no longer fits);
   the model's predicted IoU falls below ``min_score``; the mask's mean intensity lies
   more than ``max_intensity_shift`` standard deviations from the prompted slice's mask
   (when the engine passes its preprocessed ``images``). A slice that triggers a stop is
   *not* part of the result. SAM-family models find *something* in every box, so these
   rules, and not the mask vanishing, are what usually ends a walk at the tumour's end.
4. **Several anchors: the nearest anchor wins.** Every slice is segmented at most once,
   by the anchor nearest to it along the slice axis (a tie goes to the anchor with the
   lower slice index). So two anchors never produce conflicting masks for one slice:
   the walk from one anchor stops where the other anchor's territory begins. Anchor
   slices themselves always keep their own prompted segmentation. **The outermost
   prompted slices are the tumour's ends**: prompts on two or more slices whose masks
   overlap in the image plane (one tumour, boxed on several slices) are filled in between
   and the walk goes no farther than the outermost of them: a planner bounds the extent
   by drawing boxes on the top and bottom slices. Prompted slices whose masks do not
   overlap in-plane are separate pieces, each walked with the stop rules.
   ``extend_past_outer_prompts`` lets every walk go on past the outermost prompts. With
   prompts on one slice only, the stop rules decide where the tumour ends.
5. **Post-processing:** holes are filled per slice; of the 3D components (26-connected)
   only those that touch an anchor slice's mask are kept. On a CT whose HU values the
   engine passes (``ct_values``), each slice then gains its partial-volume rim towards
   lung, at most ``ct_rim_mm`` (:mod:`inference.partial_volume`).

The result never leaves the volume: boxes are clipped to the image and the walk stops at
the first and last slice. Per-slice scores (predicted IoU where the engine gives one,
else ``None``) and areas are returned so that a reviewer sees where confidence drops.

Segmenters that can use the previous slice's mask (the classic engine does) may
implement :class:`GuidedSliceSegmenter`; propagation then calls ``segment_next`` instead
of ``segment_slice`` for every slice that is not an anchor. SAM2 needs only the plain
protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from inference.limits import WalkLimits
from inference.partial_volume import add_lung_rim
from inference.prompts import TargetPrompts

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # (i0, j0, i1, j1): rows then columns, inclusive, voxel units
Point = tuple[float, float, bool]  # (i, j, positive)

UP = "up"  # increasing slice index k
DOWN = "down"  # decreasing slice index k


class StopPropagation(Exception):
    """Raised by a segmenter to end the walk in this direction; the message is the reason."""


@runtime_checkable
class SliceSegmenter(Protocol):
    """One 2D segmentation per call, on slice ``k`` of the volume the segmenter was built for."""

    def segment_slice(self, k: int, box: Box | None, points: Sequence[Point] = ()) -> tuple[np.ndarray, float | None]:
        """Segment slice ``k`` from a box ``(i0, j0, i1, j1)`` (voxel units, inclusive) and/or
        points ``(i, j, positive)``. Returns a bool ``(ny, nx)`` mask and a score
        (predicted IoU) or ``None``."""
        ...

    def prefetch(self, ks: Sequence[int]) -> None:
        """Hint: the slices the front will reach next (SAM2 encodes them in one batch).
        May be a no-op."""
        ...


def predicts_iou(segmenter: SliceSegmenter) -> bool:
    """Whether the segmenter's score is a predicted IoU (class attribute ``predicts_iou =
    True``, as SAM2's and LiteMedSAM's are): only then does the ``min_score`` rule apply."""
    return bool(getattr(segmenter, "predicts_iou", False))


@runtime_checkable
class GuidedSliceSegmenter(SliceSegmenter, Protocol):
    """Optional extension: a segmenter that uses the previous slice's mask."""

    def segment_next(
        self,
        k: int,
        box: Box,
        *,
        previous_k: int,
        previous_mask: np.ndarray,
        anchor_k: int,
    ) -> tuple[np.ndarray, float | None]:
        """Segment slice ``k`` reached from slice ``previous_k`` (mask ``previous_mask``),
        walking from the anchor on slice ``anchor_k``. May raise :class:`StopPropagation`."""
        ...


@dataclass
class PropagationParams(WalkLimits):
    """The 2D walk's settings: the limits of :class:`~inference.limits.WalkLimits` and how
    the result is finished."""

    fill_holes: bool = True
    keep_connected: bool = True
    prefetch_batch: int = 8  # how many slices ahead of the front to announce via prefetch()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefetch_batch < 1:
            raise ValueError("prefetch_batch must be >= 1")

    @classmethod
    def from_options(cls, options: WalkLimits, **overrides) -> PropagationParams:
        """The walk's parameters for a call's options (their limits), with ``overrides``."""
        return cls(**{**options.limit_values(), **overrides})


@dataclass
class AnchorInfo:
    """One prompted slice and what its walks did."""

    k: int
    area_mm2: float
    score: float | None
    first: int  # lowest slice index its walks kept
    last: int  # highest slice index its walks kept
    stop_reasons: dict[str, str] = field(default_factory=dict)  # "up"/"down" -> reason


@dataclass
class PropagationResult:
    mask: np.ndarray  # bool (z, y, x)
    slice_scores: dict[int, float | None]  # every segmented slice that was kept
    slice_areas_mm2: dict[int, float]  # area per kept slice before post-processing
    stop_reasons: dict[str, str]  # "up": why the topmost walk stopped, "down": the lowest
    anchors: list[AnchorInfo]
    warnings: list[str] = field(default_factory=list)

    @property
    def slice_range(self) -> tuple[int, int] | None:
        """(first, last) slice index of the final mask, or None when it is empty."""
        ks = np.flatnonzero(self.mask.any(axis=(1, 2)))
        return (int(ks[0]), int(ks[-1])) if ks.size else None


# -- helpers ------------------------------------------------------------------------


def bounding_box(mask2d: np.ndarray) -> Box | None:
    """Inclusive (i0, j0, i1, j1) of a 2D mask, or None when it is empty."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask2d.any(axis=0))
    return (float(rows[0]), float(cols[0]), float(rows[-1]), float(cols[-1]))


def expand_box(box: Box, margin_mm: float, spacing_yx: tuple[float, float], shape_yx: tuple[int, int]) -> Box:
    """``box`` grown by ``margin_mm`` on every side (per-axis pixel spacing), clipped to the image."""
    di = margin_mm / spacing_yx[0]
    dj = margin_mm / spacing_yx[1]
    return clip_box((box[0] - di, box[1] - dj, box[2] + di, box[3] + dj), shape_yx)


def clip_box(box: Box, shape_yx: tuple[int, int]) -> Box:
    ny, nx = shape_yx
    i0 = min(max(box[0], 0.0), ny - 1.0)
    i1 = min(max(box[2], 0.0), ny - 1.0)
    j0 = min(max(box[1], 0.0), nx - 1.0)
    j1 = min(max(box[3], 0.0), nx - 1.0)
    return (i0, j0, i1, j1)


def clicks_agree(mask2d: np.ndarray, points: Sequence[Point]) -> bool:
    """Whether every positive click ``(i, j, True)`` lies inside ``mask2d`` and every negative
    one outside (clicks off the image count at the nearest pixel)."""
    ny, nx = mask2d.shape
    return all(
        bool(mask2d[min(max(int(round(i)), 0), ny - 1), min(max(int(round(j)), 0), nx - 1)]) == bool(positive)
        for i, j, positive in points
    )


def box_from_points(
    points: Sequence[Point],
    shape_yx: tuple[int, int],
    spacing_yx: tuple[float, float],
    margin_mm: float,
) -> Box | None:
    """The bounding box of the positive points grown by ``margin_mm`` (per-axis spacing), clipped
    to the image; None without a positive point (the box both engines try around clicks)."""
    pos = [(float(i), float(j)) for i, j, positive in points if positive]
    if not pos:
        return None
    ii = [p[0] for p in pos]
    jj = [p[1] for p in pos]
    di = margin_mm / float(spacing_yx[0])
    dj = margin_mm / float(spacing_yx[1])
    ny, nx = shape_yx
    return (
        max(0.0, min(ii) - di),
        max(0.0, min(jj) - dj),
        min(ny - 1.0, max(ii) + di),
        min(nx - 1.0, max(jj) + dj),
    )


def _point_in_box(p: Point, box: Box) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def _chains(anchor_ks: list[int], anchor_masks: dict[int, np.ndarray]) -> list[list[int]]:
    """Consecutive prompted slices (by k) whose masks' bounding boxes overlap in-plane: one
    tumour prompted on several slices. Returns the chains, each sorted by k."""
    chains: list[list[int]] = []
    for k in anchor_ks:
        if chains and _boxes_overlap(bounding_box(anchor_masks[chains[-1][-1]]), bounding_box(anchor_masks[k])):
            chains[-1].append(k)
        else:
            chains.append([k])
    return chains


def _boxes_overlap(a: Box | None, b: Box | None) -> bool:
    if a is None or b is None:
        return False
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _territories(anchor_ks: list[int], n_slices: int) -> dict[int, tuple[int, int]]:
    """Nearest anchor wins (ties to the lower anchor): anchor -> (lowest, highest) slice it owns."""
    out: dict[int, tuple[int, int]] = {}
    for idx, a in enumerate(anchor_ks):
        lo = 0 if idx == 0 else (anchor_ks[idx - 1] + a) // 2 + 1
        hi = n_slices - 1 if idx == len(anchor_ks) - 1 else (a + anchor_ks[idx + 1]) // 2
        out[a] = (lo, hi)
    return out


def _check_mask(mask: np.ndarray, shape_yx: tuple[int, int], k: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape_yx:
        raise ValueError(f"segmenter returned a mask of shape {mask.shape} for slice {k}, expected {shape_yx}")
    return mask.astype(bool, copy=False)


# -- the algorithm ------------------------------------------------------------------


def propagate_2d(
    segmenter: SliceSegmenter,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    prompts: TargetPrompts,
    params: PropagationParams | None = None,
    images: np.ndarray | None = None,
    ct_values: np.ndarray | None = None,
) -> PropagationResult:
    """Segment the prompted slices and propagate each of them up and down the volume.

    ``shape`` is (z, y, x) and ``spacing`` (dz, dy, dx) in mm; ``images`` is the volume as
    the engine sees it (its preprocessed uint8 slices), for the intensity stop rule (None:
    that rule is off); ``ct_values`` the CT in HU, for the partial-volume rim
    (``ct_rim_mm``; None: no rim). See the module docstring for the rules. Raises ValueError when ``prompts`` has no box and no positive point, or a
    prompt lies outside the volume.
    """
    params = params or PropagationParams()
    nz, ny, nx = (int(v) for v in shape)
    dz, dy, dx = (float(v) for v in spacing)
    shape_yx = (ny, nx)
    pixel_mm2 = dy * dx
    if prompts.is_empty():
        raise ValueError(f"target {prompts.target!r} has no box and no positive point to start from")
    anchor_ks = prompts.anchor_slices
    for k in anchor_ks:
        if not 0 <= k < nz:
            raise ValueError(f"prompt on slice {k} is outside the volume (0..{nz - 1})")
    guided = isinstance(segmenter, GuidedSliceSegmenter)
    iou_scores = predicts_iou(segmenter)

    mask = np.zeros((nz, ny, nx), dtype=bool)
    scores: dict[int, float | None] = {}
    areas: dict[int, float] = {}
    warnings: list[str] = []

    # 1. anchors (all of them first, so that every walk knows every anchor's mask)
    segmenter.prefetch(anchor_ks)
    anchor_masks: dict[int, np.ndarray] = {}
    anchor_scores: dict[int, float | None] = {}
    for k in anchor_ks:
        m, s = _segment_anchor(segmenter, k, prompts, shape_yx, (dy, dx), params.prompt_margin_mm)
        anchor_masks[k] = m
        anchor_scores[k] = s

    # An anchor whose prompt gave nothing owns no territory: its neighbours may walk past it.
    live_ks = [a for a in anchor_ks if anchor_masks[a].any()]
    territories = _territories(live_ks, nz)
    bounded: set[int] = set()  # anchors that are an end of a prompted tumour: no walk outwards
    if not params.extend_past_outer_prompts:
        for chain in _chains(live_ks, anchor_masks):
            if len(chain) >= 2:
                lo_k, hi_k = chain[0], chain[-1]
                territories[lo_k] = (lo_k, territories[lo_k][1])
                territories[hi_k] = (territories[hi_k][0], hi_k)
                bounded |= {lo_k, hi_k}
    anchors: list[AnchorInfo] = []
    for a in anchor_ks:
        am = anchor_masks[a]
        a_area = float(am.sum()) * pixel_mm2
        info = AnchorInfo(k=a, area_mm2=a_area, score=anchor_scores[a], first=a, last=a)
        anchors.append(info)
        if a_area == 0:
            reason = f"the prompt on slice {a} gave an empty mask"
            info.stop_reasons = {UP: reason, DOWN: reason}
            warnings.append(reason)
            continue
        mask[a] = am
        scores[a] = anchor_scores[a]
        areas[a] = a_area
        lo, hi = territories[a]
        reference = _Reference.of(images, a, am) if images is not None else None
        for direction, step, limit in ((UP, 1, hi), (DOWN, -1, lo)):
            if a in bounded and limit == a:
                info.stop_reasons[direction] = (
                    f"slice {a} is the {'highest' if step > 0 else 'lowest'} prompted slice: prompts on "
                    "several slices bound the extent"
                )
                continue
            last, reason = _walk(
                segmenter,
                guided,
                a,
                am,
                a_area,
                step,
                limit,
                nz,
                spacing=(dz, dy, dx),
                shape_yx=shape_yx,
                params=params,
                mask=mask,
                scores=scores,
                areas=areas,
                neighbour_anchor=(limit != (nz - 1 if step > 0 else 0)),
                reference=reference,
                iou_scores=iou_scores,
            )
            info.stop_reasons[direction] = reason
            if step > 0:
                info.last = last
            else:
                info.first = last
            log.debug("anchor %d %s: stopped at %d: %s", a, direction, last, reason)

    # 2. post-processing
    mask = postprocess(mask, anchor_masks, fill_holes=params.fill_holes, keep_connected=params.keep_connected)
    if ct_values is not None and params.ct_rim_mm > 0:
        mask = add_lung_rim(mask, ct_values, spacing, params.ct_rim_mm)
    kept = set(int(k) for k in np.flatnonzero(mask.any(axis=(1, 2))))
    scores = {k: v for k, v in sorted(scores.items()) if k in kept}
    areas = {k: v for k, v in sorted(areas.items()) if k in kept}

    live = [a for a in anchors if a.area_mm2 > 0]
    if live:
        stop = {
            UP: max(live, key=lambda a: a.k).stop_reasons[UP],
            DOWN: min(live, key=lambda a: a.k).stop_reasons[DOWN],
        }
    else:
        stop = {UP: "no anchor produced a mask", DOWN: "no anchor produced a mask"}
    return PropagationResult(
        mask=mask,
        slice_scores=scores,
        slice_areas_mm2=areas,
        stop_reasons=stop,
        anchors=anchors,
        warnings=warnings,
    )


def postprocess(
    mask: np.ndarray, anchor_masks: dict[int, np.ndarray], *, fill_holes: bool = True, keep_connected: bool = True
) -> np.ndarray:
    """Fill holes per slice and keep only the 3D components (26-connected) that touch an
    anchor's mask on its prompted slice. ``mask`` is modified in place and returned."""
    if fill_holes:
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            mask[k] = ndimage.binary_fill_holes(mask[k])
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if keep_connected and zs.size:
        # Label only the mask's bounding box: no component reaches outside it, and labels of
        # the whole volume (int32) would take 4 bytes per voxel of a 1000-slice CT.
        z0, z1 = int(zs[0]), int(zs[-1]) + 1
        ys = np.flatnonzero(mask[z0:z1].any(axis=(0, 2)))
        xs = np.flatnonzero(mask[z0:z1].any(axis=(0, 1)))
        rows, cols = slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)
        sub = mask[z0:z1, rows, cols]
        labels, n = ndimage.label(sub, structure=np.ones((3, 3, 3), dtype=bool))
        if n > 1:
            keep = set()
            for a, am in anchor_masks.items():
                if z0 <= a < z1:
                    keep.update(int(v) for v in np.unique(labels[a - z0][am[rows, cols] & sub[a - z0]]) if v)
            if len(keep) < n:
                sub &= np.isin(labels, sorted(keep))  # a view: mask changes in place
                log.debug("dropped %d component(s) not connected to a prompted slice", n - len(keep))
    return mask


def area_stop(area_mm2: float, k: int, limits: WalkLimits, reference_mm2: float) -> str | None:
    """Why slice ``k``'s mask of ``area_mm2`` ends a walk, or None: it vanished, it is below
    ``min_area_mm2``, or below ``min_area_fraction`` of the prompted slice's area
    ``reference_mm2`` (shared by the 2D walk and SAM2's 3D passes)."""
    if area_mm2 == 0:
        return f"mask vanished on slice {k}"
    if area_mm2 < limits.min_area_mm2:
        return f"area {area_mm2:.1f} mm2 on slice {k} below the minimum {limits.min_area_mm2:g} mm2"
    if area_mm2 < limits.min_area_fraction * reference_mm2:
        return (
            f"area {area_mm2:.1f} mm2 on slice {k} below {limits.min_area_fraction:g} of the "
            f"prompted slice's {reference_mm2:.1f} mm2"
        )
    return None


@dataclass(frozen=True)
class _Reference:
    """The prompted slice's mask as the intensity rule compares against it."""

    images: np.ndarray  # the engine's uint8 (z, y, x) volume
    mean: float
    std: float

    @classmethod
    def of(cls, images: np.ndarray, k: int, mask2d: np.ndarray) -> _Reference:
        values = images[k][mask2d].astype(np.float64)
        # +1 grey level: a perfectly uniform prompted region must not make every change a stop
        return cls(images=images, mean=float(values.mean()), std=float(values.std()) + 1.0)

    def shift(self, k: int, mask2d: np.ndarray) -> float:
        """How many standard deviations slice ``k``'s mask's mean lies from the reference."""
        values = self.images[k][mask2d]
        return abs(float(values.mean()) - self.mean) / self.std if values.size else 0.0


def evidence_stop(
    k: int, mask2d: np.ndarray, score: float | None, limits: WalkLimits, reference: _Reference | None
) -> str | None:
    """Why slice ``k``'s mask ends a walk on the model's own evidence, or None: its predicted
    IoU is below ``min_score``, or its intensity left the prompted slice's."""
    if score is not None and limits.min_score > 0 and score < limits.min_score:
        return (
            f"predicted IoU {score:.2f} on slice {k} below {limits.min_score:g}: the model is not sure this is "
            "still the tumour"
        )
    if reference is not None and limits.max_intensity_shift > 0:
        shift = reference.shift(k, mask2d)
        if shift > limits.max_intensity_shift:
            return (
                f"mean intensity on slice {k} is {shift:.1f} standard deviations from the prompted slice's "
                f"(limit {limits.max_intensity_shift:g}): the mask has left the tumour"
            )
    return None


def _segment_anchor(
    segmenter: SliceSegmenter,
    k: int,
    prompts: TargetPrompts,
    shape_yx: tuple[int, int],
    spacing_yx: tuple[float, float] = (1.0, 1.0),
    margin_mm: float = 0.0,
) -> tuple[np.ndarray, float | None]:
    """Union of the masks of every box on slice ``k`` (each with the points inside it, and
    grown by ``margin_mm`` before it is segmented), plus the points-only mask of positive
    points outside every box."""
    boxes = [clip_box((b.i0, b.j0, b.i1, b.j1), shape_yx) for b in prompts.boxes if b.slice_index == k]
    points: list[Point] = [(p.i, p.j, p.positive) for p in prompts.points if p.slice_index == k]
    out = np.zeros(shape_yx, dtype=bool)
    found: list[float] = []
    calls: list[tuple[Box | None, list[Point]]] = []
    if len(boxes) == 1:
        calls.append((boxes[0], points))
    else:
        for box in boxes:
            calls.append((box, [p for p in points if _point_in_box(p, box)]))
        loose = [p for p in points if not any(_point_in_box(p, b) for b in boxes)]
        if any(p[2] for p in loose):
            calls.append((None, loose))
    for box, pts in calls:
        if box is not None and margin_mm > 0:
            box = expand_box(box, margin_mm, spacing_yx, shape_yx)
        m, s = segmenter.segment_slice(k, box, pts)
        out |= _check_mask(m, shape_yx, k)
        if s is not None:
            found.append(float(s))
    score = min(found) if found else None
    return out, score


def _walk(
    segmenter: SliceSegmenter,
    guided: bool,
    anchor: int,
    anchor_mask: np.ndarray,
    anchor_area: float,
    step: int,
    limit: int,
    nz: int,
    *,
    spacing: tuple[float, float, float],
    shape_yx: tuple[int, int],
    params: PropagationParams,
    mask: np.ndarray,
    scores: dict[int, float | None],
    areas: dict[int, float],
    neighbour_anchor: bool,
    reference: _Reference | None = None,
    iou_scores: bool = False,
) -> tuple[int, str]:
    """Walk from ``anchor`` in direction ``step`` up to slice ``limit`` (inclusive).
    Returns the last slice kept and why the walk stopped."""
    dz, dy, dx = spacing
    pixel_mm2 = dy * dx
    prev_k, prev_mask = anchor, anchor_mask
    announced = anchor  # furthest slice already announced through prefetch()
    while True:
        k = prev_k + step
        if step > 0 and k > limit or step < 0 and k < limit:
            if not neighbour_anchor:
                return prev_k, f"reached the {'last' if step > 0 else 'first'} slice of the volume (slice {prev_k})"
            return prev_k, f"slice {k} belongs to another prompted slice (nearest anchor wins)"
        if abs(k - anchor) * dz > params.max_extent_mm + 1e-6:
            return prev_k, (
                f"maximum extent {params.max_extent_mm:g} mm from the prompted slice {anchor} reached "
                f"(slice {k} would be {abs(k - anchor) * dz:.1f} mm away)"
            )
        if (k - announced) * step > 0:
            ahead = []
            for n in range(params.prefetch_batch):
                kk = k + n * step
                if (step > 0 and kk > limit) or (step < 0 and kk < limit):
                    break
                if abs(kk - anchor) * dz > params.max_extent_mm + 1e-6:
                    break
                ahead.append(kk)
            segmenter.prefetch(ahead)
            announced = ahead[-1]
        box = expand_box(bounding_box(prev_mask), params.margin_mm, (dy, dx), shape_yx)  # type: ignore[arg-type]
        try:
            if guided:
                m, s = segmenter.segment_next(  # type: ignore[attr-defined]
                    k, box, previous_k=prev_k, previous_mask=prev_mask, anchor_k=anchor
                )
            else:
                m, s = segmenter.segment_slice(k, box, ())
        except StopPropagation as exc:
            return prev_k, f"segmenter stopped at slice {k}: {exc}"
        m = _check_mask(m, shape_yx, k)
        area = float(m.sum()) * pixel_mm2
        stop = area_stop(area, k, params, anchor_area) or evidence_stop(
            k, m, s if iou_scores else None, params, reference
        )
        if stop is not None:
            return prev_k, stop
        mask[k] = m
        scores[k] = None if s is None else float(s)
        areas[k] = area
        prev_k, prev_mask = k, m
