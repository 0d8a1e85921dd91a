"""Image volumes: a voxel array with its geometry and per-slice image references.

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
    CT). ``sop_instance_uids[k]`` is the SOP Instance UID of slice ``k``. A volume built
    from multi-frame images (Enhanced CT/MR, Legacy Converted Enhanced) has one slice per
    frame: ``sop_instance_uids[k]`` is then the UID of the instance that holds slice ``k``
    (the same UID for every frame of one instance) and ``frame_numbers[k]`` its frame
    number in that instance (1-based, as DICOM's ReferencedFrameNumber counts); a volume of
    single-frame images has no ``frame_numbers`` (an empty tuple). :meth:`image_reference`
    gives both for one slice, which is what a reference to the slice must carry.
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
    frame_numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} != geometry shape {self.geometry.shape}")
        if len(self.sop_instance_uids) != self.geometry.shape[0]:
            raise ValueError("one SOP Instance UID per slice is required")
        self.frame_numbers = tuple(int(n) for n in self.frame_numbers)
        if self.frame_numbers and len(self.frame_numbers) != self.geometry.shape[0]:
            raise ValueError("frame_numbers needs one frame number per slice (or none at all)")
        if any(n < 1 for n in self.frame_numbers):
            raise ValueError("frame numbers start at 1")
        if self.frame_numbers and len(set(self.image_references())) != self.geometry.shape[0]:
            raise ValueError("two slices are the same frame of one image")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def multi_frame(self) -> bool:
        """Whether the slices are frames of multi-frame images."""
        return bool(self.frame_numbers)

    def image_reference(self, k: int) -> tuple[str, int | None]:
        """(SOP Instance UID, frame number or None) of slice ``k``."""
        return self.sop_instance_uids[k], (self.frame_numbers[k] if self.frame_numbers else None)

    def image_references(self) -> list[tuple[str, int | None]]:
        """:meth:`image_reference` of every slice, in slice order."""
        return [self.image_reference(k) for k in range(len(self.sop_instance_uids))]

    def slice_index_of(self, sop_instance_uid: str, frame_number: int | None = None) -> int | None:
        """The slice of an image (single-frame) or of one frame of a multi-frame image;
        without ``frame_number``, the first slice from that instance. None if not here."""
        for k, reference in enumerate(self.image_references()):
            if reference[0] == sop_instance_uid and (frame_number is None or reference[1] == frame_number):
                return k
        return None
