"""The CT partial-volume rim (inference.partial_volume) and its place in the 2D walk."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference.partial_volume import add_lung_rim, add_lung_rim_slice
from inference.prompts import BoxPrompt, TargetPrompts
from inference.propagation import PropagationParams, propagate_2d

PIXEL = 1.5  # mm
TUMOUR_HU, LUNG_HU, MEDIASTINUM_HU = 85.0, -850.0, 35.0


def disc(shape, centre, radius):
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def blurred(truth: np.ndarray, inside: float, outside: float) -> np.ndarray:
    """A slice as a scanner sees it: sharp tissues, then a blur of 0.7 pixels."""
    image = np.where(truth, inside, outside).astype(np.float32)
    return ndimage.gaussian_filter(image, 0.7)


def dice(a, b):
    return 2 * int((a & b).sum()) / int(a.sum() + b.sum())


def test_rim_restores_a_tumour_in_lung_that_a_soft_tissue_window_shrank():
    truth = disc((64, 64), (32, 32), 9)
    hu = blurred(truth, TUMOUR_HU, LUNG_HU)
    shrunk = ndimage.binary_erosion(truth)  # a model's edge one pixel inside the surface
    grown = add_lung_rim_slice(shrunk, hu, (PIXEL, PIXEL), 1.5)
    assert dice(grown, truth) > dice(shrunk, truth) + 0.05
    assert dice(grown, truth) > 0.97
    # never into the lung proper: every added pixel is at least half tumour
    added = grown & ~shrunk
    assert added.any() and hu[added].min() >= 0.5 * (TUMOUR_HU + LUNG_HU) - 1e-3


def test_rim_is_bounded_by_rim_mm_and_off_at_zero():
    truth = disc((64, 64), (32, 32), 12)
    hu = blurred(truth, TUMOUR_HU, LUNG_HU)
    small = disc((64, 64), (32, 32), 6)  # far inside: many pixels between it and the edge
    assert np.array_equal(add_lung_rim_slice(small, hu, (PIXEL, PIXEL), 0), small)
    one = add_lung_rim_slice(small, hu, (PIXEL, PIXEL), 1.5)  # at most one pixel
    assert np.array_equal(one, small)  # its neighbours are pure tumour, not rim: nothing to add
    three = add_lung_rim_slice(ndimage.binary_erosion(truth, iterations=2), hu, (PIXEL, PIXEL), 1.5)
    assert not (three & ~ndimage.binary_erosion(truth, iterations=1)).any()


def test_no_rim_against_soft_tissue():
    """A tumour in the mediastinum (no lung around it) is left as it is; against a wall of
    mediastinum the rim goes only where the lung is."""
    truth = disc((64, 64), (32, 32), 9)
    hu = blurred(truth, TUMOUR_HU, MEDIASTINUM_HU)
    shrunk = ndimage.binary_erosion(truth)
    assert np.array_equal(add_lung_rim_slice(shrunk, hu, (PIXEL, PIXEL), 1.5), shrunk)

    wall = np.zeros((64, 64), dtype=bool)
    wall[:, 41:] = True  # mediastinum from column 41 on: the tumour (32 +- 9) touches it
    image = np.where(truth, TUMOUR_HU, np.where(wall, MEDIASTINUM_HU, LUNG_HU)).astype(np.float32)
    hu = ndimage.gaussian_filter(image, 0.7)
    grown = add_lung_rim_slice(shrunk & ~wall, hu, (PIXEL, PIXEL), 1.5)
    assert not (grown & wall).any()
    assert (grown & ~shrunk & ~wall).any()


def test_volume_rim_checks_shapes_and_keeps_empty_slices_empty():
    truth = np.zeros((5, 40, 40), dtype=bool)
    truth[1:4] = disc((40, 40), (20, 20), 7)
    hu = np.stack([blurred(t, TUMOUR_HU, LUNG_HU) for t in truth])
    shrunk = np.stack([ndimage.binary_erosion(t) for t in truth])
    grown = add_lung_rim(shrunk, hu, (2.5, PIXEL, PIXEL), 1.5)
    assert not grown[0].any() and not grown[4].any()
    assert grown.sum() > shrunk.sum() and shrunk.sum() == np.stack([ndimage.binary_erosion(t) for t in truth]).sum()
    with pytest.raises(ValueError, match="differ in shape"):
        add_lung_rim(shrunk, hu[:4], (2.5, PIXEL, PIXEL), 1.5)


class ShrinkingSegmenter:
    """A segmenter whose edge lies a pixel inside the truth's surface, like a model in a soft-tissue window."""

    def __init__(self, truth):
        self.truth = truth

    def prefetch(self, ks):
        pass

    def segment_slice(self, k, box=None, points=()):
        return ndimage.binary_erosion(self.truth[k]), 0.9


def test_walk_adds_the_rim_only_when_given_the_ct_values():
    truth = np.zeros((9, 48, 48), dtype=bool)
    truth[2:7] = disc((48, 48), (24, 24), 8)
    hu = np.stack([blurred(t, TUMOUR_HU, LUNG_HU) for t in truth])
    prompts = TargetPrompts(
        target="GTV", output_name="GTV_AI", boxes=[BoxPrompt(slice_index=4, i0=14, j0=14, i1=34, j1=34)]
    )
    seg = ShrinkingSegmenter(truth)
    spacing = (2.5, PIXEL, PIXEL)
    plain = propagate_2d(seg, truth.shape, spacing, prompts, PropagationParams(min_score=0))
    rim = propagate_2d(seg, truth.shape, spacing, prompts, PropagationParams(min_score=0), ct_values=hu)
    off = propagate_2d(seg, truth.shape, spacing, prompts, PropagationParams(min_score=0, ct_rim_mm=0), ct_values=hu)
    assert np.array_equal(off.mask, plain.mask)
    assert dice(rim.mask, truth) > dice(plain.mask, truth) + 0.05
    assert plain.slice_range == rim.slice_range == (2, 6)


def test_negative_rim_is_refused():
    with pytest.raises(ValueError, match="ct_rim_mm"):
        PropagationParams(ct_rim_mm=-1)
