"""The ``sam2`` engine: SAM2 / SAM2.1 / MedSAM2 / fine-tuned checkpoints, 2D or 3D.

Built once per process by :func:`inference.engine.get_engine` (``get_engine("sam2",
checkpoint=..., model_cfg=..., device=...)``); the engine keeps its model, and a lock
serialises its use. Configuration (all hashable, all optional except that a checkpoint
is required unless random weights are explicitly allowed):

``checkpoint``
    path of the weights; formats: see :mod:`inference.sam2_models`.
``model_cfg``
    SAM2 config name or YAML path, default ``sam2.1_hiera_t512`` (the MedSAM2 schema).
    It must match the checkpoint: a 512-pixel MedSAM2 checkpoint has the same tensors as
    a 1024-pixel SAM2.1 tiny one, so the mistake cannot be detected from the weights.
``image_size``
    input resolution override (None: the config's).
``device``
    ``"cuda"``, ``"cuda:1"``, ``"cpu"`` or None (CUDA when present, else CPU with a warning).
``batch_size``
    slices encoded per forward pass of the image encoder (default 8).
``precision``
    ``"bf16"`` (default; autocast on CUDA, ignored on CPU) or ``"fp32"``.
``object_score_stop``
    2D mode: stop a walk when SAM2.1's object head says the object is gone (default True).
``allow_random_weights``
    tests and benchmarks only: run without a checkpoint, with randomly initialised
    weights (``random_seed``). Loudly logged, and the algorithm name says so.

Modes: ``box2d`` runs :func:`inference.propagation.propagate_2d` with a
:class:`~inference.sam2_features.Sam2SliceSegmenter`; ``video3d`` runs
:func:`inference.sam2_video.propagate_3d`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from inference.engine import ENGINES, Engine, SegmentationError, SegmentationResult, SegmentOptions
from inference.prompts import TargetPrompts
from inference.sam2_models import (
    CheckpointInfo,
    Sam2ModelError,
    build_model,
    load_checkpoint,
    resolve_model_config,
    sam2_package_version,
)
from inference.volume import Volume

log = logging.getLogger(__name__)

DEFAULT_MODEL_CFG = "sam2.1_hiera_t512"
ALGORITHM_NAME_MAX = 64  # AlgorithmName (0066,0036) is LO


def _fit(text: str, limit: int = ALGORITHM_NAME_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"


def resolve_device(device: str | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; an unavailable CUDA request is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise Sam2ModelError(f"invalid device {device!r}: use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Sam2ModelError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise Sam2ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise Sam2ModelError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return dev


class Sam2Engine(Engine):
    name = "sam2"

    def __init__(
        self,
        checkpoint: str | None = None,
        model_cfg: str | None = None,
        device: str | None = None,
        image_size: int | None = None,
        batch_size: int = 8,
        precision: str = "bf16",
        object_score_stop: bool = True,
        allow_random_weights: bool = False,
        random_seed: int = 0,
        **unknown,
    ) -> None:
        if unknown:
            known = ["checkpoint", "model_cfg", "device", *sorted(ENGINES["sam2"].rule_options)]
            raise Sam2ModelError(
                f"unknown sam2 engine option(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(known)}; tests only: allow_random_weights, random_seed)"
            )
        self.version = f"sam2 {sam2_package_version()}"
        self.model_cfg = model_cfg or DEFAULT_MODEL_CFG
        if precision not in ("bf16", "fp32"):
            raise Sam2ModelError(f"precision must be bf16 or fp32, got {precision!r}")
        if int(batch_size) < 1:
            raise Sam2ModelError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.object_score_stop = bool(object_score_stop)
        self.spec = resolve_model_config(self.model_cfg, int(image_size) if image_size else None)
        self.device = resolve_device(device)
        self.checkpoint_info: CheckpointInfo | None = None
        self.random_weights = checkpoint is None
        self.warnings: list[str] = []
        if checkpoint is None and not allow_random_weights:
            raise Sam2ModelError(
                "engine sam2 needs a checkpoint (the path of the model weights); refusing to run "
                "with randomly initialised weights (allow_random_weights is for tests only)"
            )
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise Sam2ModelError(f"checkpoint not found: {checkpoint}")

        self.autocast_dtype: torch.dtype | None = None
        if self.device.type == "cuda" and precision == "bf16":
            if torch.cuda.is_bf16_supported():
                self.autocast_dtype = torch.bfloat16
            else:
                self.warnings.append("this GPU has no bfloat16 support: SAM2 runs in float32")
        if self.device.type == "cpu":
            msg = "SAM2 runs on the CPU (no CUDA device): expect minutes per case"
            log.warning(msg)
            self.warnings.append(msg)

        t0 = time.perf_counter()
        self.model = build_model(self.spec, device="cpu", seed=random_seed if checkpoint is None else None)
        if checkpoint is not None:
            self.checkpoint_info = load_checkpoint(self.model, checkpoint, model_name=self.spec.name)
        else:
            banner = (
                f"SAM2 ENGINE WITH RANDOMLY INITIALISED WEIGHTS (seed {random_seed}): "
                "output is meaningless, for tests and benchmarks only"
            )
            log.warning("!" * 20 + " " + banner + " " + "!" * 20)
            self.warnings.append(banner)
        self.model = self.model.to(self.device)
        self.model.eval()
        self._lock = threading.Lock()
        log.info(
            "SAM2 model %s ready on %s in %.1f s (%s)",
            self.spec.name,
            self.device,
            time.perf_counter() - t0,
            self.algorithm_name,
        )

    # -- identity ----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @property
    def algorithm_name(self) -> str:
        """Model and weights, as written into the RTSTRUCT (at most 64 characters)."""
        if self.checkpoint_info is None:
            return _fit(f"SAM2 {self.spec.name} RANDOM WEIGHTS (not for clinical use)")
        info = self.checkpoint_info
        tail = f" sha256:{info.sha256[:12]}"
        head = f"SAM2 {self.spec.name} "
        room = ALGORITHM_NAME_MAX - len(head) - len(tail)
        return head + _fit(Path(info.path).name, max(room, 8)) + tail

    # -- running -----------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def segment(self, volume: Volume, prompts: TargetPrompts, options: SegmentOptions) -> SegmentationResult:
        from inference import preprocess

        t0 = time.perf_counter()
        if prompts.is_empty():
            raise SegmentationError(f"target {prompts.target!r}: no box and no positive point to start from")
        nz = volume.shape[0]
        outside = [k for k in prompts.anchor_slices if not 0 <= k < nz]
        if outside:
            raise SegmentationError(f"target {prompts.target!r}: prompts on slices {outside} outside 0..{nz - 1}")
        if options.mode not in ("box2d", "video3d"):
            raise SegmentationError(f"unknown mode {options.mode!r} (box2d or video3d)")
        try:
            images = preprocess.prepare(volume, options.window)
        except ValueError as exc:
            raise SegmentationError(f"cannot preprocess the volume: {exc}") from exc
        warnings = list(self.warnings)
        with self._lock:
            try:
                with torch.inference_mode(), self._autocast():
                    if options.mode == "box2d":
                        mask, scores, stops, extra = self._segment_2d(images.gray, volume, prompts, options)
                    else:
                        mask, scores, stops, extra = self._segment_3d(images.gray, volume, prompts, options)
            except SegmentationError:
                raise
            except ValueError as exc:
                raise SegmentationError(f"target {prompts.target!r}: {exc}") from exc
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                raise SegmentationError(
                    f"SAM2 ran out of GPU memory ({self.device}); lower batch_size (now {self.batch_size})"
                ) from exc
            except RuntimeError as exc:
                raise SegmentationError(f"SAM2 inference failed: {exc}") from exc
        warnings += extra
        seconds = time.perf_counter() - t0
        log.info(
            "SAM2 %s target %r: %d slices in %.1f s; stopped up: %s; down: %s",
            options.mode,
            prompts.target,
            int(mask.any(axis=(1, 2)).sum()),
            seconds,
            stops.get("up"),
            stops.get("down"),
        )
        if not mask.any():
            raise SegmentationError(
                f"SAM2 ({self.spec.name}) produced an empty mask for target {prompts.target!r} "
                f"on prompted slice(s) {prompts.anchor_slices}" + (f": {'; '.join(extra)}" if extra else "")
            )
        return SegmentationResult(
            mask=mask,
            slice_scores=scores,
            engine=self.name,
            engine_version=self.version,
            algorithm_name=self.algorithm_name,
            mode=options.mode,
            seconds=seconds,
            warnings=warnings,
            stop_reasons=dict(stops),
        )

    def _segment_2d(self, gray: np.ndarray, volume: Volume, prompts: TargetPrompts, options: SegmentOptions):
        from inference.propagation import PropagationParams, propagate_2d
        from inference.sam2_features import Sam2SliceSegmenter, SliceFeatureCache

        cache = SliceFeatureCache(self.model, gray, device=self.device, batch_size=self.batch_size)
        segmenter = Sam2SliceSegmenter(cache, prompts.anchor_slices, object_score_stop=self.object_score_stop)
        params = PropagationParams.from_options(options, prefetch_batch=self.batch_size)
        result = propagate_2d(segmenter, volume.shape, volume.spacing, prompts, params, images=gray)
        log.debug(
            "SAM2 2D: %d slices encoded in %d batches, peak %d cached",
            cache.stats.encoded,
            cache.stats.batches,
            cache.stats.peak_cached,
        )
        return result.mask, result.slice_scores, result.stop_reasons, list(result.warnings)

    def _segment_3d(self, gray: np.ndarray, volume: Volume, prompts: TargetPrompts, options: SegmentOptions):
        from inference.sam2_video import VideoParams, propagate_3d

        params = VideoParams.from_options(options, batch_size=self.batch_size)
        result = propagate_3d(self.model, gray, volume.spacing, prompts, params)
        log.debug(
            "SAM2 3D: frames %s, %d decoded, %d slices encoded",
            result.frame_range,
            result.frames_decoded,
            result.slices_encoded,
        )
        return result.mask, result.slice_scores, result.stop_reasons, list(result.warnings)
