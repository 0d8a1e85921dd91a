"""Intensity preprocessing: stored values to uint8 slices, as SAM2 (and the classic engine) take them.

* CT: a window (level, width) in HU, default 40/400 (soft tissue), per call:
  ``[level - width/2, level + width/2]`` maps linearly onto 0..255, values outside clip.
* MR (and any other modality): the 0.5 and 99.5 percentiles of the *nonzero* voxels map
  onto 0 and 255 (zeros are the air/background outside the body in most MR series and
  would drag the lower percentile down).

Geometry never changes: the uint8 volume is the same (z, y, x) grid as the input, one
byte per voxel. RGB slices ``(ny, nx, 3)`` are made on demand, per slice or per batch,
so a 300-slice 512x512 volume is not tripled in memory up front.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.geometry import Geometry

DEFAULT_CT_WINDOW = (40.0, 400.0)
MR_PERCENTILES = (0.5, 99.5)
_CHUNK = 16  # slices converted at a time


def window_to_uint8(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """Linear map of ``[level - width/2, level + width/2]`` onto 0..255 (clipped), rounded."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    array = np.asarray(array)
    lo = np.float32(level - width / 2.0)
    scale = np.float32(255.0 / width)
    out = np.empty(array.shape, dtype=np.uint8)
    flat_in = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
    flat_out = out.reshape(flat_in.shape)
    for start in range(0, flat_in.shape[0], _CHUNK):  # bounded float32 temporaries
        part = (flat_in[start : start + _CHUNK].astype(np.float32) - lo) * scale
        np.clip(part, 0, 255, out=part)
        flat_out[start : start + _CHUNK] = np.rint(part)
    return out


def percentile_range(array: np.ndarray, percentiles: tuple[float, float] = MR_PERCENTILES) -> tuple[float, float]:
    """(low, high) percentiles of the nonzero voxels; (0, 0) when every voxel is zero."""
    a = np.asarray(array)
    nonzero = a[a != 0]
    if nonzero.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(nonzero.astype(np.float32), percentiles)
    return float(lo), float(hi)


def percentile_to_uint8(array: np.ndarray, percentiles: tuple[float, float] = MR_PERCENTILES) -> np.ndarray:
    """The range of :func:`percentile_range` onto 0..255 (clipped). A constant image gives
    255 where it equals the constant and is nonzero, 0 elsewhere."""
    lo, hi = percentile_range(array, percentiles)
    a = np.asarray(array, dtype=np.float32)
    if hi <= lo:
        return np.where((a >= hi) & (a != 0), 255, 0).astype(np.uint8)
    return window_to_uint8(a, (lo + hi) / 2.0, hi - lo)


def to_uint8(array: np.ndarray, modality: str, window: tuple[float, float] | None = None) -> np.ndarray:
    """CT: ``window`` (level, width), default 40/400. Other modalities: ``window`` when
    given (in stored units), else the MR percentile rule."""
    if window is not None:
        return window_to_uint8(array, float(window[0]), float(window[1]))
    if modality.upper() == "CT":
        return window_to_uint8(array, *DEFAULT_CT_WINDOW)
    return percentile_to_uint8(array)


def parse_window(value) -> tuple[float, float]:
    """A CT window (level, width) in HU from what a user writes; ValueError with the reason.

    Accepted: ``"40,400"`` (also ``"40/400"`` or ``"40 400"``), ``[40, 400]`` and
    ``{"level": 40, "width": 400}``. The width must be a positive number.
    """
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,/\s]+", value.strip()) if p]
        if len(parts) != 2:
            raise ValueError(f"window {value!r}: write it as LEVEL,WIDTH, for example 40,400")
        value = parts
    elif isinstance(value, dict):
        if set(value) != {"level", "width"}:
            raise ValueError("window as a mapping needs exactly 'level' and 'width'")
        value = [value["level"], value["width"]]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"window must be [level, width] in HU, for example [40, 400], not {value!r}")
    try:
        level, width = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise ValueError(f"window values must be two numbers LEVEL,WIDTH, not {value!r}") from None
    if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
        raise ValueError(f"window width must be a positive number (got {value!r})")
    return level, width


@dataclass
class SliceImages:
    """A volume as uint8 (z, y, x) on the unchanged grid, with RGB slices on demand."""

    gray: np.ndarray  # uint8 (z, y, x)
    geometry: Geometry | None = None
    window: tuple[float, float] | None = None  # the (level, width) actually applied, if any

    def __post_init__(self) -> None:
        if self.gray.dtype != np.uint8 or self.gray.ndim != 3:
            raise ValueError("gray must be a uint8 (z, y, x) array")
        if self.geometry is not None and tuple(self.gray.shape) != self.geometry.shape:
            raise ValueError(f"gray shape {self.gray.shape} != geometry shape {self.geometry.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.gray.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.gray.shape[0]

    def rgb(self, k: int) -> np.ndarray:
        """Slice ``k`` as (ny, nx, 3) uint8 (a new array)."""
        if not 0 <= k < self.gray.shape[0]:
            raise IndexError(f"slice {k} outside 0..{self.gray.shape[0] - 1}")
        return np.repeat(self.gray[k][:, :, None], 3, axis=2)

    def rgb_batch(self, ks: Sequence[int]) -> np.ndarray:
        """Slices ``ks`` as (n, ny, nx, 3) uint8."""
        ks = list(ks)
        for k in ks:
            if not 0 <= k < self.gray.shape[0]:
                raise IndexError(f"slice {k} outside 0..{self.gray.shape[0] - 1}")
        return np.repeat(self.gray[ks][..., None], 3, axis=3)


def prepare(volume, window: tuple[float, float] | None = None) -> SliceImages:
    """A :class:`~inference.volume.Volume` to :class:`SliceImages` by its modality's rule."""
    applied = window
    if window is None and volume.modality.upper() == "CT":
        applied = DEFAULT_CT_WINDOW
    gray = to_uint8(volume.array, volume.modality, window)
    return SliceImages(gray=gray, geometry=volume.geometry, window=applied)
