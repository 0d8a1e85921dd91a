"""The partial-volume rim of a CT tumour in lung, which a soft-tissue window hides.

A SAM-family model sees a CT in a soft-tissue window (40/400: -160..240 HU). A voxel on the
border of a tumour in lung is part tumour (about 0..100 HU), part lung (about -850 HU); its
value lies between the two, and a voxel that is half tumour (about -400 HU) is clipped to
black like the lung itself. The model's edge therefore lies inside the tumour's surface by
up to a voxel, and the smaller the tumour the more that costs: on the CT phantoms, with a
box from the truth on every slice, LiteMedSAM's masks held 0.57-0.88 of the truth's volume
and a one-voxel rim was missing all round.

:func:`add_lung_rim` adds it back on each slice by the usual definition of an edge (the
half-way level between the two tissues): it grows the mask by at most ``rim_mm`` into
pixels that are at least half tumour and touch a pixel that is less than half (the lung
side). The tumour's level is the median of the mask's interior, the lung's the median of
the pixels around the mask more than 400 HU below it; a slice with no such neighbours
(a tumour against the mediastinum or the chest wall) is left as it is. Measured with
``benchmarks/partial_volume.py``; the numbers are in the README ("Where a tumour ends").
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["LUNG_CONTRAST_HU", "add_lung_rim", "add_lung_rim_slice"]

#: A neighbour counts as lung when it is at least this far (HU) below the tumour's level.
LUNG_CONTRAST_HU = 400.0
#: Neighbours are looked for this far (mm) around the mask.
RING_MM = 4.0
#: Fewer lung neighbours than this: the slice is left as it is.
MIN_LUNG_PIXELS = 5

_CROSS = ndimage.generate_binary_structure(2, 1)


def add_lung_rim_slice(mask: np.ndarray, hu: np.ndarray, spacing_yx: tuple[float, float], rim_mm: float) -> np.ndarray:
    """One slice: ``mask`` (bool, y x) grown into its partial-volume rim towards lung (see the module)."""
    if rim_mm <= 0 or not mask.any():
        return mask
    pixel = float(min(spacing_yx))
    core = ndimage.binary_erosion(mask, _CROSS)
    tumour = float(np.median(hu[core if core.any() else mask]))
    ring = ndimage.binary_dilation(mask, _CROSS, iterations=max(1, int(round(RING_MM / pixel)))) & ~mask
    around = hu[ring]
    lung_values = around[around < tumour - LUNG_CONTRAST_HU]
    if lung_values.size < MIN_LUNG_PIXELS:
        return mask
    half = 0.5 * (tumour + float(np.median(lung_values)))
    below = hu < half
    allowed = ~below & ndimage.binary_dilation(below, _CROSS)
    steps = max(1, int(round(rim_mm / pixel)))
    return ndimage.binary_dilation(mask, _CROSS, iterations=steps, mask=allowed | mask)


def add_lung_rim(mask: np.ndarray, hu: np.ndarray, spacing: tuple[float, float, float], rim_mm: float) -> np.ndarray:
    """Every slice of ``mask`` (bool, z y x) with its rim; ``hu`` is the CT in Hounsfield units."""
    if mask.shape != hu.shape:
        raise ValueError(f"mask {mask.shape} and CT {hu.shape} differ in shape")
    out = mask.copy()
    if rim_mm <= 0:
        return out
    spacing_yx = (float(spacing[1]), float(spacing[2]))
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        out[k] = add_lung_rim_slice(mask[k], hu[k].astype(np.float32, copy=False), spacing_yx, rim_mm)
    return out
