"""dicom-node study: scores checked against hand-computed values, end-to-end runs on
phantoms, NPZ files and real data, bad input, reproducibility."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from dicom_node.research.study import score, z_extent

SPACING = (2.5, 0.8, 1.2)  # dz, dy, dx: all different, so a swapped axis shows


def _slab(shape=(12, 20, 24), z=(3, 6), y=(5, 6), x=(4, 15)) -> np.ndarray:
    """A box of voxels, inclusive index ranges. Thin (2 voxels) in y or x, so that every
    voxel is a surface voxel and the surface distances can be counted by hand."""
    m = np.zeros(shape, dtype=bool)
    m[z[0] : z[1] + 1, y[0] : y[1] + 1, x[0] : x[1] + 1] = True
    return m


def test_score_extra_slice_is_measured_along_z():
    truth = _slab()  # 4 slices x 2 rows x 12 columns = 96 voxels
    pred = _slab(z=(3, 7))  # one slice more: 120 voxels
    s = score(pred, truth, SPACING)
    # Dice = 2 * 96 / (96 + 120)
    assert s["dice"] == pytest.approx(192 / 216)
    # every voxel is on the surface; 24 predicted voxels lie one slice (2.5 mm) from the
    # truth, all others at 0: 95th percentile of (96 x 0, 24 x 2.5) is 2.5 mm
    assert s["hd95_mm"] == pytest.approx(2.5)
    # within 2 mm: 96 + 96 surface voxels of 96 + 120
    assert s["surface_dice_2mm"] == pytest.approx(192 / 216)
    assert s["volume_ratio"] == pytest.approx(1.25)
    voxel_ml = 2.5 * 0.8 * 1.2 / 1000
    assert s["gt_volume_ml"] == pytest.approx(96 * voxel_ml)
    assert s["pred_volume_ml"] == pytest.approx(120 * voxel_ml)
    assert (s["gt_z_first"], s["gt_z_last"], s["pred_z_first"], s["pred_z_last"]) == (3, 6, 3, 7)
    assert (s["gt_slices"], s["pred_slices"]) == (4, 5)
    assert s["slices_reached"] == 1.0 and s["slices_missed"] == 0 and s["slices_extra"] == 1
    assert s["extent_ratio"] == pytest.approx(5 / 4)


def test_score_extra_column_is_measured_along_x_and_extra_row_along_y():
    truth = _slab()  # thin in y
    s = score(_slab(x=(4, 16)), truth, SPACING)  # one column more (8 voxels at dx = 1.2 mm)
    assert s["dice"] == pytest.approx(192 / 200)
    assert s["hd95_mm"] == pytest.approx(1.2)
    assert s["surface_dice_2mm"] == pytest.approx(1.0)  # 1.2 mm is within 2 mm
    assert s["slices_extra"] == 0 and s["extent_ratio"] == 1.0
    truth = _slab(y=(2, 13), x=(7, 8))  # thin in x: 4 x 12 x 2
    s = score(_slab(y=(2, 14), x=(7, 8)), truth, SPACING)  # one row more (dy = 0.8 mm)
    assert s["dice"] == pytest.approx(192 / 200)
    assert s["hd95_mm"] == pytest.approx(0.8)
    # the same with a 1 mm tolerance: 0.8 mm is within, so still 1.0; at 0.5 mm it is not
    assert score(_slab(y=(2, 14), x=(7, 8)), truth, SPACING, tolerance_mm=0.5)["surface_dice_2mm"] == pytest.approx(
        192 / 200
    )


def test_score_missed_slices_and_empty_prediction():
    truth = _slab(z=(2, 9))  # 8 slices
    pred = _slab(z=(4, 7))  # the middle 4
    s = score(pred, truth, SPACING)
    assert s["slices_reached"] == pytest.approx(0.5) and s["slices_missed"] == 4 and s["slices_extra"] == 0
    assert s["extent_ratio"] == pytest.approx(0.5)
    assert s["dice"] == pytest.approx(2 * 96 / (192 + 96))
    # HD95: truth voxels two slices beyond the prediction are 5 mm away
    # (truth surface: 192 voxels; 96 at 0, 48 at 2.5 mm, 48 at 5 mm -> p95 = 5 mm)
    assert s["hd95_mm"] == pytest.approx(5.0)
    empty = score(np.zeros_like(truth), truth, SPACING)
    assert empty["dice"] == 0.0 and empty["surface_dice_2mm"] == 0.0
    assert math.isinf(empty["hd95_mm"]) and empty["volume_ratio"] == 0.0
    assert empty["pred_z_first"] == "" and empty["pred_slices"] == 0
    assert empty["slices_reached"] == 0.0 and empty["slices_missed"] == 8
    assert z_extent(np.zeros((3, 2, 2), bool)) is None and z_extent(truth) == (2, 9)
