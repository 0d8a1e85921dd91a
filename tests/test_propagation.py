"""2D box propagation (inference.propagation) driven by a scripted fake segmenter.

The fake "sees" a known 3D object: asked for slice k with a box, it returns the object's
voxels on slice k inside that box (with points only: the object's component under the
positive point). It records every call, so the tests can check what propagation asked.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference.engine import SegmentOptions
from inference.prompts import BoxPrompt, PointPrompt, TargetPrompts
from inference.propagation import (
    PropagationParams,
    StopPropagation,
    bounding_box,
    expand_box,
    propagate_2d,
)


class FakeSegmenter:
    predicts_iou = True  # like SAM2 and LiteMedSAM: the min_score rule applies

    def __init__(self, truth: np.ndarray, scores: dict[int, float] | None = None):
        self.truth = truth.astype(bool)
        self.calls: list[tuple[int, tuple | None, tuple]] = []
        self.prefetched: list[list[int]] = []
        self.scores = scores or {}

    def segment_slice(self, k, box, points=()):
        ny, nx = self.truth.shape[1:]
        assert 0 <= k < self.truth.shape[0], f"asked for slice {k} outside the volume"
        if box is not None:
            assert 0 <= box[0] <= box[2] <= ny - 1 and 0 <= box[1] <= box[3] <= nx - 1, box
        self.calls.append((k, box, tuple(points)))
        sl = self.truth[k]
        if box is not None:
            inside = np.zeros_like(sl)
            i0, j0, i1, j1 = (int(round(v)) for v in box)
            inside[i0 : i1 + 1, j0 : j1 + 1] = True
            out = sl & inside
        else:
            out = np.zeros_like(sl)
        positives = [p for p in points if p[2]]
        if box is None and positives:
            labels, _ = ndimage.label(sl)
            for i, j, _pos in positives:
                lab = labels[int(round(i)), int(round(j))]
                if lab:
                    out |= labels == lab
        for i, j, pos in points:  # a negative click removes its component
            if not pos:
                labels, _ = ndimage.label(out)
                lab = labels[int(round(i)), int(round(j))]
                if lab:
                    out &= labels != lab
        return out, self.scores.get(k, 0.9)

    def prefetch(self, ks):
        self.prefetched.append(list(ks))

    @property
    def segmented(self) -> list[int]:
        return [c[0] for c in self.calls]


def ellipsoid(shape, center, radii) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + (
        (x - center[2]) / radii[2]
    ) ** 2 <= 1.0


def box_prompts(truth: np.ndarray, k: int, pad: int = 2) -> TargetPrompts:
    i0, j0, i1, j1 = bounding_box(truth[k])
    return TargetPrompts(
        target="",
        output_name="GTV_AI",
        boxes=[BoxPrompt(k, i0 - pad, j0 - pad, i1 + pad, j1 + pad)],
    )


SHAPE = (40, 64, 64)
SPACING = (3.0, 1.0, 1.0)


def test_stops_at_the_end_of_the_tumour():
    truth = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))  # slices 14..26
    seg = FakeSegmenter(truth)
    res = propagate_2d(
        seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(min_area_mm2=0, min_area_fraction=0)
    )
    assert np.array_equal(res.mask, truth)
    assert res.slice_range == (14, 26)
    assert "vanished on slice 27" in res.stop_reasons["up"]
    assert "vanished on slice 13" in res.stop_reasons["down"]
    # it looked exactly one slice past each end, and never twice at one slice
    assert sorted(seg.segmented) == list(range(13, 28))
    assert sorted(res.slice_scores) == list(range(14, 27))


def test_next_box_is_previous_bbox_plus_margin_per_axis():
    truth = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))
    seg = FakeSegmenter(truth)
    spacing = (3.0, 0.5, 2.0)  # anisotropic in-plane: margin 3 mm = 6 rows, 1.5 columns
    propagate_2d(
        seg,
        SHAPE,
        spacing,
        box_prompts(truth, 20),
        PropagationParams(margin_mm=3.0, min_area_mm2=0, min_area_fraction=0),
    )
    call = next(c for c in seg.calls if c[0] == 21)
    i0, j0, i1, j1 = bounding_box(truth[20])
    assert call[1] == pytest.approx((i0 - 6, j0 - 1.5, i1 + 6, j1 + 1.5))
    assert expand_box((0, 0, 63, 63), 5, (1, 1), (64, 64)) == (0, 0, 63, 63)


def test_the_planners_box_is_grown_by_prompt_margin_mm_before_it_is_segmented():
    truth = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))
    spacing = (3.0, 0.5, 2.0)  # 3 mm = 6 rows, 1.5 columns
    i0, j0, i1, j1 = bounding_box(truth[20])
    drawn = (i0 + 2, j0 + 1, i1 - 2, j1 - 1)  # drawn a little inside the tumour's edge
    inside = (i0 + 3.0, j0 + 1.0, True)  # a click that only the drawn box's corner region holds
    for margin, expected in ((3.0, (i0 - 4, j0 - 0.5, i1 + 4, j1 + 0.5)), (0.0, drawn)):
        seg = FakeSegmenter(truth)
        prompts = TargetPrompts(
            target="",
            output_name="GTV_AI",
            boxes=[BoxPrompt(20, *drawn), BoxPrompt(20, 60, 60, 63, 63)],  # a second box: points are split
            points=[PointPrompt(20, *inside)],
        )
        params = PropagationParams(prompt_margin_mm=margin, min_area_mm2=0, min_area_fraction=0)
        res = propagate_2d(seg, SHAPE, spacing, prompts, params)
        first = seg.calls[0]
        assert first[0] == 20 and first[1] == pytest.approx(expected)
        assert first[2] == (inside,)  # the click belongs to the box it was drawn in
        # the grown box reaches the tumour's edge on the prompted slice; the drawn one does not
        assert np.array_equal(res.mask[20], truth[20]) == (margin > 0)
        assert seg.calls[1][1] == pytest.approx(expand_box((60, 60, 63, 63), margin, spacing[1:], SHAPE[1:]))
    with pytest.raises(ValueError, match="must not be negative"):
        PropagationParams(prompt_margin_mm=-1)


def test_several_anchors_nearest_wins_and_each_slice_segmented_once():
    truth = ellipsoid(SHAPE, (20, 32, 32), (12.4, 14, 12))  # slices 8..32
    seg = FakeSegmenter(truth)
    prompts = box_prompts(truth, 12)
    prompts.boxes += box_prompts(truth, 26).boxes
    params = PropagationParams(min_area_mm2=0, min_area_fraction=0, extend_past_outer_prompts=True)
    res = propagate_2d(seg, SHAPE, SPACING, prompts, params)
    assert np.array_equal(res.mask, truth)
    assert len(seg.segmented) == len(set(seg.segmented)), "a slice was segmented twice"
    a12, a26 = res.anchors
    assert (a12.first, a12.last) == (8, 19)  # 19 is the midpoint (tie to the lower anchor)
    assert (a26.first, a26.last) == (20, 32)
    assert "another prompted slice" in a12.stop_reasons["up"]
    assert "another prompted slice" in a26.stop_reasons["down"]
    assert "vanished" in res.stop_reasons["up"] and "vanished" in res.stop_reasons["down"]


def test_the_outermost_boxes_of_one_tumour_are_its_ends():
    truth = ellipsoid(SHAPE, (20, 32, 32), (12.4, 14, 12))  # slices 8..32
    seg = FakeSegmenter(truth)
    prompts = box_prompts(truth, 12)
    prompts.boxes += box_prompts(truth, 20).boxes + box_prompts(truth, 26).boxes
    res = propagate_2d(seg, SHAPE, SPACING, prompts, PropagationParams(min_area_mm2=0, min_area_fraction=0))
    ks = np.flatnonzero(res.mask.any(axis=(1, 2)))
    assert (ks[0], ks[-1]) == (12, 26)  # filled between the boxes, nothing beyond them
    assert np.array_equal(res.mask[12:27], truth[12:27])
    assert "lowest prompted slice" in res.stop_reasons["down"] and "highest prompted slice" in res.stop_reasons["up"]
    assert not any(k < 12 or k > 26 for k in seg.segmented)  # never even looked beyond


def test_two_separate_objects_with_one_anchor_each():
    truth = ellipsoid(SHAPE, (8, 20, 20), (3.4, 6, 6)) | ellipsoid(SHAPE, (30, 44, 44), (4.4, 6, 6))
    seg = FakeSegmenter(truth)
    prompts = box_prompts(truth, 8)
    prompts.boxes += box_prompts(truth, 30).boxes
    res = propagate_2d(seg, SHAPE, SPACING, prompts, PropagationParams(min_area_mm2=0, min_area_fraction=0))
    assert np.array_equal(res.mask, truth)


def test_honours_maximum_extent():
    truth = np.zeros(SHAPE, bool)
    truth[:, 20:40, 20:40] = True  # a column through the whole volume
    seg = FakeSegmenter(truth)
    res = propagate_2d(seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(max_extent_mm=12.0))
    assert res.slice_range == (16, 24)  # 4 slices of 3 mm each way
    assert max(abs(k - 20) for k in seg.segmented) == 4, "segmented beyond the maximum extent"
    assert "maximum extent 12 mm" in res.stop_reasons["up"]
    assert "maximum extent 12 mm" in res.stop_reasons["down"]


def test_never_leaves_the_volume():
    truth = np.zeros(SHAPE, bool)
    truth[:, 50:, :14] = True  # touches the first and last slice and two image borders
    seg = FakeSegmenter(truth)  # asserts every slice and box lies inside the volume
    prompts = TargetPrompts("", "GTV_AI", boxes=[BoxPrompt(3, 48, -5, 70, 15)])  # box sticks out
    res = propagate_2d(seg, SHAPE, SPACING, prompts, PropagationParams(margin_mm=10, max_extent_mm=1000))
    assert np.array_equal(res.mask, truth)
    assert "last slice of the volume" in res.stop_reasons["up"]
    assert "first slice of the volume" in res.stop_reasons["down"]
    assert min(seg.segmented) == 0 and max(seg.segmented) == SHAPE[0] - 1
    with pytest.raises(ValueError, match="outside the volume"):
        propagate_2d(seg, SHAPE, SPACING, TargetPrompts("", "X", boxes=[BoxPrompt(40, 1, 1, 5, 5)]))


def _cone() -> np.ndarray:
    """Square cross-sections shrinking away from slice 20: side 21 px at k=20, 2 px less per slice."""
    truth = np.zeros(SHAPE, bool)
    for k in range(SHAPE[0]):
        half = 10 - abs(k - 20)
        if half >= 0:
            truth[k, 32 - half : 33 + half, 32 - half : 33 + half] = True
    return truth


def test_min_area_stop():
    truth = _cone()  # areas (1 mm pixels): 441 at k=20, 361, 289, 225, 169, 121, 81, 49, 25, 9, 1
    seg = FakeSegmenter(truth)
    res = propagate_2d(
        seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(min_area_mm2=30, min_area_fraction=0)
    )
    assert res.slice_range == (13, 27)  # area 49 kept, 25 < 30 stops
    assert "below the minimum 30 mm2" in res.stop_reasons["up"]
    assert not res.mask[28].any() and not res.mask[12].any()


def test_min_area_fraction_stop():
    truth = _cone()
    seg = FakeSegmenter(truth)
    res = propagate_2d(
        seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(min_area_mm2=0, min_area_fraction=0.25)
    )
    # 0.25 * 441 = 110.25: 121 kept (k = 15, 25), 81 stops
    assert res.slice_range == (15, 25)
    assert "below 0.25 of the prompted slice's 441.0 mm2" in res.stop_reasons["down"]


def test_point_prompts_drive_propagation():
    truth = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))
    truth |= ellipsoid(SHAPE, (20, 10, 10), (3.0, 4, 4))  # a second object the click must not pick
    seg = FakeSegmenter(truth)
    prompts = TargetPrompts("", "GTV_AI", points=[PointPrompt(20, 32.0, 32.0, True)])
    res = propagate_2d(seg, SHAPE, SPACING, prompts, PropagationParams(min_area_mm2=0, min_area_fraction=0))
    first = seg.calls[0]
    assert first[0] == 20 and first[1] is None and first[2] == ((32.0, 32.0, True),)
    expected = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))
    assert np.array_equal(res.mask, expected)
    # the mask's bounding box (plus margin) is what the neighbours got
    call21 = next(c for c in seg.calls if c[0] == 21)
    assert call21[1] == expand_box(bounding_box(expected[20]), 3.0, (1.0, 1.0), (64, 64))


def test_box_with_points_and_negative_click():
    truth = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))
    truth |= ellipsoid(SHAPE, (20, 32, 47), (2.0, 3, 3))  # a nodule touching the box, not wanted
    seg = FakeSegmenter(truth)
    prompts = TargetPrompts(
        "",
        "GTV_AI",
        boxes=[BoxPrompt(20, 18, 18, 46, 51)],
        points=[PointPrompt(20, 32, 32, True), PointPrompt(20, 32, 48, False)],
    )
    res = propagate_2d(seg, SHAPE, SPACING, prompts, PropagationParams(min_area_mm2=0, min_area_fraction=0))
    assert seg.calls[0][2] == ((32, 32, True), (32, 48, False))
    assert not res.mask[20, 32, 47], "the negative click was ignored"
    assert res.mask[20, 32, 32]


def test_post_processing_fills_holes_and_keeps_connected_component():
    tumour = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))  # slices 14..26; rows 28..36 on 26
    hollow = tumour & ~ellipsoid(SHAPE, (20, 32, 32), (3.4, 4, 4))  # a hole in slices 17..23
    blob = np.zeros(SHAPE, bool)
    blob[27:32, 25:27, 25:27] = True  # inside the box of slice 27, not touching the tumour
    assert not (ndimage.binary_dilation(tumour, np.ones((3, 3, 3))) & blob).any()
    seg = FakeSegmenter(hollow | blob)
    res = propagate_2d(
        seg, SHAPE, SPACING, box_prompts(tumour, 20), PropagationParams(min_area_mm2=0, min_area_fraction=0)
    )
    assert 31 in seg.segmented  # the walk did follow the blob; post-processing removed it
    assert np.array_equal(res.mask, tumour), "holes not filled or blob kept"
    assert max(res.slice_scores) == 26


def test_scores_are_exposed_per_slice():
    truth = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))
    seg = FakeSegmenter(truth, scores={k: 1.0 - abs(k - 20) / 10 for k in range(40)})
    res = propagate_2d(
        seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(min_area_mm2=0, min_area_fraction=0, min_score=0)
    )
    assert res.slice_scores[20] == pytest.approx(1.0)
    assert res.slice_scores[26] == pytest.approx(0.4)
    assert set(res.slice_scores) == set(res.slice_areas_mm2) == set(range(14, 27))


def test_a_low_predicted_iou_ends_the_walk():
    truth = ellipsoid(SHAPE, (20, 32, 32), (12.4, 12, 10))  # slices 8..32
    seg = FakeSegmenter(truth, scores={k: 1.0 - abs(k - 20) / 10 for k in range(40)})
    res = propagate_2d(seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(min_score=0.7))
    assert res.slice_range == (17, 23)  # predicted IoU 0.7 and more
    assert "predicted IoU 0.60 on slice 24 below 0.7" in res.stop_reasons["up"]
    assert "predicted IoU 0.60 on slice 16" in res.stop_reasons["down"]


def test_intensity_leaving_the_prompted_slices_ends_the_walk():
    truth = np.zeros(SHAPE, bool)
    truth[:, 20:40, 20:40] = True  # the model follows a column through the whole volume ...
    images = np.random.default_rng(0).normal(100, 5, SHAPE).clip(0, 255).astype(np.uint8)
    images[26:, 20:40, 20:40] += 60  # ... but from slice 26 on it is another tissue
    seg = FakeSegmenter(truth)
    res = propagate_2d(seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(), images=images)
    assert res.slice_range[1] == 25
    assert "mean intensity on slice 26 is" in res.stop_reasons["up"] and "left the tumour" in res.stop_reasons["up"]
    off = propagate_2d(
        seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(max_intensity_shift=0), images=images
    )
    assert off.slice_range[1] > 25  # the rule turned off


def test_prefetch_announces_slices_before_they_are_segmented():
    truth = ellipsoid(SHAPE, (20, 32, 32), (10.4, 12, 10))
    seg = FakeSegmenter(truth)
    propagate_2d(seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(prefetch_batch=4, min_area_fraction=0))
    announced = [k for batch in seg.prefetched for k in batch]
    assert seg.prefetched[0] == [20]
    assert all(len(b) <= 4 for b in seg.prefetched)
    assert set(seg.segmented) <= set(announced)


def test_segmenter_can_stop_the_walk_and_guided_segmenter_gets_previous_mask():
    truth = ellipsoid(SHAPE, (20, 32, 32), (8.4, 12, 10))

    class Guided(FakeSegmenter):
        def __init__(self, truth):
            super().__init__(truth)
            self.guided: list[tuple[int, int, int]] = []

        def segment_next(self, k, box, *, previous_k, previous_mask, anchor_k):
            assert np.array_equal(previous_mask, self.truth[previous_k])
            self.guided.append((k, previous_k, anchor_k))
            if k == 24:
                raise StopPropagation("intensity model no longer fits")
            return self.segment_slice(k, box)

    seg = Guided(truth)
    res = propagate_2d(
        seg, SHAPE, SPACING, box_prompts(truth, 20), PropagationParams(min_area_mm2=0, min_area_fraction=0)
    )
    assert (21, 20, 20) in seg.guided and (19, 20, 20) in seg.guided
    assert res.slice_range == (12, 23)
    assert res.stop_reasons["up"] == "segmenter stopped at slice 24: intensity model no longer fits"


def test_empty_anchor_and_empty_prompts():
    truth = ellipsoid(SHAPE, (20, 32, 32), (6.4, 12, 10))
    seg = FakeSegmenter(truth)
    prompts = TargetPrompts("", "GTV_AI", boxes=[BoxPrompt(5, 1, 1, 8, 8)])  # nothing there
    res = propagate_2d(seg, SHAPE, SPACING, prompts)
    assert not res.mask.any()
    assert res.warnings == ["the prompt on slice 5 gave an empty mask"]
    with pytest.raises(ValueError, match="no box and no positive point"):
        propagate_2d(seg, SHAPE, SPACING, TargetPrompts("", "X", points=[PointPrompt(3, 1, 1, False)]))


def test_params_from_options():
    p = PropagationParams.from_options(SegmentOptions(margin_mm=5, max_extent_mm=30), prefetch_batch=2)
    assert (p.margin_mm, p.max_extent_mm, p.min_area_mm2, p.prefetch_batch) == (5, 30, 4.0, 2)
    with pytest.raises(ValueError):
        PropagationParams(min_area_fraction=1.5)
