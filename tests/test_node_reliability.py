"""Nothing acknowledged is lost: kill -9 of the node during a transfer and during inference,
and a crashing worker. Real dcmtk peers; the node runs as a process group that is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from helpers import (
    NodeProcess,
    StoreSCP,
    deliver_later_case,
    delivered,
    image_files,
    phantom,
    require_tool,
    stored_successes,
    storescu,
    wait_for,
    write_config,
)

from dicom_node.part10 import read_part10

pytestmark = [pytest.mark.network, pytest.mark.slow]

# 300 slices, as the issue asks, at 128x128 to keep the suite fast on two cores; the
# transfer still has hundreds of instances in flight when the node is killed.
BIG = dict(seed=1, shape=(300, 128, 128))


def body(path: Path) -> bytes:
    return bytes(read_part10(path.read_bytes())[1])


@pytest.fixture
def tps(tmp_path):
    scp = StoreSCP(tmp_path / "tps").start()
    try:
        yield scp
    finally:
        scp.stop()


def test_kill9_during_a_300_slice_transfer(tmp_path, tps):
    p = phantom(**BIG)
    files = image_files(p)
    assert len(files) == 300
    config = write_config(tmp_path / "node", destinations={"tps": tps.destination()})
    node = NodeProcess(config).start()
    log = open(tmp_path / "storescu.log", "w")
    try:
        sender = subprocess.Popen(
            [
                require_tool("storescu"),
                "-v",
                "-aet",
                "STORESCU",
                "-aec",
                "STARDUST",
                "127.0.0.1",
                str(node.port),
                *map(str, files),
                str(p["prompt"]),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def stored_80_or_sender_gone() -> str | None:
            if node.query("SELECT count(*) AS n FROM instances")[0]["n"] >= 80:
                return "stored"
            return "sender exited" if sender.poll() is not None else None

        try:
            outcome = wait_for(stored_80_or_sender_gone, 120, 0.02, "80 stored instances")
        except AssertionError as exc:
            outcome = str(exc)
        if outcome != "stored":
            log.flush()
            raise AssertionError(
                f"{outcome} (storescu status {sender.poll()})\nstorescu log:\n"
                f"{(tmp_path / 'storescu.log').read_text()[-3000:]}\nnode log:\n{node.log_text()[-4000:]}"
            )
        node.kill9()
        sender.wait(60)
        log.close()
        text = (tmp_path / "storescu.log").read_text()
        ok = [Path(f) for f in stored_successes(text)]
        assert 50 <= len(ok) < 300, f"{len(ok)} successes: the kill should fall in the middle of the transfer"
        assert sender.returncode != 0

        node = NodeProcess(config).start()  # restart on the same data
        for f in ok:  # every instance that got Success is on disk, byte for byte
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            row = node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (ds.SOPInstanceUID,))
            assert row, f"{f.name} was acknowledged but is not in the index"
            stored = node.data_dir / "store" / row[0]["path"]
            assert body(stored) == body(f), f"{f.name}: stored bytes differ from what storescu sent"
        assert not list((node.data_dir / "store").rglob("*.part"))

        # the TPS sends the whole export again; the case completes and is delivered once
        out = storescu([*files, p["prompt"]], node.port)
        assert out.returncode == 0, out.stderr[-2000:]
        (result,) = delivered(node, tps)
        ds = pydicom.dcmread(result)
        refs = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert refs.SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
        assert len(node.cases()) == 1 and node.cases()[0]["n_images"] == 300
        (case,) = node.cases()
        later = deliver_later_case(node)  # the node has gone past the case: no second result
        assert sorted(tps.received()) == sorted([ds.SOPInstanceUID, later["result_sop_uid"]])
        assert [e["case"] for e in node.audit() if e["event"] == "sent"] == [case["id"], later["case_id"]]
    finally:
        if not log.closed:
            log.close()
        node.stop()


def test_kill9_during_inference(tmp_path, tps):
    p = phantom(**BIG)
    config = write_config(tmp_path / "node", destinations={"tps": tps.destination()})
    node = NodeProcess(config).start()
    try:
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        wait_for(lambda: any(e["event"] == "inference_start" for e in node.audit()), 120, 0.01, "inference to start")
        node.kill9()
        (job,) = node.jobs()
        assert job["state"] == "running", f"the job was {job['state']} when the node was killed"
        assert node.sends() == [] and tps.files() == []

        node = NodeProcess(config).start()
        (result,) = delivered(node, tps)
        (job,) = node.jobs()
        assert job["state"] == "done" and job["attempts"] == 2
        later = deliver_later_case(node)  # the node has gone past the case: no second result
        assert sorted(tps.received()) == sorted([job["result_sop_uid"], later["result_sop_uid"]])
        events = [e for e in node.audit() if e.get("case") == job["case_id"]]
        assert sum(e["event"] == "inference_start" for e in events) == 2
        assert sum(e["event"] == "sent" for e in events) == 1
        assert pydicom.dcmread(result).SOPInstanceUID == job["result_sop_uid"]
    finally:
        node.stop()


def test_kill9_after_inference_before_delivery(tmp_path):
    """The result exists but the TPS is down; the node dies; after restart it is sent once."""
    p = phantom(1)
    tps = StoreSCP(tmp_path / "tps")
    config = write_config(tmp_path / "node", destinations={"tps": tps.destination()})
    node = NodeProcess(config).start()
    try:
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        wait_for(lambda: node.sends() and node.sends()[0]["attempts"] >= 1, 120, 0.1, "a failed delivery")
        node.kill9()
        tps.start()
        node = NodeProcess(config).start()
        delivered(node, tps)
        later = deliver_later_case(node)  # the node has gone past the case: no second result
        first = node.jobs()[0]
        assert sorted(tps.received()) == sorted([first["result_sop_uid"], later["result_sop_uid"]])
        assert first["attempts"] == 1  # not segmented again
    finally:
        node.stop()
        tps.stop()


def test_a_crashing_worker_does_not_stop_reception(tmp_path, tps):
    p, other = phantom(**BIG), phantom(5)
    config = write_config(tmp_path / "node", destinations={"tps": tps.destination()})
    node = NodeProcess(config).start()
    try:
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        start = wait_for(
            lambda: [e for e in node.audit() if e["event"] == "inference_start"], 120, 0.01, "inference to start"
        )[0]
        worker_pid = int(start["worker"].rsplit(":", 1)[1])
        os.kill(worker_pid, signal.SIGKILL)  # e.g. a CUDA error or the OOM killer
        # reception goes on while the worker is dead and restarting
        assert node.echo()
        assert storescu([other["images"], other["prompt"]], node.port).returncode == 0
        delivered(node, tps, 2)
        jobs = node.jobs()
        assert [j["state"] for j in jobs] == ["done", "done"]
        assert jobs[0]["attempts"] == 2
        assert "worker_died" in node.log_text()
        assert node.alive()
        later = deliver_later_case(node)  # the node has gone past both cases: no more results
        assert sorted(tps.received()) == sorted([j["result_sop_uid"] for j in jobs] + [later["result_sop_uid"]])
    finally:
        node.stop()
