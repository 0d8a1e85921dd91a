"""Image volumes: a voxel array with its geometry and per-slice SOP Instance UIDs.

A :class:`Volume` is what the engines segment. It is built from DICOM files by
:func:`rtstruct.series.load_series` (``inference`` itself reads no DICOM files: see the
layering in README's layout section) or around plain arrays (an NPZ case of
``dicom-node convert``, a synthetic phantom).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.geometry import Geometry


@dataclass
class Volume:
    """A 3D image: ``array[k, i, j]`` (slice, row, column), see :mod:`inference.geometry`.

    ``array`` holds the stored values after Rescale Slope/Intercept (Hounsfield units for
    CT). ``sop_instance_uids[k]`` is the SOP Instance UID of slice ``k``.
    ``attributes`` carries the DICOM attributes (keyword -> value) of the patient, study,
    series and equipment modules that an RTSTRUCT written on this volume must copy; it is
    the only piece of DICOM a volume carries.
    """

    array: np.ndarray
    geometry: Geometry
    sop_instance_uids: tuple[str, ...]
    modality: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} != geometry shape {self.geometry.shape}")
        if len(self.sop_instance_uids) != self.geometry.shape[0]:
            raise ValueError("one SOP Instance UID per slice is required")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    def slice_index_of(self, sop_instance_uid: str) -> int | None:
        try:
            return self.sop_instance_uids.index(sop_instance_uid)
        except ValueError:
            return None
