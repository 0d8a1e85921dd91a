"""The whole node against real peers: dcmtk storescu sends, dcmtk storescp / Orthanc receive.

Each test starts ``dicom-node serve`` as a process with its own configuration and stops
everything it started.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from helpers import (
    CLI,
    NodeProcess,
    Orthanc,
    StoreSCP,
    check_result,
    deliver_later_case,
    delivered,
    image_files,
    phantom,
    storescu,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.network


@pytest.fixture
def tps(tmp_path):
    scp = StoreSCP(tmp_path / "tps").start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture
def start_node(tmp_path):
    nodes: list[NodeProcess] = []

    def start(**kw) -> NodeProcess:
        node = NodeProcess(write_config(tmp_path / "node", **kw)).start()
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


def test_storescu_to_node_to_storescp(tps, start_node):
    p = phantom(1)
    node = start_node(destinations={"tps": tps.destination()})
    out = storescu([p["images"], p["prompt"]], node.port)
    assert out.returncode == 0, out.stderr
    (result,) = delivered(node, tps)
    facts = check_result(result, p)
    assert facts["roi"] == "GTV_AI"
    # the audit trail has the case's timings, in order
    events = wait_for(
        lambda: [e for e in node.audit() if e.get("case") == 1 and e["event"] == "sent"] and node.audit(),
        30,
        what="the audit of the delivery",
    )
    names = [e["event"] for e in events if e.get("case") == 1]
    for a, b in [
        ("case_created", "case_ready"),
        ("case_ready", "inference_start"),
        ("inference_start", "inference_end"),
        ("inference_end", "sent"),
    ]:
        assert names.index(a) < names.index(b)
    sent = next(e for e in events if e["event"] == "sent")
    assert sent["result"] == facts["sop"]
    # no patient name or ID at INFO in the node's log
    log = node.log_text()
    ds = pydicom.dcmread(image_files(p)[0])
    assert str(ds.PatientID) not in log and str(ds.PatientName) not in log
    assert node.echo()


def test_orthanc_as_the_tps(tmp_path, start_node):
    p = phantom(1)
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.start()
    try:
        node = start_node(destinations={"tps": orthanc.destination()})
        out = storescu([p["images"], p["prompt"]], node.port)
        assert out.returncode == 0, out.stderr
        (oid,) = wait_for(lambda: orthanc.instances(), 120, 0.2, "the result in Orthanc")
        tags = orthanc.instance_tags(oid)
        assert tags["Modality"] == "RTSTRUCT"
        sent_series = pydicom.dcmread(image_files(p)[0]).SeriesInstanceUID
        refs = tags["ReferencedFrameOfReferenceSequence"][0]["RTReferencedStudySequence"][0][
            "RTReferencedSeriesSequence"
        ]
        assert refs[0]["SeriesInstanceUID"] == sent_series
        result = tmp_path / "from-orthanc.dcm"
        result.write_bytes(orthanc.file(oid))
        check_result(result, p)
        later = deliver_later_case(node)  # the node has gone past this case: its sender too
        sops = sorted(orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances())
        assert sops == sorted([tags["SOPInstanceUID"], later["result_sop_uid"]])  # delivered once
        assert [e["case"] for e in node.audit() if e["event"] == "sent"] == [1, later["case_id"]]
    finally:
        orthanc.stop()


def test_rtstruct_first_images_later_in_another_association(tps, start_node):
    p = phantom(1)
    node = start_node(destinations={"tps": tps.destination()})
    assert storescu([p["prompt"]], node.port).returncode == 0
    wait_for(lambda: node.cases(), 30, what="the case to be created")
    # another patient's prompt becomes a case in a later pass of the case assembler, after
    # the pass that made case 1 has evaluated it: case 1 was looked at without its images
    assert storescu([phantom(5)["prompt"]], node.port).returncode == 0
    wait_for(lambda: len(node.cases()) == 2, 30, what="the other patient's case")
    assert node.cases()[0]["state"] == "waiting" and tps.files() == []
    assert storescu([p["images"]], node.port).returncode == 0
    (result,) = delivered(node, tps)
    check_result(result, p)


def test_two_patients_interleaved(tps, start_node):
    a, b = phantom(1), phantom(5)
    node = start_node(destinations={"tps": tps.destination()})
    mixed = [f for pair in zip(image_files(a), image_files(b)) for f in pair]
    out = storescu([b["prompt"], *mixed, a["prompt"]], node.port)
    assert out.returncode == 0, out.stderr
    results = delivered(node, tps, 2)
    by_series = {}
    for r in results:
        by_series[
            pydicom.dcmread(r)
            .ReferencedFrameOfReferenceSequence[0]
            .RTReferencedStudySequence[0]
            .RTReferencedSeriesSequence[0]
            .SeriesInstanceUID
        ] = r
    for p in (a, b):
        series = pydicom.dcmread(image_files(p)[0]).SeriesInstanceUID
        check_result(by_series[series], p)


def test_missing_images_fail_after_the_timeout_and_nothing_is_sent(tps, start_node):
    p = phantom(1)
    node = start_node(
        destinations={"tps": tps.destination()}, cases={"incomplete_timeout_seconds": 3, "settle_seconds": 1}
    )
    files = image_files(p)
    assert storescu([*files[5:], p["prompt"]], node.port).returncode == 0
    case = wait_for(lambda: [c for c in node.cases() if c["state"] == "failed"], 60, 0.2, "the case to fail")[0]
    assert case["reason"].startswith(f"5 of {len(files)} referenced images missing")
    assert node.jobs() == [] and node.sends() == []
    later = deliver_later_case(node)  # assembler, worker and sender have gone past the failed case
    assert [j["case_id"] for j in node.jobs()] == [later["case_id"]]
    assert list(tps.received()) == [later["result_sop_uid"]]  # nothing sent for the failed case
    assert any(e["event"] == "case_failed" and "5 of" in e.get("reason", "") for e in node.audit())
    assert node.echo()


def test_tps_down_delivered_once_it_comes_up(tmp_path, start_node):
    p = phantom(1)
    tps = StoreSCP(tmp_path / "tps")  # not started yet: the TPS is down
    node = start_node(destinations={"tps": tps.destination()})
    try:
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        wait_for(lambda: node.sends() and node.sends()[0]["attempts"] >= 2, 120, 0.2, "failed delivery attempts")
        assert node.sends()[0]["state"] != "sent"
        tps.start()
        wait_for(lambda: node.sends()[0]["state"] == "sent", 60, 0.2, "the delivery")
        (job,) = node.jobs()
        later = deliver_later_case(node)  # further retries/polls must not send it again
        received = tps.received()
        assert sorted(received) == sorted([job["result_sop_uid"], later["result_sop_uid"]])
        check_result(received[job["result_sop_uid"]], p)
        assert [e["case"] for e in node.audit() if e["event"] == "sent"] == [job["case_id"], later["case_id"]]
    finally:
        tps.stop()


@pytest.mark.slow
def test_a_sam2_rule_runs_its_checkpoint_in_the_worker(tmp_path, tps, start_node):
    """A rule with engine sam2 and a checkpoint file: the worker loads the model once (at
    warm-up, before any case), segments with it and the result names model and weights.

    The checkpoint is a seeded randomly initialised SAM2.1 tiny at 512 pixels saved in the
    official format: the node treats it like any user's file. Its masks mean nothing, so
    the result is checked for what does not depend on the weights (seed 2 gives a
    non-empty mask for this phantom's box, see test_sam2_engine)."""
    import torch

    from inference.engine import get_engine
    from inference.sam2_models import file_sha256

    model = get_engine(
        "sam2", model_cfg="sam2.1_hiera_t512", device="cpu", allow_random_weights=True, random_seed=2, batch_size=4
    ).model
    checkpoint = tmp_path / "models" / "site_ft.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": model.state_dict()}, checkpoint)
    p = phantom(0, shape=(12, 128, 128), spacing=(5.0, 3.0, 3.0))
    sam2_rule = {
        "name": "sam2-ct",
        "match": {"modality": "CT"},
        "action": {
            "engine": "sam2",
            "checkpoint": str(checkpoint),
            "model_cfg": "sam2.1_hiera_t512",
            "mode": "box2d",
            "engine_options": {"batch_size": 4},
            "output_roi_name": "GTV_SAM2",
            "destinations": ["tps"],
        },
    }
    node = start_node(destinations={"tps": tps.destination()}, extra_rules=[sam2_rule])
    wait_for(lambda: "worker_ready" in node.log_text(), 300, 0.2, "the worker to load the SAM2 model")
    out = storescu([p["images"], p["prompt"]], node.port)
    assert out.returncode == 0, out.stderr
    (result,) = delivered(node, tps, timeout=300)
    facts = check_result(result, p, min_dice=0.0)  # dciodvfy, references, GTV, AUTOMATIC
    assert facts["roi"] == "GTV_SAM2"
    item = facts["dataset"].StructureSetROISequence[0]
    assert "SAM2 sam2.1_hiera_t512 site_ft" in item.ROIGenerationDescription
    assert f"sha256:{file_sha256(checkpoint)[:12]}" in item.ROIGenerationDescription
    assert "RANDOM" not in item.ROIGenerationDescription  # a checkpoint file is never called random
    (job,) = node.jobs()
    assert job["state"] == "done" and job["engine"] == "sam2"
    # built once, at warm-up: the job reused it
    assert node.log_text().count("SAM2 model sam2.1_hiera_t512 ready on cpu") == 1


def _with_planner_roi(prompt: Path, name: str, out: Path) -> Path:
    """The prompt RTSTRUCT with one more (clinical) ROI called ``name``: a copy of its box."""
    import copy

    ds = pydicom.dcmread(prompt)
    number = max(int(i.ROINumber) for i in ds.StructureSetROISequence) + 1
    roi = copy.deepcopy(ds.StructureSetROISequence[0])
    roi.ROINumber, roi.ROIName = number, name
    ds.StructureSetROISequence.append(roi)
    contour = copy.deepcopy(ds.ROIContourSequence[0])
    contour.ReferencedROINumber = number
    ds.ROIContourSequence.append(contour)
    if "RTROIObservationsSequence" in ds:
        obs = copy.deepcopy(ds.RTROIObservationsSequence[0])
        obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType = number, number, "GTV"
        ds.RTROIObservationsSequence.append(obs)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_rule_naming_the_result_like_a_planner_roi_never_takes_that_name(tps, start_node, tmp_path):
    # A rule asks for the name GTV-1; the planner's structure set already holds a GTV-1.
    # The delivered result must carry another name, the one the dry run shows.
    p = phantom(1)
    prompt = _with_planner_roi(p["prompt"], "GTV-1", tmp_path / "prompt-with-gtv1.dcm")
    rule = {"name": "named", "action": {"engine": "classic", "output_roi_name": "GTV-1", "destinations": ["tps"]}}
    node = start_node(destinations={"tps": tps.destination()}, extra_rules=[rule])
    dry = subprocess.run(
        [*CLI, "rules", "test", str(tmp_path), "-c", str(node.config), "--calling-aet", "STORESCU"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "output ROI(s): GTV-1_2" in dry.stdout, dry.stdout + dry.stderr
    out = storescu([p["images"], prompt], node.port)
    assert out.returncode == 0, out.stderr
    (result,) = delivered(node, tps)
    facts = check_result(result, p)
    assert facts["roi"] == "GTV-1_2"
