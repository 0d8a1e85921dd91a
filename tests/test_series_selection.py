"""Series selection (issue 11, item 1): strays that share a CT's SeriesInstanceUID do not block its case.

The report: eight junk instances with the CT's SeriesInstanceUID (Rows 0 or 1, ...) were
each answered Success, and afterwards a correct CT + prompt failed with "mixed image
sizes". Now an image whose header contradicts itself is refused at the door (0xA900, with
the reason); a case with good references uses exactly the referenced images; a case with
stale references keeps the largest geometrically consistent set of the series
(:mod:`rtstruct.selection`) and the log and the audit say what was left out and why.

The unit tests build headers in memory (the selection is a pure function) or write
phantom files; the node tests send with dcmtk storescu and receive with dcmtk storescp.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from helpers import (
    SHARED_DATA,
    NodeProcess,
    StoreSCP,
    check_result,
    delivered,
    image_files,
    phantom,
    require_tool,
    storescu,
    wait_for,
    write_config,
)
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_node.part10 import InvalidInstance, Undecodable, read_part10, scan_dataset
from rtstruct.selection import select_consistent
from rtstruct.series import VolumeError, load_series

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


# ======================================================================================
# The selection function, on headers in memory
# ======================================================================================
def _header(name: str, z: float, **attrs) -> SimpleNamespace:
    """A CT slice header at ``z`` (512x512, 0.9 mm pixels) with ``attrs`` changed."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.FrameOfReferenceUID = "1.2.3.5"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-230.0, -230.0, z]
    ds.ImageOrientationPatient = AXIAL
    ds.PixelSpacing = [0.9, 0.9]
    ds.Rows, ds.Columns = 512, 512
    ds.AcquisitionNumber = 1
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return SimpleNamespace(path=Path(name), ds=ds)


def _stack(n: int = 10, spacing: float = 3.0) -> list[SimpleNamespace]:
    return [_header(f"ct{k:02d}.dcm", k * spacing) for k in range(n)]


def test_a_clean_series_is_kept_whole():
    good = _stack()
    chosen = select_consistent(good)
    assert chosen.kept == tuple(good)
    assert chosen.left_out == () and chosen.describe() == ""


def test_strays_are_left_out_by_count_and_reason():
    good = _stack()
    strays = [
        *[_header(f"row1-{k}.dcm", 3.0 * k, Rows=1) for k in range(3)],
        _header("row0.dcm", 6.0, Rows=0),
        _header("scout.dcm", 0.0, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=SAGITTAL),
        _header("mr.dcm", 9.0, SOPClassUID=MRImageStorage, Modality="MR"),
        _header("sc.dcm", 12.0, SOPClassUID=SecondaryCaptureImageStorage),
        _header("spacing.dcm", 15.0, PixelSpacing=[0.7, 0.7]),
        _header("tilted.dcm", 18.0, ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 0.8, 0.6]),
        _header("other-for.dcm", 21.0, FrameOfReferenceUID="1.2.3.99"),
        _header("no-position.dcm", 24.0, ImagePositionPatient=None),
        _header("multiframe.dcm", 24.0, NumberOfFrames=3),
    ]
    mixed = [good[0], *strays[:5], *good[1:], *strays[5:]]
    chosen = select_consistent(mixed)
    assert chosen.kept == tuple(good)  # in input order
    assert [item.reason for item in chosen.left_out] == [
        "1 file of Secondary Capture Image Storage (not a single-frame CT or MR image)",
        "1 file with several frames (multi-frame objects among single-frame slices)",
        "1 image of modality MR in a CT series",
        "1 image of ImageType LOCALIZER (scout views)",
        "1 file without ImagePositionPatient",
        "3 files of 1x512 instead of 512x512 (Rows x Columns)",
        "1 file of 0x512 instead of 512x512 (Rows x Columns)",
        "1 file with PixelSpacing [0.7, 0.7] instead of [0.9, 0.9] mm",
        "1 file in orientation [1, 0, 0, 0, 0.8, 0.6] instead of [1, 0, 0, 0, 1, 0]",
        "1 file on another frame of reference",
    ]
    assert chosen.n_left_out == len(strays)
    row1 = next(item for item in chosen.left_out if "1x512" in item.reason)
    assert row1.count == 3 and {p.name for p in row1.paths} == {"row1-0.dcm", "row1-1.dcm", "row1-2.dcm"}


def test_the_largest_consistent_group_wins_whatever_comes_first():
    small = [_header(f"s{k}.dcm", 3.0 * k, Rows=256, Columns=256) for k in range(4)]
    good = _stack(6)
    chosen = select_consistent(small + good)
    assert chosen.kept == tuple(good)
    assert chosen.describe() == "4 files of 256x256 instead of 512x512 (Rows x Columns)"


def test_one_instance_per_position_keeps_the_main_acquisition_then_the_newest():
    good = _stack(6)
    for h in good:
        h.ds.InstanceCreationDate, h.ds.InstanceCreationTime = "20240101", "120000"
    resent_old = _header("resent-old.dcm", 6.0, InstanceCreationDate="20230101", InstanceCreationTime="120000")
    other_acq = _header("acq2.dcm", 9.0, AcquisitionNumber=2, InstanceCreationDate="20250101")
    resent_new = _header("resent-new.dcm", 12.003, InstanceCreationDate="20240101", InstanceCreationTime="130000")
    copy_of_one = SimpleNamespace(path=Path("copy.dcm"), ds=copy.deepcopy(good[5].ds))  # same SOP Instance
    chosen = select_consistent([*good, resent_old, other_acq, resent_new, copy_of_one])
    kept = {h.path.name for h in chosen.kept}
    # the newer re-sent slice replaces ct04 at 12 mm; the older one and the other acquisition go
    assert kept == {"ct00.dcm", "ct01.dcm", "ct02.dcm", "ct03.dcm", "resent-new.dcm", "ct05.dcm", "copy.dcm"}
    assert chosen.describe() == ("3 files at slice positions another image already takes (one image kept per position)")


def test_multi_frame_objects_alone_are_left_to_the_loader():
    enhanced = [_header("enh.dcm", 0.0, SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1", NumberOfFrames=40)]
    chosen = select_consistent(enhanced)
    assert chosen.kept == tuple(enhanced) and chosen.left_out == ()


# ======================================================================================
# load_series(select_consistent=True) on files
# ======================================================================================
def _junk_files(folder: Path, slices: list[Path]) -> dict[str, Path]:
    """Strays with the series' SeriesInstanceUID, written next to copies of ``slices``."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def write(name: str, ds) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out[name] = folder / f"{name}.dcm"
        ds.save_as(out[name], enforce_file_format=True)

    for k in range(2):
        ds = pydicom.dcmread(slices[10 + k])
        ds.Rows = 1
        ds.PixelData = ds.PixelData[: 2 * int(ds.Columns)]
        write(f"row1-{k}", ds)
    ds = pydicom.dcmread(slices[3])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = SAGITTAL
    write("localizer", ds)
    ds = pydicom.dcmread(slices[20])
    ds.InstanceCreationDate = "19990101"  # older than the slice it repeats: the original stays
    write("resent", ds)
    ds = pydicom.dcmread(slices[30])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    write("mr", ds)
    return out


STORED_JUNK = {
    "2 files of 1x256 instead of 256x256 (Rows x Columns)",
    "1 image of ImageType LOCALIZER (scout views)",
    "1 file at slice positions another image already takes (one image kept per position)",
    "1 image of modality MR in a CT series",
}


def test_load_series_leaves_the_strays_out_and_reports_them(tmp_path, caplog):
    p = phantom(1)
    slices = image_files(p)
    junk = _junk_files(tmp_path / "junk", slices)
    files = slices + list(junk.values())
    with pytest.raises(VolumeError, match=r"mixed|LOCALIZER|duplicate|SOPClassUID|Modality"):
        load_series(files)  # without selection the strays spoil the series
    reference = load_series(slices)
    left_out: list = []
    with caplog.at_level(logging.INFO, logger="rtstruct.series"):
        volume = load_series(files, select_consistent=True, left_out=left_out)
    assert volume.sop_instance_uids == reference.sop_instance_uids
    assert np.array_equal(volume.array, reference.array)
    assert {item.reason for item in left_out} == STORED_JUNK
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the caller reports
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rtstruct.series"):
        load_series(files, select_consistent=True)  # no list: one WARNING line here
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{len(slices)} image(s) kept, 5 file(s) left out" in line and "LOCALIZER" in line


def test_selection_never_hides_a_missing_slice(tmp_path):
    slices = image_files(phantom(1))
    files = slices[:20] + slices[21:]
    with pytest.raises(VolumeError, match=r"1 slice\(s\) missing"):
        load_series(files, select_consistent=True)
    junk = _junk_files(tmp_path / "junk", slices)
    left_out: list = []
    with pytest.raises(VolumeError, match="no usable image"):
        load_series([junk["localizer"]], select_consistent=True, left_out=left_out)
    assert [item.reason for item in left_out] == ["1 image of ImageType LOCALIZER (scout views)"]


# ======================================================================================
# The receive path: headers that contradict themselves are refused (0xA900)
# ======================================================================================
def _encoded(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def _slice() -> Dataset:
    return pydicom.dcmread(image_files(phantom(1))[0])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"Rows": 0}, "Rows is 0"),
        ({"Columns": 0}, "Columns is 0"),
        ({"BitsAllocated": 12}, "BitsAllocated 12 is not 8, 16 or 32"),
        ({"NumberOfFrames": "0"}, "NumberOfFrames is 0"),
        ({"PixelData": b"\0" * 1024}, "PixelData 1024 bytes, 256x256x1x1 of 16 bits need 131072"),
        ({"PixelData": b"\0" * 131074}, "PixelData 131074 bytes"),
        ({"Rows": 255}, "PixelData 131072 bytes, 255x256x1x1 of 16 bits need 130560"),
    ],
)
def test_a_header_that_contradicts_itself_is_refused_with_0xA900(change, message):
    ds = _slice()
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    with pytest.raises(InvalidInstance) as err:
        scan_dataset(_encoded(ds), ExplicitVRLittleEndian)
    assert err.value.status == 0xA900
    assert str(err.value).startswith(message)
    assert len(str(err.value)) <= 64  # it fits the ErrorComment (LO) whole


def test_consistent_headers_pass_odd_lengths_with_their_pad_byte_and_compressed_data():
    ds = _slice()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 3, 8, 8, 7
    ds.PixelData = bytes(9)  # 9 bytes: written with one pad byte
    assert len(_encoded(ds)) % 2 == 0
    assert scan_dataset(_encoded(ds), ExplicitVRLittleEndian).sop_instance_uid == ds.SOPInstanceUID
    ds = _slice()
    ds.Rows = 1  # 1x256 with its 512 bytes: consistent (stored; selection leaves it out)
    ds.PixelData = ds.PixelData[:512]
    scan_dataset(_encoded(ds), ExplicitVRLittleEndian)
    ds = _slice()
    ds.Rows = 0
    del ds.PixelData
    with pytest.raises(InvalidInstance, match="Rows is 0"):
        scan_dataset(_encoded(ds), ExplicitVRLittleEndian)
    ds = _slice()
    del ds.PixelData
    with pytest.raises(Undecodable, match="no PixelData"):
        scan_dataset(_encoded(ds), ExplicitVRLittleEndian)
    ds = _slice()  # encapsulated (compressed) pixel data: its length is the codec's business
    ds.PixelData = encapsulate([b"\xff\xd8 a compressed frame \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    scan_dataset(_encoded(ds), ExplicitVRLittleEndian)


def test_every_real_file_in_shared_data_passes_the_receive_checks():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real DICOM data not found at {SHARED_DATA}")
    counts: dict[str, int] = {}
    for path in sorted(SHARED_DATA.rglob("*")):
        if not path.is_file() or path.suffix.lower() in {".md", ".txt"}:
            continue
        ts, dataset, _ = read_part10(path.read_bytes())
        header = scan_dataset(dataset, ts)
        counts[header.modality or "?"] = counts.get(header.modality or "?", 0) + 1
    assert counts.get("CT", 0) >= 100 and counts.get("MR", 0) >= 40 and counts.get("RTSTRUCT", 0) >= 5, counts


@pytest.mark.parametrize(
    "folder", ["lung1-001-ct/CT", "ge-phantom-ct/CT", "sts-001-mr/MR_T1/IMAGES", "sts-001-mr/MR_T2/IMAGES"]
)
def test_real_series_are_kept_whole(folder):
    """Selection leaves nothing out of a clean real series (the oblique MR included)."""
    from rtstruct.headers import read_header

    root = SHARED_DATA / folder
    if not root.is_dir():
        pytest.skip(f"real DICOM data not found at {root}")
    headers = [SimpleNamespace(path=f, ds=read_header(f)) for f in sorted(root.glob("*.dcm"))]
    chosen = select_consistent(headers)
    assert chosen.left_out == () and len(chosen.kept) == len(headers) >= 5


# ======================================================================================
# The running node: the scenario, with dcmtk storescu and storescp
# ======================================================================================
def _responses(output: str) -> list[tuple[int, str]]:
    """(status, ErrorComment) of each C-STORE response ``storescu -d`` received, in order."""
    out = []
    for block in output.split("Received Store Response")[1:]:
        status = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", block)
        comment = re.search(r"\(0000,0902\) LO \[([^\]]*)\]", block.split("Sending file:")[0])
        out.append((int(status.group(1), 16) if status else -1, comment.group(1).strip() if comment else ""))
    return out


def _refused_junk(slices: list[Path], folder: Path) -> dict[str, tuple[Path, str]]:
    """Instances whose header contradicts itself, each with the reason the node must give."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, change, reason in [
        ("rows0", {"Rows": 0}, "Rows is 0"),
        ("bits12", {"BitsAllocated": 12}, "BitsAllocated 12 is not 8, 16 or 32"),
        ("short", {"PixelData": b"\0" * 1024}, "PixelData 1024 bytes"),
    ]:
        ds = pydicom.dcmread(slices[5])
        for keyword, value in change.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made[name] = (path, reason)
    return made


def _finished_job(node: NodeProcess, rtstruct_uid: str) -> dict:
    """The job of the case of ``rtstruct_uid`` once it is done or failed (a failed case
    without a job fails the test at once, with its reason)."""

    def finished() -> dict | None:
        cases = node.query("SELECT * FROM cases WHERE rtstruct_uid = ?", (rtstruct_uid,))
        if cases and cases[0]["state"] == "failed":
            return {"state": "failed", "error": cases[0]["reason"]}
        jobs = node.query(
            "SELECT j.* FROM jobs j JOIN cases c ON c.id = j.case_id WHERE c.rtstruct_uid = ?", (rtstruct_uid,)
        )
        return jobs[0] if jobs and jobs[0]["state"] in ("done", "failed") else None

    return wait_for(finished, 120, 0.2, "the case's job to finish")


def _stale(prompt: Path, out: Path) -> Path:
    """The prompt with every image reference replaced by a UID that was never stored."""
    ds = pydicom.dcmread(prompt)
    fresh: dict[str, str] = {}
    for item in ds.iterall():
        if item.keyword == "ReferencedSOPInstanceUID":
            item.value = fresh.setdefault(str(item.value), generate_uid())
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.network
def test_strays_in_the_series_neither_block_a_good_case_nor_a_stale_one(tmp_path):
    require_tool("storescu")
    p = phantom(1)
    slices = image_files(p)
    refused = _refused_junk(slices, tmp_path / "refused")
    stored = _junk_files(tmp_path / "stored", slices)
    assert len(refused) + len(stored) == 8
    tps = StoreSCP(tmp_path / "tps").start()
    node = NodeProcess(write_config(tmp_path / "node", destinations={"tps": tps.destination()})).start()
    try:
        # 1. The junk first, each file in order: three refused with the reason, five stored.
        junk = [path for path, _ in refused.values()] + list(stored.values())
        out = storescu(junk, node.port, extra=["--no-halt", "-d"])
        answers = _responses(out.stderr)
        assert len(answers) == 8, out.stderr[-3000:]
        assert [status for status, _ in answers] == [0xA900] * 3 + [0x0000] * 5, answers
        for (name, (_, reason)), (_, comment) in zip(refused.items(), answers):
            assert comment.startswith(reason), (name, comment)
        refusals = [line for line in node.log_text().splitlines() if "store_refused" in line]
        assert len(refusals) == 3 and all("status=0xA900" in line for line in refusals), refusals
        # 2. The correct CT and its prompt (references exactly the good slices): delivered.
        out = storescu([p["images"], p["prompt"]], node.port)
        assert out.returncode == 0, out.stderr[-2000:]
        job = _finished_job(node, str(pydicom.dcmread(p["prompt"], stop_before_pixels=True).SOPInstanceUID))
        assert job["state"] == "done", job["error"]
        (result,) = delivered(node, tps, 1, timeout=60)
        check_result(result, p)
        (case,) = node.cases()
        assert case["mode"] == "references" and case["n_images"] == len(slices)
        # 3. The same prompt with stale references: the series fallback, strays left out and said so.
        stale = _stale(p["prompt"], tmp_path / "stale.dcm")
        out = storescu([stale], node.port)
        assert out.returncode == 0, out.stderr[-2000:]
        job = _finished_job(node, str(pydicom.dcmread(stale, stop_before_pixels=True).SOPInstanceUID))
        assert job["state"] == "done", job["error"]
        results = delivered(node, tps, 2, timeout=60)
        stale_case = node.cases()[1]
        assert stale_case["mode"] == "series-fallback" and stale_case["n_images"] == len(slices) + len(stored)
        (job,) = node.query("SELECT * FROM jobs WHERE case_id = ?", (stale_case["id"],))
        assert job["state"] == "done"
        check_result(next(r for r in results if r != result), p)
        audit = [e for e in node.audit() if e["event"] == "images_left_out"]
        assert len(audit) == 1 and audit[0]["case"] == stale_case["id"], audit
        assert audit[0]["kept"] == len(slices) and audit[0]["left_out"] == len(stored)
        assert set(audit[0]["reasons"]) == STORED_JUNK
        lines = [line for line in node.log_text().splitlines() if ": images_left_out " in line]
        assert len(lines) == 1 and " WARNING " in lines[0], lines
        why = json.loads(re.search(r'\bwhy=("(?:[^"\\]|\\.)*")', lines[0]).group(1))
        assert set(why.split("; ")) == STORED_JUNK
        detail = json.loads(job["detail"])
        assert set(detail["left_out"]) == STORED_JUNK
        assert any(w.startswith("5 of the case's images left out: ") for w in detail["warnings"]), detail["warnings"]
        ds = pydicom.dcmread(slices[0])
        assert str(ds.PatientID) not in lines[0] and str(ds.PatientName) not in lines[0]
        assert "Traceback" not in node.log_text()
        print(lines[0])
    finally:
        node.stop()
        tps.stop()
