"""Overlap and surface-distance metrics between two masks on the same grid.

All distances are in mm and use the true, possibly anisotropic spacing ``(dz, dy, dx)``
in the arrays' ``(z, y, x)`` order. Distance maps are SciPy's exact Euclidean distance
transform (``distance_transform_edt`` with ``sampling=spacing``, float64) on the masks'
bounding box. SimpleITK's Maurer map was measured as the alternative: faster (0.29 s
against 0.43 s on a 60x200x200 box, 2 cores) but float32 only, so a hand-computed 0.8 mm
reads 0.799999; on the cropped boxes the metrics run on, the speed difference does not
matter, the exactness does (``tests/test_metrics.py`` checks hand-computed distances).

Surfaces: the surface of a mask is its set of border voxels (foreground voxels with at
least one 6-connected background neighbour; the volume's edge counts as background).
The distance between two surface voxels is the Euclidean distance between voxel centres.

Empty masks (defined here, tested in tests/test_metrics.py):

=============================  ======  =============  ==========  ============
case                           dice    surface_dice   hd95        volume_ratio
=============================  ======  =============  ==========  ============
both empty                     1.0     1.0            0.0         1.0
prediction empty, truth not    0.0     0.0            inf         0.0
truth empty, prediction not    0.0     0.0            inf         inf
=============================  ======  =============  ==========  ============

``inf`` (not ``nan``) for HD95 with one empty mask: the prediction is as wrong as it can
be, and ``inf`` sorts and compares as "worse than any number" where ``nan`` would not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a).astype(bool, copy=False)
    b = np.asarray(b).astype(bool, copy=False)
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or min(sp) <= 0:
        raise ValueError(f"spacing must be {ndim} positive values, got {spacing}")
    return sp


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A n B| / (|A| + |B|); 1.0 when both are empty."""
    a, b = _pair(a, b)
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def volume_ratio(pred: np.ndarray, truth: np.ndarray) -> float:
    """|pred| / |truth| (1.0 both empty, inf when only the truth is empty)."""
    pred, truth = _pair(pred, truth)
    sp, st = int(pred.sum()), int(truth.sum())
    if st == 0:
        return 1.0 if sp == 0 else math.inf
    return sp / st


def surface(mask: np.ndarray) -> np.ndarray:
    """Border voxels of ``mask``: foreground with a 6-connected background neighbour
    (outside the array counts as background)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union, padded by one background voxel
    on every side. Surfaces and surface distances are unchanged (all surface voxels lie
    in the box, and outside the array counted as background anyway), but the distance
    transforms run on the box instead of a whole 512x512x300 volume."""
    union = a | b
    lo, hi = [], []
    for axis in range(a.ndim):
        other = tuple(i for i in range(a.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    return np.pad(a[box], 1), np.pad(b[box], 1)


def distance_to(mask: np.ndarray, spacing) -> np.ndarray:
    """Euclidean distance (mm) of every voxel centre to the nearest voxel of ``mask``
    (0 on ``mask``); ``mask`` must not be empty."""
    return ndimage.distance_transform_edt(~mask, sampling=spacing)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``, and back.
    Both masks must be non-empty."""
    a, b = _crop_to_union(a, b)
    sa, sb = surface(a), surface(b)
    return distance_to(sb, spacing)[sa], distance_to(sa, spacing)[sb]


def surface_dice(a: np.ndarray, b: np.ndarray, spacing, tolerance_mm: float = 2.0) -> float:
    """Surface Dice at ``tolerance_mm`` (Nikolov et al. 2018, voxel-surface variant): the
    fraction of both surfaces that lies within the tolerance of the other surface,
    (|{d_ab <= t}| + |{d_ba <= t}|) / (|S_a| + |S_b|)."""
    a, b = _pair(a, b)
    sp = _spacing(spacing, a.ndim)
    ea, eb = not a.any(), not b.any()
    if ea and eb:
        return 1.0
    if ea or eb:
        return 0.0
    d_ab, d_ba = _surface_distances(a, b, sp)
    within = int((d_ab <= tolerance_mm + 1e-9).sum()) + int((d_ba <= tolerance_mm + 1e-9).sum())
    return within / (d_ab.size + d_ba.size)


def _directed_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray] | float:
    """Surface distances both ways in mm, or the value of a distance metric when a mask is
    empty: 0.0 when both are, inf when one is."""
    a, b = _pair(a, b)
    sp = _spacing(spacing, a.ndim)
    ea, eb = not a.any(), not b.any()
    if ea and eb:
        return 0.0
    if ea or eb:
        return math.inf
    return _surface_distances(a, b, sp)


def hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """95th percentile Hausdorff distance in mm: the larger of the two directed 95th
    percentiles of surface-to-surface distances (0.0 both empty, inf one empty)."""
    d = _directed_distances(a, b, spacing)
    if isinstance(d, float):
        return d
    d_ab, d_ba = d
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def hausdorff(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Maximum surface distance in mm (same empty-mask rules as :func:`hd95`)."""
    d = _directed_distances(a, b, spacing)
    if isinstance(d, float):
        return d
    d_ab, d_ba = d
    return float(max(d_ab.max(), d_ba.max()))


@dataclass
class Scores:
    dice: float
    surface_dice: float
    tolerance_mm: float
    hd95_mm: float
    volume_ratio: float
    pred_volume_ml: float
    truth_volume_ml: float

    def as_dict(self) -> dict[str, float | None]:
        """JSON-ready: inf becomes None (JSON has no infinity)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def evaluate(pred: np.ndarray, truth: np.ndarray, spacing, tolerance_mm: float = 2.0) -> Scores:
    """Every metric of this module for one prediction against its truth."""
    pred, truth = _pair(pred, truth)
    voxel_ml = float(np.prod(_spacing(spacing, pred.ndim))) / 1000.0
    return Scores(
        dice=dice(pred, truth),
        surface_dice=surface_dice(pred, truth, spacing, tolerance_mm),
        tolerance_mm=float(tolerance_mm),
        hd95_mm=hd95(pred, truth, spacing),
        volume_ratio=volume_ratio(pred, truth),
        pred_volume_ml=int(pred.sum()) * voxel_ml,
        truth_volume_ml=int(truth.sum()) * voxel_ml,
    )
