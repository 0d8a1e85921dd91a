"""Bad input to the running node: a clear status or log line each time, and the node keeps serving."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from helpers import (
    NodeProcess,
    StoreSCP,
    deliver_later_case,
    echoscu,
    image_files,
    phantom,
    storescu,
    wait_for,
    write_config,
)
from pydicom.uid import generate_uid
from test_scp import _raw_store, _with_payload, dataset_bytes, write_files
from test_store import tiny_ct

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    tps = StoreSCP(tmp / "tps").start()
    node = NodeProcess(write_config(tmp / "node", destinations={"tps": tps.destination()})).start()
    try:
        yield tmp, node, tps
    finally:
        node.stop()
        tps.stop()


def serving(node: NodeProcess) -> None:
    out = echoscu(node.port)
    assert out.returncode == 0, f"the node stopped answering C-ECHO: {out.stderr}"
    assert node.alive()


def test_non_dicom_bytes(running):
    tmp, node, _ = running
    status, comment = _raw_store(node.port, _with_payload(tmp, "garbage.dcm", b"\x89PNG\r\n\x1a\n not DICOM" * 40))
    assert status == 0xC210 and "not a decodable DICOM dataset" in comment
    assert "store_refused" in node.log_text()
    serving(node)


def test_truncated_data(running):
    tmp, node, _ = running
    good = image_files(phantom(1))[0]
    raw = good.read_bytes()
    body = dataset_bytes(good)
    status, comment = _raw_store(node.port, _with_payload(tmp, "cut.dcm", body[: len(body) // 2]))
    assert status == 0xC210, comment
    cut = tmp / "truncated-file.dcm"
    cut.write_bytes(raw[: len(raw) - 5000])  # a truncated file handed to dcmtk storescu
    out = storescu([cut], node.port)
    assert "Received Store Response (Success)" not in out.stderr
    serving(node)


def test_unsupported_sop_class(running):
    tmp, node, _ = running
    ds = tiny_ct()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan: not configured
    out = storescu(write_files(tmp / "plan", [ds]), node.port)
    assert out.returncode != 0 and re.search(r"presentation context|not supported", out.stderr, re.I)
    serving(node)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_uid_crafted_as_a_path(running):
    tmp, node, _ = running
    out = storescu(write_files(tmp / "evil", [tiny_ct(series="../../../etc")]), node.port)
    assert "CannotUnderstand" in out.stderr.replace(" ", "")
    assert not list(node.data_dir.rglob("etc"))
    serving(node)


def _changed_prompt(src: Path, out: Path, change) -> Path:
    ds = pydicom.dcmread(src)
    change(ds)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def _failed_job_reason(node: NodeProcess, rtstruct_uid: str) -> str:
    def reason():
        rows = node.query(
            "SELECT j.state, j.error FROM jobs j JOIN cases c ON c.id = j.case_id WHERE c.rtstruct_uid = ?",
            (rtstruct_uid,),
        )
        return rows and rows[0]["state"] == "failed" and rows[0]["error"]

    return wait_for(reason, 120, 0.2, "the job to fail")


def test_prompt_outside_the_image(running):
    tmp, node, tps = running
    p = phantom(1)

    def shift(ds):
        for rc in ds.ROIContourSequence:
            for c in rc.ContourSequence:
                pts = [float(v) for v in c.ContourData]
                c.ContourData = [f"{v + 2000.0:.2f}" if i % 3 == 0 else f"{v:.2f}" for i, v in enumerate(pts)]

    bad = _changed_prompt(p["prompt"], tmp / "outside.dcm", shift)
    before = len(tps.files())
    assert storescu([p["images"], bad], node.port).returncode == 0
    reason = _failed_job_reason(node, pydicom.dcmread(bad).SOPInstanceUID)
    assert "outside the image" in reason
    later = deliver_later_case(node)  # the worker and the sender have gone past the failed job
    assert len(tps.files()) == before + 1  # nothing sent (but the later case's result)
    assert later["result_sop_uid"] in tps.received()
    assert "job_failed" in node.log_text()
    serving(node)


def test_prompt_on_another_frame_of_reference(running):
    tmp, node, tps = running
    p = phantom(1)
    other = generate_uid()

    def move(ds):
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = other
        for roi in ds.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = other

    bad = _changed_prompt(p["prompt"], tmp / "other-for.dcm", move)
    before = len(tps.files())
    assert storescu([p["images"], bad], node.port).returncode == 0
    reason = _failed_job_reason(node, pydicom.dcmread(bad).SOPInstanceUID)
    assert "another frame of reference" in reason
    later = deliver_later_case(node)
    assert len(tps.files()) == before + 1
    assert later["result_sop_uid"] in tps.received()
    serving(node)
