"""Case assembly: when a prompt RTSTRUCT and its images form a ready case (real store, real rules)."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from helpers import image_files, phantom, write_rules
from pydicom.uid import generate_uid

from dicom_node.audit import AuditLog
from dicom_node.cases import CaseAssembler
from dicom_node.config import config_from_data
from dicom_node.rules import RuleSet
from dicom_node.service import decide_with_rules
from dicom_node.store import Origin, Store


@pytest.fixture(scope="module")
def phantoms():
    return {seed: phantom(seed, "CT", shape=(24, 128, 128), spacing=(2.5, 3.0, 3.0)) for seed in (1, 2)}


_dbs = None


@pytest.fixture(autouse=True)
def _backend(databases):
    """Every test of this module runs on SQLite and on PostgreSQL (``databases``)."""
    global _dbs
    _dbs = databases
    yield
    _dbs = None


class Harness:
    """A store, a real rules file and the assembler, with associations opened and closed by hand."""

    def __init__(self, tmp_path: Path, **cases_cfg) -> None:
        cfg = config_from_data(
            {
                "access": {"calling_aets": ["STORESCU"]},
                "data_dir": str(tmp_path / "data"),
                "cases": {
                    "settle_seconds": 2,
                    "incomplete_timeout_seconds": 60,
                    "stale_reference_wait_seconds": 5,
                    **cases_cfg,
                },
            }
        )
        self.cfg = cfg
        self.db = _dbs.open(cfg.db_path)
        self.store = Store(cfg.store_dir, self.db, fsync=False)
        self.audit = AuditLog(cfg.audit_path)
        ruleset = RuleSet.load(write_rules(tmp_path / "rules.yaml", ["tps"]))
        self.open: set[str] = set()
        self.queued: list[int] = []
        self.asm = CaseAssembler(
            cfg,
            self.db,
            self.store,
            self.audit,
            decide=lambda c, i, p: decide_with_rules(ruleset, c, i, p),
            is_open=lambda a: a in self.open,
            on_queued=self.queued.append,
        )

    def send(self, files, assoc: str, close: bool = True) -> None:
        self.open.add(assoc)
        for f in files:
            self.store.import_file(
                Path(f), Origin(source="dicom", assoc_id=assoc, calling_aet="STORESCU", called_aet="STARDUST")
            )
        if close:
            self.open.discard(assoc)

    def close(self, assoc: str) -> None:
        self.open.discard(assoc)

    def step(self, now: float | None = None) -> list[dict]:
        self.asm.step(now)
        return [dict(r) for r in self.db.query("SELECT * FROM cases ORDER BY id")]


def test_one_association_ready_at_release_without_quiet_time(tmp_path, phantoms):
    h = Harness(tmp_path, settle_seconds=3600)  # a settle time would never elapse here
    p = phantoms[1]
    h.send(image_files(p) + [p["prompt"]], "A", close=False)
    (case,) = h.step()
    assert case["state"] == "waiting"  # complete, but the association is still open
    h.close("A")
    (case,) = h.step()  # the very next evaluation after the release
    assert case["state"] == "queued" and case["mode"] == "references"
    assert case["n_images"] == 24 and case["n_refs"] == 24
    job = h.db.one("SELECT * FROM jobs WHERE case_id=?", (case["id"],))
    assert job["state"] == "pending" and job["rule"] == "test-default"
    assert h.queued == [job["id"]]
    assert case["ready_at"] - max(r["received_at"] for r in h.db.query("SELECT received_at FROM instances")) < 5


def test_rtstruct_first_images_later_in_another_association(tmp_path, phantoms):
    h = Harness(tmp_path)
    p = phantoms[1]
    h.send([p["prompt"]], "A")
    assert h.step()[0]["state"] == "waiting"
    files = image_files(p)
    h.send(files[:10], "B", close=False)
    assert h.step()[0]["state"] == "waiting"
    h.send(files[10:], "B", close=False)
    assert h.step()[0]["state"] == "waiting"  # B still open
    h.close("B")
    assert h.step()[0]["state"] == "queued"


def test_settle_time_when_the_association_stays_open(tmp_path, phantoms):
    h = Harness(tmp_path, settle_seconds=2)
    p = phantoms[1]
    h.send(image_files(p) + [p["prompt"]], "A", close=False)
    now = time.time()
    assert h.step(now)[0]["state"] == "waiting"
    assert h.step(now + 2.5)[0]["state"] == "queued"


def test_two_patients_interleaved(tmp_path, phantoms):
    h = Harness(tmp_path)
    a, b = phantoms[1], phantoms[2]
    mixed = [f for pair in zip(image_files(a), image_files(b)) for f in pair]
    h.send([b["prompt"]] + mixed[:20], "A", close=False)
    h.send(mixed[20:] + [a["prompt"]], "A")
    cases = h.step()
    assert [c["state"] for c in cases] == ["queued", "queued"]
    for case, p in zip(cases, (b, a)):
        series = pydicom.dcmread(image_files(p)[0]).SeriesInstanceUID
        assert case["image_series_uid"] == series and case["n_images"] == 24
        uids = {
            r["sop_instance_uid"]
            for r in h.db.query("SELECT sop_instance_uid FROM case_images WHERE case_id=?", (case["id"],))
        }
        assert uids == {pydicom.dcmread(f).SOPInstanceUID for f in image_files(p)}


def test_missing_images_fail_after_the_timeout_with_the_count(tmp_path, phantoms):
    h = Harness(tmp_path, incomplete_timeout_seconds=30)
    p = phantoms[1]
    h.send(image_files(p)[3:] + [p["prompt"]], "A")
    now = time.time()
    assert h.step(now + 10)[0]["state"] == "waiting"
    (case,) = h.step(now + 31)
    assert case["state"] == "failed"
    assert case["reason"].startswith("3 of 24 referenced images missing")
    assert h.db.one("SELECT count(*) AS n FROM jobs")["n"] == 0
    events = [e["event"] for e in _audit(h)]
    assert "case_failed" in events


def test_progress_extends_the_timeout(tmp_path, phantoms):
    h = Harness(tmp_path, incomplete_timeout_seconds=30)
    p = phantoms[1]
    h.send([p["prompt"]], "A")
    start = time.time()
    assert h.step(start + 20)[0]["state"] == "waiting"
    h.send(image_files(p)[:5], "B")  # more pieces arrive: the clock restarts
    assert h.step(time.time() + 20)[0]["state"] == "waiting"
    assert h.step(time.time() + 31)[0]["state"] == "failed"


def test_resent_prompt_unchanged_is_ignored_changed_makes_a_new_case(tmp_path, phantoms):
    h = Harness(tmp_path)
    p = phantoms[1]
    h.send(image_files(p) + [p["prompt"]], "A")
    assert [c["state"] for c in h.step()] == ["queued"]
    h.send([p["prompt"]], "B")  # the same bytes again (e.g. the TPS retried)
    assert [c["state"] for c in h.step()] == ["queued"]
    # the planner corrects the box: same RTSTRUCT, changed content
    ds = pydicom.dcmread(p["prompt"])
    ds.StructureSetLabel = "PROMPT_V2"
    changed = tmp_path / "prompt_v2.dcm"
    ds.save_as(changed, enforce_file_format=True)
    h.send([changed], "C")
    cases = h.step()
    assert [c["state"] for c in cases] == ["queued", "queued"]
    assert (
        cases[1]["rtstruct_uid"] == cases[0]["rtstruct_uid"]
        and cases[1]["rtstruct_sha256"] != cases[0]["rtstruct_sha256"]
    )
    # each case has its own frozen prompt copy, recorded relative to data_dir
    prompts = [h.cfg.data_dir / c["prompt_path"] for c in cases]
    assert not any(Path(c["prompt_path"]).is_absolute() for c in cases)
    assert prompts[0].read_bytes() != prompts[1].read_bytes()


def test_stale_references_fall_back_to_the_series(tmp_path, phantoms):
    h = Harness(tmp_path, stale_reference_wait_seconds=5)
    p = phantoms[1]
    # the TPS re-exported the images with new SOP Instance UIDs: the prompt's references are stale
    out = tmp_path / "reexport"
    out.mkdir()
    for f in image_files(p):
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f.name, enforce_file_format=True)
    h.send(sorted(out.glob("*.dcm")) + [p["prompt"]], "A")
    now = time.time()
    assert h.step(now)[0]["state"] == "waiting"  # fallback: quiet time after the release
    (case,) = h.step(now + 6)
    assert case["state"] == "queued" and case["mode"] == "series-fallback" and case["n_images"] == 24


def test_rtstruct_without_prompts_makes_no_case(tmp_path, phantoms):
    h = Harness(tmp_path)
    p = phantoms[1]
    h.send(image_files(p) + [p["truth"]], "A")  # a clinician's GTV, no BOX_/POS_ ROI
    assert h.step() == []


def test_restart_resumes_from_the_arrival_log(tmp_path, phantoms):
    h = Harness(tmp_path)
    p = phantoms[1]
    h.send(image_files(p) + [p["prompt"]], "A")
    # the node dies before the assembler saw the arrivals; a new one picks them up
    h2 = Harness(tmp_path)
    assert [c["state"] for c in h2.step()] == ["queued"]
    assert [c["state"] for c in h2.step()] == ["queued"]  # processed once


def _audit(h: Harness) -> list[dict]:
    from dicom_node.audit import read_audit

    return list(read_audit(h.cfg.audit_path))
