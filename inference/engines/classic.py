"""The ``classic`` engine: intensity-based segmentation without model weights.

It is what the node runs where no SAM2 checkpoint (or no GPU) is available, in the demo
and in CI, and it says so: its algorithm name is
``"STARDUST classic region-growing (not SAM2)"``, which the RTSTRUCT writer puts into
ROIGenerationAlgorithm of every ROI it produces.

It plugs into the same 2D box propagation as SAM2 (:func:`inference.propagation.propagate_2d`)
through :class:`ClassicSliceSegmenter`, which implements the guided protocol (it sees the
previous slice's mask).

Intensities: CT through a wide window (-1000..400 HU, :data:`CLASSIC_CT_WINDOW`) so that
the partial-volume rim between tumour and lung keeps its information; MR by the 0.5-99.5
percentile rule (or ``options.window`` when given). Per slice, everything happens in a
crop around the box (fast on 512x512 images), on the 3x3-median-smoothed slice.

*Prompted slice (anchor).*

1. Split the box into two intensity classes (Otsu). The tumour's class is the one under
   the positive clicks, else the one holding most of the box's centre-weighted mass.
2. Intensity model (:class:`_Model`): median and robust spread (MAD) of the tumour's
   class in the middle half of the box give the *core range* ``median +- k_sigma *
   spread``, which never crosses the Otsu level and, when the box's border holds a second
   tissue of the tumour's class with a clearly different median (mediastinum, muscle),
   stops halfway to it. "Tissue" = pixels in the core range, opened by ``open_mm``.
3. Competition (marker-based watershed on the gradient magnitude, restricted to tissue):
   tumour markers = the core of the chosen tissue component (pixels at least ``core_mm``
   inside it; positive clicks), background markers = tissue outside the box and negative
   clicks. This cuts the tumour from the mediastinum or chest wall that it touches (same
   intensity: no threshold can) along the weakest edge between the two.
4. Keep what the tumour markers won inside the box, close by ``close_mm`` (cavities,
   air bronchograms), fill holes, then add the partial-volume rim (up to ``rim_mm``,
   pixels on the tumour's side of the Otsu level next to lung, not next to tissue that
   lost the competition).

*Clicks without a box* (``POS_``/``NEG_`` points only): boxes grown from the positive clicks
by each half-size of ``click_boxes_mm`` are tried, smallest first, and the first whose mask
is settled is used: it agrees with every click, keeps off the box's border and barely
changes in the next larger box (``click_stable_dice``). A single fixed box either cuts a
large tumour or, around a small one, lets other tissue into the intensity model. Measured
end to end (``dicom-node study SRC OUT --engine classic --prompt points --positives 2
--negatives 1 --slice largest --seed 0``; one fixed box of +-25 mm -> settled boxes, 3D Dice):
STS-001 T1 0.012 -> 0.689, T2 0.319 -> 0.854, 8 CT phantoms (median) 0.951 -> 0.963, 8 MR
phantoms 0.967 -> 0.967, LUNG1-001 0.583 -> 0.583 (unchanged: its clicked slice's mask holds
about half of the tumour, Dice 0.71 on that slice, and the walk shrinks from there).

*Every further slice (walking from an anchor).* The same, with memory of the previous
slice: the allowed region is the propagation box intersected with the previous mask
dilated by ``step_mm``; tumour markers = the previous mask's core in tissue; background
markers = tissue outside the allowed region **plus all tissue that lost the competition
on the previous slice**. So the tumour/mediastinum interface drawn on the prompted slice
is carried from slice to slice instead of drifting into the mediastinum by a few mm per
slice. The area may grow at most ``max_growth`` times per slice (else the mask is
restricted to a thinner dilation of the previous one).

The walk stops (:class:`~inference.propagation.StopPropagation`, "intensity model no
longer fits") when no tissue of the tumour's intensity is left under the previous mask's
core, or when the new mask's median grey level (tumour-class pixels only) is more than
``k_fit`` spreads from the prompted slice's: that is what happens when the front slides
off the end of the tumour onto the mediastinum or chest wall. The propagation's own
limits (area, area fraction, maximum extent, volume edge) apply on top.

Score per slice: the fraction of the mask's outline that lies on an intensity edge
(next to out-of-range pixels, e.g. lung) rather than on a line drawn by the competition
or the constraints. Low values mean "touches structures of the same intensity": the
places a reviewer should look at first. It is not a predicted IoU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage
from skimage.filters import sobel, threshold_otsu
from skimage.segmentation import watershed

from inference.engine import Engine, SegmentationError, SegmentationResult, SegmentOptions
from inference.metrics import dice
from inference.preprocess import prepare
from inference.prompts import TargetPrompts
from inference.propagation import (
    Box,
    Point,
    PropagationParams,
    StopPropagation,
    bounding_box,
    box_from_points,
    clicks_agree,
    propagate_2d,
)
from inference.volume import Volume

log = logging.getLogger(__name__)

ALGORITHM_NAME = "STARDUST classic region-growing (not SAM2)"
VERSION = "1.0"
#: CT (level, width) of the classic engine: -1000..400 HU, wide enough that a voxel half
#: tumour, half lung (about -400 HU) keeps its value. The soft-tissue window SAM2 gets
#: (40/400) clips lung and tumour edges alike to black and would shrink every tumour in
#: lung by its partial-volume rim.
CLASSIC_CT_WINDOW = (-300.0, 1400.0)


@dataclass(frozen=True)
class ClassicParams:
    """Tunables of the classic segmenter (lengths in mm)."""

    open_mm: float = 1.5  # opening of the tissue mask: cuts vessels and thin strands
    close_mm: float = 5.0  # closing of the result: cavities and air bronchograms inside
    rim_mm: float = 3.0  # partial-volume rim towards the other class (lung) added at the end
    core_mm: float = 5.0  # markers: pixels at least this far inside a mask
    step_mm: float = 8.0  # the mask may move at most this far from one slice to the next
    max_growth: float = 2.0  # area growth cap per slice
    context_mm: float = 20.0  # crop margin around the box (background markers live there)
    k_sigma: float = 3.0  # far side of the intensity range, in robust spreads from the median
    k_fit: float = 2.0  # stop when a slice's median differs from the model's by more spreads
    min_spread: float = 2.0  # uint8 grey levels: floor of the robust spread
    min_contrast: float = 6.0  # grey levels between the box's two classes; less: nothing to segment
    click_radius_mm: float = 2.0  # marker disc around a click
    no_prompt_box_mm: float = 25.0  # clicks without a box: the box when no size of click_boxes_mm settles
    click_boxes_mm: tuple[float, ...] = (15.0, 25.0, 40.0, 60.0, 80.0)  # half-sizes tried, smallest first
    click_stable_dice: float = 0.9  # a box is settled when the next larger one gives this Dice or more
    ct_window: tuple[float, float] = CLASSIC_CT_WINDOW

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name not in ("ct_window", "click_boxes_mm") and getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must not be negative")
        object.__setattr__(self, "click_boxes_mm", tuple(sorted(float(h) for h in self.click_boxes_mm)))
        if not self.click_boxes_mm or self.click_boxes_mm[0] <= 0:
            raise ValueError("click_boxes_mm must be positive half-sizes")
        if self.max_growth < 1:
            raise ValueError("max_growth must be >= 1")


@dataclass
class _Model:
    """Intensity model learned on a prompted slice (grey levels of the uint8 image).

    ``median``/``spread`` describe the tumour itself (robust statistics of its class in the
    middle of the box); its *core range* ``[lo, hi]`` is ``median +- k_sigma * spread``,
    narrowed on the near side to the level that separates the tumour from a second tissue
    of its class in the box (mediastinum, muscle) when there is one. ``threshold``
    is the Otsu level between the tumour's class and the other class in the box (lung
    for a tumour in lung): a voxel at least half tumour lies on the tumour's side of it,
    which is how the partial-volume rim is added back.
    """

    threshold: float
    bright: bool  # the tumour is the brighter Otsu class
    median: float
    spread: float
    lo: float  # core range
    hi: float
    contrast: float = 0.0  # |median of the tumour's class - median of the other class|


@dataclass
class _Crop:
    i0: int
    j0: int
    i1: int  # exclusive
    j1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.i0, self.i1), slice(self.j0, self.j1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.i1 - self.i0, self.j1 - self.j0


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 1)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r + 0.5


def _ellipse_se(mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """A structuring element that is a disc of ``mm`` radius in physical units."""
    ri = max(int(round(mm / spacing_yx[0])), 1)
    rj = max(int(round(mm / spacing_yx[1])), 1)
    y, x = np.ogrid[-ri : ri + 1, -rj : rj + 1]
    return (y / ri) ** 2 + (x / rj) ** 2 <= 1.0 + 1e-9


def _inside(mask: np.ndarray, box: Box) -> bool:
    """The mask keeps more than a pixel off the box's border on every side (where the box
    was clipped, off the image's edge): the box did not cut it."""
    m0, n0, m1, n1 = bounding_box(mask)  # type: ignore[misc]
    return m0 > box[0] + 1 and n0 > box[1] + 1 and m1 < box[2] - 1 and n1 < box[3] - 1


class ClassicSliceSegmenter:
    """A :class:`~inference.propagation.GuidedSliceSegmenter` over one uint8 volume."""

    def __init__(self, gray: np.ndarray, spacing: tuple[float, float, float], params: ClassicParams | None = None):
        if gray.dtype != np.uint8 or gray.ndim != 3:
            raise ValueError("gray must be a uint8 (z, y, x) volume")
        self.gray = gray
        self.spacing_yx = (float(spacing[1]), float(spacing[2]))
        self.p = params or ClassicParams()
        self.models: dict[int, _Model] = {}  # anchor slice -> intensity model
        self._background: dict[tuple[int, int], tuple[_Crop, np.ndarray]] = {}  # (anchor, k) -> lost tissue
        self._se = {}

    # -- protocol --------------------------------------------------------------------
    def prefetch(self, ks: Sequence[int]) -> None:  # nothing to precompute
        return None

    def segment_slice(self, k: int, box: Box | None, points: Sequence[Point] = ()) -> tuple[np.ndarray, float | None]:
        ny, nx = self.gray.shape[1:]
        positives = [(i, j) for i, j, pos in points if pos]
        negatives = [(i, j) for i, j, pos in points if not pos]
        if box is None:
            if not positives:
                raise ValueError("a slice needs a box or a positive click")
            box = self._box_for_clicks(k, points)
        box = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], ny - 1.0), min(box[3], nx - 1.0))
        crop = self._crop(box)
        im = self._smooth(k, crop)
        inbox = self._box_mask(box, crop)
        pos_px = self._to_crop(positives, crop)
        neg_px = self._to_crop(negatives, crop)

        model = self._learn(im, inbox, pos_px)
        self.models[k] = model
        tissue = self._tissue(im, model)
        cand = tissue & inbox
        if model.contrast >= self.p.min_contrast:
            chosen = self._choose_component(cand, inbox, pos_px)
        else:  # one intensity class only (noise): nothing stands out in the box
            log.info(
                "slice %d: no object in the box (contrast %.1f < %.1f grey levels)",
                k,
                model.contrast,
                self.p.min_contrast,
            )
            chosen = np.zeros_like(cand)
        if not chosen.any():
            self._remember(k, k, crop, tissue, np.zeros_like(tissue))
            return np.zeros((ny, nx), dtype=bool), 0.0
        core = self._core(chosen & ndimage.binary_erosion(inbox, self._se_mm(self.p.core_mm)))
        if not core.any():
            core = self._core(chosen)
        fg = core | self._click_mask(pos_px, crop.shape)
        bg = ~inbox | self._click_mask(neg_px, crop.shape)
        won = self._compete(im, tissue, fg, bg) & inbox
        won = self._keep_touching(won, fg)
        mask = self._add_rim(self._finish(won, inbox), im, model, inbox, tissue)
        self._remember(k, k, crop, tissue, mask)
        return self._paste(mask, crop), self._edge_score(mask, im, model)

    def segment_next(
        self, k: int, box: Box, *, previous_k: int, previous_mask: np.ndarray, anchor_k: int
    ) -> tuple[np.ndarray, float | None]:
        model = self.models[anchor_k]
        crop = self._crop(box)
        im = self._smooth(k, crop)
        prev = previous_mask[crop.slices]
        tissue = self._tissue(im, model)
        allowed = self._box_mask(box, crop) & ndimage.binary_dilation(prev, self._se_mm(self.p.step_mm))
        core = self._core(prev) & tissue
        if not core.any():
            raise StopPropagation(
                "intensity model no longer fits: no tissue of the tumour's intensity under the previous mask"
            )
        bg = ~allowed
        lost = self._recall(anchor_k, previous_k, crop)
        if lost is not None:
            bg |= lost
        bg &= ~core
        won = self._compete(im, tissue, core, bg) & allowed
        won = self._keep_touching(won, prev & won if (prev & won).any() else core)
        if won.sum() > self.p.max_growth * max(int(prev.sum()), 1):
            won &= ndimage.binary_dilation(prev, self._se_mm(self.p.step_mm / 2.5))
        finished = self._finish(won, allowed)
        level = self._level(finished, im, model)
        log.debug(
            "slice %d: tumour-class median %.1f (prompted slice %.1f +- %.1f)", k, level, model.median, model.spread
        )
        if finished.any() and abs(level - model.median) > self.p.k_fit * model.spread:
            raise StopPropagation(
                f"intensity model no longer fits: median grey level {level:.0f} on slice {k} vs "
                f"{model.median:.0f} +- {self.p.k_fit:g} x {model.spread:.1f} on the prompted slice"
            )
        mask = self._add_rim(finished, im, model, allowed, tissue)
        self._remember(anchor_k, k, crop, tissue, mask)
        if previous_k != anchor_k:  # the walk never comes back to it
            self._background.pop((anchor_k, previous_k), None)
        return self._paste(mask, crop), self._edge_score(mask, im, model)

    # -- clicks without a box --------------------------------------------------------
    def _box_for_clicks(self, k: int, points: Sequence[Point]) -> Box:
        """The box for clicks that come without one: the smallest of the boxes grown from the
        positive clicks by ``click_boxes_mm`` whose mask is *settled*: it agrees with every
        click, lies inside the box (off its border, and so off the image's edge) and the next
        larger box gives nearly the same mask (Dice >= ``click_stable_dice``),
        so the box did not cut the tumour. A fixed box cuts a tumour larger than itself (on
        the real cases of 73-93 mm it kept 5-60 %); a box far larger than a small tumour lets
        other tissue into the intensity model. When no size settles: the largest box whose
        mask agrees and lies inside, else ``no_prompt_box_mm``."""
        tried: list[tuple[float, Box, np.ndarray, bool]] = []
        for half in self.p.click_boxes_mm:
            box = box_from_points(points, self.gray.shape[1:], self.spacing_yx, half)
            mask, _ = self.segment_slice(k, box, points)
            ok = bool(mask.any()) and clicks_agree(mask, points) and _inside(mask, box)
            if tried and tried[-1][3] and dice(tried[-1][2], mask) >= self.p.click_stable_dice:
                log.debug("slice %d: clicks settled in a box of +-%g mm", k, tried[-1][0])
                return tried[-1][1]
            tried.append((half, box, mask, ok))
        enclosed = [t for t in tried if t[3]]
        if enclosed:
            log.debug("slice %d: no click box settled; +-%g mm", k, enclosed[-1][0])
            return enclosed[-1][1]
        log.debug("slice %d: no click box settled; +-%g mm", k, self.p.no_prompt_box_mm)
        return box_from_points(points, self.gray.shape[1:], self.spacing_yx, self.p.no_prompt_box_mm)

    # -- pieces ----------------------------------------------------------------------
    def _se_mm(self, mm: float) -> np.ndarray:
        key = round(mm, 3)
        if key not in self._se:
            self._se[key] = _ellipse_se(mm, self.spacing_yx)
        return self._se[key]

    def _crop(self, box: Box) -> _Crop:
        ny, nx = self.gray.shape[1:]
        mi = self.p.context_mm / self.spacing_yx[0] + 2
        mj = self.p.context_mm / self.spacing_yx[1] + 2
        return _Crop(
            max(int(np.floor(box[0] - mi)), 0),
            max(int(np.floor(box[1] - mj)), 0),
            min(int(np.ceil(box[2] + mi)) + 1, ny),
            min(int(np.ceil(box[3] + mj)) + 1, nx),
        )

    def _smooth(self, k: int, crop: _Crop) -> np.ndarray:
        return ndimage.median_filter(self.gray[k][crop.slices], size=3).astype(np.float32)

    @staticmethod
    def _box_mask(box: Box, crop: _Crop) -> np.ndarray:
        m = np.zeros(crop.shape, dtype=bool)
        i0 = max(int(np.ceil(box[0] - 1e-6)) - crop.i0, 0)
        j0 = max(int(np.ceil(box[1] - 1e-6)) - crop.j0, 0)
        i1 = int(np.floor(box[2] + 1e-6)) - crop.i0
        j1 = int(np.floor(box[3] + 1e-6)) - crop.j0
        m[i0 : i1 + 1, j0 : j1 + 1] = True
        return m

    @staticmethod
    def _to_crop(points, crop: _Crop) -> list[tuple[int, int]]:
        out = []
        for i, j in points:
            ii, jj = int(round(i)) - crop.i0, int(round(j)) - crop.j0
            if 0 <= ii < crop.shape[0] and 0 <= jj < crop.shape[1]:
                out.append((ii, jj))
        return out

    def _click_mask(self, pts: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        for i, j in pts:
            m[i, j] = True
        if pts:
            m = ndimage.binary_dilation(m, self._se_mm(self.p.click_radius_mm))
        return m

    def _learn(self, im: np.ndarray, inbox: np.ndarray, pos_px: list[tuple[int, int]]) -> _Model:
        values = im[inbox]
        if values.size < 4 or values.max() - values.min() < 1:
            v = float(values.mean()) if values.size else 0.0
            d = self.p.k_sigma * self.p.min_spread
            return _Model(v - 1.0, True, v, self.p.min_spread, v - d, v + d, 0.0)
        t = float(threshold_otsu(values))
        ii, jj = np.nonzero(inbox)
        ci, cj = ii.mean(), jj.mean()
        hi_, hj_ = max(np.ptp(ii), 1) / 2.0, max(np.ptp(jj), 1) / 2.0
        if pos_px:
            clicked = np.array([im[i, j] for i, j in pos_px])
            bright = bool(np.mean(clicked > t) >= 0.5)
        else:
            # centre-weighted vote: the class that fills the middle of the box is the tumour
            w = np.exp(-0.5 * (((ii - ci) / (hi_ / 2)) ** 2 + ((jj - cj) / (hj_ / 2)) ** 2))
            bright = bool(w[values > t].sum() >= w[values <= t].sum())
        in_class = values > t if bright else values <= t
        # statistics from the middle half of the box (pure tumour, not its rim or neighbours)
        middle = (np.abs(ii - ci) <= hi_ / 2) & (np.abs(jj - cj) <= hj_ / 2) & in_class
        sample = values[middle] if middle.sum() >= 9 else values[in_class]
        if pos_px:
            near = np.zeros(im.shape, dtype=bool)
            for i, j in pos_px:
                near[i, j] = True
            near = ndimage.binary_dilation(near, self._se_mm(self.p.no_prompt_box_mm / 5))
            clicked_sample = im[near & ((im > t) if bright else (im <= t))]
            if clicked_sample.size >= 9:
                sample = clicked_sample
        med = float(np.median(sample))
        spread = max(1.4826 * float(np.median(np.abs(sample - med))), self.p.min_spread)
        lo, hi = med - self.p.k_sigma * spread, med + self.p.k_sigma * spread
        # Never across the Otsu level towards the other class.
        lo, hi = (max(lo, t), hi) if bright else (lo, min(hi, t))
        # A second tissue of the tumour's class at the box's border (mediastinum, muscle):
        # when its median differs clearly from the tumour's, the core range stops halfway
        # (never closer than 1.5 spreads to the tumour's median).
        ring_i = max(2.0, 0.15 * 2 * hi_)
        ring_j = max(2.0, 0.15 * 2 * hj_)
        border = ((np.abs(ii - ci) > hi_ - ring_i) | (np.abs(jj - cj) > hj_ - ring_j)) & in_class
        if border.sum() >= 10:
            neighbour = float(np.median(values[border]))
            half = (neighbour + med) / 2.0
            if bright and neighbour < med - 3 * spread:
                lo = max(lo, min(half, med - 1.5 * spread))
            elif not bright and neighbour > med + 3 * spread:
                hi = min(hi, max(half, med + 1.5 * spread))
        other = values[~in_class]
        contrast = abs(med - float(np.median(other))) if other.size else 0.0
        return _Model(threshold=t, bright=bright, median=med, spread=spread, lo=lo, hi=hi, contrast=contrast)

    def _level(self, mask: np.ndarray, im: np.ndarray, model: _Model) -> float:
        """Median grey level of the mask's pixels of the tumour's Otsu class (cavities and
        air bronchograms, which belong to the other class, do not count)."""
        values = im[mask & ~self._other_class(im, model)]
        return float(np.median(values)) if values.size else float("nan")

    def _tissue(self, im: np.ndarray, model: _Model) -> np.ndarray:
        """Pixels in the tumour's core range, opened (cuts vessels and thin strands)."""
        t = (im >= model.lo) & (im <= model.hi)
        return ndimage.binary_opening(t, self._se_mm(self.p.open_mm))

    @staticmethod
    def _other_class(im: np.ndarray, model: _Model) -> np.ndarray:
        return im <= model.threshold if model.bright else im > model.threshold

    def _add_rim(
        self, mask: np.ndarray, im: np.ndarray, model: _Model, region: np.ndarray, tissue: np.ndarray
    ) -> np.ndarray:
        """Add the partial-volume rim: grow the mask by up to ``rim_mm`` into pixels on the
        tumour's side of the Otsu threshold but outside the core range, near the other
        class (lung), and not next to tissue that lost the competition (the edge of the
        mediastinum or chest wall is not the tumour's rim)."""
        if not mask.any() or self.p.rim_mm <= 0:
            return mask
        other = self._other_class(im, model)
        between = ~other & ((im < model.lo) if model.bright else (im > model.hi))
        se = self._se_mm(self.p.rim_mm)
        square = np.ones((3, 3), dtype=bool)
        lost = ndimage.binary_dilation(tissue & ~mask, square, iterations=2)
        allowed = between & ndimage.binary_dilation(other, se) & region & ~lost
        steps = max(int(round(self.p.rim_mm / min(self.spacing_yx))), 1)
        cross = ndimage.generate_binary_structure(2, 1)
        return ndimage.binary_dilation(mask, cross, iterations=steps, mask=allowed | mask)

    def _core(self, mask: np.ndarray, core_mm: float | None = None) -> np.ndarray:
        """Pixels at least ``core_mm`` inside ``mask`` (or half its thickness if thinner)."""
        if not mask.any():
            return mask.copy()
        core_mm = self.p.core_mm if core_mm is None else core_mm
        dt = ndimage.distance_transform_edt(mask, sampling=self.spacing_yx)
        return dt >= min(core_mm, 0.5 * float(dt.max()))

    def _choose_component(self, cand: np.ndarray, inbox: np.ndarray, pos_px) -> np.ndarray:
        labels, n = ndimage.label(cand)
        if n == 0:
            return cand
        if pos_px:
            hit = {int(labels[i, j]) for i, j in pos_px} - {0}
            if hit:
                return np.isin(labels, sorted(hit))
        # the component with the most centre-weighted area
        ii, jj = np.nonzero(inbox)
        ci, cj = ii.mean(), jj.mean()
        si, sj = max(np.ptp(ii), 1) / 3.0, max(np.ptp(jj), 1) / 3.0
        yy, xx = np.indices(cand.shape)
        w = np.exp(-0.5 * (((yy - ci) / si) ** 2 + ((xx - cj) / sj) ** 2))
        score = ndimage.sum(w, labels, index=np.arange(1, n + 1))
        return labels == int(np.argmax(score)) + 1

    @staticmethod
    def _compete(im: np.ndarray, tissue: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
        markers = np.zeros(im.shape, dtype=np.int32)
        markers[bg & tissue] = 2
        markers[fg & tissue] = 1
        if not (markers == 1).any():
            return np.zeros(im.shape, dtype=bool)
        labels = watershed(sobel(im), markers, mask=tissue)
        return labels == 1

    @staticmethod
    def _keep_touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        labels, n = ndimage.label(mask)
        if n <= 1:
            return mask
        keep = np.unique(labels[seeds & mask])
        keep = keep[keep > 0]
        return np.isin(labels, keep)

    def _finish(self, mask: np.ndarray, region: np.ndarray) -> np.ndarray:
        if not mask.any():
            return mask
        se = self._se_mm(self.p.close_mm)
        pad = se.shape[0] // 2 + 1, se.shape[1] // 2 + 1
        closed = ndimage.binary_closing(np.pad(mask, ((pad[0], pad[0]), (pad[1], pad[1]))), se)
        closed = closed[pad[0] : pad[0] + mask.shape[0], pad[1] : pad[1] + mask.shape[1]]
        return ndimage.binary_fill_holes((closed & region) | mask)

    def _edge_score(self, mask: np.ndarray, im: np.ndarray, model: _Model) -> float:
        if not mask.any():
            return 0.0
        outline = mask & ~ndimage.binary_erosion(mask)
        edge = outline & ndimage.binary_dilation(self._other_class(im, model))
        return float(edge.sum()) / float(outline.sum())

    def _remember(self, anchor_k: int, k: int, crop: _Crop, tissue: np.ndarray, mask: np.ndarray) -> None:
        self._background[(anchor_k, k)] = (crop, tissue & ~mask)

    def _recall(self, anchor_k: int, k: int, crop: _Crop) -> np.ndarray | None:
        """The tissue that lost on slice ``k`` (walk from ``anchor_k``), in ``crop``'s frame."""
        entry = self._background.get((anchor_k, k))
        if entry is None:
            return None
        old, lost = entry
        out = np.zeros(crop.shape, dtype=bool)
        i0, j0 = max(old.i0, crop.i0), max(old.j0, crop.j0)
        i1, j1 = min(old.i1, crop.i1), min(old.j1, crop.j1)
        if i0 < i1 and j0 < j1:
            out[i0 - crop.i0 : i1 - crop.i0, j0 - crop.j0 : j1 - crop.j0] = lost[
                i0 - old.i0 : i1 - old.i0, j0 - old.j0 : j1 - old.j0
            ]
        return out

    def _paste(self, mask: np.ndarray, crop: _Crop) -> np.ndarray:
        out = np.zeros(self.gray.shape[1:], dtype=bool)
        out[crop.slices] = mask
        return out


class ClassicEngine(Engine):
    """Weight-free engine: :class:`ClassicSliceSegmenter` through 2D box propagation."""

    name = "classic"
    version = VERSION

    def __init__(self, **params) -> None:
        self.params = ClassicParams(**params)

    @property
    def algorithm_name(self) -> str:
        return ALGORITHM_NAME

    def segment(self, volume: Volume, prompts: TargetPrompts, options: SegmentOptions) -> SegmentationResult:
        if options.mode != "box2d":
            raise SegmentationError(
                f"the classic engine has no {options.mode!r} mode: it segments slice by slice "
                "(mode box2d); video3d needs the sam2 engine"
            )
        if prompts.is_empty():
            raise SegmentationError(f"target {prompts.target!r} has no box and no positive click")
        t0 = time.perf_counter()
        images = prepare(volume, self.params.ct_window if volume.modality.upper() == "CT" else options.window)
        segmenter = ClassicSliceSegmenter(images.gray, volume.spacing, self.params)
        try:
            result = propagate_2d(
                segmenter,
                volume.shape,
                volume.spacing,
                prompts,
                PropagationParams.from_options(options),
                images=images.gray,
            )
        except ValueError as exc:
            raise SegmentationError(str(exc)) from exc
        if not result.mask.any():
            raise SegmentationError(
                "the classic engine found no tumour at the prompts: " + "; ".join(result.warnings or ["empty mask"])
            )
        warnings = list(result.warnings)
        for direction, reason in result.stop_reasons.items():
            if "maximum extent" in reason or "of the volume" in reason:
                warnings.append(f"propagation {direction} stopped early, the tumour may continue: {reason}")
        log.info(
            "classic: %d slices (%s), stopped up: %s; down: %s",
            len(result.slice_scores),
            result.slice_range,
            result.stop_reasons["up"],
            result.stop_reasons["down"],
        )
        return SegmentationResult(
            mask=result.mask,
            slice_scores=result.slice_scores,
            engine=self.name,
            engine_version=self.version,
            algorithm_name=self.algorithm_name,
            mode="box2d",
            seconds=time.perf_counter() - t0,
            warnings=warnings,
            stop_reasons=dict(result.stop_reasons),
        )
