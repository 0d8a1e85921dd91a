"""3D segmentation with SAM2's video predictor, fed from the in-memory volume.

No JPEG frames on disk: the inference state that ``SAM2VideoPredictor.init_state`` would
build from a folder of frames is built here from the preprocessed uint8 slices, and the
image features come from a :class:`~inference.sam2_features.SliceFeatureCache` that
encodes a batch of slices ahead of the front and evicts the slices behind it (SAM2's own
state keeps only one frame's features and encodes frames one by one).

Algorithm (as MedSAM2 and the reference code do it, with prompts instead of a contour):

1. Frames: only slices within ``max_extent_mm`` of a prompted slice are part of the
   "video" (the sub-volume ``lo..hi``); the rest is never encoded.
2. Objects: on each prompted slice the n-th box (sorted by position) belongs to object n;
   points go with the box that contains them (else object 0). Usually there is one box
   per slice and so one object.
3. Forward pass from the lowest prompted slice up to ``hi``; then the state is reset, the
   prompts are added again and the reverse pass runs from the highest prompted slice down
   to ``lo``. The result is the union of both passes (and of all objects).
4. A pass stops early at the first non-prompted slice whose mask area is below
   ``min_area_mm2`` or below ``min_area_fraction`` of the prompted slice's area (that
   slice is not kept): beyond it the 3D component could not connect to the prompt anyway.
5. Post-processing: holes filled per slice; only 3D components (26-connected) that touch a
   prompted slice's mask are kept.

Per-slice scores are SAM2's predicted IoU of the chosen mask (the minimum over the passes
and objects that produced the slice).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inference.limits import WalkLimits
from inference.prompts import BoxPrompt, PointPrompt, TargetPrompts
from inference.propagation import DOWN, UP, area_stop, postprocess
from inference.sam2_features import SliceFeatureCache, slices_to_model_input

log = logging.getLogger(__name__)


@dataclass
class VideoParams(WalkLimits):
    """SAM2 3D propagation's settings: the limits of :class:`~inference.limits.WalkLimits`
    (``margin_mm`` is not used: the video predictor needs no box after the prompted slice;
    nor is ``prompt_margin_mm``, measured for the 2D walk only: the video predictor gets the
    planner's boxes as drawn)."""

    batch_size: int = 8
    fill_holes: bool = True
    keep_connected: bool = True

    @classmethod
    def from_options(cls, options: WalkLimits, **overrides) -> VideoParams:
        return cls(**{**options.limit_values(), **overrides})


@dataclass
class VideoResult:
    mask: np.ndarray  # bool (z, y, x)
    slice_scores: dict[int, float | None]
    stop_reasons: dict[str, str]
    frame_range: tuple[int, int]  # (lo, hi): slices that formed the video
    frames_decoded: int
    slices_encoded: int
    warnings: list[str] = field(default_factory=list)


class _LazyFrames:
    """``inference_state["images"]``: a normalised frame on demand (only used by SAM2 on a
    feature-cache miss, which the driver avoids)."""

    def __init__(self, gray: np.ndarray, image_size: int, device: torch.device) -> None:
        self.gray, self.image_size, self.device = gray, image_size, device

    def __len__(self) -> int:
        return int(self.gray.shape[0])

    def __getitem__(self, f: int) -> torch.Tensor:
        return slices_to_model_input(self.gray[f : f + 1], self.image_size, self.device)[0]


def _new_state(predictor, frames: _LazyFrames, cache: SliceFeatureCache, ny: int, nx: int) -> dict[str, Any]:
    """What ``SAM2VideoPredictor.init_state`` builds, without loading frames from disk."""
    from collections import OrderedDict

    device = predictor.device
    return {
        "images": frames,
        "num_frames": len(frames),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": ny,
        "video_width": nx,
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": cache.entries,
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def _sync_cache(state: dict, cache: SliceFeatureCache) -> None:
    """SAM2 replaces ``cached_features`` by a one-frame dict on a miss: merge it back."""
    current = state["cached_features"]
    if current is not cache.entries:
        cache.entries.update(current)
        state["cached_features"] = cache.entries


def group_objects(prompts: TargetPrompts, lo: int) -> tuple[dict[int, dict[int, tuple]], list[str]]:
    """Object id -> frame -> (box xyxy or None, points [[x, y]], labels [1/0]).

    Frames are relative to ``lo``; coordinates are (x, y) = (j, i) in the original slice.
    """
    warnings: list[str] = []
    objects: dict[int, dict[int, tuple]] = {}
    for k in prompts.anchor_slices:
        boxes: list[BoxPrompt] = sorted((b for b in prompts.boxes if b.slice_index == k), key=lambda b: (b.i0, b.j0))
        points: list[PointPrompt] = [p for p in prompts.points if p.slice_index == k]
        per_obj: dict[int, tuple[BoxPrompt | None, list[PointPrompt]]] = {n: (b, []) for n, b in enumerate(boxes)}
        for p in points:
            owner = next((n for n, b in enumerate(boxes) if b.i0 <= p.i <= b.i1 and b.j0 <= p.j <= b.j1), 0)
            per_obj.setdefault(owner, (None, []))[1].append(p)
        for n, (b, pts) in per_obj.items():
            if b is None and not any(p.positive for p in pts):
                warnings.append(f"slice {k}: only negative points and no box; ignored as a prompt")
                continue
            box = None if b is None else [b.j0, b.i0, b.j1, b.i1]
            coords = [[p.j, p.i] for p in pts]
            labels = [1 if p.positive else 0 for p in pts]
            objects.setdefault(n, {})[k - lo] = (box, coords, labels)
    return objects, warnings


def propagate_3d(
    predictor,
    gray: np.ndarray,
    spacing: tuple[float, float, float],
    prompts: TargetPrompts,
    params: VideoParams | None = None,
) -> VideoResult:
    """Segment one target in 3D with SAM2's video predictor. ``gray`` is the uint8
    (z, y, x) volume, ``spacing`` (dz, dy, dx) mm. Run inside ``torch.inference_mode()``
    (and the autocast the device wants). See the module docstring for the algorithm."""
    run = _VideoRun(predictor, gray, spacing, prompts, params or VideoParams())
    for direction, step in ((UP, 1), (DOWN, -1)):
        run.add_prompts(first_pass=step > 0)
        reason = run.track(step)
        run.stop_reasons[direction] = reason
        log.debug("SAM2 3D pass %s stopped: %s", direction, reason)
    return run.result()


class _VideoRun:
    """The state of one :func:`propagate_3d` call: the sub-volume that forms the video, the
    feature cache, SAM2's inference state and what both passes found."""

    def __init__(self, predictor, gray: np.ndarray, spacing, prompts: TargetPrompts, params: VideoParams) -> None:
        self.predictor, self.params = predictor, params
        self.nz, self.ny, self.nx = (int(v) for v in gray.shape)
        dz, dy, dx = (float(v) for v in spacing)
        self.pixel_mm2 = dy * dx
        anchors = prompts.anchor_slices
        if not anchors or prompts.is_empty():
            raise ValueError(f"target {prompts.target!r} has no box and no positive point to start from")
        for k in anchors:
            if not 0 <= k < self.nz:
                raise ValueError(f"prompt on slice {k} is outside the volume (0..{self.nz - 1})")
        n_ext = int(math.floor(params.max_extent_mm / dz + 1e-6))
        self.lo, self.hi = max(0, anchors[0] - n_ext), min(self.nz - 1, anchors[-1] + n_ext)
        sub = gray[self.lo : self.hi + 1]
        self.nf = self.hi - self.lo + 1

        self.objects, self.warnings = group_objects(prompts, self.lo)
        if not self.objects:
            raise ValueError(f"target {prompts.target!r} has no usable prompt: {'; '.join(self.warnings)}")
        self.cond_frames = sorted({f for per in self.objects.values() for f in per})

        self.device = predictor.device
        self.cache = SliceFeatureCache(predictor, sub, device=self.device, batch_size=params.batch_size)
        self.cache.pinned |= set(self.cond_frames)
        self.state = _new_state(
            predictor, _LazyFrames(sub, predictor.image_size, self.device), self.cache, self.ny, self.nx
        )

        self.mask = np.zeros((self.nz, self.ny, self.nx), dtype=bool)
        self.scores: dict[int, float | None] = {}
        self.anchor_masks: dict[int, np.ndarray] = {}
        self.anchor_area: dict[int, float] = {}
        self.stop_reasons: dict[str, str] = {}
        self.decoded = 0

    def note_score(self, k: int, s: float | None) -> None:
        """A slice's score is the lowest predicted IoU of the passes and objects that made it."""
        if s is None:
            self.scores.setdefault(k, None)
        elif self.scores.get(k) is None:
            self.scores[k] = s
        else:
            self.scores[k] = min(self.scores[k], s)  # type: ignore[type-var]

    def ensure_ahead(self, f: int, step: int, end: int) -> None:
        """Encode frame ``f`` and the next ones in one batch unless ``f`` is cached already."""
        if f in self.cache:
            return
        ahead = []
        g = f
        while len(ahead) < self.cache.batch_size and (g <= end if step > 0 else g >= end):
            if g not in self.cache:
                ahead.append(g)
            g += step
        self.cache.ensure(ahead)

    def add_prompts(self, *, first_pass: bool) -> None:
        """Reset SAM2's state and add every prompt again (each pass starts from the prompts)."""
        predictor, state, cache = self.predictor, self.state, self.cache
        predictor.reset_state(state)
        cache.evict_all_but(self.cond_frames)
        cache.ensure(self.cond_frames)
        for obj_id, per in sorted(self.objects.items()):
            for f, (box, coords, labels) in sorted(per.items()):
                _, _, video_masks = predictor.add_new_points_or_box(
                    state,
                    frame_idx=f,
                    obj_id=obj_id,
                    points=coords or None,
                    labels=labels or None,
                    box=box,
                    normalize_coords=True,
                )
                _sync_cache(state, cache)
                obj_idx = state["obj_id_to_idx"][obj_id]
                m = (video_masks[obj_idx, 0] > 0.0).cpu().numpy()
                k = f + self.lo
                self.anchor_masks[k] = self.anchor_masks.get(k, np.zeros((self.ny, self.nx), bool)) | m
                if predictor.last_head_scores is not None:
                    self.note_score(k, predictor.last_head_scores[0])
        if first_pass:
            for k, m in self.anchor_masks.items():
                self.anchor_area[k] = float(m.sum()) * self.pixel_mm2
                self.mask[k] |= m
        predictor.propagate_in_video_preflight(state)
        _sync_cache(state, cache)

    def _frame_masks(self, f: int, step: int) -> tuple[list[torch.Tensor], list[float]]:
        """Every object's low-resolution mask on frame ``f`` (tracked from the previous one)."""
        predictor, state = self.predictor, self.state
        per_obj_masks = []
        frame_scores = []
        for obj_idx in range(len(state["obj_ids"])):
            out_dict = state["output_dict_per_obj"][obj_idx]
            if f in out_dict["cond_frame_outputs"]:
                pred = out_dict["cond_frame_outputs"][f]["pred_masks"]
            else:
                current, pred = predictor._run_single_frame_inference(
                    inference_state=state,
                    output_dict=out_dict,
                    frame_idx=f,
                    batch_size=1,
                    is_init_cond_frame=False,
                    point_inputs=None,
                    mask_inputs=None,
                    reverse=step < 0,
                    run_mem_encoder=True,
                )
                out_dict["non_cond_frame_outputs"][f] = current
                self.decoded += 1
                if predictor.last_head_scores is not None:
                    frame_scores.append(predictor.last_head_scores[0])
            state["frames_tracked_per_obj"][obj_idx][f] = {"reverse": step < 0}
            per_obj_masks.append(pred.to(self.device))
        _sync_cache(state, self.cache)
        return per_obj_masks, frame_scores

    def track(self, step: int) -> str:
        """One pass from the prompted frames to the end of the video; why it stopped."""
        start = self.cond_frames[0] if step > 0 else self.cond_frames[-1]
        end = self.nf - 1 if step > 0 else 0
        ref_area = max(self.anchor_area.values()) if self.anchor_area else 0.0
        reason = f"reached the {'last' if step > 0 else 'first'} slice of the volume"
        if (step > 0 and self.hi < self.nz - 1) or (step < 0 and self.lo > 0):
            reason = f"maximum extent {self.params.max_extent_mm:g} mm from the prompted slices reached"
        f = start
        while (f <= end) if step > 0 else (f >= end):
            self.ensure_ahead(f, step, end)
            per_obj_masks, frame_scores = self._frame_masks(f, step)
            k = f + self.lo
            if f in self.cond_frames:  # its mask is the prompted one, already in `mask`
                f += step
                continue
            _, video_masks = self.predictor._get_orig_video_res_output(self.state, torch.cat(per_obj_masks, dim=0))
            m = (video_masks[:, 0] > 0.0).any(dim=0).cpu().numpy()
            stop = area_stop(float(m.sum()) * self.pixel_mm2, k, self.params, ref_area)
            if stop is not None:
                return stop
            self.mask[k] |= m
            self.note_score(k, min(frame_scores) if frame_scores else None)
            self.cache.evict([f])
            f += step
        return reason

    def result(self) -> VideoResult:
        params = self.params
        mask = postprocess(
            self.mask, self.anchor_masks, fill_holes=params.fill_holes, keep_connected=params.keep_connected
        )
        kept = set(int(k) for k in np.flatnonzero(mask.any(axis=(1, 2))))
        warnings = list(self.warnings)
        for k, m in self.anchor_masks.items():
            if not m.any():
                warnings.append(f"the prompt on slice {k} gave an empty mask")
        return VideoResult(
            mask=mask,
            slice_scores={k: v for k, v in sorted(self.scores.items()) if k in kept},
            stop_reasons=self.stop_reasons,
            frame_range=(self.lo, self.hi),
            frames_decoded=self.decoded,
            slices_encoded=self.cache.stats.encoded,
            warnings=warnings,
        )
