"""``dicom-node finetune NPZ_DIR OUT_DIR``: fine-tune LiteMedSAM or SAM2 on a department's
own contours (the NPZ files of ``dicom-node convert``) and write checkpoints that rules load.

Settings (:func:`compose_settings`): ``config/finetune.yaml`` composed with Hydra, with
``key=value`` overrides from the command line, checked by :class:`FinetuneSettings`
(types, ranges, unknown keys). The file documents every key.

The run, in order; everything that can be wrong with the input is checked before OUT_DIR
is touched, so a refused run leaves nothing behind:

1. **Cases**: every ``*.npz`` under NPZ_DIR (:func:`.cases.scan`); each label whose name
   matches ``data.label`` is a target. A file that cannot be read or has no matching label
   is left out with its reason (``split.csv``); none left is an error.
2. **Split by patient** (:func:`split_cases`): cases of one patient (the NPZ's ``patient``
   field, else the name ``convert`` gives without ``--pseudonymize``) stay together; a
   seeded permutation of the patients puts ``val.fraction`` of them (at least one) in
   validation. Written to ``OUT_DIR/split.csv``.
3. **Training samples**: every slice of a training target with at least ``data.min_area_px``
   labelled pixels, its intensities prepared by the engine's own
   :func:`inference.preprocess.prepare`, a box simulated from the label each time the
   slice is drawn (:func:`.simulate.simulate_box`, the simulation of ``study --jitter``),
   plus ``data.points`` positive clicks (:func:`.simulate.simulate_points`; sam2 only).
   And ``data.beyond_ends`` slices past each end of every target, with an empty label and
   the box the walk would bring there (the last labelled slice's box grown by the walk's
   margin): without them the model sees only slices that hold tumour, learns that every box
   holds some, and its predicted IoU stops ending the walk (measured: validation Dice 0.96
   after one epoch, 0.69 after two, the walk running 30 mm past the ends; see the note of
   the fine-tuning issue).
   The trainer (:mod:`inference.training`) applies the model's own preprocessing.
4. **Validation** before the first epoch and after each (:func:`validate`): on each
   validation target a box on its ``val.slice`` (seeded as ``study`` seeds it), segmented
   by the node's pipeline (:func:`dicom_node.pipeline.segment_targets`) with the
   checkpoint just written, loaded the way a rule loads it; scored as ``study`` scores
   (:func:`.study.score`). A target whose segmentation fails scores Dice 0.
5. **Outputs**: ``last.pt`` after every epoch (weights, optimiser and progress: resume
   from it by running the same command again), ``best.pt`` (the weights with the highest
   median validation Dice so far; the initial weights count as epoch 0), ``metrics.csv``
   (epoch, steps, train loss, validation medians, slices segmented past the truth's ends, seconds), ``curves.png`` and
   ``config.yaml`` (the resolved settings). Every file is written to a temporary name and
   renamed. Ctrl-C writes ``last.pt`` with the weights of the last update and stops.

A checkpoint is ``{"model": state_dict, "finetune": {...}}``: the format both engines read
(``checkpoint:`` in a rule, ``--checkpoint`` in ``segment`` and ``study``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dicom_node.research.cases import CaseLoadError, NpzCase, load_npz_case, scan
from dicom_node.research.simulate import PromptSpec, case_rng, simulate_box, simulate_points, simulate_prompts

log = logging.getLogger(__name__)

CONFIG_NAME = "finetune"
MODELS = ("litemedsam", "sam2")
METRICS_FIELDS = [
    "epoch",
    "steps",
    "train_loss",
    "val_dice_median",
    "val_surface_dice_median",
    "val_hd95_median",
    "val_slices_extra",
    "val_targets",
    "seconds",
]
SPLIT_FIELDS = ["case", "patient", "split", "targets", "slices", "file", "reason"]
#: settings a resumed run may change (the others must equal those of the run in OUT_DIR)
RESUMABLE_CHANGES = {"epochs", "max_steps", "progress"}


class FinetuneError(ValueError):
    """The run cannot start or go on; the message says why (one sentence per cause)."""


class FinetuneInterrupted(RuntimeError):
    """Ctrl-C: ``last.pt`` holds the weights of the last update."""


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossSettings(_Strict):
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    iou_weight: float = Field(1.0, ge=0)


class DataSettings(_Strict):
    label: str = "gtv"
    min_area_px: int = Field(10, ge=1)
    jitter_mm: float = Field(3.0, ge=0)
    points: int = Field(0, ge=0)
    beyond_ends: int = Field(2, ge=0)
    window: tuple[float, float] | None = None

    @field_validator("label")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        return v


class ValSettings(_Strict):
    fraction: float = Field(0.2, ge=0, lt=1)
    slice: Literal["largest", "middle"] = "largest"
    jitter_mm: float = Field(0.0, ge=0)
    mode: Literal["box2d", "video3d"] = "box2d"
    limits: dict = Field(default_factory=dict)


class FinetuneSettings(_Strict):
    """The resolved settings (``config/finetune.yaml`` documents each)."""

    model: Literal["litemedsam", "sam2"] = "litemedsam"
    init_checkpoint: str | None = None
    model_cfg: str | None = "sam2.1_hiera_t512"
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    clip_norm: float | None = Field(1.0, gt=0)
    freeze_image_encoder: bool = True
    device: str = "auto"
    feature_cache_slices: int = Field(2000, ge=0)
    loss: LossSettings = Field(default_factory=LossSettings)
    seed: int = 0
    progress: bool = True
    data: DataSettings = Field(default_factory=DataSettings)
    val: ValSettings = Field(default_factory=ValSettings)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


def default_config_dir() -> Path:
    """The repository's ``config/`` folder (where ``finetune.yaml`` lives)."""
    return Path(__file__).resolve().parents[2] / "config"


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def compose_settings(
    overrides: list[str], config_file: str | os.PathLike | None = None
) -> tuple[FinetuneSettings, str]:
    """The settings from ``config_file`` (default ``config/finetune.yaml``) with Hydra
    ``key=value`` overrides applied; returns them and the resolved YAML text."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import OverrideParseException
    from omegaconf import OmegaConf

    path = Path(config_file) if config_file else default_config_dir() / f"{CONFIG_NAME}.yaml"
    if not path.is_file():
        raise FinetuneError(f"fine-tuning settings file not found: {path}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.resolve().parent), version_base=None):
            cfg = compose(config_name=path.stem, overrides=list(overrides))
    except OverrideParseException as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(
            f"cannot read the settings on the command line ({text}): write key=value, and quote a value "
            "with special characters, e.g. \"data.label='^GTV.*'\""
        ) from None
    except Exception as exc:  # hydra's composition errors (an unknown key, a missing file)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(f"cannot apply the settings ({text})") from None
    finally:
        GlobalHydra.instance().clear()
    data = OmegaConf.to_container(cfg, resolve=True)
    try:
        settings = FinetuneSettings.model_validate(data)
    except ValidationError as exc:
        raise FinetuneError(
            f"invalid fine-tuning settings in {path.name} or the command line: {_pydantic_message(exc)}"
        ) from None
    if settings.model == "litemedsam" and settings.data.points:
        raise FinetuneError("data.points must be 0 for --model litemedsam: LiteMedSAM takes box prompts only")
    if settings.model == "litemedsam" and settings.val.mode != "box2d":
        raise FinetuneError("val.mode video3d is for --model sam2; litemedsam validates with box2d")
    if settings.model == "sam2" and not settings.init_checkpoint:
        raise FinetuneError(
            "--model sam2 needs init_checkpoint=PATH (the SAM2 weights to fine-tune; none ship with the node)"
        )
    return settings, OmegaConf.to_yaml(OmegaConf.create(settings.model_dump()))


# ---------------------------------------------------------------------------------------
# Cases and the split
# ---------------------------------------------------------------------------------------
@dataclass
class CaseEntry:
    """One NPZ case: where it is, whose it is, what it holds (no voxels)."""

    npz: NpzCase
    patient: str
    targets: list[str] = field(default_factory=list)
    slices: int = 0
    reason: str = ""
    split: str = ""

    @property
    def name(self) -> str:
        return f"{self.npz.dataset}/{self.npz.name}" if self.npz.dataset else self.npz.name


_CONVERT_NAME = re.compile(r"^(?P<patient>.+)_(CT|MR)(_s[^_]+)?_[0-9a-f]{8}(-\d+)?$")


def patient_of(npz: NpzCase, data: dict) -> str:
    """The NPZ's ``patient`` field; else the patient part of ``convert``'s file name; else the file name."""
    if "patient" in data and str(data["patient"]).strip():
        return str(data["patient"])
    m = _CONVERT_NAME.match(npz.name)
    return m.group("patient") if m else npz.name


def find_cases(npz_dir: Path, label_regex: re.Pattern, min_area_px: int) -> list[CaseEntry]:
    """Every NPZ case under ``npz_dir`` with its matching targets (or why it has none)."""
    if not npz_dir.is_dir():
        raise FinetuneError(f"NPZ folder not found: {npz_dir}")
    found = scan(npz_dir, progress=False)
    if not found.npz:
        raise FinetuneError(
            f"no NPZ file under {npz_dir}: convert the DICOM cases first (dicom-node convert SRC {npz_dir})"
        )
    entries = []
    seen_labels: set[str] = set()
    for npz in found.npz:
        entry = CaseEntry(npz=npz, patient=npz.name)
        try:
            with np.load(npz.path, allow_pickle=False) as z:
                meta = {"patient": z["patient"]} if "patient" in z.files else {}
            entry.patient = patient_of(npz, meta)
            loaded = load_npz_case(npz, None)
        except CaseLoadError as exc:
            entry.reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - a foreign file is one case left out, not a crash
            entry.reason = f"unreadable NPZ ({type(exc).__name__}: {exc})"
        else:
            seen_labels.update(loaded.label_names)
            for name, mask in loaded.labels:
                if label_regex.search(name):
                    entry.targets.append(name)
                    entry.slices += int((mask.reshape(mask.shape[0], -1).sum(axis=1) >= min_area_px).sum())
            if not entry.targets:
                entry.reason = f"no label matches {label_regex.pattern!r} (labels: {', '.join(loaded.label_names)})"
            elif entry.slices == 0:
                entry.reason = f"no slice of {', '.join(entry.targets)} has {min_area_px} labelled pixels"
        entries.append(entry)
    usable = [e for e in entries if not e.reason]
    if not usable:
        if seen_labels:
            names = sorted(seen_labels)
            shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            raise FinetuneError(
                f"no label in the {len(entries)} NPZ file(s) under {npz_dir} matches data.label={label_regex.pattern!r} "
                f"(labels found: {shown})"
            )
        first = entries[0]
        raise FinetuneError(
            f"none of the {len(entries)} NPZ file(s) under {npz_dir} holds labels to train on "
            f"({first.npz.path.name}: {first.reason})"
        )
    return entries


def split_cases(entries: list[CaseEntry], fraction: float, seed: int) -> None:
    """Set each usable entry's ``split`` to train or val by patient (see the module doc)."""
    usable = [e for e in entries if not e.reason]
    patients = sorted({e.patient for e in usable})
    n_val = 0
    if fraction > 0:
        if len(patients) < 2:
            raise FinetuneError(
                f"validation needs at least 2 patients with labels, found {len(patients)}: add cases or set val.fraction=0"
            )
        n_val = min(len(patients) - 1, max(1, int(round(fraction * len(patients)))))
    order = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5E1])).permutation(len(patients))
    val = {patients[int(i)] for i in order[:n_val]}
    for e in entries:
        e.split = "skipped" if e.reason else ("val" if e.patient in val else "train")


# ---------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------
@dataclass
class _Slice:
    key: tuple
    gray: np.ndarray
    mask: np.ndarray
    spacing_yx: tuple[float, float]
    #: a slice past the target's end: its label is empty and its box comes from this mask
    #: (the nearest labelled slice's), grown by the walk's margin, as the walk would ask
    box_from: np.ndarray | None = None


def load_training_slices(entries: list[CaseEntry], settings: FinetuneSettings) -> list[_Slice]:
    """The labelled slices of the training targets, intensities as the engine prepares them."""
    from inference import preprocess

    regex = re.compile(settings.data.label, re.IGNORECASE)
    out: list[_Slice] = []
    for e in entries:
        if e.split != "train":
            continue
        loaded = load_npz_case(e.npz, None)
        window = tuple(settings.data.window) if settings.data.window else None
        gray = preprocess.prepare(loaded.volume, window).gray
        spacing_yx = (float(loaded.volume.spacing[1]), float(loaded.volume.spacing[2]))
        for name, mask in loaded.labels:
            if not regex.search(name):
                continue
            areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
            for k in np.flatnonzero(areas >= settings.data.min_area_px):
                out.append(_Slice((e.name, name, int(k)), gray[k].copy(), mask[k].copy(), spacing_yx))
            present = np.flatnonzero(areas)
            for end, step in ((int(present[0]), -1), (int(present[-1]), 1)):
                for n in range(1, settings.data.beyond_ends + 1):
                    k = end + step * n
                    if 0 <= k < mask.shape[0] and not mask[k].any():
                        empty = np.zeros_like(mask[k])
                        out.append(_Slice((e.name, name, k), gray[k].copy(), empty, spacing_yx, mask[end].copy()))
        del loaded, gray
    return out


def make_sample(s: _Slice, settings: FinetuneSettings, rng: np.random.Generator):
    """One :class:`inference.training.Sample` of a slice: a fresh simulated prompt."""
    from inference.training import Sample

    if s.box_from is not None:  # past the end: the box the walk would bring from the last slice
        from inference.limits import WalkLimits
        from inference.propagation import expand_box

        margin = float(settings.val.limits.get("margin_mm", WalkLimits().margin_mm))
        box = simulate_box(s.box_from, s.spacing_yx, settings.data.jitter_mm, rng)
        box = expand_box(box, margin, s.spacing_yx, s.mask.shape)
        return Sample(key=s.key, gray=s.gray, mask=s.mask, box=box, points=[])
    box = simulate_box(s.mask, s.spacing_yx, settings.data.jitter_mm, rng)
    points = []
    if settings.data.points:
        clicks = simulate_points(s.mask, s.spacing_yx, settings.data.points, 0, (3.0, 10.0), rng)
        points = [(float(i), float(j), bool(p)) for i, j, p in clicks]
    return Sample(key=s.key, gray=s.gray, mask=s.mask, box=box, points=points)


# ---------------------------------------------------------------------------------------
# Model, checkpoints
# ---------------------------------------------------------------------------------------
def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device={name} but CUDA is not available on this machine (use device=cpu)")
    return dev


def build_trainer(settings: FinetuneSettings, device):
    """The trainer with the initial weights; a checkpoint of another model is a clear error."""
    from inference.engine import SegmentationError
    from inference.training import LiteMedSamTrainer, Sam2Trainer, TrainingError

    try:
        if settings.model == "litemedsam":
            from inference.litemedsam import load_model

            model, info = load_model(settings.init_checkpoint)
            base = info.sha256
            trainer = LiteMedSamTrainer(model, device, settings.freeze_image_encoder, settings.feature_cache_slices)
        else:
            from inference.sam2_models import build_model, load_checkpoint

            model = build_model(settings.model_cfg, device="cpu")
            info = load_checkpoint(model, settings.init_checkpoint, model_name=settings.model_cfg)
            base = info.sha256
            trainer = Sam2Trainer(model, device, settings.freeze_image_encoder, settings.feature_cache_slices)
    except (SegmentationError, TrainingError, ValueError) as exc:
        raise FinetuneError(f"cannot start from the initial weights: {exc}") from None
    return trainer, base


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 022 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


_UMASK = _umask()


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def save_checkpoint(path: Path, state_dict: dict, meta: dict, extra: dict | None = None) -> None:
    """``{"model": state_dict, "finetune": meta, **extra}``, atomically."""
    import torch

    payload = {"model": state_dict, "finetune": meta, **(extra or {})}
    _atomic(path, lambda p: torch.save(payload, p))


def read_last(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FinetuneError(f"cannot resume: {path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or "finetune" not in obj or "optimizer" not in obj:
        raise FinetuneError(f"cannot resume: {path} was not written by dicom-node finetune")
    return obj


# ---------------------------------------------------------------------------------------
# Validation through the node's pipeline
# ---------------------------------------------------------------------------------------
def engine_spec(settings: FinetuneSettings, checkpoint: Path | None, device):
    """The engine a rule with this checkpoint builds (validation uses the eager PyTorch model:
    the same masks as OpenVINO's, without converting every epoch's weights)."""
    from inference.engine import EngineSpec

    dev = None if device.type == "cpu" and settings.model == "litemedsam" else str(device)
    if settings.model == "litemedsam":
        return EngineSpec(
            "litemedsam",
            checkpoint=None if checkpoint is None else str(checkpoint),
            device=dev,
            options=(("runtime", "eager"),),
        )
    return EngineSpec("sam2", checkpoint=str(checkpoint), model_cfg=settings.model_cfg, device=str(device))


def validate(entries: list[CaseEntry], settings: FinetuneSettings, spec) -> dict:
    """Segment every validation target from a simulated box and score it (module doc, 4)."""
    from dicom_node.pipeline import CaseError, segment_targets
    from dicom_node.research.study import score
    from inference.engine import SegmentOptions, release

    regex = re.compile(settings.data.label, re.IGNORECASE)
    prompt = PromptSpec(kind="box", slice=settings.val.slice, jitter_mm=settings.val.jitter_mm)
    window = tuple(settings.data.window) if settings.data.window else None
    options = SegmentOptions(mode=settings.val.mode, window=window, **settings.val.limits)
    rows = []
    try:
        for e in entries:
            if e.split != "val":
                continue
            loaded = load_npz_case(e.npz, None)
            for name, mask in loaded.labels:
                if not regex.search(name):
                    continue
                rng = case_rng(settings.seed, e.npz.name, name)
                prompts = simulate_prompts(mask, loaded.volume.spacing, prompt, rng)
                try:
                    (target,), _ = segment_targets(loaded.volume, [prompts], spec, options)
                    pred = target.result.mask
                except CaseError as exc:
                    log.warning("validation of %s %s failed: %s", e.name, name, exc)
                    pred = np.zeros_like(mask)
                row = score(pred, mask, loaded.volume.spacing)
                row.update(case=e.name, roi=name)
                rows.append(row)
    finally:
        release(spec)
    if not rows:
        return {"rows": [], "dice": math.nan, "surface_dice": math.nan, "hd95": math.nan, "extra": 0}

    def med(key):
        values = [float(r[key]) for r in rows if r[key] == r[key]]  # NaN-free
        return statistics.median(values) if values else math.nan

    return {
        "rows": rows,
        "dice": med("dice"),
        "surface_dice": med("surface_dice_2mm"),
        "hd95": med("hd95_mm"),
        "extra": sum(int(r["slices_extra"]) for r in rows),  # slices segmented past the truth's ends
    }


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------
def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    def write(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    _atomic(path, write)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def plot_curves(rows: list[dict], path: Path) -> None:
    """Train loss and validation Dice / HD95 against the epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(key):
        out = []
        for r in rows:
            try:
                out.append(float(r[key]))
            except (TypeError, ValueError):
                out.append(math.nan)
        return out

    epochs = col("epoch")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, col("train_loss"), marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("train loss (Dice + BCE + IoU head)")
    a.xaxis.get_major_locator().set_params(integer=True)
    a.grid(alpha=0.3)
    b.plot(epochs, col("val_dice_median"), marker="o", color="tab:green", label="Dice")
    b.plot(epochs, col("val_surface_dice_median"), marker=".", color="tab:olive", label="surface Dice 2 mm")
    b.set_xlabel("epoch")
    b.xaxis.get_major_locator().set_params(integer=True)
    b.set_ylabel("validation median")
    b.set_ylim(0, 1)
    b.grid(alpha=0.3)
    c = b.twinx()
    c.plot(epochs, col("val_hd95_median"), marker="x", color="tab:red", label="HD95 mm")
    c.set_ylabel("HD95 mm")
    lines = b.get_lines() + c.get_lines()
    b.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    fig.suptitle("dicom-node finetune (epoch 0: the initial weights)")
    fig.tight_layout()
    _atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    out: Path
    metrics: list[dict]
    best: Path | None
    last: Path
    best_epoch: int | None
    best_dice: float
    initial_dice: float
    train_cases: int
    val_cases: int
    steps: int


def _settings_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _settings_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def _check_out_dir(out: Path, settings: FinetuneSettings) -> dict | None:
    """The run to resume in ``out`` (its last.pt), None for a new run; refuses a foreign folder."""
    import yaml

    if out.exists() and not out.is_dir():
        raise FinetuneError(f"OUT_DIR {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    last = out / "last.pt"
    if not last.is_file():
        raise FinetuneError(
            f"OUT_DIR {out} is not empty and holds no last.pt of an earlier run: choose a new or empty folder"
        )
    state = read_last(last)
    before = yaml.safe_load(str(state["finetune"].get("config", ""))) or {}
    changed = [k for k in _settings_diff(before, settings.model_dump()) if k not in RESUMABLE_CHANGES]
    if changed:
        raise FinetuneError(
            f"OUT_DIR {out} holds a run with other settings ({', '.join(changed)} differ): resume it with the "
            "same settings, or choose a new folder"
        )
    return state


def run_finetune(
    npz_dir: str | os.PathLike,
    out: str | os.PathLike,
    settings: FinetuneSettings,
    config_yaml: str,
    *,
    echo: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune; see the module doc. Raises :class:`FinetuneError` (nothing written when
    the input is bad) or :class:`FinetuneInterrupted` (Ctrl-C, ``last.pt`` written)."""
    import torch

    from inference.training import Optimiser, TrainingError

    if echo is None:

        def echo(text: str) -> None:
            print(text, flush=True)

    npz_dir, out = Path(npz_dir), Path(out)
    t_start = time.perf_counter()
    # -- everything that can be wrong with the input, before OUT_DIR is touched ------------
    resume = _check_out_dir(out, settings)
    regex = re.compile(settings.data.label, re.IGNORECASE)
    entries = find_cases(npz_dir, regex, settings.data.min_area_px)
    split_cases(entries, settings.val.fraction, settings.seed)
    train_n = sum(e.split == "train" for e in entries)
    val_n = sum(e.split == "val" for e in entries)
    if train_n == 0:
        raise FinetuneError("no case left for training: lower val.fraction or add cases")
    if settings.val.limits:
        from inference.engine import SegmentOptions

        try:
            SegmentOptions(**settings.val.limits)
        except (TypeError, ValueError) as exc:
            raise FinetuneError(f"val.limits: {exc}") from None
    device = resolve_device(settings.device)
    trainer, base_sha = build_trainer(settings, device)
    optimiser = Optimiser(
        trainer,
        settings.lr,
        settings.weight_decay,
        settings.grad_accumulation,
        settings.clip_norm,
    )
    for e in entries:
        if e.reason:
            log.warning("case %s left out: %s", e.name, e.reason)
    slices = load_training_slices(entries, settings)
    trainable, total = trainer.counts()
    echo(
        f"fine-tuning {settings.model} on {device.type}: {train_n} training case(s) ({len(slices)} slices), "
        f"{val_n} validation case(s), {trainable:,} of {total:,} parameters train"
        + (" (image encoder frozen)" if settings.freeze_image_encoder else "")
    )

    # -- OUT_DIR -----------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "config.yaml", lambda p: p.write_text(config_yaml, encoding="utf-8"))
    _write_csv(
        out / "split.csv",
        SPLIT_FIELDS,
        [
            {
                "case": e.name,
                "patient": e.patient,
                "split": e.split,
                "targets": ";".join(e.targets),
                "slices": e.slices,
                "file": str(e.npz.path),
                "reason": e.reason,
            }
            for e in entries
        ],
    )
    last_path, best_path, metrics_path = out / "last.pt", out / "best.pt", out / "metrics.csv"
    meta_base = {
        "model": settings.model,
        "model_cfg": settings.model_cfg if settings.model == "sam2" else "",
        "base_weights_sha256": base_sha,
        "config": config_yaml,
    }
    metrics = read_metrics(metrics_path) if resume else []
    epoch_done = 0
    best_dice = -1.0
    best_epoch: int | None = None
    if resume:
        trainer.model.load_state_dict(resume["model"], strict=True)
        optimiser.load_state_dict(resume["optimizer"])
        epoch_done = int(resume["finetune"]["epoch"])
        best_dice = float(resume["finetune"].get("best_dice", -1.0))
        best_epoch = resume["finetune"].get("best_epoch")
        metrics = [m for m in metrics if int(m["epoch"]) <= epoch_done]
        echo(f"resuming {out} after epoch {epoch_done} (step {optimiser.steps})")

    def meta(epoch: int, **more) -> dict:
        return {
            **meta_base,
            "epoch": epoch,
            "steps": optimiser.steps,
            "best_dice": best_dice,
            "best_epoch": best_epoch,
            **more,
        }

    def save_last(epoch: int, **more) -> None:
        save_checkpoint(last_path, trainer.state_dict(), meta(epoch, **more), {"optimizer": optimiser.state_dict()})

    def evaluate(epoch: int, train_loss: float) -> float:
        nonlocal best_dice, best_epoch
        t0 = time.perf_counter()
        if val_n:
            if epoch == 0:  # the initial weights: the packaged ones (None) or init_checkpoint
                ckpt = Path(settings.init_checkpoint) if settings.init_checkpoint else None
            else:
                ckpt = last_path
            v = validate(entries, settings, engine_spec(settings, ckpt, device))
        else:
            v = {"rows": [], "dice": math.nan, "surface_dice": math.nan, "hd95": math.nan, "extra": 0}
        row = {
            "epoch": epoch,
            "steps": optimiser.steps,
            "train_loss": "" if math.isnan(train_loss) else f"{train_loss:.5f}",
            "val_dice_median": f"{v['dice']:.4f}",
            "val_surface_dice_median": f"{v['surface_dice']:.4f}",
            "val_hd95_median": f"{v['hd95']:.2f}",
            "val_slices_extra": v["extra"],
            "val_targets": len(v["rows"]),
            "seconds": f"{time.perf_counter() - t_start:.1f}",
        }
        metrics.append(row)
        improved = (not val_n and epoch > 0) or (val_n and v["dice"] == v["dice"] and v["dice"] > best_dice)
        if improved:
            best_dice = v["dice"] if val_n else best_dice
            best_epoch = epoch
            save_checkpoint(best_path, trainer.state_dict(), meta(epoch, val_dice_median=v["dice"]))
        _write_csv(metrics_path, METRICS_FIELDS, metrics)
        plot_curves(metrics, out / "curves.png")
        echo(
            f"epoch {epoch}: steps {optimiser.steps}, train loss {row['train_loss'] or '-'}, "
            f"val Dice {row['val_dice_median']} (HD95 {row['val_hd95_median']} mm, {v['extra']} slices past the "
            f"ends, {len(v['rows'])} target(s)) "
            f"in {time.perf_counter() - t0:.0f} s" + (" *best*" if improved else "")
        )
        return v["dice"]

    if not resume:
        evaluate(0, math.nan)  # the initial weights (epoch 0; best.pt until an epoch beats them)

    per_epoch = settings.steps_per_epoch or max(1, math.ceil(len(slices) / settings.batch_size))
    batches = per_epoch * settings.grad_accumulation
    epoch = epoch_done
    try:
        for epoch in range(epoch_done + 1, settings.epochs + 1):
            if settings.max_steps is not None and optimiser.steps >= settings.max_steps:
                break
            rng = np.random.default_rng(np.random.SeedSequence([int(settings.seed) & 0xFFFFFFFF, epoch]))
            trainer.train()
            losses = []
            bar = None
            if settings.progress:
                from tqdm import tqdm

                # disable=None: no bar when stderr is not a terminal (a log file, a service)
                bar = tqdm(
                    total=batches, desc=f"epoch {epoch}/{settings.epochs}", unit="batch", leave=False, disable=None
                )
            try:
                order = rng.permutation(len(slices))
                pos = 0
                for b in range(batches):
                    if pos + settings.batch_size > len(order):
                        order, pos = rng.permutation(len(slices)), 0
                    idx = order[pos : pos + settings.batch_size]
                    pos += settings.batch_size
                    batch = [make_sample(slices[int(i)], settings, rng) for i in idx]
                    loss, _parts = trainer.loss(
                        batch, settings.loss.dice_weight, settings.loss.bce_weight, settings.loss.iou_weight
                    )
                    optimiser.step(loss, where=f"at epoch {epoch}, batch {b + 1}")
                    losses.append(float(loss.detach()))
                    if bar:
                        bar.update(1)
                        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                    if settings.max_steps is not None and optimiser.steps >= settings.max_steps:
                        break
            finally:
                if bar:
                    bar.close()
            trainer.eval()
            save_last(epoch)  # what validation loads, as a rule would
            evaluate(epoch, float(np.mean(losses)) if losses else math.nan)
            save_last(epoch)  # again: best_dice/best_epoch of this epoch
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        trainer.eval()
        save_last(epoch - 1, interrupted=True)
        raise FinetuneInterrupted(
            f"interrupted in epoch {epoch} at step {optimiser.steps}: {last_path} holds the weights of that step; "
            "run the same command again to resume from the start of that epoch"
        ) from None
    except TrainingError as exc:
        raise FinetuneError(str(exc)) from None

    initial = float(metrics[0]["val_dice_median"]) if metrics and metrics[0]["epoch"] in ("0", 0) else math.nan
    return FinetuneResult(
        out=out,
        metrics=metrics,
        best=best_path if best_path.is_file() else None,
        last=last_path,
        best_epoch=best_epoch,
        best_dice=best_dice,
        initial_dice=initial,
        train_cases=train_n,
        val_cases=val_n,
        steps=optimiser.steps,
    )
