"""The Storage SCP against real dcmtk peers: durability, access control, TLS, bad input."""

from __future__ import annotations

import re
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from helpers import echoscu, free_port, require_tool, storescu, wait_for
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid
from test_store import tiny_ct

from dicom_node.config import config_from_data, merge
from dicom_node.db import Database
from dicom_node.scp import StorageSCP
from dicom_node.store import Store

pytestmark = pytest.mark.network

EXPLICIT = "1.2.840.10008.1.2.1"


@contextmanager
def running_scp(tmp_path: Path, **overrides):
    data = merge(
        {
            "data_dir": str(tmp_path / "data"),
            "network": {"bind": "127.0.0.1", "port": free_port()},
            "access": {"calling_aets": ["STORESCU", "ECHOSCU", "PYNETDICOM"], "networks": ["127.0.0.0/8"]},
            "storage": {"min_free_mb": 1},
        },
        overrides,
    )
    cfg = config_from_data(data)
    db = Database(cfg.db_path)
    store = Store(cfg.store_dir, db, fsync=True, min_free_bytes=cfg.storage.min_free_mb * 2**20)
    scp = StorageSCP(cfg, store)
    closed = []
    scp.close_listeners.append(closed.append)
    scp.start()
    scp.closed = closed
    try:
        yield scp
    finally:
        scp.stop()


def write_files(folder: Path, datasets) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ds in datasets:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = EXPLICIT
        path = folder / f"{ds.SOPInstanceUID[-12:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file (after its meta group)."""
    from dicom_node.part10 import read_part10

    return bytes(read_part10(path.read_bytes())[1])


def test_echo_store_and_release(tmp_path):
    study, series = generate_uid(), generate_uid()
    files = write_files(tmp_path / "in", [tiny_ct(study=study, series=series) for _ in range(5)])
    with running_scp(tmp_path) as scp:
        assert echoscu(scp.port).returncode == 0
        out = storescu(files, scp.port)
        assert out.returncode == 0, out.stderr
        assert out.stderr.count("Received Store Response (Success)") == 5
        for f in files:
            ds = pydicom.dcmread(f)
            stored = scp.store.path_of(ds.SOPInstanceUID)
            assert stored == scp.store.root / study / series / f"{ds.SOPInstanceUID}.dcm"
            assert dataset_bytes(stored) == dataset_bytes(f)  # byte for byte what storescu sent
        wait_for(lambda: any(c.instances == 5 for c in scp.closed), 10, what="the association close report")
        info = next(c for c in scp.closed if c.instances == 5)
        assert info.calling_aet == "STORESCU" and info.how in ("released", "closed")
        assert not scp.open


def test_unknown_calling_and_called_ae_are_rejected(tmp_path):
    files = write_files(tmp_path / "in", [tiny_ct()])
    with running_scp(tmp_path) as scp:
        out = storescu(files, scp.port, aet="INTRUDER")
        assert out.returncode != 0
        assert "Calling AE Title Not Recognized" in out.stderr
        out = echoscu(scp.port, aec="NOT_US")
        assert out.returncode != 0 and "Called AE Title Not Recognized" in out.stderr
        assert scp.store.db.one("SELECT count(*) AS n FROM instances")["n"] == 0
        assert echoscu(scp.port).returncode == 0  # still serving


def test_unknown_source_network_is_rejected(tmp_path):
    # only 10.0.0.0/8 may send: the loopback peer is outside the allow-list
    with running_scp(tmp_path, access={"networks": ["10.0.0.0/8"]}) as scp:
        out = echoscu(scp.port)
        assert out.returncode != 0
        assert "Association Rejected" in out.stderr and "Rejected Permanent" in out.stderr
    with running_scp(tmp_path, access={"networks": ["10.0.0.0/8"], "allow_any_network": True}) as scp:
        assert echoscu(scp.port).returncode == 0


def test_unsupported_sop_class_is_refused_at_negotiation(tmp_path):
    ds = tiny_ct()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: not configured
    files = write_files(tmp_path / "in", [ds])
    with running_scp(tmp_path) as scp:
        out = storescu(files, scp.port)
        assert out.returncode != 0
        assert re.search(r"no (valid )?presentation context|No presentation context|not supported", out.stderr, re.I)
        assert scp.store.db.one("SELECT count(*) AS n FROM instances")["n"] == 0
        assert echoscu(scp.port).returncode == 0


def _raw_store(port: int, payload_file: Path) -> int:
    """C-STORE the bytes after the file meta of ``payload_file`` without decoding them."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE("PYNETDICOM")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", EXPLICIT)
        assoc = ae.associate("127.0.0.1", port, ae_title="STARDUST")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(payload_file)
            return int(status.Status), str(status.get("ErrorComment", ""))
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def _with_payload(tmp_path: Path, name: str, body: bytes) -> Path:
    """A file with valid meta (CT, explicit VR LE) followed by ``body``."""
    good = write_files(tmp_path / "tmpl", [tiny_ct()])[0]
    raw = good.read_bytes()
    meta_end = len(raw) - len(dataset_bytes(good))
    path = tmp_path / name
    path.write_bytes(raw[:meta_end] + body)
    return path


def test_non_dicom_and_truncated_data_get_an_error_status(tmp_path):
    good = write_files(tmp_path / "good", [tiny_ct()])[0]
    body = dataset_bytes(good)
    with running_scp(tmp_path) as scp:
        status, comment = _raw_store(
            scp.port, _with_payload(tmp_path, "garbage.dcm", b"MZ\x90\x00 this is not DICOM" * 50)
        )
        assert status == 0xC210 and "not a decodable DICOM dataset" in comment
        status, comment = _raw_store(scp.port, _with_payload(tmp_path, "cut.dcm", body[: len(body) - 50]))
        assert status == 0xC210, comment
        assert scp.store.db.one("SELECT count(*) AS n FROM instances")["n"] == 0
        assert not list(scp.store.root.rglob("*.part"))
        assert echoscu(scp.port).returncode == 0
        out = storescu([good], scp.port)  # and still stores good data
        assert out.returncode == 0 and "Success" in out.stderr


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_uid_crafted_as_a_path_is_refused(tmp_path):
    evil = tiny_ct(study="../../../../tmp/stardust-evil")
    files = write_files(tmp_path / "in", [evil])
    with running_scp(tmp_path) as scp:
        out = storescu(files, scp.port)
        text = out.stdout + out.stderr
        assert "Success" not in text
        assert re.search(r"Error: ?Cannot ?Understand", text, re.I), text
        assert not Path("/tmp/stardust-evil").exists()
        assert scp.store.db.one("SELECT count(*) AS n FROM instances")["n"] == 0
        assert echoscu(scp.port).returncode == 0


def test_disk_floor_answers_out_of_resources(tmp_path):
    files = write_files(tmp_path / "in", [tiny_ct()])
    with running_scp(tmp_path, storage={"min_free_mb": 2**40}) as scp:
        out = storescu(files, scp.port)
        text = out.stdout + out.stderr
        assert re.search(r"Refused: ?Out ?Of ?Resources", text, re.I), text
        assert scp.store.db.one("SELECT count(*) AS n FROM instances")["n"] == 0


def test_association_limit(tmp_path):
    with running_scp(tmp_path, network={"max_associations": 1}) as scp:
        from pynetdicom import AE

        ae = AE("PYNETDICOM")
        ae.add_requested_context("1.2.840.10008.1.1")
        first = ae.associate("127.0.0.1", scp.port, ae_title="STARDUST")
        try:
            assert first.is_established
            out = echoscu(scp.port)
            assert out.returncode != 0 and "Local Limit Exceeded" in out.stderr
        finally:
            first.release()
        wait_for(lambda: echoscu(scp.port).returncode == 0, 10, 0.2, "the slot to free up")


# -- TLS ------------------------------------------------------------------------------------
def _openssl(*args, cwd: Path) -> None:
    exe = require_tool("openssl")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
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
        "/CN=STARDUST test CA",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    # server key encrypted: its password comes from the environment
    _openssl("genrsa", "-aes256", "-passout", "pass:node-key-pw", "-out", "server.key", "2048", cwd=d)
    _openssl(
        "req",
        "-new",
        "-key",
        "server.key",
        "-passin",
        "pass:node-key-pw",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
        cwd=d,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=tps-client",
        cwd=d,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.crt",
        "-days",
        "2",
        cwd=d,
    )
    return d


def test_tls_with_dcmtk(tmp_path, pki, monkeypatch):
    monkeypatch.setenv("STARDUST_TEST_TLS_PW", "node-key-pw")
    files = write_files(tmp_path / "in", [tiny_ct(), tiny_ct()])
    tls = {
        "enabled": True,
        "cert_file": str(pki / "server.crt"),
        "key_file": str(pki / "server.key"),
        "key_password_env": "STARDUST_TEST_TLS_PW",
        "ca_file": str(pki / "ca.crt"),
    }
    with running_scp(tmp_path, tls=tls) as scp:
        out = storescu(files, scp.port, extra=["+tla", "+cf", str(pki / "ca.crt")])
        assert out.returncode == 0, out.stderr
        assert out.stderr.count("Received Store Response (Success)") == 2
        assert echoscu(scp.port).returncode != 0  # plain TCP to the TLS port fails
        # a silent client that never starts the handshake does not block others
        with socket.create_connection(("127.0.0.1", scp.port)):
            assert echoscu(scp.port, extra=["+tla", "+cf", str(pki / "ca.crt")]).returncode == 0
    with running_scp(tmp_path, tls={**tls, "require_client_cert": True}) as scp:
        anon = echoscu(scp.port, extra=["+tla", "+cf", str(pki / "ca.crt")])
        assert anon.returncode != 0  # no client certificate: refused in the handshake
        out = storescu(
            files,
            scp.port,
            extra=["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")],
        )
        assert out.returncode == 0, out.stderr
        assert (
            echoscu(
                scp.port, extra=["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
            ).returncode
            == 0
        )
