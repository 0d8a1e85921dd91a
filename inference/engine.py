"""The contract between segmentation engines and their callers (node worker, CLI, study).

An engine turns a :class:`~inference.volume.Volume` and one target's prompts into a 3D
mask on the volume's grid. Engines are built once per process and reused
(:func:`get_engine`); building a SAM2 model is expensive.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from inference.prompts import TargetPrompts
from inference.volume import Volume

Mode = Literal["box2d", "video3d"]


class SegmentationError(RuntimeError):
    """The engine could not produce a result for these prompts; the message says why."""


@dataclass
class SegmentOptions:
    """Per-call settings (a rule's action fills these).

    ``window``: CT (level, width) in HU; ``None`` means 40/400 for CT and the 0.5-99.5
    percentile of nonzero voxels for MR. Propagation limits are in mm so that they mean
    the same on 1 mm and 5 mm slices.
    """

    mode: Mode = "box2d"
    window: tuple[float, float] | None = None
    margin_mm: float = 3.0
    min_area_mm2: float = 4.0
    min_area_fraction: float = 0.05
    max_extent_mm: float = 120.0


@dataclass
class SegmentationResult:
    mask: np.ndarray  # bool, (z, y, x), the volume's grid
    slice_scores: dict[int, float | None]  # per segmented slice: predicted IoU or engine score
    engine: str  # "classic" | "sam2"
    engine_version: str
    algorithm_name: str  # goes into ROIGenerationAlgorithm identification of the RTSTRUCT
    mode: str
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


class Engine(abc.ABC):
    name: str = "engine"
    version: str = "0"

    @property
    def algorithm_name(self) -> str:
        return f"{self.name} {self.version}"

    @abc.abstractmethod
    def segment(self, volume: Volume, prompts: TargetPrompts, options: SegmentOptions) -> SegmentationResult:
        """Segment one target; raise :class:`SegmentationError` with a reason on failure."""


_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(name: str, **config) -> Engine:
    """The process-wide engine for ``name`` and ``config`` (built on first use).

    ``config`` must be hashable values (paths as strings). Known names: ``classic``,
    ``sam2``, ``litemedsam``.
    """
    key = (name, tuple(sorted(config.items())))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            if name == "classic":
                from inference.engines.classic import ClassicEngine

                engine = ClassicEngine(**config)
            elif name == "sam2":
                from inference.engines.sam2 import Sam2Engine

                engine = Sam2Engine(**config)
            elif name == "litemedsam":
                from inference.engines.litemedsam import LiteMedSamEngine

                engine = LiteMedSamEngine(**config)
            else:
                raise ValueError(f"unknown engine {name!r} (known: classic, sam2, litemedsam)")
            _engines[key] = engine
        return engine
