"""Prompt simulation from a ground-truth mask: slice choice, box, jitter in mm, points, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.research.simulate import (
    PromptSpec,
    SimulationError,
    case_rng,
    choose_slice,
    simulate_box,
    simulate_points,
    simulate_prompts,
)


def _stack(areas_rows: list[tuple[int, int, int, int] | None], shape=(24, 30)) -> np.ndarray:
    """A (z, y, x) mask with one rectangle (i0, j0, i1, j1 inclusive) or nothing per slice."""
    mask = np.zeros((len(areas_rows), *shape), dtype=bool)
    for k, r in enumerate(areas_rows):
        if r is not None:
            i0, j0, i1, j1 = r
            mask[k, i0 : i1 + 1, j0 : j1 + 1] = True
    return mask


def test_choose_slice_largest_and_middle():
    # areas: slice1 = 4, slice2 = 9, slice3 = 9, slice4 = 1, slice6 = 4; extent 1..6, middle 3.5
    mask = _stack([None, (0, 0, 1, 1), (0, 0, 2, 2), (5, 5, 7, 7), (0, 0, 0, 0), None, (3, 3, 4, 4)])
    assert choose_slice(mask, "largest") == 3  # tie 2 vs 3 -> nearest to 3.5
    assert choose_slice(mask, "middle") == 3  # 3 and 4 both 0.5 away -> lower index
    only_ends = _stack([(0, 0, 0, 0), None, None, None, (0, 0, 1, 1)])
    assert choose_slice(only_ends, "middle") == 0  # no GT at 2: nearest GT slice, lower on tie
    with pytest.raises(SimulationError, match="empty"):
        choose_slice(np.zeros((3, 4, 4), bool), "largest")


def test_box_without_jitter_is_the_bounding_box_in_row_column_order():
    mask = _stack([None, (3, 7, 10, 20), None])
    spec = PromptSpec(kind="box", slice="largest", jitter_mm=0.0)
    prompts = simulate_prompts(mask, (2.5, 0.8, 1.2), spec, case_rng(0, "c", "r"))
    assert len(prompts.boxes) == 1 and not prompts.points
    box = prompts.boxes[0]
    assert (box.slice_index, box.i0, box.j0, box.i1, box.j1) == (1, 3.0, 7.0, 10.0, 20.0)


def test_box_jitter_is_in_mm_per_axis_and_clipped():
    mask2d = np.zeros((200, 200), bool)
    mask2d[80:121, 60:141] = True  # rows 80..120, columns 60..140
    dy, dx, jitter = 0.5, 2.0, 4.0  # 4 mm = 8 rows or 2 columns
    row_moves, col_moves = [], []
    for seed in range(200):
        i0, j0, i1, j1 = simulate_box(mask2d, (dy, dx), jitter, case_rng(seed, "case", "GTV"))
        row_moves += [abs(i0 - 80) * dy, abs(i1 - 120) * dy]
        col_moves += [abs(j0 - 60) * dx, abs(j1 - 140) * dx]
    assert max(row_moves) <= jitter + 1e-9 and max(col_moves) <= jitter + 1e-9
    # the jitter really uses the whole +-4 mm on both axes (pixels differ by a factor 4)
    assert max(row_moves) > 3.5 and max(col_moves) > 3.5
    assert np.mean(row_moves) == pytest.approx(jitter / 2, rel=0.15)
    # near the image edge the box is clipped into the image
    edge = np.zeros((20, 20), bool)
    edge[0:3, 17:20] = True
    for seed in range(50):
        i0, j0, i1, j1 = simulate_box(edge, (1.0, 1.0), 5.0, case_rng(seed))
        assert 0 <= i0 <= i1 <= 19 and 0 <= j0 <= j1 <= 19


def test_same_seed_same_prompt_and_independent_of_order():
    mask = _stack([(2, 2, 12, 20), (1, 3, 14, 22), (4, 4, 9, 9)])
    spec = PromptSpec(kind="box", jitter_mm=3.0)
    a = simulate_prompts(mask, (3, 1, 1), spec, case_rng(7, "case_0001", "GTV-1"))
    case_rng(7, "case_0002", "GTV-1").uniform(size=100)  # another case drawn in between
    b = simulate_prompts(mask, (3, 1, 1), spec, case_rng(7, "case_0001", "GTV-1"))
    c = simulate_prompts(mask, (3, 1, 1), spec, case_rng(8, "case_0001", "GTV-1"))
    d = simulate_prompts(mask, (3, 1, 1), spec, case_rng(7, "case_0001", "GTV-2"))
    assert a.boxes == b.boxes
    assert a.boxes != c.boxes and a.boxes != d.boxes


def test_points_positive_deep_inside_negative_in_ring_around():
    yy, xx = np.mgrid[0:80, 0:100]
    dy, dx = 0.7, 1.3
    # an ellipse of radius 14 mm in both directions (anisotropic pixels)
    disk = ((yy - 40) * dy) ** 2 + ((xx - 50) * dx) ** 2 <= 14.0**2
    pts = simulate_points(disk, (dy, dx), positives=4, negatives=4, ring_mm=(3.0, 8.0), rng=case_rng(3))
    pos = [(i, j) for i, j, p in pts if p]
    neg = [(i, j) for i, j, p in pts if not p]
    assert len(pos) == 4 and len(neg) == 4
    inside = ndimage.distance_transform_edt(disk, sampling=(dy, dx))
    outside = ndimage.distance_transform_edt(~disk, sampling=(dy, dx))
    assert inside[pos[0]] == inside.max()  # first click: the deepest point
    for i, j in pos:
        assert disk[i, j] and inside[i, j] >= 0.5 * inside.max()
    for i, j in neg:
        assert not disk[i, j] and 3.0 <= outside[i, j] <= 8.0
    # negatives surround the target: one per quadrant around the centroid
    quadrants = {(np.sign((i - 40) * dy) >= 0, np.sign((j - 50) * dx) >= 0) for i, j in neg}
    assert len(quadrants) == 4
    # through simulate_prompts they become PointPrompts on the chosen slice
    vol = np.stack([np.zeros_like(disk), disk, np.zeros_like(disk)])
    tp = simulate_prompts(vol, (2.0, dy, dx), PromptSpec(kind="points", positives=2, negatives=3), case_rng(1))
    assert not tp.boxes and len(tp.points) == 5
    assert {p.slice_index for p in tp.points} == {1}
    assert sum(p.positive for p in tp.points) == 2


def test_prompt_spec_rejects_nonsense():
    with pytest.raises(ValueError):
        PromptSpec(kind="lasso")
    with pytest.raises(ValueError):
        PromptSpec(slice="first")
    with pytest.raises(ValueError):
        PromptSpec(jitter_mm=-1)
    with pytest.raises(ValueError):
        PromptSpec(kind="points", positives=0)
