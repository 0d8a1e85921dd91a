"""The job queue (leases, idempotency, recovery) and result delivery (dcmtk storescp as the TPS)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from apscheduler.schedulers.background import BackgroundScheduler
from helpers import StoreSCP, free_port, wait_for
from test_store import tiny_ct

from dicom_node import jobs as q
from dicom_node.audit import AuditLog, read_audit
from dicom_node.config import config_from_data
from dicom_node.db import Database
from dicom_node.sender import Sender, export_file

_dbs = None


@pytest.fixture(autouse=True)
def _backend(databases):
    """Every test of this module runs on SQLite and on PostgreSQL (``databases``)."""
    global _dbs
    _dbs = databases
    yield
    _dbs = None


def make_db(tmp_path: Path) -> Database:
    return _dbs.open(tmp_path / "node.db")


def add_case_and_job(db: Database, action: dict | None = None) -> int:
    now = time.time()
    with db.tx() as c:
        cid = c.execute(
            """INSERT INTO cases (state, rtstruct_uid, rtstruct_sha256, prompt_path, n_refs, created_at,
                   last_progress_at, ready_at) VALUES ('queued', '1.2.3', 'h', '/p', 1, ?, ?, ?)""",
            (now, now, now),
        ).lastrowid
        return q.create_job(c, cid, "r", action or {"engine": "classic", "destinations": []}, ["why"], now)


def test_claim_is_exclusive_and_ordered(tmp_path):
    db = make_db(tmp_path)
    ids = [add_case_and_job(db) for _ in range(20)]
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(n):
        mydb = _dbs.reopen(db)
        while True:
            job = q.claim_job(mydb, f"w{n}", 30)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ids  # every job exactly once: never the same case twice concurrently
    row = db.one("SELECT state, attempts, lease_owner FROM jobs WHERE id=?", (ids[0],))
    assert row["state"] == "running" and row["attempts"] == 1 and row["lease_owner"].startswith("w")


def test_one_job_per_case(tmp_path):
    db = make_db(tmp_path)
    job = add_case_and_job(db)
    case_id = db.one("SELECT case_id FROM jobs WHERE id=?", (job,))["case_id"]
    with pytest.raises(Exception, match="(?i)unique"):
        with db.tx() as c:
            q.create_job(c, case_id, "r", {}, [])


def test_lease_renewal_completion_and_lost_lease(tmp_path):
    db = make_db(tmp_path)
    add_case_and_job(db, {"destinations": ["tps"]})
    job = q.claim_job(db, "w1", 30)
    assert q.renew_lease(db, job.id, "w1", 30)
    assert not q.renew_lease(db, job.id, "w2", 30)
    # the worker died: its job goes back to pending, another worker takes it
    assert q.release_owner(db, "w1", "worker crashed", max_attempts=3) == [(job.id, "pending")]
    again = q.claim_job(db, "w2", 30)
    assert again.id == job.id and again.attempts == 2
    # the first worker's late completion is refused (it lost the lease)
    kw = dict(
        result_path="/r.dcm",
        result_sop_uid="1.2",
        result_series_uid="1.3",
        engine="classic",
        inference_seconds=1.0,
        detail={},
        deliveries=[("tps", "dicom")],
    )
    assert not q.complete_job(db, job.id, "w1", **kw)
    assert q.complete_job(db, job.id, "w2", **kw)
    assert not q.complete_job(db, job.id, "w2", **kw)  # once only
    sends = db.query("SELECT * FROM sends")
    assert len(sends) == 1 and sends[0]["destination"] == "tps" and sends[0]["state"] == "pending"
    assert db.one("SELECT state FROM cases")["state"] == "done"


def test_crash_loop_gives_up_after_max_attempts(tmp_path):
    db = make_db(tmp_path)
    jid = add_case_and_job(db)
    for attempt in range(1, 4):
        job = q.claim_job(db, f"w{attempt}", 30)
        assert job.id == jid
        state = q.release_owner(db, f"w{attempt}", "worker exited with status -9", max_attempts=3)
    assert state == [(jid, "failed")]
    row = db.one("SELECT state, error FROM jobs WHERE id=?", (jid,))
    assert row["state"] == "failed" and "gave up after 3 attempts" in row["error"]
    assert db.one("SELECT state FROM cases")["state"] == "failed"
    q.retry_job(db, jid)
    assert db.one("SELECT state, attempts FROM jobs")["state"] == "pending"
    with pytest.raises(q.JobError, match="only failed jobs"):
        q.retry_job(db, jid)


def test_recover_on_start(tmp_path):
    db = make_db(tmp_path)
    add_case_and_job(db)
    job = q.claim_job(db, "old-node:worker0:123", 30)
    with db.tx() as c:
        c.execute(
            "INSERT INTO sends (job_id, destination, kind, state, attempts, next_attempt_at) "
            "VALUES (?, 'tps', 'dicom', 'sending', 1, 0)",
            (job.id,),
        )
    if not db.is_postgresql:
        counts = q.recover_on_start(db, max_attempts=3)
        assert counts == {"jobs_requeued": 1, "jobs_failed": 0, "sends_requeued": 1}
        assert db.one("SELECT state FROM jobs")["state"] == "pending"
        return
    # a database shared by several nodes: another node's job and its delivery are left alone
    # (they come back by the lease), this node's job is requeued
    add_case_and_job(db)
    mine = q.claim_job(db, q.owner_name(0) + ":456", 30)
    counts = q.recover_on_start(db, max_attempts=3)
    assert counts == {"jobs_requeued": 1, "jobs_failed": 0, "sends_requeued": 0}
    assert db.one("SELECT state FROM jobs WHERE id=?", (mine.id,))["state"] == "pending"
    assert db.one("SELECT state FROM jobs WHERE id=?", (job.id,))["state"] == "running"
    assert q.release_expired(db, max_attempts=3, now=time.time() + 60) == [(job.id, "pending")]
    # the delivery left 'sending' by the other node is due again once its lease is over
    assert db.one("SELECT state FROM sends")["state"] == "pending"


def test_fail_permanent_vs_retryable(tmp_path):
    db = make_db(tmp_path)
    jid = add_case_and_job(db)
    q.claim_job(db, "w", 30)
    assert q.fail_job(db, jid, "w", "CUDA error", retryable=True, max_attempts=3) == "pending"
    q.claim_job(db, "w", 30)
    assert q.fail_job(db, jid, "w", "prompt outside the image", retryable=False, max_attempts=3) == "failed"
    assert db.one("SELECT reason FROM cases")["reason"] == "prompt outside the image"


def test_backoff_is_capped_exponential():
    assert [q.backoff_seconds(n, 5, 60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


# -- delivery ----------------------------------------------------------------------------------
def _result_file(tmp_path: Path) -> Path:
    from pydicom.dataset import FileMetaDataset

    ds = tiny_ct()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    path = tmp_path / "results" / "1" / f"RS.{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    return path


class SenderHarness:
    def __init__(self, tmp_path: Path, destinations: dict, **send_cfg) -> None:
        self.cfg = config_from_data(
            {
                "access": {"calling_aets": ["X"]},
                "data_dir": str(tmp_path / "data"),
                "destinations": destinations,
                "send": {"backoff_initial_seconds": 0.3, "backoff_max_seconds": 1.0, "max_attempts": 50, **send_cfg},
            }
        )
        self.db = make_db(tmp_path)
        self.audit = AuditLog(tmp_path / "audit.jsonl")
        self.scheduler = BackgroundScheduler()
        self._polls = 0  # runs of the sender's interval poll, as the scheduler reports them
        self._polls_lock = threading.Lock()
        self.scheduler.add_listener(self._job_ran, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self.scheduler.start()
        self.sender = Sender(self.cfg, self.db, self.audit, self.scheduler)
        self.sender.start()

    def _job_ran(self, ev) -> None:
        if ev.job_id == "sender-poll":
            with self._polls_lock:
                self._polls += 1

    def wait_for_polls(self, n: int = 2) -> None:
        """Wait until the sender's interval poll has run ``n`` more times from now: it has
        looked at its queue since (the scheduler reports a run once it has returned, so a
        delivery it claimed is already marked ``sending``)."""
        with self._polls_lock:
            target = self._polls + n
        wait_for(lambda: self._polls >= target, 30, what=f"{n} more sender polls")

    def job_with_result(self, result: Path, deliveries: list[tuple[str, str]]) -> int:
        jid = add_case_and_job(self.db)
        job = q.claim_job(self.db, "w", 30)
        ds = pydicom.dcmread(result)
        assert q.complete_job(
            self.db,
            job.id,
            "w",
            result_path=str(result),
            result_sop_uid=ds.SOPInstanceUID,
            result_series_uid=ds.SeriesInstanceUID,
            engine="classic",
            inference_seconds=0.1,
            detail={},
            deliveries=deliveries,
        )
        self.sender.wake()
        return jid

    def sends(self) -> list[dict]:
        return [dict(r) for r in self.db.query("SELECT * FROM sends ORDER BY id")]

    def stop(self) -> None:
        self.sender.stop()
        self.scheduler.shutdown(wait=False)


def test_delivery_waits_for_the_tps_and_sends_exactly_once(tmp_path):
    port = free_port()
    tps = StoreSCP(tmp_path / "tps", port=port)
    h = SenderHarness(tmp_path, {"tps": tps.destination()})
    try:
        result = _result_file(tmp_path)
        h.job_with_result(result, [("tps", "dicom")])
        # the TPS is down: attempts fail and are retried with backoff
        wait_for(lambda: h.sends()[0]["attempts"] >= 3, 30, what="three failed attempts")
        row = h.sends()[0]
        assert row["state"] in ("pending", "sending") and "cannot connect" in (row["last_error"] or "")
        tps.start()
        wait_for(lambda: h.sends()[0]["state"] == "sent", 30, what="delivery after the TPS came up")
        (sent,) = h.sends()
        h.wait_for_polls(2)  # a few more sender polls: nothing more may be sent
        assert h.sends() == [sent]  # not claimed again
        assert len(tps.files()) == 1
        assert pydicom.dcmread(tps.files()[0]).SOPInstanceUID == pydicom.dcmread(result).SOPInstanceUID
        events = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "sent"]
        assert len(events) == 1
    finally:
        h.stop()
        tps.stop()


def test_two_senders_racing_deliver_each_result_once(tmp_path):
    """Two senders (two nodes' views of one database) pump the same queue at once: every
    delivery is made by one of them, once."""
    from pydicom.dataset import FileMetaDataset

    tps = StoreSCP(tmp_path / "tps").start()
    h = SenderHarness(tmp_path, {"tps": tps.destination()})
    other_scheduler = BackgroundScheduler()
    other_scheduler.start()
    other = Sender(h.cfg, _dbs.reopen(h.db), AuditLog(tmp_path / "audit2.jsonl"), other_scheduler)
    try:
        h.sender.stop()  # both start together below
        h.sender = Sender(h.cfg, h.db, h.audit, h.scheduler)
        uids = []
        for k in range(12):
            ds = tiny_ct()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
            path = tmp_path / "results" / str(k) / f"RS.{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True)
            ds.save_as(path, enforce_file_format=True)
            uids.append(ds.SOPInstanceUID)
            jid = add_case_and_job(h.db)
            job = q.claim_job(h.db, "w", 30)
            assert job.id == jid
            assert q.complete_job(
                h.db, jid, "w", result_path=str(path), result_sop_uid=ds.SOPInstanceUID,
                result_series_uid=ds.SeriesInstanceUID, engine="classic", inference_seconds=0.1, detail={},
                deliveries=[("tps", "dicom")],
            )  # fmt: skip
        threads = [threading.Thread(target=s.start) for s in (h.sender, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: all(r["state"] == "sent" for r in h.sends()), 60, what="12 deliveries")
        h.wait_for_polls(2)
        assert [(r["state"], r["attempts"]) for r in h.sends()] == [("sent", 1)] * 12
        sent = [e for f in ("audit.jsonl", "audit2.jsonl") for e in read_audit(tmp_path / f) if e["event"] == "sent"]
        assert sorted(e["job"] for e in sent) == list(range(1, 13))  # each once, by one sender or the other
        assert sorted(pydicom.dcmread(f).SOPInstanceUID for f in tps.files()) == sorted(uids)
    finally:
        other.stop()
        other_scheduler.shutdown(wait=False)
        h.stop()
        tps.stop()


def test_dead_letter_and_resend(tmp_path):
    port = free_port()
    tps = StoreSCP(tmp_path / "tps", port=port)
    h = SenderHarness(tmp_path, {"tps": tps.destination()}, max_attempts=2)
    try:
        jid = h.job_with_result(_result_file(tmp_path), [("tps", "dicom")])
        wait_for(lambda: h.sends()[0]["state"] == "dead", 30, what="the dead letter")
        assert h.sends()[0]["attempts"] == 2
        tps.start()
        h.wait_for_polls(2)  # the sender polls with the TPS up
        assert tps.files() == []  # dead letters stay dead
        assert [(s["state"], s["attempts"]) for s in h.sends()] == [("dead", 2)]
        assert q.resend_job(h.db, jid) == 1
        wait_for(lambda: h.sends()[0]["state"] == "sent", 30, what="the manual resend")
        assert len(tps.files()) == 1
        with pytest.raises(q.JobError, match="no delivery to 'nowhere'"):
            q.resend_job(h.db, jid, "nowhere")
    finally:
        h.stop()
        tps.stop()


def test_a_reject_followed_by_a_close_is_always_reported_as_rejected(tmp_path):
    """pynetdicom's DUL closes the socket as soon as an A-ASSOCIATE-RJ arrives, and its
    requestor thread then sometimes marks the association aborted (about 1 in 4 here).
    The reject PDU is what counts: every attempt must say 'rejected'."""
    from dicom_node.sender import DeliveryError, c_echo

    tps = StoreSCP(tmp_path / "tps", extra=["--refuse"]).start()
    try:
        messages = set()
        for _ in range(20):
            with pytest.raises(DeliveryError) as info:
                c_echo("127.0.0.1", tps.port, tps.aet, timeout=10)
            messages.add(str(info.value))
        assert messages == {f"association rejected by {tps.aet}@127.0.0.1:{tps.port} (No reason given)"}
    finally:
        tps.stop()


def test_rejected_association_and_unknown_destination_are_reported(tmp_path):
    tps = StoreSCP(tmp_path / "tps", extra=["--refuse"]).start()
    h = SenderHarness(tmp_path, {"tps": tps.destination()}, max_attempts=1)
    try:
        h.job_with_result(_result_file(tmp_path), [("tps", "dicom"), ("ghost", "dicom")])
        wait_for(lambda: all(s["state"] == "dead" for s in h.sends()), 30, what="both deliveries to fail")
        errors = {s["destination"]: s["last_error"] for s in h.sends()}
        assert "rejected" in errors["tps"]
        assert "'ghost' is not defined" in errors["ghost"]
    finally:
        h.stop()
        tps.stop()


def test_export_folder_is_written_atomically(tmp_path):
    h = SenderHarness(tmp_path, {})
    try:
        result = _result_file(tmp_path)
        out = tmp_path / "export"
        h.job_with_result(result, [(f"folder:{out}", "folder")])
        wait_for(lambda: h.sends()[0]["state"] == "sent", 30, what="the export")
        files = list(out.iterdir())
        assert [f.name for f in files] == [result.name]  # no temporary file left
        assert files[0].read_bytes() == result.read_bytes()
    finally:
        h.stop()


def test_export_never_shows_a_partial_file(tmp_path):
    big = tmp_path / "big.dcm"
    big.write_bytes(b"x" * (20 * 2**20))
    out = tmp_path / "out"
    seen_sizes = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for f in out.glob("*.dcm") if out.exists() else []:
                seen_sizes.add(f.stat().st_size)

    t = threading.Thread(target=watch)
    t.start()
    try:
        export_file(big, out, "r.dcm")
    finally:
        stop.set()
        t.join()
    assert seen_sizes <= {20 * 2**20}


def test_delivery_over_tls_with_a_client_certificate(tmp_path):
    """The sender verifies the destination's certificate and presents its own (dcmtk storescp +tls)."""
    from test_scp import _openssl

    d = tmp_path / "pki"
    d.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("tps", "node"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    tps = StoreSCP(
        tmp_path / "tps", extra=["+tls", str(d / "tps.key"), str(d / "tps.crt"), "-pw", "-rc", "+cf", str(d / "ca.crt")]
    ).start()
    tls = {
        "enabled": True,
        "ca_file": str(d / "ca.crt"),
        "cert_file": str(d / "node.crt"),
        "key_file": str(d / "node.key"),
    }
    h = SenderHarness(
        tmp_path,
        {
            "tps": {**tps.destination(), "tls": tls},
            "wrong_ca": {**tps.destination(), "tls": {**tls, "ca_file": str(d / "node.crt")}},
        },
        max_attempts=1,
    )
    try:
        result = _result_file(tmp_path)
        h.job_with_result(result, [("tps", "dicom"), ("wrong_ca", "dicom")])
        wait_for(
            lambda: {s["state"] for s in h.sends()} <= {"sent", "dead"} and len(h.sends()) == 2,
            30,
            what="both deliveries to finish",
        )
        states = {s["destination"]: s for s in h.sends()}
        assert states["tps"]["state"] == "sent", states["tps"]["last_error"]
        assert states["wrong_ca"]["state"] == "dead" and "cannot connect" in states["wrong_ca"]["last_error"]
        (received,) = tps.files()
        assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(result).SOPInstanceUID
    finally:
        h.stop()
        tps.stop()


def test_one_worker_per_device(monkeypatch):
    from dicom_node.worker import resolve_devices

    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: auto means one CPU worker
    assert resolve_devices(["auto"]) == ["cpu"]
    assert resolve_devices(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
