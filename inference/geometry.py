"""Geometry of a 3D image volume in the DICOM patient coordinate system.

Conventions, used everywhere in this project (the reason they are spelled out: mixing
axis orders is the classic bug of medical imaging code):

* Arrays are indexed ``[k, i, j]`` = ``[slice, row, column]`` = ``(z, y, x)``.
* ``spacing`` is ``(dz, dy, dx)`` in mm, in that same order: slice spacing, distance
  between rows (DICOM PixelSpacing[0]) and distance between columns (PixelSpacing[1]).
* ``direction`` is a 3x3 matrix whose *rows* are unit vectors in patient coordinates
  (LPS, mm) of the index axes, again in ``(z, y, x)`` order:
  ``direction[0]`` = slice normal (increasing slice index),
  ``direction[1]`` = column direction cosines, ImageOrientationPatient[3:6]
  (increasing row index), ``direction[2]`` = row direction cosines,
  ImageOrientationPatient[0:3] (increasing column index).
* ``origin`` is the patient position (x, y, z) of the *centre* of voxel ``[0, 0, 0]``,
  which is the ImagePositionPatient of the first slice.

So a continuous voxel index ``idx = (k, i, j)`` maps to patient coordinates
``p = origin + (idx * spacing) @ direction``. Oblique orientations are normal: nothing
here assumes an identity direction matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Geometry:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        origin.setflags(write=False)
        direction.setflags(write=False)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes, got {self.shape}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
            raise ValueError("direction must be orthonormal")

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_dicom(
        cls,
        first_position: np.ndarray,
        orientation: np.ndarray,
        pixel_spacing: tuple[float, float],
        slice_spacing: float,
        shape: tuple[int, int, int],
    ) -> Geometry:
        """From the first slice's ImagePositionPatient, ImageOrientationPatient,
        PixelSpacing, the slice spacing and the (slices, rows, columns) shape."""
        orientation = np.asarray(orientation, dtype=np.float64).reshape(6)
        row_dir = orientation[:3] / np.linalg.norm(orientation[:3])
        col_dir = orientation[3:] / np.linalg.norm(orientation[3:])
        normal = np.cross(row_dir, col_dir)
        direction = np.stack([normal, col_dir, row_dir])
        spacing = (float(slice_spacing), float(pixel_spacing[0]), float(pixel_spacing[1]))
        return cls(shape=shape, spacing=spacing, origin=first_position, direction=direction)

    # -- DICOM views ---------------------------------------------------------------
    @property
    def image_orientation(self) -> list[float]:
        """ImageOrientationPatient: row direction cosines, then column direction cosines."""
        return [*self.direction[2].tolist(), *self.direction[1].tolist()]

    @property
    def pixel_spacing(self) -> list[float]:
        """PixelSpacing: (row spacing, column spacing)."""
        return [self.spacing[1], self.spacing[2]]

    @property
    def normal(self) -> np.ndarray:
        return self.direction[0]

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (centre of its first voxel)."""
        return self.origin + k * self.spacing[0] * self.direction[0]

    # -- transforms ----------------------------------------------------------------
    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(k, i, j, 1)`` to ``(x, y, z, 1)``."""
        a = np.eye(4)
        a[:3, :3] = (self.direction * np.asarray(self.spacing)[:, None]).T
        a[:3, 3] = self.origin
        return a

    def index_to_patient(self, idx: np.ndarray) -> np.ndarray:
        """Continuous ``(k, i, j)`` indices, shape (N, 3) or (3,), to patient (x, y, z) mm."""
        idx = np.asarray(idx, dtype=np.float64)
        return self.origin + (idx * np.asarray(self.spacing)) @ self.direction

    def patient_to_index(self, points: np.ndarray) -> np.ndarray:
        """Patient (x, y, z) mm, shape (N, 3) or (3,), to continuous ``(k, i, j)`` indices."""
        points = np.asarray(points, dtype=np.float64)
        return ((points - self.origin) @ self.direction.T) / np.asarray(self.spacing)

    def contains_index(self, idx: np.ndarray, tol: float = 0.5) -> np.ndarray:
        """Whether continuous indices lie inside the volume (voxel centres +- ``tol``)."""
        idx = np.atleast_2d(np.asarray(idx, dtype=np.float64))
        upper = np.asarray(self.shape, dtype=np.float64) - 1 + tol
        return np.all((idx >= -tol) & (idx <= upper), axis=1)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def same_grid(self, other: Geometry, atol: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def __repr__(self) -> str:
        return (
            f"Geometry(shape={self.shape}, spacing={tuple(round(s, 4) for s in self.spacing)}, "
            f"origin={np.round(self.origin, 3).tolist()}, "
            f"direction={np.round(self.direction, 4).tolist()})"
        )
