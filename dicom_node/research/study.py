"""``dicom-node study``: re-contour a cohort from simulated planner prompts and score it.

For every case (DICOM cases found by :func:`.cases.scan`, or NPZ files written by
``dicom-node convert``) and every ground-truth ROI (``--roi``, default: names containing
"GTV"):

1. simulate the planner's prompt from the ground truth (:mod:`.simulate`, seeded by
   seed, case and ROI, so the same seed gives the same prompts);
2. segment through the node's own code path (:func:`segment_prompts`);
3. score against the ground truth with the true anisotropic spacing
   (:mod:`inference.metrics`): Dice, surface Dice at 2 mm, HD95 (mm), volume ratio, and
   how far along z the prediction reached compared with the ground truth.

Writes into OUT: ``cases.csv`` (one row per case and ROI; bad input as ``skipped`` rows
with the reason; an engine failure as a ``failed`` row scored as an empty prediction),
``summary.csv`` and ``summary.txt`` (median [Q1, Q3] per dataset and model),
``study.json`` (the settings), ``figures/`` (box plots, heatmap, and overlays of the
worst cases, see :mod:`.report`) and ``predictions/<dataset>/<case>.npz`` (the predicted
masks: ``segs`` label map and ``label_names``, as ``convert`` writes ``gts``).

With ``predictions`` (``--predictions DIR``) no engine runs: the masks saved in DIR (by
an earlier study, or by any other tool in the same format) are scored instead, with the
same metrics, summary and figures - to re-score a run or to compare another tool's output.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from dicom_node.research.cases import (
    CaseLoadError,
    DicomCase,
    LoadedCase,
    NpzCase,
    load_dicom_case,
    load_npz_case,
    pack_labels,
    safe_name,
    scan,
    unpack_labels,
)
from dicom_node.research.report import (
    Overlay,
    OverlaySlice,
    fmt,
    format_table,
    make_figures,
    overlay_figure,
    summarize,
    write_summary_csv,
)
from dicom_node.research.simulate import PromptSpec, SimulationError, case_rng, describe, simulate_prompts
from inference.engine import DEFAULT_ENGINE, EngineSpec, SegmentOptions
from inference.prompts import TargetPrompts
from inference.volume import Volume

log = logging.getLogger(__name__)

DEFAULT_ROI_PATTERN = r"(?i)gtv"
#: Columns of cases.csv, in order. Timing columns are the only ones that differ between
#: two runs with the same seed.
FIELDS = [
    "dataset",
    "case",
    "roi",
    "model",
    "engine",
    "mode",
    "prompt",
    "slice",
    "jitter_mm",
    "seed",
    "status",
    "reason",
    "dice",
    "surface_dice_2mm",
    "hd95_mm",
    "volume_ratio",
    "gt_volume_ml",
    "pred_volume_ml",
    "gt_z_first",
    "gt_z_last",
    "pred_z_first",
    "pred_z_last",
    "gt_slices",
    "pred_slices",
    "slices_reached",
    "slices_missed",
    "slices_extra",
    "extent_ratio",
    "prompt_slice",
    "prompt_detail",
    "spacing",
    "seconds",
    "seconds_load",
    "warnings",
]
TIMING_FIELDS = ("seconds", "seconds_load")
SCORED = ("ok", "failed")


@dataclass
class StudyConfig:
    """Everything that determines a study's numbers (saved as study.json)."""

    engine: str = DEFAULT_ENGINE
    checkpoint: str | None = None
    model_cfg: str | None = None
    device: str | None = None
    engine_options: dict = field(default_factory=dict)  # a rule's engine_options (e.g. point_method)
    mode: str = "box2d"
    window: tuple[float, float] | None = None
    model_label: str | None = None
    prompt: PromptSpec = field(default_factory=PromptSpec)
    seed: int = 0
    roi_pattern: str | None = DEFAULT_ROI_PATTERN
    dataset_name: str | None = None
    worst: int = 3
    tolerance_mm: float = 2.0
    predictions: str | None = None  # score these saved predictions instead of running an engine
    save_predictions: bool = True
    limits: dict = field(default_factory=dict)  # the walk's limits that differ from the defaults

    @property
    def model(self) -> str:
        """The model's name in tables and figures: engine, plus the checkpoint's file name."""
        if self.model_label:
            return self.model_label
        if self.predictions:
            # predictions of an earlier study keep that study's model name
            pdir = Path(self.predictions).resolve()
            settings = pdir.parent / "study.json"
            if pdir.name == "predictions" and settings.is_file():
                try:
                    return str(json.loads(settings.read_text(encoding="utf-8"))["model"])
                except (ValueError, KeyError, TypeError):
                    pass
            return f"predictions:{pdir.name}"
        if self.engine == "sam2":
            name = Path(self.checkpoint).stem if self.checkpoint else "no-checkpoint"
            return f"sam2:{name}" + (f"/{self.mode}" if self.mode != "box2d" else "")
        if self.checkpoint:  # a fine-tuned litemedsam
            return f"{self.engine}:{Path(self.checkpoint).stem}"
        return self.engine

    def engine_spec(self) -> EngineSpec:
        """The engine the study runs, as the node's pipeline builds it."""
        return EngineSpec(
            self.engine,
            checkpoint=None if self.checkpoint is None else str(self.checkpoint),
            model_cfg=self.model_cfg,
            device=None if self.device is None else str(self.device),
            options=tuple(sorted(self.engine_options.items())),
        )

    def options(self) -> SegmentOptions:
        return SegmentOptions(mode=self.mode, window=self.window, **self.limits)


@dataclass
class StudyResult:
    out: Path
    rows: list[dict]
    summary: list[dict]
    table: str
    figures: list[Path]


# ---------------------------------------------------------------------------------------
# The node's code path
# ---------------------------------------------------------------------------------------
class StudyError(ValueError):
    """The study cannot run at all (for example, the engine cannot be built)."""


def build_study_engine(config: StudyConfig):
    """The process-wide engine, built the way the node's pipeline builds it
    (:func:`dicom_node.pipeline.build_engine`). A bad engine setting or checkpoint is a
    :class:`StudyError` before any case runs."""
    from dicom_node.pipeline import CaseError, build_engine

    try:
        return build_engine(config.engine_spec())
    except (CaseError, ValueError) as exc:
        raise StudyError(str(exc)) from None


def segment_prompts(volume: Volume, prompts: TargetPrompts, config: StudyConfig):
    """Segment one target through the node's code path
    (:func:`dicom_node.pipeline.segment_targets`); returns its SegmentationResult."""
    from dicom_node.pipeline import segment_targets

    (target,), _warnings = segment_targets(volume, [prompts], config.engine_spec(), config.options())
    return target.result


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------
def z_extent(mask: np.ndarray) -> tuple[int, int] | None:
    """(first, last) slice index holding any voxel of ``mask``, or None when empty."""
    ks = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    return (int(ks[0]), int(ks[-1])) if ks.size else None


def score(pred: np.ndarray, truth: np.ndarray, spacing, tolerance_mm: float = 2.0) -> dict:
    """The study's metrics for one prediction against its ground truth (both (z, y, x)).

    Dice, surface Dice and HD95 come from :mod:`inference.metrics` with ``spacing``
    (dz, dy, dx). Along z: ``gt_slices``/``pred_slices`` are the extents (first to last
    slice, inclusive), ``slices_reached`` the fraction of ground-truth slices on which
    the prediction has voxels, ``slices_missed`` those ground-truth slices without
    prediction, ``slices_extra`` the predicted slices without ground truth, and
    ``extent_ratio`` = pred_slices / gt_slices.
    """
    from inference import metrics

    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    s = metrics.evaluate(pred, truth, spacing, tolerance_mm)
    gt_ext, pr_ext = z_extent(truth), z_extent(pred)
    gt_on = truth.reshape(truth.shape[0], -1).any(axis=1)
    pr_on = pred.reshape(pred.shape[0], -1).any(axis=1)
    gt_slices = gt_ext[1] - gt_ext[0] + 1 if gt_ext else 0
    pred_slices = pr_ext[1] - pr_ext[0] + 1 if pr_ext else 0
    return {
        "dice": s.dice,
        "surface_dice_2mm": s.surface_dice,
        "hd95_mm": s.hd95_mm,
        "volume_ratio": s.volume_ratio,
        "gt_volume_ml": s.truth_volume_ml,
        "pred_volume_ml": s.pred_volume_ml,
        "gt_z_first": gt_ext[0] if gt_ext else "",
        "gt_z_last": gt_ext[1] if gt_ext else "",
        "pred_z_first": pr_ext[0] if pr_ext else "",
        "pred_z_last": pr_ext[1] if pr_ext else "",
        "gt_slices": gt_slices,
        "pred_slices": pred_slices,
        "slices_reached": float((gt_on & pr_on).sum() / gt_on.sum()) if gt_on.any() else math.nan,
        "slices_missed": int((gt_on & ~pr_on).sum()),
        "slices_extra": int((pr_on & ~gt_on).sum()),
        "extent_ratio": pred_slices / gt_slices if gt_slices else math.nan,
    }


# ---------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------
def display_range(volume: Volume, window: tuple[float, float] | None) -> tuple[float, float]:
    """Stored values shown black .. white: the CT window (default 40/400), or the MR
    0.5-99.5 percentile of nonzero voxels (as the engines see the image)."""
    from inference.preprocess import DEFAULT_CT_WINDOW, percentile_range

    if volume.modality == "CT":
        level, width = window or DEFAULT_CT_WINDOW
        return level - width / 2.0, level + width / 2.0
    lo, hi = percentile_range(volume.array)
    return float(lo), float(hi)


def build_overlay(
    title: str,
    volume: Volume,
    truth: np.ndarray,
    pred: np.ndarray,
    prompts: TargetPrompts,
    window: tuple[float, float] | None,
) -> Overlay:
    """Three slices: the prompted one, the one with the largest error, and the end of the
    ground truth farthest from the prompt (where propagation has to get to)."""
    anchor = prompts.anchor_slices[0] if prompts.anchor_slices else int(np.argmax(truth.sum(axis=(1, 2))))
    error = (truth ^ pred).reshape(truth.shape[0], -1).sum(axis=1)
    picks: list[tuple[int, str]] = [(anchor, "prompt")]
    if error.any():
        picks.append((int(np.argmax(error)), "largest error"))
    ext = z_extent(truth)
    if ext:  # both ends of the ground truth, the farther from the prompt first
        for k in sorted(ext, key=lambda k: -abs(k - anchor)):
            picks.append((k, "GT end"))
    chosen: list[tuple[int, str]] = []
    for k, why in picks:
        if k not in [c for c, _ in chosen] and len(chosen) < 3:
            chosen.append((k, why))
    chosen.sort()
    overlay = Overlay(
        title=title,
        spacing_yx=(volume.spacing[1], volume.spacing[2]),
        display_range=display_range(volume, window),
        boxes=[(b.slice_index, b.i0, b.j0, b.i1, b.j1) for b in prompts.boxes],
        points=[(p.slice_index, p.i, p.j, p.positive) for p in prompts.points],
    )
    for k, why in chosen:
        overlay.slices.append(
            OverlaySlice(k=k, why=why, image=np.array(volume.array[k]), truth=truth[k].copy(), pred=pred[k].copy())
        )
    return overlay


# ---------------------------------------------------------------------------------------
# Running a study
# ---------------------------------------------------------------------------------------
def _base_row(config: StudyConfig, dataset: str, case: str, roi: str) -> dict:
    row = {k: "" for k in FIELDS}
    row.update(dataset=dataset, case=case, roi=roi, model=config.model, seed=config.seed)
    if config.predictions:
        row["engine"] = "predictions"
    else:
        row.update(
            engine=config.engine,
            mode=config.mode,
            prompt=config.prompt.kind,
            slice=config.prompt.slice,
            jitter_mm=fmt(config.prompt.jitter_mm),
        )
    return row


# ---------------------------------------------------------------------------------------
# Saved predictions
# ---------------------------------------------------------------------------------------
def prediction_path(root: Path, dataset: str, case: str) -> Path:
    """Where a case's predictions are saved: ``root/<dataset>/<case>.npz``."""
    return root / safe_name(dataset) / f"{safe_name(case)}.npz"


def save_predictions(path: Path, preds: list[tuple[str, np.ndarray]], spacing) -> None:
    """One NPZ per case: ``segs`` (label map; label n = n-th ROI), ``label_names``,
    ``roi_masks`` when predictions overlap (as ``dicom-node convert`` writes ``gts``)."""
    from dicom_node.research.convert import save_npz

    arrays, _ = pack_labels(preds, "segs")
    arrays["spacing"] = np.asarray(spacing, dtype=np.float64)
    save_npz(path, arrays)


def load_predictions(root: Path, dataset: str, case: str, shape) -> dict[str, np.ndarray]:
    """ROI name -> predicted mask of one case from ``root`` (see :func:`prediction_path`;
    a flat ``root/<case>.npz`` is accepted too); raises :class:`CaseLoadError`."""
    path = prediction_path(root, dataset, case)
    if not path.is_file():
        flat = root / f"{safe_name(case)}.npz"
        if not flat.is_file():
            raise CaseLoadError(f"no prediction file {path} (nor {flat})")
        path = flat
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001
        raise CaseLoadError(f"unreadable prediction file {path}: {type(exc).__name__}: {exc}") from exc
    if "segs" not in data:
        raise CaseLoadError(f"prediction file {path} has no 'segs' array")
    if tuple(data["segs"].shape) != tuple(shape):
        raise CaseLoadError(f"prediction {path} has shape {data['segs'].shape}, the case {tuple(shape)}")
    return dict(unpack_labels(data, "segs"))


def _load(item: DicomCase | NpzCase, roi_regex) -> LoadedCase:
    if isinstance(item, NpzCase):
        return load_npz_case(item, roi_regex)
    return load_dicom_case(item, roi_regex)


def study_case(
    loaded: LoadedCase,
    config: StudyConfig,
    seconds_load: float,
    keep_overlay,
    save_to: Path | None = None,
) -> list[dict]:
    """Rows for every ground-truth ROI of one loaded case; with ``save_to``, the
    predictions are saved there (see :func:`save_predictions`)."""
    from inference.engine import SegmentationError

    rows = []
    volume = loaded.volume
    spacing = volume.spacing
    saved: dict[str, np.ndarray] | None = None
    if config.predictions:
        try:
            saved = load_predictions(Path(config.predictions), loaded.dataset, loaded.name, volume.shape)
        except CaseLoadError as exc:
            row = _base_row(config, loaded.dataset, loaded.name, "")
            row.update(status="skipped", reason=str(exc))
            return [row]
    preds: list[tuple[str, np.ndarray]] = []
    for roi, truth in loaded.labels:
        row = _base_row(config, loaded.dataset, loaded.name, roi)
        row["spacing"] = "x".join(f"{s:.4g}" for s in spacing)
        row["seconds_load"] = fmt(seconds_load)
        row["warnings"] = "; ".join(loaded.warnings)
        prompts = TargetPrompts(target="", output_name="GTV_AI")
        t0 = time.perf_counter()
        if saved is not None:
            if roi not in saved:
                row.update(
                    status="skipped", reason=f"no prediction for ROI {roi!r} (has: {', '.join(saved) or 'none'})"
                )
                rows.append(row)
                continue
            pred = saved[roi]
            row["status"] = "ok"
        else:
            try:
                prompts = simulate_prompts(
                    truth,
                    spacing,
                    config.prompt,
                    case_rng(config.seed, loaded.name, roi),
                    target="",
                    output_name="GTV_AI",
                )
            except SimulationError as exc:
                row.update(status="skipped", reason=f"no prompt: {exc}")
                rows.append(row)
                continue
            row["prompt_slice"] = prompts.anchor_slices[0]
            row["prompt_detail"] = describe(prompts)
            t0 = time.perf_counter()
            try:
                result = segment_prompts(volume, prompts, config)
                pred = np.asarray(result.mask, dtype=bool)
                if pred.shape != truth.shape:
                    raise SegmentationError(f"engine returned a mask of shape {pred.shape}, expected {truth.shape}")
                row["status"] = "ok"
                if result.warnings:
                    row["warnings"] = "; ".join([*loaded.warnings, *result.warnings])
            except (SegmentationError, ValueError, RuntimeError) as exc:
                pred = np.zeros_like(truth)
                row.update(status="failed", reason=f"engine: {type(exc).__name__}: {exc}")
            row["seconds"] = fmt(time.perf_counter() - t0)
            preds.append((roi, pred))
        for key, value in score(pred, truth, spacing, config.tolerance_mm).items():
            row[key] = fmt(value) if isinstance(value, float) else value
        title = (
            f"{loaded.dataset} / {loaded.name} / {roi}: Dice {float(row['dice']):.3f}, "
            f"HD95 {float(row['hd95_mm']):.1f} mm, model {config.model}"
            + (f" ({row['reason']})" if row["status"] != "ok" else "")
        )
        keep_overlay(row, partial(build_overlay, title, volume, truth, pred, prompts, config.window))
        rows.append(row)
    if save_to is not None and preds:
        save_predictions(prediction_path(save_to, loaded.dataset, loaded.name), preds, spacing)
    return rows


class _Worst:
    """The ``n`` scored rows with the lowest Dice, with their overlays (built only for them)."""

    def __init__(self, n: int):
        self.n = n
        self.items: list[tuple[float, int, dict, Overlay]] = []
        self.counter = 0

    def __call__(self, row: dict, make) -> None:
        if self.n <= 0:
            return
        d = float(row["dice"])
        self.counter += 1
        if len(self.items) >= self.n and d >= self.items[-1][0]:
            return
        self.items.append((d, self.counter, row, make()))
        self.items.sort(key=lambda t: (t[0], t[1]))
        del self.items[self.n :]


def run_study(
    src: str | os.PathLike, out: str | os.PathLike, config: StudyConfig, progress: bool = True
) -> StudyResult:
    """Run a study over every case under ``src``; see the module doc."""
    src, out = Path(src), Path(out)
    regex = re.compile(config.roi_pattern) if config.roi_pattern else None
    if not config.predictions:
        build_study_engine(config)  # fail before the first case when the model cannot be built
    out.mkdir(parents=True, exist_ok=True)
    found = scan(src, dataset_name=config.dataset_name, progress=progress)
    items: list[DicomCase | NpzCase] = [*found.cases, *found.npz]
    log.info("study: %d cases (%d DICOM, %d NPZ), model %s", len(items), len(found.cases), len(found.npz), config.model)
    rows: list[dict] = []
    worst = _Worst(config.worst)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="study", unit="case")
    try:
        for item in items:
            t0 = time.perf_counter()
            try:
                loaded = _load(item, regex)
            except CaseLoadError as exc:
                row = _base_row(config, item.dataset, item.name, "")
                row.update(status="skipped", reason=str(exc))
                rows.append(row)
            except Exception as exc:  # noqa: BLE001 - one unreadable case must not end the study
                log.debug("loading %s failed", item.name, exc_info=True)
                row = _base_row(config, item.dataset, item.name, "")
                row.update(status="skipped", reason=f"{type(exc).__name__}: {exc}")
                rows.append(row)
            else:
                save_to = out / "predictions" if config.save_predictions and not config.predictions else None
                rows.extend(study_case(loaded, config, time.perf_counter() - t0, worst, save_to))
                del loaded
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    for skip in found.skipped:
        row = _base_row(config, skip.dataset, "", "")
        row.update(status="skipped", reason=f"{skip.source}: {skip.reason}")
        rows.append(row)

    write_rows(rows, out / "cases.csv")
    summary = summarize(rows)
    write_summary_csv(summary, out / "summary.csv")
    table = format_table(summary)
    (out / "summary.txt").write_text(table + "\n", encoding="utf-8")
    settings = asdict(config)
    settings["model"] = config.model
    settings["src"] = str(src)
    (out / "study.json").write_text(json.dumps(settings, indent=2, default=str) + "\n", encoding="utf-8")
    figures = make_figures(rows, out / "figures")
    for rank, (_, _, row, overlay) in enumerate(worst.items, start=1):
        name = f"{rank:02d}_{row['case']}_{row['roi']}".replace(os.sep, "_")
        figures.append(overlay_figure(overlay, out / "figures" / "worst" / f"{_safe(name)}.png"))
    return StudyResult(out=out, rows=rows, summary=summary, table=table, figures=figures)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name)


def write_rows(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def combine_reports(sources: list[str | os.PathLike], out: str | os.PathLike) -> StudyResult:
    """Summary and figures over the ``cases.csv`` of several studies (no overlays: those
    need the images, each study draws its own)."""
    from dicom_node.research.report import read_rows

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(sources)
    write_rows([{k: r.get(k, "") for k in FIELDS} for r in rows], out / "cases.csv")
    summary = summarize(rows)
    write_summary_csv(summary, out / "summary.csv")
    table = format_table(summary)
    (out / "summary.txt").write_text(table + "\n", encoding="utf-8")
    figures = make_figures(rows, out / "figures")
    return StudyResult(out=out, rows=rows, summary=summary, table=table, figures=figures)
