"""Study results: per-case CSV rows -> summary (median and IQR) and PNG figures.

Works on the rows of one study or of several (``dicom-node study --report DIR... -o OUT``
combines the ``cases.csv`` of earlier studies: one heatmap column per model).

Figures (matplotlib, Agg backend, written as PNG):

* ``box_<metric>.png`` - one box plot per metric: a box per dataset and model, every
  case drawn as a dot over it (cohorts are small; a box alone hides that);
* ``heatmap_dice.png`` - median Dice by dataset (rows) x model (columns), with n;
* ``worst/<rank>_<case>_<roi>.png`` - written by the study itself (it has the images):
  for its worst cases, a few slices with the ground truth, the prediction and the prompt
  drawn on the windowed image (:func:`overlay_figure`).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: (column, label, higher_is_better) of the metrics summarised and plotted.
METRICS: list[tuple[str, str, bool]] = [
    ("dice", "Dice", True),
    ("surface_dice_2mm", "Surface Dice at 2 mm", True),
    ("hd95_mm", "HD95 (mm)", False),
    ("volume_ratio", "Volume ratio (prediction / GT)", False),
    ("slices_reached", "Fraction of GT slices reached", True),
    ("extent_ratio", "z-extent ratio (prediction / GT)", False),
    ("seconds", "Seconds per ROI (segmentation)", False),
]
ALL = "ALL"


# ---------------------------------------------------------------------------------------
# Values and rows
# ---------------------------------------------------------------------------------------
def to_float(value) -> float:
    """A CSV cell as a float: '' -> nan, 'inf' -> inf."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def fmt(value) -> str:
    """A number for the CSV files: 6 significant digits, 'inf' kept, nan as ''."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    v = float(value)
    if math.isnan(v):
        return ""
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.6g}"


def read_rows(sources: list[str | os.PathLike]) -> list[dict]:
    """The rows of ``cases.csv`` files; each source is a study folder or a CSV file."""
    rows: list[dict] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            path = path / "cases.csv"
        if not path.is_file():
            raise FileNotFoundError(f"no study results at {src} (expected a study folder with cases.csv, or a CSV)")
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "dice" not in reader.fieldnames or "model" not in reader.fieldnames:
                raise ValueError(f"{path} is not a study CSV (needs columns 'dice' and 'model')")
            rows.extend(dict(r) for r in reader)
    return rows


def ok_rows(rows: list[dict]) -> list[dict]:
    """The scored rows: ``ok``, and ``failed`` (an engine failure, scored as an empty
    prediction so that failures count against the model instead of vanishing)."""
    return [r for r in rows if r.get("status") in ("ok", "failed")]


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile that copes with inf (an inf neighbour gives inf)."""
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    pos = q * (len(vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = vals[lo], vals[hi]
    if lo == hi or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return b if pos - lo > 0 else a
    return a + (b - a) * (pos - lo)


# ---------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> list[dict]:
    """Per (dataset, model), plus (ALL, model) when there are several datasets: counts and
    the median, first and third quartile of every metric."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    datasets = sorted({r.get("dataset", "") for r in rows})
    for r in rows:
        groups[(r.get("dataset", ""), r.get("model", ""))].append(r)
        if len(datasets) > 1:
            groups[(ALL, r.get("model", ""))].append(r)
    out = []
    for dataset, model in sorted(groups, key=lambda k: (k[0] == ALL, k[0], k[1])):
        members = groups[(dataset, model)]
        good = ok_rows(members)
        entry = {
            "dataset": dataset,
            "model": model,
            "n": len(good),
            "skipped": len(members) - len(good),
            "cases": len({r.get("case") for r in good}),
        }
        for col, _, _ in METRICS:
            vals = [to_float(r.get(col)) for r in good]
            entry[f"{col}_median"] = quantile(vals, 0.5)
            entry[f"{col}_q1"] = quantile(vals, 0.25)
            entry[f"{col}_q3"] = quantile(vals, 0.75)
        out.append(entry)
    return out


def summary_fields() -> list[str]:
    fields = ["dataset", "model", "n", "skipped", "cases"]
    for col, _, _ in METRICS:
        fields += [f"{col}_median", f"{col}_q1", f"{col}_q3"]
    return fields


def write_summary_csv(summary: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=summary_fields())
        w.writeheader()
        for s in summary:
            w.writerow({k: (fmt(v) if isinstance(v, float) else v) for k, v in s.items()})


def format_table(summary: list[dict]) -> str:
    """The summary as a fixed-width text table: median [Q1, Q3] per metric."""
    short = {
        "dice": "Dice",
        "surface_dice_2mm": "sDice@2mm",
        "hd95_mm": "HD95 mm",
        "volume_ratio": "vol ratio",
        "slices_reached": "GT slices reached",
        "extent_ratio": "z-extent ratio",
        "seconds": "s/ROI",
    }
    header = ["dataset", "model", "n", "skip"] + [short[c] for c, _, _ in METRICS]
    lines = [header]
    for s in summary:
        cells = [str(s["dataset"]), str(s["model"]), str(s["n"]), str(s["skipped"])]
        for col, _, _ in METRICS:
            med = s[f"{col}_median"]
            if math.isnan(med):
                cells.append("-")
            else:
                digits = 1 if col in ("hd95_mm", "seconds") else 3
                cells.append(f"{_num(med, digits)} [{_num(s[f'{col}_q1'], digits)}, {_num(s[f'{col}_q3'], digits)}]")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text) + "\n(median [Q1, Q3] over ROIs; n = ROIs scored, skip = ROIs or cases skipped)"


def _num(v: float, digits: int) -> str:
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def boxplot_metric(rows: list[dict], metric: str, label: str, path: Path) -> Path:
    """One box per dataset x model, with every case as a dot. Infinite values (HD95 of
    an empty prediction) cannot be drawn: they are left out of the box and counted above
    it ("+1 inf"); the summary's medians include them."""
    plt = _pyplot()
    good = ok_rows(rows)
    datasets = sorted({r["dataset"] for r in good})
    models = sorted({r["model"] for r in good})
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(datasets) * max(1, len(models)) + 1.5), 4.2))
    rng = np.random.default_rng(0)  # dot jitter only
    finite_max = -math.inf
    for mi, model in enumerate(models):
        for di, dataset in enumerate(datasets):
            vals = [to_float(r.get(metric)) for r in good if r["dataset"] == dataset and r["model"] == model]
            vals = [v for v in vals if not math.isnan(v)]
            finite = [v for v in vals if math.isfinite(v)]
            n_inf = len(vals) - len(finite)
            x = di + (mi - (len(models) - 1) / 2) * width
            if finite:
                finite_max = max(finite_max, max(finite))
                ax.boxplot(
                    [finite],
                    positions=[x],
                    widths=width * 0.8,
                    showfliers=False,
                    patch_artist=True,
                    boxprops={"facecolor": colors(mi), "alpha": 0.35},
                    medianprops={"color": "black"},
                )
                ax.scatter(
                    x + rng.uniform(-width * 0.2, width * 0.2, len(finite)),
                    finite,
                    s=14,
                    color=colors(mi),
                    edgecolor="black",
                    linewidth=0.4,
                    zorder=3,
                )
            if n_inf:
                ax.annotate(
                    f"+{n_inf} inf",
                    (x, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="darkred",
                )
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, rotation=20 if len(datasets) > 3 else 0, ha="right" if len(datasets) > 3 else "center")
    ax.set_ylabel(label)
    if metric in ("dice", "surface_dice_2mm", "slices_reached"):
        ax.set_ylim(-0.02, 1.02)
    if metric in ("volume_ratio", "extent_ratio"):
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    if len(models) > 1:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i), alpha=0.5) for i in range(len(models))]
        ax.legend(handles, models, fontsize=8, loc="best")
    n = len([r for r in good if not math.isnan(to_float(r.get(metric)))])
    ax.set_title(f"{label} (n = {n} ROIs)" + (f", model {models[0]}" if len(models) == 1 else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_grid(rows: list[dict], metric: str = "dice") -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(datasets, models, medians, counts): the median of ``metric`` over the scored ROIs
    of each dataset (rows) and model (columns); nan where there is none."""
    good = ok_rows(rows)
    datasets = sorted({r["dataset"] for r in rows})
    models = sorted({r["model"] for r in rows if r.get("model")})
    grid = np.full((len(datasets), len(models)), np.nan)
    counts = np.zeros(grid.shape, dtype=int)
    for i, d in enumerate(datasets):
        for j, m in enumerate(models):
            vals = [to_float(r.get(metric)) for r in good if r["dataset"] == d and r["model"] == m]
            vals = [v for v in vals if not math.isnan(v)]
            counts[i, j] = len(vals)
            if vals:
                grid[i, j] = quantile(vals, 0.5)
    return datasets, models, grid, counts


def heatmap(rows: list[dict], path: Path, metric: str = "dice", label: str = "median Dice") -> Path:
    """Median of ``metric`` by dataset (rows) x model (columns), annotated with n."""
    plt = _pyplot()
    datasets, models, grid, counts = heatmap_grid(rows, metric)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(models) + 2.5), max(2.5, 0.6 * len(datasets) + 1.5)))
    ax.set_facecolor("lightgrey")  # cells without data
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(datasets)):
        for j in range(len(models)):
            text = "no data" if counts[i, j] == 0 else f"{grid[i, j]:.3f}\nn={counts[i, j]}"
            color = "black" if counts[i, j] == 0 or grid[i, j] >= 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=20, ha="right")
    ax.set_yticks(range(len(datasets)))
    ax.set_yticklabels(datasets)
    ax.set_xlabel("model")
    ax.set_ylabel("dataset")
    ax.set_title(f"{label} by dataset and model", fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(rows: list[dict], out: Path) -> list[Path]:
    """Box plots of every metric and the Dice heatmap into ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if not ok_rows(rows):
        return paths
    for col, label, _ in METRICS:
        paths.append(boxplot_metric(rows, col, label, out / f"box_{col}.png"))
    paths.append(heatmap(rows, out / "heatmap_dice.png"))
    return paths


# ---------------------------------------------------------------------------------------
# Overlays of single cases
# ---------------------------------------------------------------------------------------
@dataclass
class OverlaySlice:
    k: int
    why: str  # "prompt", "largest error", "GT end", ...
    image: np.ndarray  # 2D, stored values
    truth: np.ndarray  # 2D bool
    pred: np.ndarray  # 2D bool


@dataclass
class Overlay:
    """What one overlay figure shows (kept by the study for its worst cases)."""

    title: str
    spacing_yx: tuple[float, float]
    display_range: tuple[float, float]  # stored values mapped to black .. white
    slices: list[OverlaySlice] = field(default_factory=list)
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)  # k, i0, j0, i1, j1
    points: list[tuple[int, float, float, bool]] = field(default_factory=list)  # k, i, j, positive


def _crop(slices: list[OverlaySlice], boxes, points, margin: int = 12) -> tuple[slice, slice]:
    """The in-plane region that holds GT, prediction and prompt on every shown slice."""
    ny, nx = slices[0].image.shape
    rows, cols = [], []
    for s in slices:
        for m in (s.truth, s.pred):
            r = np.flatnonzero(m.any(axis=1))
            c = np.flatnonzero(m.any(axis=0))
            if r.size:
                rows += [r[0], r[-1]]
                cols += [c[0], c[-1]]
    for _, i0, j0, i1, j1 in boxes:
        rows += [i0, i1]
        cols += [j0, j1]
    for _, i, j, _ in points:
        rows.append(i)
        cols.append(j)
    if not rows:
        return slice(0, ny), slice(0, nx)
    r0, r1 = int(max(0, min(rows) - margin)), int(min(ny, max(rows) + margin + 1))
    c0, c1 = int(max(0, min(cols) - margin)), int(min(nx, max(cols) + margin + 1))
    # at least 64 pixels each way, so the anatomy around stays visible
    for lo_hi, n in (([r0, r1], ny), ([c0, c1], nx)):
        need = 64 - (lo_hi[1] - lo_hi[0])
        if need > 0:
            lo_hi[0] = max(0, lo_hi[0] - need // 2)
            lo_hi[1] = min(n, lo_hi[0] + 64)
    return slice(r0, r1), slice(c0, c1)


def overlay_figure(overlay: Overlay, path: Path) -> Path:
    """One row of slices: windowed image, GT contour (green), prediction contour (red),
    prompt box (yellow) and clicks (+ cyan, x magenta); pixels drawn with their true
    aspect ratio (row spacing / column spacing)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    n = len(overlay.slices)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 4.0), squeeze=False)
    rs, cs = _crop(overlay.slices, overlay.boxes, overlay.points)
    dy, dx = overlay.spacing_yx
    vmin, vmax = overlay.display_range
    for ax, s in zip(axes[0], overlay.slices):
        ax.imshow(s.image[rs, cs], cmap="gray", vmin=vmin, vmax=vmax, aspect=dy / dx, interpolation="nearest")
        # the ground truth wider and underneath, so that it shows where the two coincide
        for mask, color, width in ((s.truth, "lime", 2.4), (s.pred, "red", 1.1)):
            part = mask[rs, cs]
            if part.any() and not part.all():
                ax.contour(part.astype(float), levels=[0.5], colors=[color], linewidths=width)
        for k, i0, j0, i1, j1 in overlay.boxes:
            if k == s.k:
                ax.add_patch(
                    Rectangle(
                        (j0 - cs.start - 0.5, i0 - rs.start - 0.5),
                        j1 - j0 + 1,
                        i1 - i0 + 1,
                        fill=False,
                        edgecolor="yellow",
                        linewidth=1.2,
                        linestyle="--",
                    )
                )
        for k, i, j, positive in overlay.points:
            if k == s.k:
                ax.plot(
                    j - cs.start,
                    i - rs.start,
                    marker="+" if positive else "x",
                    markersize=9,
                    markeredgewidth=2,
                    color="cyan" if positive else "magenta",
                )
        gt_px, pr_px = int(s.truth.sum()), int(s.pred.sum())
        ax.set_title(
            f"slice {s.k} ({s.why})\nGT {gt_px * dy * dx / 100:.1f} cm², pred {pr_px * dy * dx / 100:.1f} cm²",
            fontsize=8,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color="lime", label="ground truth"), Line2D([], [], color="red", label="prediction")]
    if overlay.boxes:
        handles.append(Line2D([], [], color="yellow", linestyle="--", label="prompt box"))
    if overlay.points:
        handles.append(Line2D([], [], color="cyan", marker="+", linestyle="", label="positive click"))
        handles.append(Line2D([], [], color="magenta", marker="x", linestyle="", label="negative click"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(overlay.title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
