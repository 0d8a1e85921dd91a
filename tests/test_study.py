"""dicom-node study: scores checked against hand-computed values, end-to-end runs on
phantoms, NPZ files and real data, bad input, reproducibility."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers import shared_path
from test_convert import build_cohort, load_npz, read_csv  # the cohort with bad input

from dicom_node.cli import main
from dicom_node.research.study import score, z_extent

SPACING = (2.5, 0.8, 1.2)  # dz, dy, dx: all different, so a swapped axis shows


def _slab(shape=(12, 20, 24), z=(3, 6), y=(5, 6), x=(4, 15)) -> np.ndarray:
    """A box of voxels, inclusive index ranges. Thin (2 voxels) in y or x, so that every
    voxel is a surface voxel and the surface distances can be counted by hand."""
    m = np.zeros(shape, dtype=bool)
    m[z[0] : z[1] + 1, y[0] : y[1] + 1, x[0] : x[1] + 1] = True
    return m


def test_score_extra_slice_is_measured_along_z():
    truth = _slab()  # 4 slices x 2 rows x 12 columns = 96 voxels
    pred = _slab(z=(3, 7))  # one slice more: 120 voxels
    s = score(pred, truth, SPACING)
    # Dice = 2 * 96 / (96 + 120)
    assert s["dice"] == pytest.approx(192 / 216)
    # every voxel is on the surface; 24 predicted voxels lie one slice (2.5 mm) from the
    # truth, all others at 0: 95th percentile of (96 x 0, 24 x 2.5) is 2.5 mm
    assert s["hd95_mm"] == pytest.approx(2.5)
    # within 2 mm: 96 + 96 surface voxels of 96 + 120
    assert s["surface_dice_2mm"] == pytest.approx(192 / 216)
    assert s["volume_ratio"] == pytest.approx(1.25)
    voxel_ml = 2.5 * 0.8 * 1.2 / 1000
    assert s["gt_volume_ml"] == pytest.approx(96 * voxel_ml)
    assert s["pred_volume_ml"] == pytest.approx(120 * voxel_ml)
    assert (s["gt_z_first"], s["gt_z_last"], s["pred_z_first"], s["pred_z_last"]) == (3, 6, 3, 7)
    assert (s["gt_slices"], s["pred_slices"]) == (4, 5)
    assert s["slices_reached"] == 1.0 and s["slices_missed"] == 0 and s["slices_extra"] == 1
    assert s["extent_ratio"] == pytest.approx(5 / 4)


def test_score_extra_column_is_measured_along_x_and_extra_row_along_y():
    truth = _slab()  # thin in y
    s = score(_slab(x=(4, 16)), truth, SPACING)  # one column more (8 voxels at dx = 1.2 mm)
    assert s["dice"] == pytest.approx(192 / 200)
    assert s["hd95_mm"] == pytest.approx(1.2)
    assert s["surface_dice_2mm"] == pytest.approx(1.0)  # 1.2 mm is within 2 mm
    assert s["slices_extra"] == 0 and s["extent_ratio"] == 1.0
    truth = _slab(y=(2, 13), x=(7, 8))  # thin in x: 4 x 12 x 2
    s = score(_slab(y=(2, 14), x=(7, 8)), truth, SPACING)  # one row more (dy = 0.8 mm)
    assert s["dice"] == pytest.approx(192 / 200)
    assert s["hd95_mm"] == pytest.approx(0.8)
    # the same with a 1 mm tolerance: 0.8 mm is within, so still 1.0; at 0.5 mm it is not
    assert score(_slab(y=(2, 14), x=(7, 8)), truth, SPACING, tolerance_mm=0.5)["surface_dice_2mm"] == pytest.approx(
        192 / 200
    )


def test_score_missed_slices_and_empty_prediction():
    truth = _slab(z=(2, 9))  # 8 slices
    pred = _slab(z=(4, 7))  # the middle 4
    s = score(pred, truth, SPACING)
    assert s["slices_reached"] == pytest.approx(0.5) and s["slices_missed"] == 4 and s["slices_extra"] == 0
    assert s["extent_ratio"] == pytest.approx(0.5)
    assert s["dice"] == pytest.approx(2 * 96 / (192 + 96))
    # HD95: truth voxels two slices beyond the prediction are 5 mm away
    # (truth surface: 192 voxels; 96 at 0, 48 at 2.5 mm, 48 at 5 mm -> p95 = 5 mm)
    assert s["hd95_mm"] == pytest.approx(5.0)
    empty = score(np.zeros_like(truth), truth, SPACING)
    assert empty["dice"] == 0.0 and empty["surface_dice_2mm"] == 0.0
    assert math.isinf(empty["hd95_mm"]) and empty["volume_ratio"] == 0.0
    assert empty["pred_z_first"] == "" and empty["pred_slices"] == 0
    assert empty["slices_reached"] == 0.0 and empty["slices_missed"] == 8
    assert z_extent(np.zeros((3, 2, 2), bool)) is None and z_extent(truth) == (2, 9)


# ---------------------------------------------------------------------------------------
# The study end to end
# ---------------------------------------------------------------------------------------

TIMING = {"seconds", "seconds_load"}


def _write_case(path: Path, imgs, labels: list[tuple[str, np.ndarray]], key="gts", spacing=SPACING):
    from dicom_node.research.cases import pack_labels

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays, _ = pack_labels(labels, key)
    if imgs is not None:
        arrays.update(
            imgs=imgs,
            spacing=np.array(spacing),
            origin=np.array([10.0, -20.0, 30.0]),
            direction=np.eye(3)[::-1].copy(),
            modality=np.array("CT"),
        )
    np.savez_compressed(path, **arrays)


def test_study_numbers_match_hand_computed_values(tmp_path):
    """An NPZ case whose prediction is known (--predictions): the CSV holds the values
    counted by hand in the scoring tests above, in the right axis order."""
    truth = _slab()  # 4 slices x 2 rows x 12 columns
    other = _slab(y=(2, 13), x=(7, 8))  # 4 slices x 12 rows x 2 columns
    imgs = np.zeros(truth.shape, dtype=np.int16)
    src, preds = tmp_path / "src", tmp_path / "preds"
    _write_case(src / "synthetic" / "case_a.npz", imgs, [("GTV_z", truth), ("GTV_y", other), ("GTV_none", truth)])
    _write_case(src / "synthetic" / "case_b.npz", imgs, [("GTV", truth)])
    _write_case(
        preds / "synthetic" / "case_a.npz",
        None,
        [("GTV_z", _slab(z=(3, 7))), ("GTV_y", _slab(y=(2, 14), x=(7, 8)))],
        key="segs",
    )
    out = tmp_path / "out"
    assert main(["study", str(src), str(out), "--predictions", str(preds), "--no-progress"]) == 0
    rows = {(r["case"], r["roi"]): r for r in read_csv(out / "cases.csv")}
    z, y = rows[("case_a", "GTV_z")], rows[("case_a", "GTV_y")]
    assert z["status"] == y["status"] == "ok" and z["dataset"] == "synthetic"
    assert float(z["dice"]) == pytest.approx(192 / 216, abs=1e-6)
    assert float(z["surface_dice_2mm"]) == pytest.approx(192 / 216, abs=1e-6)
    assert float(z["hd95_mm"]) == pytest.approx(2.5)  # dz, not dy or dx
    assert float(z["volume_ratio"]) == pytest.approx(1.25)
    assert float(z["gt_volume_ml"]) == pytest.approx(96 * 2.5 * 0.8 * 1.2 / 1000, abs=1e-6)
    assert (z["gt_slices"], z["pred_slices"], z["slices_extra"], z["slices_missed"]) == ("4", "5", "1", "0")
    assert float(z["extent_ratio"]) == pytest.approx(1.25) and float(z["slices_reached"]) == 1.0
    assert z["spacing"] == "2.5x0.8x1.2"
    assert float(y["dice"]) == pytest.approx(192 / 200, abs=1e-6)
    assert float(y["hd95_mm"]) == pytest.approx(0.8)  # dy
    assert float(y["surface_dice_2mm"]) == pytest.approx(1.0)
    assert rows[("case_a", "GTV_none")]["status"] == "skipped"
    assert "no prediction for ROI 'GTV_none'" in rows[("case_a", "GTV_none")]["reason"]
    assert rows[("case_b", "")]["status"] == "skipped" and "no prediction file" in rows[("case_b", "")]["reason"]
    summary = read_csv(out / "summary.csv")
    (synthetic,) = [s for s in summary if s["dataset"] == "synthetic"]
    assert synthetic["n"] == "2" and synthetic["skipped"] == "2"
    assert float(synthetic["dice_median"]) == pytest.approx((192 / 216 + 192 / 200) / 2, abs=1e-5)
    assert synthetic["model"] == "predictions:preds"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_cohort")
    return root, build_cohort(root, [("CT", 1), ("MR", 2)])


def _strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_study_phantoms_with_bad_input_reproducible(cohort, tmp_path, capsys):
    from dicom_node.research.cases import load_dicom_case, scan

    root, paths = cohort
    out1, out2, out3 = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    args = ["--engine", "classic", "--jitter", "3", "--no-progress", "--worst", "2"]
    assert main(["study", str(root), str(out1), "--seed", "7", *args]) == 0
    printed = capsys.readouterr().out
    assert "phantoms" in printed and "skipped" in printed and "Dice" in printed
    rows = read_csv(out1 / "cases.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 and {r["roi"] for r in ok} == {"GTV"} and {r["model"] for r in ok} == {"classic"}
    for r in ok:
        assert float(r["dice"]) > 0.5, r
        assert float(r["seconds"]) > 0
        assert r["prompt_detail"].startswith(f"box k={r['prompt_slice']} ")
    # every kind of bad input is a skipped row with its reason, and the run completed
    reasons = " | ".join(r["reason"] for r in rows if r["status"] == "skipped")
    for expected in (
        "no image series for this RTSTRUCT",
        "but its referenced series",
        "has no RTSTRUCT on it",
        "not a readable DICOM file",
        paths["truncated_file"].name,
        "no DICOM files found",
    ):
        assert expected in reasons
    # figures
    figures = out1 / "figures"
    assert (figures / "heatmap_dice.png").is_file() and (figures / "box_hd95_mm.png").is_file()
    assert len(list((figures / "worst").glob("*.png"))) == 2
    # the saved prediction is what was scored: recount Dice and volume by hand
    found = {c.name: c for c in scan(root).cases}
    for r in ok:
        pred = load_npz(out1 / "predictions" / "phantoms" / f"{r['case']}.npz")
        assert list(pred["label_names"]) == ["GTV"]
        p = pred["segs"] == 1
        truth = load_dicom_case(found[r["case"]]).labels[0][1]
        assert float(r["dice"]) == pytest.approx(2 * (p & truth).sum() / (p.sum() + truth.sum()), abs=1e-5)
        voxel_ml = np.prod(pred["spacing"]) / 1000
        assert float(r["pred_volume_ml"]) == pytest.approx(p.sum() * voxel_ml, rel=1e-5)
        assert float(r["gt_volume_ml"]) == pytest.approx(truth.sum() * voxel_ml, rel=1e-5)
    # same seed: the same CSV apart from timings; another seed: other prompts
    assert main(["study", str(root), str(out2), "--seed", "7", *args]) == 0
    assert _strip_timing(read_csv(out2 / "cases.csv")) == _strip_timing(rows)
    assert main(["study", str(root), str(out3), "--seed", "8", *args]) == 0
    other = {r["case"]: r["prompt_detail"] for r in read_csv(out3 / "cases.csv") if r["status"] == "ok"}
    assert all(other[r["case"]] != r["prompt_detail"] for r in ok)


def test_study_dicom_and_npz_give_the_same_numbers(cohort, tmp_path):
    """Without jitter the prompt does not depend on the case name: the DICOM cases and
    their NPZ conversions (pseudonymised) must score identically."""
    root, _ = cohort
    src = root / "phantoms"
    npz = tmp_path / "npz"
    assert main(["convert", str(src), str(npz), "--pseudonymize", "--no-progress"]) == 0
    assert main(["study", str(src), str(tmp_path / "dicom_study"), "--no-progress", "--worst", "0"]) == 0
    assert main(["study", str(npz), str(tmp_path / "npz_study"), "--no-progress", "--worst", "0"]) == 0
    mapping = {m["SeriesInstanceUID"]: m["case"] for m in read_csv(npz / "pseudonym_map.csv")}
    from dicom_node.research.cases import scan

    name_to_case = {c.name: mapping[c.series.series_uid] for c in scan(src).cases}
    dicom_rows = {name_to_case[r["case"]]: r for r in read_csv(tmp_path / "dicom_study" / "cases.csv")}
    npz_rows = {r["case"]: r for r in read_csv(tmp_path / "npz_study" / "cases.csv")}
    assert set(npz_rows) == {"case_0001", "case_0002"}
    for case, r in npz_rows.items():
        d = dicom_rows[case]
        assert r["status"] == d["status"] == "ok"
        for key in (
            "dice",
            "surface_dice_2mm",
            "hd95_mm",
            "volume_ratio",
            "gt_volume_ml",
            "pred_volume_ml",
            "prompt_detail",
            "gt_slices",
            "pred_slices",
        ):
            assert r[key] == d[key], key


def test_study_point_prompts_and_middle_slice(cohort, tmp_path):
    root, _ = cohort
    out = tmp_path / "points"
    assert (
        main(
            [
                "study",
                str(root / "phantoms"),
                str(out),
                "--prompt",
                "points",
                "--slice",
                "middle",
                "--positives",
                "2",
                "--negatives",
                "2",
                "--no-progress",
                "--worst",
                "1",
            ]
        )
        == 0
    )
    rows = [r for r in read_csv(out / "cases.csv") if r["status"] == "ok"]
    assert len(rows) == 2
    for r in rows:
        assert r["prompt"] == "points" and r["slice"] == "middle"
        assert r["prompt_detail"].count("+(") == 2 and r["prompt_detail"].count("-(") == 2
        gt_first, gt_last = int(r["gt_z_first"]), int(r["gt_z_last"])
        assert abs(int(r["prompt_slice"]) - (gt_first + gt_last) / 2) <= 1
        # The clicks are drawn per case name, which holds the phantom's new UIDs: every run
        # draws others. On these 4 mm pixels the CT tumour is 8 pixels wide and 2 negative
        # clicks may land next to it: over 17 draws the CT gave 0.495 (15 times), 0.198 and
        # 0.123, the MR 0.885-0.915. So: each mask lies on its tumour, and one is good.
        assert float(r["dice"]) > 0.05, r
    assert max(float(r["dice"]) for r in rows) > 0.8, rows


def test_study_command_errors(tmp_path, capsys):
    assert main(["study", str(tmp_path)]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["study", str(tmp_path), str(tmp_path / "out"), "--engine", "classic", "--checkpoint", "x.pt"]) == 2
    assert "sam2" in capsys.readouterr().err
    assert main(["study", str(tmp_path), str(tmp_path / "out"), "--roi", "(("]) == 2
    assert "regular expression" in capsys.readouterr().err
    # an engine that cannot be built stops the study before the first case
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    (tmp_path / "cases").mkdir()
    assert (
        main(
            [
                "study",
                str(tmp_path / "cases"),
                str(tmp_path / "o2"),
                "--engine",
                "sam2",
                "--checkpoint",
                str(bad),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "engine 'sam2' cannot be used" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    # engine options as a rule sets them: checked by the engine before the first case
    for option, expected in (
        ("point_method=sideways", "point_method must be one of grow, margins"),
        ("threads=2=3", "threads"),
        ("nonsense", "write KEY=VALUE"),
    ):
        argv = ["study", str(tmp_path / "cases"), str(tmp_path / "o3"), "--engine-option", option, "--no-progress"]
        assert main(argv) == 2
        assert expected in capsys.readouterr().err
        assert not (tmp_path / "o3").exists()
    # a folder with nothing to score: the run completes, says so and exits 1
    (tmp_path / "src").mkdir()
    assert main(["study", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "no ROI could be scored" in capsys.readouterr().err
    assert (tmp_path / "out" / "cases.csv").is_file()


def test_study_lung1_classic(tmp_path):
    from rtstruct import rasterize_roi, read_rtstruct
    from rtstruct.series import load_series

    src = shared_path("lung1-001-ct")
    out = tmp_path / "lung"
    assert main(["study", str(src), str(out), "--roi", "^GTV-1$", "--no-progress", "--worst", "1"]) == 0
    (row,) = read_csv(out / "cases.csv")
    assert row["status"] == "ok" and row["dataset"] == "lung1-001-ct" and row["roi"] == "GTV-1"
    # ground truth side, checked against the RTSTRUCT rasterised here
    volume = load_series(src / "CT")
    gtv = rasterize_roi(read_rtstruct(next((src / "RTSTRUCT").iterdir())).roi("GTV-1"), volume.geometry)
    assert float(row["gt_volume_ml"]) == pytest.approx(gtv.sum() * volume.geometry.voxel_volume_mm3 / 1000, rel=1e-5)
    ks = np.flatnonzero(gtv.any(axis=(1, 2)))
    assert (int(row["gt_z_first"]), int(row["gt_z_last"])) == (ks[0], ks[-1])
    assert int(row["prompt_slice"]) == int(np.argmax(gtv.sum(axis=(1, 2))))
    # the classic engine beats the naive threshold (Dice 0.40) on this hilar tumour
    assert float(row["dice"]) > 0.5
    assert float(row["hd95_mm"]) < 30
    assert len(list((out / "figures" / "worst").glob("*.png"))) == 1


def test_study_oblique_mr_from_npz(tmp_path):
    src = shared_path("sts-001-mr", "MR_T1")
    npz = tmp_path / "npz"
    assert main(["convert", str(src), str(npz), "--roi", "GTV_Mass", "--no-progress"]) == 0
    out = tmp_path / "mr"
    assert main(["study", str(npz), str(out), "--roi", "GTV_Mass", "--no-progress", "--worst", "1"]) == 0
    (row,) = read_csv(out / "cases.csv")
    assert row["status"] == "ok" and row["roi"] == "GTV_Mass" and row["dataset"] == "MR_T1"
    assert row["spacing"].startswith("5.2x0.3906x0.3906")
    assert float(row["dice"]) > 0.3


@pytest.mark.parametrize(
    "spacing",
    [
        (2.5, 1.0, 1.0),
        (2.5, 0.8, 1.2),  # dy != dx: the closing in the classic engine once shifted the mask
    ],
)
def test_study_classic_on_a_sharp_cuboid_stays_inside_it(tmp_path, spacing):
    """A uniform 40 HU cuboid on -800 HU: the predicted mask must not contain background."""
    shape = (14, 64, 64)
    cube = np.zeros(shape, dtype=bool)
    cube[3:10, 20:45, 20:40] = True
    imgs = np.where(cube, 40, -800).astype(np.int16)
    src = tmp_path / "src"
    _write_case(src / "cuboid" / "case.npz", imgs, [("GTV", cube)], spacing=spacing)
    out = tmp_path / "out"
    assert main(["study", str(src), str(out), "--engine", "classic", "--no-progress", "--worst", "0"]) == 0
    (row,) = read_csv(out / "cases.csv")
    assert row["status"] == "ok"
    pred = load_npz(out / "predictions" / "cuboid" / "case.npz")["segs"] == 1
    assert int((pred & ~cube).sum()) == 0
    assert float(row["dice"]) > 0.95
