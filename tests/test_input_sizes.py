"""Input sizes (issue 11, item 7): large cases are processed, or refused with a reason,
before they exhaust the worker's memory.

Through the running node (dcmtk storescu -> node -> dcmtk storescp as the TPS), with small
limits in its node.yaml so that the test stays quick: a 1000-slice CT and a 1024x1024 CT
over ``limits.max_voxels`` are refused before their pixels are read, an RTSTRUCT with 200
clinical ROIs over ``limits.max_contour_points`` is refused while its contours are read,
and a 0.6 mm CT and a prompt with 20 targets among 200 clinical ROIs within the limits are
segmented and delivered. Each refusal's sentence is the same in the job, the case and the
log, and names the value and the limit. The unit tests check the limits' sentences, the
``limits:`` section of node.yaml, the refusal before the array is allocated and the
ContourData parser (the same values as pydicom's, the same refusals). The last test keeps
``benchmarks/input_sizes.py`` runnable (its measured figures are in the README).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import REPO, NodeProcess, StoreSCP, require_tool, storescu, wait_for, write_config
from pydicom.dataset import Dataset

from dicom_node.config import ConfigError, load_config
from dicom_node.phantom import write_size_case
from inference.limits import InputLimits, InputTooLarge, input_limits, set_input_limits
from rtstruct.reader import RTStructError, read_rtstruct
from rtstruct.series import VolumeError, load_series

SMALL = {"max_voxels": 1_000_000, "max_targets": 50, "max_mask_voxels": 10_000_000, "max_contour_points": 100_000}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    return {
        # within the limits: processed
        "thin": write_size_case(root / "thin", slices=100, rows=96, slice_spacing=0.6),
        "targets": write_size_case(
            root / "targets", slices=40, rows=96, targets=20, clinical_rois=200, contour_points=20_000
        ),
        # over the limits: refused
        "slices": write_size_case(root / "slices", slices=1000, rows=48, slice_spacing=0.6),
        "matrix": write_size_case(root / "matrix", slices=4, rows=1024, slice_spacing=5.0),
        "points": write_size_case(root / "points", slices=40, rows=96, clinical_rois=200, contour_points=120_000),
    }


@pytest.fixture
def small_limits():
    previous = set_input_limits(InputLimits(**SMALL))
    yield input_limits()
    set_input_limits(previous)


def _logged_reasons(node: NodeProcess, event: str, case: int) -> list[str]:
    out = []
    for line in node.log_text().splitlines():
        if f": {event} " in line and re.search(rf"\bcase={case}\b", line):
            m = re.search(r'\breason=("(?:[^"\\]|\\.)*"|\S+)', line)
            if m:
                value = m.group(1)
                out.append(json.loads(value) if value.startswith('"') else value)
    return out


# -- through the node ----------------------------------------------------------------------
@pytest.mark.network
def test_large_cases_through_the_node_are_processed_or_refused_with_the_reason(tmp_path, cases):
    require_tool("storescu")
    require_tool("storescp")
    tps = StoreSCP(tmp_path / "tps").start()
    node, data_dir = None, tmp_path / "data"
    try:
        # the node's store in memory where there is a tmpfs: 1000 fsync'ed files on a disk take a minute
        shm = Path("/dev/shm")
        data_dir = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path / "data"
        config = write_config(
            tmp_path / "node", destinations={"tps": tps.destination()}, limits=SMALL, data_dir=str(data_dir)
        )
        node = NodeProcess(config).start()
        # the 1000 slices over 4 associations at once (one association takes about a minute here)
        slices = sorted(cases["slices"]["images"].iterdir())
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda part: storescu(part, node.port), [slices[i::4] for i in range(4)]))
        outs.append(storescu([cases["slices"]["prompt"]], node.port))
        for name in ("matrix", "points", "thin", "targets"):
            outs.append(storescu([cases[name]["images"], cases[name]["prompt"]], node.port))
        for out in outs:
            assert out.returncode == 0, out.stderr[-2000:]

        def finished(name):
            uid = str(pydicom.dcmread(cases[name]["prompt"], stop_before_pixels=True).SOPInstanceUID)

            def check():
                rows = node.query("SELECT * FROM cases WHERE rtstruct_uid = ?", (uid,))
                jobs = rows and node.query("SELECT * FROM jobs WHERE case_id = ?", (rows[0]["id"],))
                if jobs and jobs[0]["state"] in ("done", "failed") and rows[0]["state"] in ("done", "failed"):
                    return node.query("SELECT * FROM cases WHERE id = ?", (rows[0]["id"],))[0], jobs[0]
                return None

            return check

        refusals = {
            "slices": r"series [\d.]+ has 1000 slices of 48x48 = 2,304,000 voxels, more than the limit of "
            r"1,000,000 \(limits\.max_voxels\)",
            "matrix": r"series [\d.]+ has 4 slices of 1024x1024 = 4,194,304 voxels, more than the limit of "
            r"1,000,000 \(limits\.max_voxels\)",
            "points": r"the RTSTRUCT holds more than 100,000 contour points \(limits\.max_contour_points; "
            r"[\d,]+ read so far\)",
        }
        for name, pattern in refusals.items():
            case, job = wait_for(finished(name), 120, 0.2, f"the {name} case's job to end")
            assert job["state"] == "failed", (name, job)
            reason = job["error"]
            assert re.search(pattern, reason), (name, reason)
            assert case["reason"] == reason
            wait_for(lambda case=case: _logged_reasons(node, "job_failed", case["id"]), 10, 0.2, "the log line")
            assert _logged_reasons(node, "job_failed", case["id"]) == [reason]
            assert job["attempts"] == 1  # a refusal is permanent: not retried

        for name in ("thin", "targets"):
            case, job = wait_for(finished(name), 180, 0.2, f"the {name} case's job to end")
            assert job["state"] == "done", (name, job["error"])
        wait_for(lambda: sum(s["state"] == "sent" for s in node.sends()) >= 2, 120, 0.2, "2 deliveries")
        results = [pydicom.dcmread(f) for f in tps.files()]
        by_images = {str(ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID): ds for ds in results}
        thin = by_images[str(pydicom.dcmread(next(cases["thin"]["images"].iterdir())).FrameOfReferenceUID)]
        targets = by_images[str(pydicom.dcmread(next(cases["targets"]["images"].iterdir())).FrameOfReferenceUID)]
        assert [r.ROIName for r in thin.StructureSetROISequence] == ["GTV_AI"]
        assert len(thin.ROIContourSequence[0].ContourSequence) >= 20  # a tumour of >= 12 mm on 0.6 mm slices
        names = [r.ROIName for r in targets.StructureSetROISequence]
        assert names == [f"T{i:02d}_AI" for i in range(1, 21)]
    finally:
        if node is not None:
            node.stop()
        tps.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# -- the limits ----------------------------------------------------------------------------
def test_limit_sentences_name_the_value_the_limit_and_what_to_do():
    limits = InputLimits(max_voxels=100, max_targets=2, max_mask_voxels=150, max_contour_points=10)
    limits.check_voxels(1, 10, 10)
    with pytest.raises(InputTooLarge, match=r"has 2 slices of 10x10 = 200 voxels, more than the limit of 100 "):
        limits.check_voxels(2, 10, 10)
    limits.check_targets(1, 100)
    with pytest.raises(InputTooLarge, match=r"holds 3 targets, more than the limit of 2 \(limits\.max_targets\)"):
        limits.check_targets(3, 10)
    with pytest.raises(InputTooLarge, match=r"2 targets on 100 voxels need 200 mask voxels, more than .* 150"):
        limits.check_targets(2, 100)
    with pytest.raises(InputTooLarge, match=r"more than 10 contour points .*11 read so far.*raise the limit"):
        limits.check_contour_points(11)
    with pytest.raises(ValueError, match="max_targets must be at least 1"):
        InputLimits(max_targets=0)


def test_node_yaml_limits_section(tmp_path):
    shipped = load_config(REPO / "config" / "node.yaml")
    assert shipped.limits.input_limits() == InputLimits()  # the file documents the defaults
    path = write_config(tmp_path, limits={"max_voxels": 12345, "max_contour_points": 77})
    cfg = load_config(path)
    assert cfg.limits.input_limits() == InputLimits(max_voxels=12345, max_contour_points=77)
    bad = write_config(tmp_path / "bad", limits={"max_targets": 0})
    with pytest.raises(ConfigError, match="max_targets"):
        load_config(bad)


def test_a_series_over_max_voxels_is_refused_before_its_pixels_are_read(tmp_path, small_limits):
    case = write_size_case(tmp_path, slices=4, rows=1024, slice_spacing=5.0)
    for f in case["images"].iterdir():  # pixel data that cannot be decoded: reading it would say so
        ds = pydicom.dcmread(f)
        ds.PixelData = b"\0" * 10
        ds.save_as(f, enforce_file_format=True)
    with pytest.raises(VolumeError, match=r"4 slices of 1024x1024 = 4,194,304 voxels, more than the limit"):
        load_series(case["images"])
    set_input_limits()
    with pytest.raises(VolumeError, match="pixel data"):  # within the limits the pixels are read
        load_series(case["images"])


def test_a_multiframe_instance_over_max_voxels_is_refused_from_its_header(tmp_path, small_limits):
    ds = pydicom.dcmread(next(write_size_case(tmp_path, slices=3, rows=96)["images"].iterdir()))
    ds.NumberOfFrames = 500  # 500 x 96 x 96 = 4.6 M voxels, declared
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(VolumeError, match=r"has 500 slices of 96x96 = 4,608,000 voxels"):
        load_series([path])


def test_too_many_targets_and_mask_voxels_are_refused_by_the_pipeline(tmp_path):
    from dicom_node.pipeline import CaseError, prepare

    case = write_size_case(tmp_path, slices=40, rows=96, targets=4)
    previous = set_input_limits(InputLimits(max_targets=3))
    try:
        with pytest.raises(
            CaseError, match=r"prompts refused: the prompt RTSTRUCT holds 4 targets, more than the limit"
        ):
            prepare(case["images"], case["prompt"])
        set_input_limits(InputLimits(max_mask_voxels=3 * case["voxels"]))
        with pytest.raises(CaseError, match=r"4 targets on 368,640 voxels need 1,474,560 mask voxels"):
            prepare(case["images"], case["prompt"])
        set_input_limits()
        assert len(prepare(case["images"], case["prompt"]).targets) == 4
    finally:
        set_input_limits(previous)


# -- ContourData ---------------------------------------------------------------------------
def test_contour_data_from_a_file_reads_as_pydicom_reads_it(tmp_path):
    case = write_size_case(tmp_path, slices=20, rows=64, slice_spacing=3.0, clinical_rois=4, contour_points=2000)
    fast = read_rtstruct(case["prompt"])
    ds = pydicom.dcmread(case["prompt"])
    expected = [
        np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
        for item in ds.ROIContourSequence
        for c in item.ContourSequence
    ]
    got = [c.points for r in fast.rois for c in r.contours]
    assert len(got) == len(expected) == 5 and sum(len(p) for p in got[1:]) == 2000  # after the box's contour
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert read_rtstruct(ds).rois[-1].contours[0].points.tolist() == got[-1].tolist()  # the in-memory path


@pytest.mark.parametrize(
    "stored, message",
    [
        (b"1.0\\2.0\\abc", "ContourData holds a value that is not a number"),
        (b"1.0\\2.0", "ContourData has 2 values, not a whole number of x/y/z triplets"),
        (b"1.0\\nan\\3.0", "ContourData holds non-finite values"),
        (b"  ", "ContourData has 0 values"),
    ],
)
def test_bad_contour_data_in_a_file_is_refused_as_before(tmp_path, stored, message):
    case = write_size_case(tmp_path, slices=20, rows=64, slice_spacing=3.0)
    raw = bytearray(case["prompt"].read_bytes())
    ds = pydicom.dcmread(case["prompt"])
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    old = ("\\".join(str(v) for v in contour.ContourData)).encode()
    old += b" " * (len(old) % 2)
    start = raw.index(old)
    new = stored + b" " * (len(old) - len(stored))  # same length: the element's length stays right
    raw[start : start + len(old)] = new
    path = tmp_path / "bad.dcm"
    path.write_bytes(bytes(raw))
    with pytest.raises(RTStructError, match=re.escape(message)):
        read_rtstruct(path)


def test_contour_points_over_the_limit_are_refused_while_reading(tmp_path):
    case = write_size_case(tmp_path, slices=20, rows=64, slice_spacing=3.0, clinical_rois=10, contour_points=5000)
    previous = set_input_limits(InputLimits(max_contour_points=4000))
    try:
        with pytest.raises(RTStructError, match=r"more than 4,000 contour points"):
            read_rtstruct(case["prompt"])
    finally:
        set_input_limits(previous)
    rois = read_rtstruct(case["prompt"]).rois
    assert sum(len(c.points) for r in rois[1:] for c in r.contours) == 5000 and rois[0].name == "BOX_"


def test_clinical_rois_are_added_with_the_points_asked_for():
    ds = Dataset()
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    from dicom_node.phantom import add_clinical_rois, make_phantom

    volume = make_phantom(shape=(56, 64, 64)).volume
    assert add_clinical_rois(ds, volume, 3, 2501, per_contour=400) == 3 * 833
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["ORGAN_001", "ORGAN_002", "ORGAN_003"]
    counts = [int(c.NumberOfContourPoints) for c in ds.ROIContourSequence[0].ContourSequence]
    assert counts == [400, 400, 33]


# -- the benchmark -------------------------------------------------------------------------
def test_input_sizes_benchmark_runs(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "input_sizes.py"),
            "--quick",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["baseline", "targets3"]
    for row in rows:
        assert row["outcome"].startswith("ok: "), row
        assert row["peak_mb"] > 50 and row["seconds"] > 0 and row["voxels"] == 40 * 128 * 128
        assert row["ratio"] == round(row["peak_mb"] / rows[0]["peak_mb"], 2)
    assert rows[1]["outcome"].startswith("ok: 3 target(s)")
