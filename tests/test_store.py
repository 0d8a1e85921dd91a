"""The instance store: durable files by validated UIDs, SQLite index, reconcile, retention."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from dicom_node.config import config_from_data
from dicom_node.db import Database
from dicom_node.part10 import read_part10, scan_dataset
from dicom_node.retention import run_retention
from dicom_node.store import InvalidInstance, Origin, OutOfSpace, Store, Undecodable

EXPLICIT, IMPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"


def tiny_ct(**uids) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = uids.get("sop", generate_uid())
    ds.StudyInstanceUID = uids.get("study", generate_uid())
    ds.SeriesInstanceUID = uids.get("series", generate_uid())
    ds.FrameOfReferenceUID = uids.get("frame", generate_uid())
    ds.Modality = "CT"
    ds.PatientID = "PAT-0001"
    ds.PatientName = "Doe^Jane"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    seq_item = Dataset()
    seq_item.CodeValue = "X"
    ds.ProcedureCodeSequence = [seq_item]
    ds.PixelData = np.arange(64, dtype=np.int16).tobytes()
    return ds


def encode(ds: Dataset, ts: str = EXPLICIT) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = ts == IMPLICIT
    write_dataset(buf, ds)
    data = buf.getvalue()
    if ts == DEFLATED:
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = c.compress(data) + c.flush()
    return data


@pytest.fixture
def store(tmp_path, databases):
    """A store over the node's database, on SQLite and on PostgreSQL."""
    db = databases.open(tmp_path / "node.db")
    return Store(tmp_path / "store", db, fsync=True, min_free_bytes=1)


def test_put_writes_the_received_bytes_and_indexes_them(store, tmp_path):
    ds = tiny_ct()
    data = encode(ds)
    stored = store.put(data, EXPLICIT, Origin(assoc_id="a-1", calling_aet="TPS", peer="127.0.0.1:5"))
    assert stored.path == store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    raw = stored.path.read_bytes()
    assert raw[128:132] == b"DICM" and raw.endswith(data)  # exactly the received dataset bytes
    back = pydicom.dcmread(stored.path)
    assert back.file_meta.TransferSyntaxUID == EXPLICIT
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "TPS"
    assert back.PatientName == "Doe^Jane"
    row = store.db.one("SELECT * FROM instances WHERE sop_instance_uid=?", (ds.SOPInstanceUID,))
    assert row["series_uid"] == ds.SeriesInstanceUID and row["assoc_id"] == "a-1" and row["modality"] == "CT"
    assert row["patient_ref"].startswith("p:") and "PAT-0001" not in row["patient_ref"]
    assert not list(store.root.rglob("*.part"))
    # a re-sent instance replaces the file, keeps one index row and logs a second arrival
    store.put(data, EXPLICIT, Origin(assoc_id="a-2"))
    assert store.db.one("SELECT count(*) AS n FROM instances")["n"] == 1
    assert store.db.one("SELECT count(*) AS n FROM arrivals")["n"] == 2


@pytest.mark.parametrize("ts", [IMPLICIT, DEFLATED])
def test_other_transfer_syntaxes(store, ts):
    ds = tiny_ct()
    stored = store.put(encode(ds, ts), ts, Origin())
    assert pydicom.dcmread(stored.path).SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("cut", [1, 7, 40, 200])
def test_truncated_data_is_undecodable(store, cut):
    data = encode(tiny_ct())
    with pytest.raises(Undecodable) as err:
        store.put(data[: len(data) - cut], EXPLICIT, Origin())
    assert err.value.status == 0xC210
    assert not [p for p in store.root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
def test_random_bytes_are_undecodable(store, ts):
    rng = np.random.default_rng(1)
    with pytest.raises(Undecodable, match="not a decodable DICOM dataset"):
        store.put(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), ts, Origin())
    with pytest.raises(Undecodable):
        store.put(b"hello, this is not DICOM at all" * 20, ts, Origin())


def test_missing_required_attribute(store):
    ds = tiny_ct()
    del ds.SeriesInstanceUID
    with pytest.raises(Undecodable, match="lacks SeriesInstanceUID"):
        store.put(encode(ds), EXPLICIT, Origin())


@pytest.mark.parametrize("key", ["sop", "study", "series"])
@pytest.mark.parametrize("evil", ["../../etc", "1.2/../../x", "..", "1.2.3/"])
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_uid_crafted_as_a_path_never_touches_the_disk(store, tmp_path, key, evil):
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidInstance, match="not a valid DICOM UID") as err:
        store.put(encode(tiny_ct(**{key: evil})), EXPLICIT, Origin())
    assert 0xC000 <= err.value.status <= 0xCFFF
    after = sorted(str(p) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and not p.endswith(("node.db-wal", "node.db-shm"))] == []
    assert not (tmp_path.parent / "etc").exists()


def test_request_and_dataset_must_agree(store):
    ds = tiny_ct()
    with pytest.raises(InvalidInstance, match="C-STORE request is for SOP Instance"):
        store.put(encode(ds), EXPLICIT, Origin(), expected_sop_instance=generate_uid())
    with pytest.raises(InvalidInstance) as err:
        store.put(encode(ds), EXPLICIT, Origin(), expected_sop_class="1.2.840.10008.5.1.4.1.1.4")
    assert err.value.status == 0xA900


def test_out_of_space(tmp_path):
    store = Store(tmp_path / "store", Database(tmp_path / "db"), min_free_bytes=2**62)
    with pytest.raises(OutOfSpace, match="storage.min_free_mb") as err:
        store.put(encode(tiny_ct()), EXPLICIT, Origin())
    assert err.value.status == 0xA700


def test_scan_reads_only_top_level_tags():
    ds = tiny_ct()
    inner = Dataset()
    inner.SOPInstanceUID = "1.2.3.4"  # nested: must not be taken for the instance's UID
    ds.ReferencedImageSequence = [inner]
    header = scan_dataset(encode(ds), EXPLICIT)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.patient_id == "PAT-0001" and header.modality == "CT"


def test_read_part10_and_import(store, tmp_path):
    ds = tiny_ct()
    path = tmp_path / "x.dcm"
    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    ds.save_as(path, enforce_file_format=True)
    ts, body, _aet = read_part10(path.read_bytes())
    assert ts == EXPLICIT
    stored = store.import_file(path, Origin(source="watch", calling_aet="WATCH"))
    assert pydicom.dcmread(stored.path).SOPInstanceUID == ds.SOPInstanceUID
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(Undecodable, match="not a DICOM file"):
        store.import_file(tmp_path / "notes.txt", Origin(source="watch"))


def test_reconcile_after_a_crash(store):
    a, b = tiny_ct(), tiny_ct()
    sa = store.put(encode(a), EXPLICIT, Origin())
    sb = store.put(encode(b), EXPLICIT, Origin())
    # power loss: the last index row is gone, a half-written .part and a corrupt file remain
    with store.db.tx() as c:
        c.execute("DELETE FROM instances WHERE sop_instance_uid=?", (b.SOPInstanceUID,))
    (sa.path.parent / ".x.dcm.1.part").write_bytes(b"partial")
    bad = sa.path.parent / "1.2.3.4.dcm"
    bad.write_bytes(b"\0" * 200)
    counts = store.reconcile()
    assert counts["parts_removed"] == 1 and counts["indexed"] == 1 and counts["quarantined"] == 1
    row = store.db.one("SELECT source, path FROM instances WHERE sop_instance_uid=?", (b.SOPInstanceUID,))
    assert row["source"] == "reconcile" and store.abspath(row["path"]) == sb.path
    assert not bad.exists() and (store.root / ".quarantine" / "1.2.3.4.dcm").exists()
    assert store.reconcile()["indexed"] == 0  # idempotent


def test_retention_keeps_unfinished_cases(store, tmp_path):
    cfg = config_from_data(
        {"access": {"calling_aets": ["TPS"]}, "data_dir": str(tmp_path), "storage": {"retention_days": 1}}
    )
    old_free, old_case, new = tiny_ct(), tiny_ct(), tiny_ct()
    for ds in (old_free, old_case, new):
        store.put(encode(ds), EXPLICIT, Origin())
    long_ago = time.time() - 3 * 86400
    with store.db.tx() as c:
        c.execute(
            "UPDATE instances SET received_at=? WHERE sop_instance_uid IN (?, ?)",
            (long_ago, old_free.SOPInstanceUID, old_case.SOPInstanceUID),
        )
        cid = c.execute(
            """INSERT INTO cases (state, rtstruct_uid, rtstruct_sha256, prompt_path, ref_series_uids, n_refs,
                   created_at, last_progress_at) VALUES ('waiting', '1.2.3', 'x', '/nowhere', ?, 1, ?, ?)""",
            (json.dumps([old_case.SeriesInstanceUID]), long_ago, long_ago),
        ).lastrowid
        c.execute("INSERT INTO case_refs VALUES (?, ?)", (cid, old_case.SOPInstanceUID))
    counts = run_retention(cfg, store.db, store)
    assert counts["instances"] == 1
    left = {r["sop_instance_uid"] for r in store.db.query("SELECT sop_instance_uid FROM instances")}
    assert left == {old_case.SOPInstanceUID, new.SOPInstanceUID}
    # once the case is finished, its old instance goes too
    with store.db.tx() as c:
        c.execute("UPDATE cases SET state='failed'")
    assert run_retention(cfg, store.db, store)["instances"] == 1
    assert not list(Path(store.root).glob(f"{old_free.StudyInstanceUID}*"))
