"""Metrics (inference.metrics) against values computed by hand on small synthetic masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference.metrics import dice, evaluate, hausdorff, hd95, surface, surface_dice, volume_ratio


def cube(offset=(0, 0, 0), shape=(10, 10, 10)) -> np.ndarray:
    m = np.zeros(shape, bool)
    z, y, x = (2 + o for o in offset)
    m[z : z + 4, y : y + 4, x : x + 4] = True
    return m


def test_surface_of_a_cube():
    s = surface(cube())
    assert s.sum() == 64 - 8  # a 4x4x4 cube minus its 2x2x2 interior
    edge = np.ones((3, 3, 3), bool)  # touching the array border: border counts as background
    assert surface(edge).sum() == 26


def test_cubes_offset_one_slice_with_thick_slices():
    # B is A moved by one slice (3 mm). Worked out by hand:
    # |A n B| = 48 -> Dice 96/128. Surface of each: 56 voxels, of which
    # 16 (the far face) are 3 mm from the other surface, 4 (inner 2x2 of a face that is
    # interior in the other cube) are 1 mm (one row) away, 36 lie on the other surface.
    a, b = cube(), cube((1, 0, 0))
    sp = (3.0, 1.0, 1.0)
    assert dice(a, b) == pytest.approx(0.75)
    assert surface_dice(a, b, sp, 2.0) == pytest.approx(80 / 112)
    assert surface_dice(a, b, sp, 0.99) == pytest.approx(72 / 112)
    assert surface_dice(a, b, sp, 3.0) == pytest.approx(1.0)
    assert hd95(a, b, sp) == pytest.approx(3.0)
    assert hausdorff(a, b, sp) == pytest.approx(3.0)
    # the same shift along x with the same spacing tuple is only 1 mm
    c = cube((0, 0, 1))
    assert hd95(a, c, sp) == pytest.approx(1.0)
    assert surface_dice(a, c, sp, 2.0) == pytest.approx(1.0)


def test_cubes_offset_two_columns_anisotropic_in_plane():
    # B is A moved by two columns of 0.5 mm. Per surface (56 voxels): 16 at 1.0 mm (far
    # face), 16 at 0.5 mm (12 of the ring one column in, 4 of the inner face), 24 at 0.
    a, b = cube(), cube((0, 0, 2))
    sp = (2.0, 0.7, 0.5)
    assert dice(a, b) == pytest.approx(0.5)
    assert surface_dice(a, b, sp, 0.49) == pytest.approx(48 / 112)
    assert surface_dice(a, b, sp, 0.5) == pytest.approx(80 / 112)
    assert surface_dice(a, b, sp, 1.0) == pytest.approx(1.0)
    d = np.array([0.0] * 24 + [0.5] * 16 + [1.0] * 16)
    assert hd95(a, b, sp) == pytest.approx(np.percentile(d, 95)) == pytest.approx(1.0)


def test_hd95_ignores_a_few_outliers_but_hausdorff_does_not():
    a = np.zeros((1, 60, 60), bool)
    a[0, 10:50, 10:50] = True
    b = a.copy()
    b[0, 55, 55] = True  # one stray voxel, 5*sqrt(2) px from the square's corner
    sp = (1.0, 1.0, 1.0)
    assert hd95(a, b, sp) == pytest.approx(0.0)
    assert hausdorff(a, b, sp) == pytest.approx(math.hypot(6, 6))


def test_empty_masks():
    e = np.zeros((5, 5, 5), bool)
    a = cube(shape=(8, 8, 8))[:5, :5, :5]
    sp = (1.0, 1.0, 1.0)
    assert dice(e, e) == 1.0 and surface_dice(e, e, sp) == 1.0 and hd95(e, e, sp) == 0.0
    assert volume_ratio(e, e) == 1.0
    assert dice(e, a) == 0.0 and dice(a, e) == 0.0
    assert surface_dice(e, a, sp) == 0.0 and surface_dice(a, e, sp) == 0.0
    assert hd95(e, a, sp) == math.inf and hd95(a, e, sp) == math.inf
    assert volume_ratio(e, a) == 0.0 and volume_ratio(a, e) == math.inf
    scores = evaluate(e, a, sp)
    assert scores.as_dict()["hd95_mm"] is None and scores.dice == 0.0


def test_evaluate_and_bad_input():
    a, b = cube(), cube((1, 0, 0))
    s = evaluate(a, b, (3.0, 1.0, 1.0))
    assert s.dice == pytest.approx(0.75) and s.hd95_mm == pytest.approx(3.0)
    assert s.pred_volume_ml == pytest.approx(64 * 3 / 1000)
    assert s.volume_ratio == 1.0
    with pytest.raises(ValueError, match="same shape"):
        dice(a, a[:5])
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, b, (1.0, 1.0))


def test_against_brute_force_pairwise_distances_with_masks_on_the_array_edge():
    """Random blobs, one touching the array's border: surface distances by brute force
    (every pair of surface voxels, scipy.spatial) agree with the distance-transform path."""
    from scipy import ndimage
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(3)
    shape, sp = (12, 30, 26), (2.5, 0.8, 1.1)
    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
    b = np.roll(a, (1, 2, -1), axis=(0, 1, 2)) | (ndimage.gaussian_filter(rng.random(shape), 2) > 0.56)
    a[:, 0, :5] = True  # on the border of the array
    pa = np.argwhere(surface(a)) * sp
    pb = np.argwhere(surface(b)) * sp
    d = cdist(pa, pb)
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    assert hd95(a, b, sp) == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
    assert hausdorff(a, b, sp) == pytest.approx(max(d_ab.max(), d_ba.max()))
    expected = ((d_ab <= 2.0).sum() + (d_ba <= 2.0).sum()) / (d_ab.size + d_ba.size)
    assert surface_dice(a, b, sp, 2.0) == pytest.approx(expected)


def test_distance_map_uses_the_spacing_in_array_order():
    from inference.metrics import distance_to

    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[0, 0, 0] = True
    d = distance_to(mask, (3.0, 1.0, 2.0))  # (dz, dy, dx)
    assert d[0, 0, 0] == 0.0
    assert d[1, 1, 1] == pytest.approx(np.sqrt(9 + 1 + 4), abs=1e-4)
    assert d[0, 0, 5] == pytest.approx(10.0, abs=1e-4) and d[3, 0, 0] == pytest.approx(9.0, abs=1e-4)
