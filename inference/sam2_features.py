"""SAM2 image features of a volume's slices, encoded in batches, and 2D prompt decoding.

:class:`SliceFeatureCache` turns uint8 slices into SAM2 input (resize to the model's
``image_size``, replicate to RGB, normalise with SAM2's ImageNet mean/std, as
``SAM2ImagePredictor.set_image`` and the video predictor's ``init_state`` do) and runs
the image encoder on a batch of slices at a time. Features are kept per slice until
evicted, so memory is bounded by the slices near the propagation front.

:class:`Sam2SliceSegmenter` is the :class:`~inference.propagation.SliceSegmenter` of the
2D mode: ``prefetch`` encodes the announced slices in batches and evicts those already
decoded; ``segment_slice`` decodes a box and/or points on one slice.

Coordinates: prompts come in voxel indices (row ``i``, column ``j``); SAM2 takes
``(x, y) = (j, i)`` in the original image's pixel frame, scaled by
``image_size / nx`` and ``image_size / ny`` to the model's input frame.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from inference.sam2_models import image_feature_sizes

#: SAM2's input normalisation (ImageNet), as in sam2.utils.transforms / misc.load_video_frames.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


def slices_to_model_input(gray: np.ndarray, image_size: int, device: torch.device | str) -> torch.Tensor:
    """uint8 slices ``(n, ny, nx)`` -> normalised float32 ``(n, 3, S, S)`` on ``device``."""
    if gray.dtype != np.uint8 or gray.ndim != 3:
        raise ValueError(f"expected uint8 (n, ny, nx) slices, got {gray.dtype} {gray.shape}")
    x = torch.from_numpy(np.ascontiguousarray(gray)).to(device)
    x = x.float().div_(255.0).unsqueeze(1)  # (n, 1, ny, nx)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_batch(model, images: torch.Tensor) -> dict:
    """``model.forward_image`` on a batch (SAM2's high-resolution projections included)."""
    return model.forward_image(images)


@dataclass
class CacheStats:
    encoded: int = 0
    batches: int = 0
    evicted: int = 0
    peak_cached: int = 0


class SliceFeatureCache:
    """Backbone features of slices of one volume, encoded ``batch_size`` at a time.

    Entries are what SAM2's video predictor keeps in ``inference_state["cached_features"]``:
    ``k -> (image (1, 3, S, S), backbone_out)`` with single-slice ``backbone_out``
    (``backbone_fpn`` and ``vision_pos_enc`` lists). ``capacity`` bounds the number of
    cached slices (oldest evicted first) as a safety net; callers evict explicitly.
    """

    def __init__(
        self,
        model,
        gray: np.ndarray,
        *,
        device: torch.device | str,
        batch_size: int = 8,
        capacity: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.gray = gray
        self.device = torch.device(device)
        self.image_size = int(model.image_size)
        self.batch_size = int(batch_size)
        self.capacity = max(int(capacity or 4 * batch_size), batch_size + 4)
        self.entries: OrderedDict[int, tuple[torch.Tensor, dict]] = OrderedDict()
        self.pinned: set[int] = set()  # never evicted (anchor slices)
        self.stats = CacheStats()

    def __contains__(self, k: int) -> bool:
        return k in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def ensure(self, ks: Sequence[int]) -> None:
        """Encode those of ``ks`` that are not cached yet, in batches (order kept)."""
        todo = []
        for k in ks:
            k = int(k)
            if not 0 <= k < self.gray.shape[0]:
                raise IndexError(f"slice {k} outside 0..{self.gray.shape[0] - 1}")
            if k not in self.entries and k not in todo:
                todo.append(k)
        for start in range(0, len(todo), self.batch_size):
            self._encode(todo[start : start + self.batch_size])

    def _encode(self, ks: list[int]) -> None:
        images = slices_to_model_input(self.gray[ks], self.image_size, self.device)
        out = encode_batch(self.model, images)
        fpn = out["backbone_fpn"]
        pos = out["vision_pos_enc"]
        for n, k in enumerate(ks):
            backbone_out = {
                "backbone_fpn": [f[n : n + 1] for f in fpn],
                # the positional encoding is the same for every slice of the batch
                "vision_pos_enc": [p[0:1] for p in pos],
            }
            self.entries[k] = (images[n : n + 1], backbone_out)
        self.stats.encoded += len(ks)
        self.stats.batches += 1
        self._trim()
        self.stats.peak_cached = max(self.stats.peak_cached, len(self.entries))

    def _trim(self) -> None:
        while len(self.entries) > self.capacity:
            victim = next((k for k in self.entries if k not in self.pinned), None)
            if victim is None:
                break
            del self.entries[victim]
            self.stats.evicted += 1

    def evict(self, ks) -> None:
        for k in list(ks):
            if k in self.entries and k not in self.pinned:
                del self.entries[k]
                self.stats.evicted += 1

    def evict_all_but(self, keep) -> None:
        keep = set(keep) | self.pinned
        self.evict([k for k in self.entries if k not in keep])

    def get(self, k: int) -> tuple[torch.Tensor, dict]:
        if k not in self.entries:
            self.ensure([k])
        return self.entries[k]


@dataclass
class Decoded:
    mask: np.ndarray  # bool (ny, nx)
    iou: float  # predicted IoU of the returned mask
    object_score: float | None  # object score logit (SAM2.1 heads), > 0: object present
    logits: np.ndarray | None = None  # float (ny, nx) mask logits, the mask is logits > 0


def prompt_to_model_points(
    box: tuple[float, float, float, float] | None,
    points: Sequence[tuple[float, float, bool]],
    orig_hw: tuple[int, int],
    image_size: int,
) -> tuple[list[list[float]], list[int]]:
    """Voxel-index prompts -> SAM2 prompt points in the model's input frame.

    A box ``(i0, j0, i1, j1)`` becomes the two corners ``(x, y) = (j0, i0), (j1, i1)``
    with labels 2 and 3 (SAM2's box encoding, first); a point ``(i, j, positive)`` becomes
    ``(j, i)`` with label 1 or 0. ``x`` is scaled by ``image_size / nx`` and ``y`` by
    ``image_size / ny``, as SAM2's ``transform_coords(normalize=True)`` does.
    """
    ny, nx = orig_hw
    sx, sy = image_size / nx, image_size / ny
    coords: list[list[float]] = []
    labels: list[int] = []
    if box is not None:
        i0, j0, i1, j1 = box
        coords += [[j0 * sx, i0 * sy], [j1 * sx, i1 * sy]]
        labels += [2, 3]
    for i, j, positive in points:
        coords.append([j * sx, i * sy])
        labels.append(1 if positive else 0)
    return coords, labels


def sam_heads(model, backbone_out: dict, point_coords: torch.Tensor, point_labels: torch.Tensor, multimask: bool):
    """SAM2's prompt encoder and mask decoder on a batch of ``n`` slices' features, one
    prompt per slice (``point_coords`` ``(n, m, 2)`` in the model's input frame,
    ``point_labels`` ``(n, m)``; see :func:`prompt_to_model_points`), without memory, as
    a single image. Returns the low-resolution mask logits ``(n, k, S/4, S/4)``, the
    predicted IoUs ``(n, k)`` and the object-score logits (differentiable: fine-tuning
    trains through exactly this path)."""
    size = model.image_size
    n = point_coords.shape[0]
    _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    feats = [feat.permute(1, 2, 0).reshape(n, -1, *hw) for feat, hw in zip(vision_feats, image_feature_sizes(size))]
    image_embed, high_res = feats[-1], feats[:-1]
    sparse, dense = model.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
    low_res, ious, _, object_score_logits = model.sam_mask_decoder(
        image_embeddings=image_embed,
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        repeat_image=False,
        high_res_features=high_res,
    )
    return low_res, ious, object_score_logits


def decode_prompts(
    model,
    backbone_out: dict,
    orig_hw: tuple[int, int],
    box: tuple[float, float, float, float] | None,
    points: Sequence[tuple[float, float, bool]] = (),
) -> Decoded:
    """SAM2's prompt encoder + mask decoder on one slice's features.

    ``box`` is ``(i0, j0, i1, j1)`` and ``points`` ``(i, j, positive)`` in voxel indices of
    the original slice of shape ``orig_hw = (ny, nx)``. A single point alone is ambiguous:
    three masks are predicted and the one with the highest predicted IoU is kept; a box (or
    several points) asks for one mask (SAM2's stability check may still fall back to the
    best of three).
    """
    if box is None and not points:
        raise ValueError("a box or at least one point is required")
    ny, nx = orig_hw
    size = model.image_size
    device = backbone_out["backbone_fpn"][-1].device
    coords, labels = prompt_to_model_points(box, points, orig_hw, size)
    point_coords = torch.tensor([coords], dtype=torch.float32, device=device)
    point_labels = torch.tensor([labels], dtype=torch.int32, device=device)
    multimask = box is None and len(points) == 1

    low_res, ious, object_score_logits = sam_heads(model, backbone_out, point_coords, point_labels, multimask)
    best = int(torch.argmax(ious[0]).item()) if multimask else 0
    logits = low_res[:, best : best + 1].float()
    full = F.interpolate(logits, size=(ny, nx), mode="bilinear", align_corners=False)
    logits_np = full[0, 0].cpu().numpy()
    iou = float(ious[0, best].float().item())
    obj = None
    if object_score_logits is not None and getattr(model, "pred_obj_scores", False):
        obj = float(object_score_logits[0].float().max().item())
    return Decoded(mask=logits_np > 0.0, iou=iou, object_score=obj, logits=logits_np)


class Sam2SliceSegmenter:
    """The SAM2 :class:`~inference.propagation.SliceSegmenter` for one volume.

    ``anchor_slices`` are the prompted slices: their features are pinned (the walks start
    there) and the object-score stop never applies to them. With ``object_score_stop``,
    a propagated (not prompted) slice on which SAM2.1's object head says "no object"
    (logit < 0) ends the walk in that direction.
    """

    #: its score is the model's predicted IoU (the walk's ``min_score`` rule applies)
    predicts_iou = True

    def __init__(
        self,
        cache: SliceFeatureCache,
        anchor_slices: Sequence[int] = (),
        *,
        object_score_stop: bool = True,
    ) -> None:
        self.cache = cache
        self.model = cache.model
        self.orig_hw = (int(cache.gray.shape[1]), int(cache.gray.shape[2]))
        self.anchor_slices = set(int(k) for k in anchor_slices)
        self.object_score_stop = object_score_stop
        self.decoded: set[int] = set()
        self.object_scores: dict[int, float | None] = {}
        cache.pinned |= self.anchor_slices

    def prefetch(self, ks: Sequence[int]) -> None:
        ks = [int(k) for k in ks if 0 <= int(k) < self.cache.gray.shape[0]]
        # slices already decoded are behind the front: their features are no longer needed
        self.cache.evict([k for k in list(self.cache.entries) if k in self.decoded and k not in ks])
        self.cache.ensure(ks)

    def segment_slice(self, k, box=None, points=()):
        from inference.propagation import StopPropagation

        k = int(k)
        _, backbone_out = self.cache.get(k)
        out = decode_prompts(self.model, backbone_out, self.orig_hw, box, list(points))
        self.decoded.add(k)
        self.object_scores[k] = out.object_score
        if (
            self.object_score_stop
            and k not in self.anchor_slices
            and out.object_score is not None
            and out.object_score < 0
        ):
            raise StopPropagation(f"SAM2 object score {out.object_score:.2f} < 0: no object on slice {k}")
        return out.mask, out.iou
