"""Fine-tuning the engines' models on 2D slices: the loss, the optimiser step and one
trainer per model (LiteMedSAM, SAM2).

Nothing here reads files or knows of cases: :mod:`dicom_node.research.finetune` turns
``convert``'s NPZ files into :class:`Sample` s (a uint8 slice as the engine prepares it,
its label and a simulated prompt) and writes the checkpoints this module's trainers
make. Each trainer prepares its batch with the engine's own functions, so training sees
exactly what inference sees:

* LiteMedSAM: :func:`inference.litemedsam.to_model_input` (resize, min-max, RGB, pad),
  :func:`~inference.litemedsam.box_to_model` and
  :func:`~inference.litemedsam.logits_to_slice` (the logits on the slice's grid, where
  the loss is computed and where inference thresholds them at 0).
* SAM2: :func:`inference.sam2_features.slices_to_model_input`,
  :func:`~inference.sam2_features.prompt_to_model_points` and
  :func:`~inference.sam2_features.sam_heads` (the 2D path of the ``sam2`` engine).

What trains: the mask decoder (for SAM2 with a frozen encoder, without its two
high-resolution projections, which SAM2 applies while encoding the image); the image
encoder unless ``freeze_image_encoder`` (then its outputs are computed once per slice and
kept: decoder-only fine-tuning is practical on a CPU); the prompt encoder never (the
prompt conventions stay those the model was trained with). Loss: soft Dice + binary
cross-entropy on the logits (:func:`dice_bce_loss`), plus the mean squared error of the
predicted IoU against the IoU the mask really has (the walk's ``min_score`` stops on that
prediction). SAM2's object-score head does not train (every training slice holds tumour:
it would only learn "always present"). :class:`Optimiser`: AdamW with gradient
accumulation and gradient clipping; a loss that is not finite raises :class:`TrainingError`.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LiteMedSamTrainer",
    "Optimiser",
    "Sam2Trainer",
    "Sample",
    "TrainingError",
    "dice_bce_loss",
]


class TrainingError(RuntimeError):
    """Training cannot go on (a loss that is not finite, a bad setting); the message says why."""


@dataclass
class Sample:
    """One training example: a slice, its label and the prompt simulated from the label.

    ``gray`` is the slice as the engine prepares it (:func:`inference.preprocess.prepare`),
    uint8 ``(ny, nx)``; ``mask`` bool ``(ny, nx)``; ``box`` ``(i0, j0, i1, j1)`` in pixel
    indices (inclusive), ``points`` ``(i, j, positive)`` clicks; ``key`` names the slice
    (case, slice index) so that a frozen encoder's output can be kept.
    """

    key: tuple
    gray: np.ndarray
    mask: np.ndarray
    box: tuple[float, float, float, float] | None
    points: list[tuple[float, float, bool]] = field(default_factory=list)


def dice_bce_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, bce_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the batch of ``dice_weight * (1 - soft Dice) + bce_weight * BCE``.

    ``logits`` and ``target`` (0/1) are ``(n, 1, h, w)``; the soft Dice is per sample
    (``(2 sum(p t) + 1) / (sum p + sum t + 1)``), so a small tumour counts as much as a
    large one. Returns the loss and its parts as floats.
    """
    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, logits.ndim))
    inter = (prob * target).sum(dim=dims)
    dice = (2.0 * inter + 1.0) / (prob.sum(dim=dims) + target.sum(dim=dims) + 1.0)
    dice_loss = (1.0 - dice).mean()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    loss = dice_weight * dice_loss + bce_weight * bce
    return loss, {"dice_loss": float(dice_loss.detach()), "bce": float(bce.detach())}


class _FeatureCache:
    """A frozen encoder's outputs per slice key, least recently used out beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self.items: OrderedDict[tuple, object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        if self.limit == 0:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)


class _Trainer:
    """What both trainers share: which parameters train, modes, the feature cache, autocast."""

    model_name = "model"

    def __init__(self, model: torch.nn.Module, device: torch.device, freeze_image_encoder: bool, cache_limit: int):
        self.model = model.to(device)
        self.device = device
        self.freeze_image_encoder = bool(freeze_image_encoder)
        self.cache = _FeatureCache(cache_limit if self.freeze_image_encoder else 0)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for module in self.trainable_modules():
            for p in module.parameters():
                p.requires_grad_(True)
        if not self.parameters():
            raise TrainingError(f"{self.model_name}: no parameter to train")

    # -- what trains --------------------------------------------------------------------
    def image_encoder(self) -> torch.nn.Module:
        raise NotImplementedError

    def mask_decoder(self) -> torch.nn.Module:
        raise NotImplementedError

    def trainable_modules(self) -> list[torch.nn.Module]:
        mods = [self.mask_decoder()]
        if not self.freeze_image_encoder:
            mods.append(self.image_encoder())
        return mods

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        return sum(p.numel() for p in self.parameters()), sum(p.numel() for p in self.model.parameters())

    def train(self) -> None:
        self.model.eval()  # frozen parts stay in eval mode (no dropout, no statistics)
        for module in self.trainable_modules():
            module.train()

    def eval(self) -> None:
        self.model.eval()

    def autocast(self):
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    # -- the batch ----------------------------------------------------------------------
    def forward(self, samples: Sequence[Sample]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One ``(1, 1, ny, nx)`` logit map per sample, on its slice's grid, and the model's
        predicted IoU of each mask ``(n,)``."""
        raise NotImplementedError

    def logits(self, samples: Sequence[Sample]) -> list[torch.Tensor]:
        return self.forward(samples)[0]

    def loss(
        self, samples: Sequence[Sample], dice_weight: float = 1.0, bce_weight: float = 1.0, iou_weight: float = 1.0
    ):
        """The batch's loss (mean over its samples) and its parts.

        Besides Dice + BCE on the mask, the IoU head learns the IoU its mask really has
        (mean squared error, ``iou_weight``; the target is computed from the thresholded
        mask, without gradient): the walk stops on that prediction (``min_score``), so a
        decoder whose masks changed must also re-learn how good they are.
        """
        if not samples:
            raise TrainingError("an empty batch")
        with self.autocast():
            logits, iou_pred = self.forward(samples)
        total = None
        parts = {"dice_loss": 0.0, "bce": 0.0, "iou_mse": 0.0}
        iou_true = []
        for lg, s in zip(logits, samples):
            target = torch.from_numpy(np.ascontiguousarray(s.mask)).to(self.device).reshape(lg.shape)
            value, p = dice_bce_loss(lg.float(), target, dice_weight, bce_weight)
            total = value if total is None else total + value
            for k in ("dice_loss", "bce"):
                parts[k] += p[k] / len(samples)
            with torch.no_grad():
                pred = lg.detach() > 0
                union = (pred | target).sum()
                iou_true.append((pred & target).sum().float() / union.clamp(min=1).float())
        total = total / len(samples)
        if iou_weight:
            mse = F.mse_loss(iou_pred.float(), torch.stack(iou_true).to(iou_pred.device))
            parts["iou_mse"] = float(mse.detach())
            total = total + iou_weight * mse
        return total, parts

    def predict(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        """Masks (logits > 0) of a batch, without gradients (for checks)."""
        with torch.no_grad(), self.autocast():
            return [(lg[0, 0] > 0).cpu().numpy() for lg in self.logits(samples)]

    def _features(self, samples: Sequence[Sample], encode):
        """The encoder's output per sample: kept ones from the cache, the others encoded in
        one batch (with gradients when the encoder trains)."""
        out: list = [None] * len(samples)
        todo = []
        for n, s in enumerate(samples):
            got = self.cache.get(s.key) if self.freeze_image_encoder else None
            if got is None:
                todo.append(n)
            else:
                out[n] = got
        if todo:
            ctx = torch.no_grad() if self.freeze_image_encoder else contextlib.nullcontext()
            with ctx:
                encoded = encode([samples[n] for n in todo])
            for n, value in zip(todo, encoded):
                out[n] = value
                if self.freeze_image_encoder:
                    self.cache.put(samples[n].key, value)
        return out


class LiteMedSamTrainer(_Trainer):
    """LiteMedSAM (TinyViT encoder, SAM prompt encoder and mask decoder) on box prompts."""

    model_name = "LiteMedSAM"

    def image_encoder(self):
        return self.model.image_encoder

    def mask_decoder(self):
        return self.model.mask_decoder

    def _encode(self, samples: Sequence[Sample]) -> list[torch.Tensor]:
        from inference.litemedsam import Letterbox, to_model_input

        x = np.concatenate([to_model_input(s.gray[None], Letterbox.for_shape(s.gray.shape)) for s in samples])
        emb = self.model.image_encoder(torch.from_numpy(x).to(self.device))
        return list(emb.unbind(0))

    def forward(self, samples: Sequence[Sample]) -> tuple[list[torch.Tensor], torch.Tensor]:
        from inference.litemedsam import Letterbox, box_to_model, logits_to_slice

        for s in samples:
            if s.box is None:
                raise TrainingError("LiteMedSAM was trained with box prompts only: every sample needs a box")
            if s.points:
                raise TrainingError("LiteMedSAM takes no clicks (set points: 0 for --model litemedsam)")
        emb = torch.stack(self._features(samples, self._encode))
        letterboxes = [Letterbox.for_shape(s.gray.shape) for s in samples]
        boxes = np.stack([box_to_model(s.box, lb) for s, lb in zip(samples, letterboxes)])
        boxes_t = torch.from_numpy(boxes).to(self.device).reshape(len(samples), 1, 4)
        pe = self.model.prompt_encoder
        sparse, dense = pe(points=None, boxes=boxes_t, masks=None)
        low, iou = self.model.mask_decoder(
            image_embeddings=emb,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return [logits_to_slice(low[n : n + 1], lb) for n, lb in enumerate(letterboxes)], iou.reshape(-1)


class Sam2Trainer(_Trainer):
    """SAM2 / SAM2.1 (Hiera encoder, SAM heads) on box and click prompts, as single images
    (the 2D path of the ``sam2`` engine; the memory modules are not trained).

    With the image encoder frozen, the mask decoder's two high-resolution projections
    (``conv_s0``, ``conv_s1``) are frozen too: SAM2 applies them in ``forward_image``, so
    they are part of the image features kept per slice (training them would mean keeping
    the encoder's 256-channel stride-4 and stride-8 maps instead, five times the memory).
    A kept slice holds 4 MiB at 512 pixels (16 MiB at 1024); the positional encodings are
    the same for every slice of a model and are kept once.
    """

    model_name = "SAM2"

    def __init__(self, model: torch.nn.Module, device: torch.device, freeze_image_encoder: bool, cache_limit: int):
        super().__init__(model, device, freeze_image_encoder, cache_limit)
        if self.freeze_image_encoder:
            for name in ("conv_s0", "conv_s1"):
                conv = getattr(self.model.sam_mask_decoder, name, None)
                if conv is not None:
                    conv.requires_grad_(False)
        self._pos_enc: list[torch.Tensor] | None = None

    def image_encoder(self):
        return self.model.image_encoder

    def mask_decoder(self):
        return self.model.sam_mask_decoder

    def _encode(self, samples: Sequence[Sample]) -> list[list[torch.Tensor]]:
        from inference.sam2_features import slices_to_model_input

        size = self.model.image_size
        x = torch.cat([slices_to_model_input(s.gray[None], size, self.device) for s in samples])
        out = self.model.forward_image(x)
        if self._pos_enc is None:
            self._pos_enc = [p[0:1].detach().clone() for p in out["vision_pos_enc"]]
        # a kept slice's features are its own copy: a view would keep its whole batch alive
        keep = self.freeze_image_encoder
        return [
            [f[n : n + 1].clone() if keep else f[n : n + 1] for f in out["backbone_fpn"]] for n in range(len(samples))
        ]

    def forward(self, samples: Sequence[Sample]) -> tuple[list[torch.Tensor], torch.Tensor]:
        from inference.sam2_features import prompt_to_model_points, sam_heads

        feats = self._features(samples, self._encode)
        size = self.model.image_size
        prompts = [prompt_to_model_points(s.box, s.points, s.gray.shape, size) for s in samples]
        lengths = {len(c) for c, _ in prompts}
        if len(lengths) != 1:
            raise TrainingError("every sample of a SAM2 batch needs the same number of prompt points")
        if any(not c for c, _ in prompts):
            raise TrainingError("every sample needs a box or a click")
        coords = torch.tensor([c for c, _ in prompts], dtype=torch.float32, device=self.device)
        labels = torch.tensor([lab for _, lab in prompts], dtype=torch.int32, device=self.device)
        n = len(samples)
        batch = {
            "backbone_fpn": [torch.cat([f[i] for f in feats]) for i in range(len(feats[0]))],
            "vision_pos_enc": [p.expand(n, -1, -1, -1) for p in self._pos_enc],
        }
        low, ious, _obj = sam_heads(self.model, batch, coords, labels, multimask=False)
        out = []
        for k, s in enumerate(samples):
            out.append(
                F.interpolate(low[k : k + 1, :1].float(), size=s.gray.shape, mode="bilinear", align_corners=False)
            )
        return out, ious[:, 0]


class Optimiser:
    """AdamW over a trainer's parameters, with gradient accumulation and clipping.

    :meth:`step` takes one batch: backward of ``loss / accumulate``; every ``accumulate``
    batches the gradients are clipped to ``clip_norm`` and applied. :attr:`steps` counts
    applied updates.
    """

    def __init__(
        self,
        trainer: _Trainer,
        lr: float,
        weight_decay: float = 0.01,
        accumulate: int = 1,
        clip_norm: float | None = 1.0,
    ) -> None:
        if lr <= 0 or not math.isfinite(lr):
            raise TrainingError(f"lr must be a positive number, got {lr}")
        if accumulate < 1:
            raise TrainingError(f"grad_accumulation must be >= 1, got {accumulate}")
        self.trainer = trainer
        self.params = trainer.parameters()
        self.optim = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.accumulate = int(accumulate)
        self.clip_norm = clip_norm
        self.pending = 0
        self.steps = 0

    def step(self, loss: torch.Tensor, *, where: str = "") -> bool:
        """Backward one batch's loss; returns True when an update was applied."""
        value = float(loss.detach())
        if not math.isfinite(value):
            self.optim.zero_grad(set_to_none=True)
            raise TrainingError(
                f"the loss is {value}{' ' + where if where else ''}: training stopped (lower lr, or check "
                "the labels and images of the batch); the last checkpoint is the one before"
            )
        (loss / self.accumulate).backward()
        self.pending += 1
        if self.pending < self.accumulate:
            return False
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.pending = 0
        self.steps += 1
        return True

    def state_dict(self) -> dict:
        return {"optimizer": self.optim.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
