"""Study reports on synthetic result tables: summary statistics, the printed table, the
figures (box plots, heatmap, overlays) and combining several studies' CSVs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from dicom_node.cli import main
from dicom_node.research.report import (
    METRICS,
    Overlay,
    OverlaySlice,
    format_table,
    heatmap,
    heatmap_grid,
    make_figures,
    overlay_figure,
    quantile,
    summarize,
)
from dicom_node.research.study import FIELDS, write_rows


def _row(dataset, model, dice, hd95="1.0", status="ok", case=None, **extra):
    row = {k: "" for k in FIELDS}
    row.update(
        dataset=dataset,
        model=model,
        case=case or f"{dataset}-{dice}",
        roi="GTV",
        status=status,
        dice=str(dice),
        surface_dice_2mm=str(dice),
        hd95_mm=str(hd95),
        volume_ratio="1.0",
        slices_reached="1.0",
        extent_ratio="1.0",
        seconds="0.5",
    )
    row.update(extra)
    return row


def _rows() -> list[dict]:
    return [
        _row("lung", "classic", 0.5, hd95="10"),
        _row("lung", "classic", 0.7, hd95="6"),
        _row("lung", "classic", 0.8, hd95="4"),
        _row("lung", "classic", 0.9, hd95="2"),
        _row("lung", "classic", 0.0, hd95="inf", status="failed", reason="engine: x"),
        _row("lung", "classic", "", hd95="", status="skipped", reason="corrupt"),
        _row("phantom", "classic", 0.95, hd95="1"),
        _row("phantom", "classic", 0.97, hd95="1.5"),
        _row("phantom", "sam2:ckpt", 0.99, hd95="0.5"),
    ]


def test_quantile_linear_with_inf():
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.25) == pytest.approx(1.75)
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.75) == pytest.approx(3.25)
    assert quantile([1.0, math.inf], 0.5) == math.inf  # an empty prediction is not averaged away
    assert quantile([1.0, 2.0, math.inf], 0.5) == 2.0
    assert quantile([math.inf, math.inf], 0.5) == math.inf
    assert math.isnan(quantile([], 0.5))
    assert quantile([5.0, math.nan, 1.0], 0.5) == 3.0  # nan (no value) is left out


def test_summary_median_iqr_per_dataset_and_model():
    summary = {(s["dataset"], s["model"]): s for s in summarize(_rows())}
    assert set(summary) == {
        ("lung", "classic"),
        ("phantom", "classic"),
        ("phantom", "sam2:ckpt"),
        ("ALL", "classic"),
        ("ALL", "sam2:ckpt"),
    }
    lung = summary[("lung", "classic")]
    # scored: 0.5, 0.7, 0.8, 0.9 and the failure (0.0); the skipped row is counted apart
    assert lung["n"] == 5 and lung["skipped"] == 1
    assert lung["dice_median"] == pytest.approx(0.7)
    assert lung["dice_q1"] == pytest.approx(0.5)
    assert lung["dice_q3"] == pytest.approx(0.8)
    # HD95 values 10, 6, 4, 2, inf: median 6, Q3 between 6 and 10 -> 10
    assert lung["hd95_mm_median"] == pytest.approx(6.0)
    assert lung["hd95_mm_q3"] == pytest.approx(10.0)
    everything = summary[("ALL", "classic")]
    assert everything["n"] == 7 and everything["dice_median"] == pytest.approx(0.8)
    assert summary[("phantom", "classic")]["dice_median"] == pytest.approx(0.96)
    table = format_table(summarize(_rows()))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["dataset", "model", "n", "skip"]
    lung_line = next(l for l in lines if l.startswith("lung"))
    assert "0.700 [0.500, 0.800]" in lung_line and "6.0 [4.0, 10.0]" in lung_line


def _png_ok(path: Path, min_size=(200, 200)) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1]
    return img


def test_figures_box_plots_and_heatmap(tmp_path):
    paths = make_figures(_rows(), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted([f"box_{c}.png" for c, _, _ in METRICS] + ["heatmap_dice.png"])
    for p in paths:
        img = _png_ok(p)
        assert img[..., :3].std() > 0.05  # not a blank canvas
    # nothing scored: no figures, no crash
    assert make_figures([_row("x", "m", "", status="skipped")], tmp_path / "none") == []


def test_heatmap_medians_by_dataset_and_model(tmp_path):
    rows = [
        _row("a", "m1", 0.1),
        _row("a", "m1", 0.3),
        _row("a", "m2", 0.95),
        _row("b", "m1", 0.9),
        _row("b", "m1", 0.0, status="failed"),
        _row("c", "m1", "", status="skipped"),
    ]
    datasets, models, grid, counts = heatmap_grid(rows)
    assert datasets == ["a", "b", "c"] and models == ["m1", "m2"]
    np.testing.assert_allclose(grid[0], [0.2, 0.95])
    assert grid[1, 0] == pytest.approx(0.45) and math.isnan(grid[1, 1])  # the failure counts as 0
    assert np.isnan(grid[2]).all()
    np.testing.assert_array_equal(counts, [[2, 1], [2, 0], [0, 0]])
    img = _png_ok(heatmap(rows, tmp_path / "h.png"))[..., :3]
    yellow = (img[..., 0] > 0.8) & (img[..., 1] > 0.8) & (img[..., 2] < 0.4)  # viridis near 1
    purple = (img[..., 0] < 0.35) & (img[..., 1] < 0.3) & (img[..., 2] > 0.35)  # viridis near 0.2
    assert yellow.sum() > 500 and purple.sum() > 500


def test_overlay_figure_draws_truth_prediction_and_prompt(tmp_path):
    yy, xx = np.mgrid[0:120, 0:100]
    image = np.where((yy - 60) ** 2 + (xx - 50) ** 2 < 400, 60.0, -800.0)
    truth = (yy - 60) ** 2 + (xx - 50) ** 2 < 400
    pred = (yy - 64) ** 2 + (xx - 52) ** 2 < 300
    overlay = Overlay(
        title="test case",
        spacing_yx=(0.8, 1.2),
        display_range=(-160.0, 240.0),
        slices=[OverlaySlice(3, "prompt", image, truth, pred), OverlaySlice(5, "largest error", image, truth, pred)],
        boxes=[(3, 40.0, 30.0, 80.0, 70.0)],
        points=[(5, 60.0, 50.0, True), (5, 60.0, 80.0, False)],
    )
    img = _png_ok(overlay_figure(overlay, tmp_path / "w" / "o.png"))[..., :3]
    green = (img[..., 1] > 0.7) & (img[..., 0] < 0.4) & (img[..., 2] < 0.4)
    red = (img[..., 0] > 0.7) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
    yellow = (img[..., 0] > 0.8) & (img[..., 1] > 0.8) & (img[..., 2] < 0.3)
    cyan = (img[..., 1] > 0.7) & (img[..., 2] > 0.7) & (img[..., 0] < 0.3)
    magenta = (img[..., 0] > 0.7) & (img[..., 2] > 0.7) & (img[..., 1] < 0.3)
    for colour, mask in (("green", green), ("red", red), ("yellow", yellow), ("cyan", cyan), ("magenta", magenta)):
        assert mask.sum() > 20, f"no {colour} drawn"


def test_study_report_combines_studies(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_rows([r for r in _rows() if r["model"] == "classic"], a / "cases.csv")
    write_rows([r for r in _rows() if r["model"] != "classic"], b / "cases.csv")
    out = tmp_path / "combined"
    assert main(["study", "--report", str(a), str(b / "cases.csv"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sam2:ckpt" in printed and "classic" in printed and "combined 2 studies" in printed
    with open(out / "summary.csv", newline="") as fh:
        summary = {(r["dataset"], r["model"]): r for r in csv.DictReader(fh)}
    assert float(summary[("phantom", "sam2:ckpt")]["dice_median"]) == pytest.approx(0.99)
    assert float(summary[("lung", "classic")]["dice_median"]) == pytest.approx(0.7)
    assert (out / "figures" / "heatmap_dice.png").is_file()
    with open(out / "cases.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(_rows())
    # bad uses give clear errors
    assert main(["study", "--report", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "no study results" in capsys.readouterr().err
    assert main(["study", "--report", str(a)]) == 2
    assert "needs -o" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    assert main(["study", "--report", str(tmp_path / "other.csv"), "-o", str(out)]) == 2
    assert "not a study CSV" in capsys.readouterr().err
