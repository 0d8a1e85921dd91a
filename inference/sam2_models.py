"""Building SAM2 models from the package's configs and loading the checkpoints users bring.

Models
------
``resolve_model_config`` understands the names of the real SAM2 configs shipped with the
``sam2`` package (``sam2_hiera_{t,s,b+,l}``, ``sam2.1_hiera_{t,s,b+,l}``, also spelled
``configs/sam2.1/sam2.1_hiera_t.yaml`` or ``sam2.1_hiera_tiny`` ...), the MedSAM2 variant
``sam2.1_hiera_t512`` (SAM2.1 tiny at 512 pixels, see :data:`VARIANTS`) and a path to a
YAML file with a top-level ``model:`` mapping (for example MedSAM2's own
``sam2.1_hiera_t512.yaml``). Any of them can be built at another ``image_size`` (a multiple
of 32): the memory attention's RoPE feature sizes follow (``image_size // 16``).

Every model is built as :class:`NodeVideoPredictor`, a :class:`SAM2VideoPredictor`
subclass without parameters of its own, so one model per process serves both the 2D
(image encoder + prompt decoder) and the 3D (video) path, and its state dict is exactly
SAM2's.

Hydra
-----
``import sam2`` calls ``hydra.initialize_config_module("sam2")`` when GlobalHydra is not
initialised, which would hijack the application's hydra state (and make a later
``hydra.initialize`` of the application fail). This module imports ``sam2`` through
:func:`import_sam2`, which clears GlobalHydra again if (and only if) that import
initialised it. Configs are then composed without hydra's global state: the YAML file is
read with OmegaConf, overrides are applied with ``OmegaConf.update`` and the model is
built with ``hydra.utils.instantiate`` (a pure function). Building twice, or after the
application initialised hydra, therefore works and leaves GlobalHydra as it was.
(Consequence: SAM2's own ``sam2.build_sam.build_sam2`` which needs hydra's global config
search path is not used here.)

Checkpoints
-----------
``load_checkpoint`` reads, with ``torch.load(weights_only=True)``:

* ``{"model": state_dict}``: official SAM2 / SAM2.1 and MedSAM2 checkpoints;
* ``{"model_state_dict": state_dict}`` with keys prefixed ``sam2_model.``: fine-tunes saved
  by the reference research code (STARDUST-MedSAM2); the prefix is removed;
* a bare state dict (``{name: tensor}``), keys possibly prefixed ``sam2_model.``;

and, in every format, a ``module.`` prefix on *all* keys (DistributedDataParallel) is
removed. Loading is strict: any missing or unexpected key, or a shape mismatch, raises
:class:`CheckpointError` listing them (long lists truncated, with counts).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.checkpoints import file_sha256, is_state_dict, state_dict_problems
from inference.engine import SegmentationError

log = logging.getLogger(__name__)


class Sam2ModelError(SegmentationError):
    """A SAM2 model cannot be built or used as configured; the message says why."""


class CheckpointError(Sam2ModelError):
    """A checkpoint cannot be read, or does not fit the model; the message says why."""


# -- importing sam2 without touching GlobalHydra -------------------------------------------

_import_lock = threading.Lock()


def import_sam2():
    """Import the ``sam2`` package and return it, leaving GlobalHydra as it was before.

    ``sam2/__init__.py`` initialises hydra's global config module when GlobalHydra is not
    initialised yet; if that happens during this import, it is cleared again here.
    """
    with _import_lock:
        if "sam2" in sys.modules:
            return sys.modules["sam2"]
        from hydra.core.global_hydra import GlobalHydra

        was_initialized = GlobalHydra.instance().is_initialized()
        import sam2  # noqa: F401  (the side effect is what this function contains)

        if not was_initialized and GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        return sam2


import_sam2()
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402
from sam2.sam2_video_predictor import SAM2VideoPredictor  # noqa: E402


def sam2_package_version() -> str:
    try:
        from importlib.metadata import version

        return version("sam2")
    except Exception:  # pragma: no cover - metadata missing in an odd install
        return "unknown"


# -- the model class -----------------------------------------------------------------------


class NodeVideoPredictor(SAM2VideoPredictor):
    """SAM2's video predictor that remembers the scores of the last SAM head call.

    ``last_head_scores`` is ``(predicted IoU of the chosen mask, object score logit)`` for
    the first object of the last call of the mask decoder; the 3D path reads it after each
    frame to report per-slice scores. No parameters are added: the state dict is SAM2's.
    """

    last_head_scores: tuple[float, float | None] | None = None

    def _forward_sam_heads(self, *args, **kwargs):
        out = super()._forward_sam_heads(*args, **kwargs)
        ious, object_score_logits = out[2], out[6]
        iou = float(ious[0].max().float().item())
        obj = None if object_score_logits is None else float(object_score_logits[0].float().max().item())
        self.last_head_scores = (iou, obj)
        return out


_OUR_TARGET = f"{NodeVideoPredictor.__module__}.{NodeVideoPredictor.__qualname__}"


# -- configs ---------------------------------------------------------------------------------

_SIZE_ALIASES = {
    "t": "t",
    "tiny": "t",
    "s": "s",
    "small": "s",
    "b+": "b+",
    "base_plus": "b+",
    "base-plus": "b+",
    "bplus": "b+",
    "b": "b+",
    "l": "l",
    "large": "l",
}

#: Named variants: name -> (base config name, image size). ``sam2.1_hiera_t512`` has the
#: state-dict schema of MedSAM2 (bowang-lab/MedSAM2, ``sam2.1_hiera_t512.yaml``): SAM2.1
#: tiny with ``image_size`` 512 and the RoPE ``feat_sizes`` [32, 32] in memory attention.
VARIANTS: dict[str, tuple[str, int]] = {
    "sam2.1_hiera_t512": ("sam2.1_hiera_t", 512),
}
_VARIANT_ALIASES = {"medsam2": "sam2.1_hiera_t512", "sam2.1_hiera_tiny512": "sam2.1_hiera_t512"}

#: Overrides that the SAM2 video builder applies for inference (post-processing settings;
#: none changes the parameters). ``fill_hole_area`` is 0 because it needs SAM2's optional
#: CUDA extension; holes are filled per slice in our own post-processing instead.
VIDEO_OVERRIDES: dict[str, Any] = {
    "sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
    "sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
    "sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 0,
}


def image_size_overrides(image_size: int) -> dict[str, Any]:
    """The ``model.*`` overrides that change a config's input resolution consistently."""
    if image_size % 32 or image_size < 64:
        raise Sam2ModelError(f"image_size must be a multiple of 32 and at least 64, got {image_size}")
    feat = image_size // 16  # stride-16 feature map used by memory attention
    return {
        "image_size": image_size,
        "memory_attention.layer.self_attention.feat_sizes": [feat, feat],
        "memory_attention.layer.cross_attention.feat_sizes": [feat, feat],
    }


def _package_dir() -> Path:
    spec = importlib.util.find_spec("sam2")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover
        raise Sam2ModelError("the sam2 package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def available_model_configs() -> list[str]:
    """Names accepted by :func:`resolve_model_config` (besides YAML paths)."""
    cfg_dir = _package_dir() / "configs"
    names = sorted(p.stem for sub in ("sam2", "sam2.1") for p in (cfg_dir / sub).glob("*.yaml"))
    return names + sorted(VARIANTS)


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a display name, the YAML file and the ``model.*`` overrides."""

    name: str
    yaml_path: Path
    image_size: int
    overrides: tuple[tuple[str, Any], ...] = ()

    def override_dict(self) -> dict[str, Any]:
        return dict(self.overrides)


def _canonical_name(text: str) -> str | None:
    """``configs/sam2.1/sam2.1_hiera_tiny.yaml`` -> ``sam2.1_hiera_t`` (None if not a SAM2 name)."""
    stem = Path(text).name
    if stem.endswith(".yaml"):
        stem = stem[: -len(".yaml")]
    stem = _VARIANT_ALIASES.get(stem.lower(), stem)
    if stem in VARIANTS:
        return stem
    m = re.fullmatch(r"(sam2(?:\.1)?)_hiera_([a-z+_-]+?)(512|1024)?", stem, flags=re.IGNORECASE)
    if not m:
        return None
    size = _SIZE_ALIASES.get(m.group(2).lower())
    if size is None:
        return None
    name = f"{m.group(1).lower()}_hiera_{size}"
    if m.group(3):
        name += m.group(3)
    return name


def resolve_model_config(model_cfg: str, image_size: int | None = None) -> ModelSpec:
    """Turn a config name or YAML path into a :class:`ModelSpec`.

    ``image_size`` (None: the config's own, 1024 for SAM2, 512 for ``*_t512``) sets the
    input resolution and the matching RoPE feature sizes.
    """
    if not model_cfg or not isinstance(model_cfg, str):
        raise Sam2ModelError(f"model_cfg must be a config name or a YAML path, got {model_cfg!r}")
    path = Path(os.path.expanduser(model_cfg))
    if path.suffix in (".yaml", ".yml") and path.is_file():
        yaml_path = path.resolve()
        name = path.stem
        base_size = None
    else:
        name = _canonical_name(model_cfg)
        if name is None:
            raise Sam2ModelError(
                f"unknown SAM2 model config {model_cfg!r}: use one of "
                f"{', '.join(available_model_configs())} or a path to a YAML file"
            )
        base_size = None
        base = name
        if name in VARIANTS:
            base, base_size = VARIANTS[name]
        else:
            m = re.fullmatch(r"(.*_hiera_(?:t|s|b\+|l))(512|1024)", name)
            if m:
                base, base_size = m.group(1), int(m.group(2))
        folder = "sam2.1" if base.startswith("sam2.1") else "sam2"
        yaml_path = _package_dir() / "configs" / folder / f"{base}.yaml"
        if not yaml_path.is_file():
            raise Sam2ModelError(f"SAM2 config file not found for {model_cfg!r}: {yaml_path}")
    size = image_size or base_size
    overrides = dict(image_size_overrides(size)) if size else {}
    if size and name in VARIANTS and size != VARIANTS[name][1]:
        name = f"{VARIANTS[name][0]}@{size}"
    elif size and not name.endswith(str(size)) and size != 1024:
        name = f"{name}@{size}"
    return ModelSpec(
        name=name,
        yaml_path=yaml_path,
        image_size=size or 0,  # 0: the YAML's own (filled in by compose_model_config)
        overrides=tuple(overrides.items()),
    )


def _check_targets(node: Any, where: str = "model") -> None:
    """Refuse ``_target_`` entries outside the sam2 package: instantiate() calls them.

    ``node`` is a plain container (``OmegaConf.to_container``)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_":
                if not isinstance(value, str) or not (value.startswith("sam2.") or value == _OUR_TARGET):
                    raise Sam2ModelError(f"{where}._target_ = {value!r}: only classes of the sam2 package can be built")
            else:
                _check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _check_targets(item, f"{where}[{i}]")


def compose_model_config(spec: ModelSpec):
    """The ``model`` node of ``spec``'s YAML with overrides applied (an OmegaConf DictConfig),
    composed without hydra's global state."""
    from omegaconf import OmegaConf

    try:
        root = OmegaConf.load(spec.yaml_path)
    except Exception as exc:
        raise Sam2ModelError(f"cannot read model config {spec.yaml_path}: {exc}") from exc
    if "model" not in root:
        hint = " (a training config? use the model's inference config)" if "trainer" in root else ""
        raise Sam2ModelError(f"{spec.yaml_path} has no top-level 'model' section{hint}")
    cfg = root.model
    OmegaConf.set_struct(cfg, False)
    for key, value in {**VIDEO_OVERRIDES, **spec.override_dict()}.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    _check_targets(OmegaConf.to_container(cfg, resolve=False))
    cfg._target_ = _OUR_TARGET
    OmegaConf.resolve(cfg)
    return cfg


def build_model(
    model_cfg: str | ModelSpec,
    *,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> NodeVideoPredictor:
    """Build a randomly initialised SAM2 model (eval mode, on ``device``).

    ``seed`` makes the random initialisation reproducible without touching the caller's
    global RNG state. Load weights with :func:`load_checkpoint` afterwards.
    """
    from hydra.utils import instantiate

    spec = model_cfg if isinstance(model_cfg, ModelSpec) else resolve_model_config(model_cfg, image_size)
    cfg = compose_model_config(spec)
    try:
        if seed is None:
            model = instantiate(cfg, _recursive_=True)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = instantiate(cfg, _recursive_=True)
    except Sam2ModelError:
        raise
    except Exception as exc:
        raise Sam2ModelError(f"cannot build SAM2 model {spec.name} from {spec.yaml_path}: {exc}") from exc
    model = model.to(device)
    model.eval()
    return model


def image_feature_sizes(image_size: int) -> list[tuple[int, int]]:
    """Backbone feature map sizes used by the SAM heads (strides 4, 8, 16)."""
    return [(image_size // 4,) * 2, (image_size // 8,) * 2, (image_size // 16,) * 2]


def make_image_predictor(model, **kwargs) -> SAM2ImagePredictor:
    """SAM2's image predictor for ``model``, with its feature sizes fixed for the model's
    ``image_size`` (SAM2 1.1.0 hard-codes the 1024-pixel sizes 256/128/64)."""
    predictor = SAM2ImagePredictor(model, **kwargs)
    predictor._bb_feat_sizes = image_feature_sizes(model.image_size)
    return predictor


# -- checkpoints -----------------------------------------------------------------------------

FINETUNE_PREFIX = "sam2_model."
DDP_PREFIX = "module."


@dataclass
class CheckpointInfo:
    path: str
    sha256: str
    format: str  # "model" | "model_state_dict" | "bare"
    tensors: int
    stripped_prefixes: list[str] = field(default_factory=list)

    @property
    def short(self) -> str:
        """File name and hash prefix, as written into the RTSTRUCT's algorithm name."""
        return f"{Path(self.path).name} sha256:{self.sha256[:12]}"


def _strip_common_prefix(sd: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], bool]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}, True
    return sd, False


def extract_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The model state dict inside a loaded checkpoint object.

    Returns ``(state_dict, format, stripped_prefixes)``; raises :class:`CheckpointError`
    when no state dict is found.
    """
    if isinstance(obj, Mapping) and "model" in obj and is_state_dict(obj["model"]):
        sd, fmt = dict(obj["model"]), "model"
    elif isinstance(obj, Mapping) and "model_state_dict" in obj and is_state_dict(obj["model_state_dict"]):
        sd, fmt = dict(obj["model_state_dict"]), "model_state_dict"
    elif is_state_dict(obj):
        sd, fmt = dict(obj), "bare"
    else:
        if isinstance(obj, Mapping):
            keys = [str(k) for k in list(obj)[:8]]
            what = f"a dict with keys {keys}{' ...' if len(obj) > 8 else ''}"
        else:
            what = f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{source}: no model weights found: expected {{'model': state_dict}} (SAM2, MedSAM2), "
            f"{{'model_state_dict': state_dict}} (fine-tunes, keys prefixed '{FINETUNE_PREFIX}') "
            f"or a bare state dict of tensors; got {what}"
        )
    stripped = []
    for prefix in (DDP_PREFIX, FINETUNE_PREFIX):
        sd, did = _strip_common_prefix(sd, prefix)
        if did:
            stripped.append(prefix)
    return sd, fmt, stripped


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str, model_name: str) -> None:
    """Raise :class:`CheckpointError` unless ``sd`` has exactly the model's keys and shapes."""
    problems, missing, unexpected = state_dict_problems(model, sd)
    if not problems:
        return
    parts = [f"{source} does not fit model {model_name}", *problems]
    if unexpected and not missing and all(k.startswith(FINETUNE_PREFIX) for k in unexpected):
        parts.append(f"hint: some but not all keys carry the '{FINETUNE_PREFIX}' prefix")
    parts.append("the model config (--model-cfg) must match the checkpoint")
    raise CheckpointError("; ".join(parts))


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if m:
            raise CheckpointError(
                f"checkpoint {p} holds Python objects besides tensors ({m.group(1)}), which are not "
                f"loaded for safety (torch.load weights_only=True). Re-save only the weights, e.g. "
                f"torch.save({{'model': model.state_dict()}}, path), in a trusted environment."
            ) from exc
        detail = next(
            (line.strip() for line in text.splitlines() if "Unsupported" in line), text.splitlines()[0] if text else ""
        )
        raise CheckpointError(
            f"cannot read checkpoint {p}: not a PyTorch checkpoint, or a damaged or truncated one ({detail})"
        ) from exc


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, model_name: str = "SAM2") -> CheckpointInfo:
    """Load weights from ``path`` into ``model``, strictly. See the module docstring."""
    obj = read_checkpoint(path)
    sd, fmt, stripped = extract_state_dict(obj, source=f"checkpoint {path}")
    check_state_dict(model, sd, f"checkpoint {Path(path).name}", model_name)
    missing, unexpected = model.load_state_dict(sd, strict=True)
    if missing or unexpected:  # pragma: no cover - strict=True raises before
        raise CheckpointError(f"checkpoint {path}: missing {missing}, unexpected {unexpected}")
    info = CheckpointInfo(
        path=str(path), sha256=file_sha256(path), format=fmt, tensors=len(sd), stripped_prefixes=stripped
    )
    log.info(
        "loaded SAM2 checkpoint %s (format %s, %d tensors, sha256 %s)",
        Path(path).name,
        fmt,
        len(sd),
        info.sha256[:12],
    )
    return info
