"""The operator's web page without a running node: configuration, authentication, TLS, pages.

The pages are served by the node's own uvicorn server (:class:`dicom_node.web.server.WebServer`)
on loopback over a database made here; ``test_web_node.py`` runs the whole node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import CLI, REPO, free_port, phantom, require_tool, write_config
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.config import ConfigError, config_from_data
from dicom_node.db import Database
from dicom_node.failures import record_failure
from dicom_node.jobs import create_job
from dicom_node.qa import pick_slices
from dicom_node.states import CaseState, JobState, NotificationKind
from dicom_node.web.app import create_app
from dicom_node.web.auth import PasswordFile, PasswordFileError, hash_password, read_password_file
from dicom_node.web.server import WebError, WebServer

ACCESS = {"calling_aets": ["STORESCU"]}
#: one client for the plain-HTTP tests (a new one per request would load the CA bundle every time)
http = httpx.Client(timeout=30)


def _cfg(tmp_path: Path, **web):
    return config_from_data(
        {"access": ACCESS, "data_dir": str(tmp_path / "data"), "web": {"enabled": True, "port": free_port(), **web}},
        base=tmp_path,
    )


def _passwords(path: Path, **users: str) -> Path:
    path.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in users.items()))
    return path


def _failed_case(db: Database, prompt: Path) -> int:
    """A case whose job failed, as the worker leaves it (with its recorded failure)."""
    now = time.time()
    with db.tx() as c:
        case_id = c.execute(
            """INSERT INTO cases (state, reason, rtstruct_uid, rtstruct_sha256, prompt_path, n_refs, created_at,
                   last_progress_at, ready_at, finished_at, patient_ref, mode, n_images, source, calling_aet)
               VALUES (?, ?, '1.2.3.4', 'abc', ?, 3, ?, ?, ?, ?, 'p:0123456789ab', 'references', 3, 'dicom',
                       'STORESCU')""",
            (CaseState.FAILED, "prompts refused: the box is outside the image", str(prompt), now, now, now, now),
        ).lastrowid
        job_id = create_job(c, case_id, "lung-ct", {"engine": "classic", "outputs": ["rtstruct"]}, ["rule 1"], now)
        c.execute(
            "UPDATE jobs SET state=?, error=?, attempts=1, finished_at=? WHERE id=?",
            (JobState.FAILED, "prompts refused: the box is outside the image", now, job_id),
        )
        record_failure(
            c,
            NotificationKind.JOB_FAILED,
            "prompts refused: the box is outside the image",
            case_id=case_id,
            job_id=job_id,
        )
    return case_id


@pytest.fixture
def served(tmp_path, databases):
    """start(**web) -> (cfg, db, base URL) of a WebServer over a database with one failed case
    (on SQLite and on PostgreSQL)."""
    servers: list[WebServer] = []

    def start(**web):
        cfg = _cfg(tmp_path, **web)
        db = databases.open(cfg.db_path, cfg.files_dir)
        case_id = _failed_case(db, phantom(1)["prompt"])
        server = WebServer(cfg, create_app(cfg, db))
        server.start()
        servers.append(server)
        scheme = "https" if cfg.web.tls.enabled else "http"
        return cfg, db, f"{scheme}://127.0.0.1:{server.port}", case_id

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


# -- configuration -------------------------------------------------------------------------
def test_web_is_off_by_default_and_local():
    cfg = config_from_data({"access": ACCESS})
    assert not cfg.web.enabled and cfg.web.bind == "127.0.0.1" and not cfg.web.show_patient_identity
    assert cfg.webhook.url is None


@pytest.mark.parametrize(
    "web, message",
    [
        ({"bind": "0.0.0.0"}, "bind 0.0.0.0 is reachable from other hosts and the page has no authentication"),
        ({"bind": "10.1.2.3", "password_file": "pw"}, "with password_file needs tls.enabled"),
        ({"bind": "localhost"}, "is not an IP address"),
        ({"bind": "0.0.0.0", "tls": {"enabled": True}}, "tls.enabled needs cert_file and key_file"),
    ],
)
def test_unsafe_or_broken_web_settings_are_refused(web, message):
    with pytest.raises(ConfigError, match=message):
        config_from_data({"access": ACCESS, "web": {"enabled": True, **web}})


def test_other_addresses_are_allowed_with_authentication(tmp_path):
    tls = {"enabled": True, "cert_file": "c.pem", "key_file": "k.pem"}
    basic = config_from_data(
        {"access": ACCESS, "web": {"enabled": True, "bind": "0.0.0.0", "password_file": "pw", "tls": tls}}
    )
    assert basic.web.authenticates and not basic.web.loopback
    certs = {**tls, "ca_file": "ca.pem", "require_client_cert": True}
    assert config_from_data(
        {"access": ACCESS, "web": {"enabled": True, "bind": "0.0.0.0", "tls": certs}}
    ).web.client_certificates


def test_the_node_refuses_to_start_on_0000_without_authentication(tmp_path):
    config = write_config(tmp_path, web={"enabled": True, "bind": "0.0.0.0", "port": free_port()})
    t0 = time.monotonic()
    out = subprocess.run([*CLI, "serve", "-c", str(config)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "web: bind 0.0.0.0 is reachable from other hosts and the page has no authentication" in out.stderr
    assert not (tmp_path / "data" / "node.db").exists()  # refused before anything started
    assert time.monotonic() - t0 < 60


def test_webhook_url_is_checked():
    with pytest.raises(ConfigError, match="is not an http:// or https:// URL"):
        config_from_data({"access": ACCESS, "webhook": {"url": "ftp://x/hook"}})
    with pytest.raises(ConfigError, match="put no credentials in the URL"):
        config_from_data({"access": ACCESS, "webhook": {"url": "https://u:p@x/hook"}})


# -- the password file ---------------------------------------------------------------------
def test_password_file_errors_name_the_line(tmp_path):
    path = tmp_path / "pw"
    path.write_text("# operators\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    with pytest.raises(PasswordFileError, match=r"line 2 \(user 'alice'\): only bcrypt hashes"):
        read_password_file(path)
    path.write_text("no colon here\n")
    with pytest.raises(PasswordFileError, match="line 1: expected USER:HASH"):
        read_password_file(path)
    with pytest.raises(PasswordFileError, match="does not exist"):
        read_password_file(tmp_path / "missing")


def test_web_passwd_writes_a_file_the_node_reads(tmp_path):
    path = tmp_path / "etc" / "web.passwd"
    for user, pw in (("alice", "correct horse"), ("bob", "battery staple"), ("alice", "new one")):
        out = subprocess.run(
            [*CLI, "web", "passwd", str(path), user, "--stdin"], input=pw + "\n", capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
    assert "changed in" in out.stdout and oct(path.stat().st_mode & 0o777) == "0o640"
    users = PasswordFile(path)
    assert set(read_password_file(path)) == {"alice", "bob"}
    assert users.verify("alice", "new one") and not users.verify("alice", "correct horse")
    assert users.verify("bob", "battery staple") and not users.verify("carol", "battery staple")


# -- authentication over HTTP ----------------------------------------------------------------
def test_basic_authentication(served, tmp_path):
    pw = _passwords(tmp_path / "pw", alice="s3cret")
    _cfg_, db, url, case_id = served(password_file=str(pw))
    for auth in (None, ("alice", "wrong"), ("mallory", "s3cret")):
        r = http.get(f"{url}/cases", auth=auth)
        assert r.status_code == 401, auth
        assert r.headers["www-authenticate"].startswith('Basic realm="STARDUST DICOM node"')
    assert http.get(f"{url}/metrics", auth=("alice", "wrong")).status_code == 401
    r = http.get(f"{url}/cases/{case_id}", auth=("alice", "s3cret"))
    assert r.status_code == 200 and "signed in as alice" in r.text and "Retry the segmentation" in r.text
    assert r.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in r.headers["content-security-policy"]
    # an action needs the page's token, then runs: the failed job is queued again
    assert http.post(f"{url}/cases/{case_id}/retry", auth=("alice", "s3cret")).status_code == 403
    token = r.text.split('name="token" value="')[1].split('"')[0]
    r = http.post(f"{url}/cases/{case_id}/retry", auth=("alice", "s3cret"), data={"token": token})
    assert r.status_code == 303 and r.headers["location"] == f"/cases/{case_id}?done=retried"
    assert db.one("SELECT state FROM jobs")["state"] == JobState.PENDING
    r = http.post(f"{url}/cases/{case_id}/retry", auth=("alice", "s3cret"), data={"token": token})
    assert r.status_code == 409 and "only failed jobs can be retried" in r.text
    assert http.get(f"{url}/cases/{case_id}/retry", auth=("alice", "s3cret")).status_code == 405


def test_without_authentication_pages_are_read_only(served):
    _cfg_, db, url, case_id = served()
    r = http.get(f"{url}/cases/{case_id}")
    assert r.status_code == 200 and "Retry the segmentation" not in r.text and "need a signed-in user" in r.text
    assert http.post(f"{url}/cases/{case_id}/retry", data={"token": "x"}).status_code == 403
    assert db.one("SELECT state FROM jobs")["state"] == JobState.FAILED


def test_pages_and_their_refusals(served):
    _cfg_, _db, url, case_id = served()
    health = http.get(f"{url}/")
    assert health.status_code == 200 and "prompts refused: the box is outside the image" in health.text  # last errors
    cases = http.get(f"{url}/cases", params={"state": "failed"})
    assert cases.status_code == 200 and f'href="/cases/{case_id}"' in cases.text and "lung-ct" in cases.text
    assert "No cases in state done" in http.get(f"{url}/cases", params={"state": "done"}).text
    bad = http.get(f"{url}/cases", params={"state": "nonsense"})
    assert bad.status_code == 400 and "state must be one of waiting, queued, done, failed" in bad.text
    assert http.get(f"{url}/cases/999").status_code == 404
    assert http.get(f"{url}/cases/{case_id}/qa/..%2F..%2Fnode.db").status_code == 404
    assert http.get(f"{url}/static/style.css").status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(http.get(f"{url}/metrics").text)}
    cases_gauge = {s.labels["state"]: s.value for s in families["stardust_cases"].samples}
    assert cases_gauge == {"waiting": 0, "queued": 0, "done": 0, "failed": 1}
    assert {s.labels["state"]: s.value for s in families["stardust_jobs"].samples}["failed"] == 1


def test_patient_identity_only_when_asked_for(served):
    import pydicom

    ds = pydicom.dcmread(phantom(1)["prompt"])
    name, pid = str(ds.PatientName), str(ds.PatientID)
    _c, _d, url, case_id = served()
    hidden = http.get(f"{url}/cases").text + http.get(f"{url}/cases/{case_id}").text
    assert name not in hidden and pid not in hidden
    _c, _d, url, case_id = served(show_patient_identity=True)
    shown = http.get(f"{url}/cases/{case_id}").text
    assert name in shown and pid in shown and name in http.get(f"{url}/cases").text


def test_a_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = _cfg(tmp_path, port=s.getsockname()[1])
        server = WebServer(cfg, create_app(cfg, Database(cfg.db_path)))
        with pytest.raises(WebError, match=r"web: cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            server.start()


# -- TLS with client certificates ----------------------------------------------------------
def _openssl(*args, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("web-pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=STARDUST web test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


def test_client_certificates_over_tls(served, pki):
    import ssl

    tls = {
        "enabled": True,
        "cert_file": str(pki / "server.crt"),
        "key_file": str(pki / "server.key"),
        "ca_file": str(pki / "ca.crt"),
        "require_client_cert": True,
    }
    _c, _d, url, case_id = served(tls=tls)
    anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(f"{url}/cases", verify=anonymous).raise_for_status()
    with_cert = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with_cert.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    r = httpx.get(f"{url}/cases/{case_id}", verify=with_cert)
    assert r.status_code == 200 and "signed in as client certificate" in r.text and "Retry the segmentation" in r.text
    with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # no plain HTTP on the TLS port
        httpx.get(url.replace("https://", "http://") + "/cases").raise_for_status()


# -- small pieces --------------------------------------------------------------------------
def test_qa_slices_are_the_prompted_ones_and_the_extent():
    assert pick_slices(range(10, 31), [20]) == [10, 15, 20, 25, 30]
    assert pick_slices([5], [5]) == [5]
    assert pick_slices([], [7]) == [7]
    assert pick_slices(range(0, 40), [3, 30, 35], limit=4) == [0, 3, 30, 35]


def test_the_webhook_payload_has_no_identifiers():
    from dicom_node.notify import payload
    from dicom_node.rows import NotificationRow
    from dicom_node.states import NotificationState

    row = NotificationRow(7, NotificationKind.CASE_FAILED, 3, None, None, None, None, "12 of 134 referenced images missing",
                          0.0, NotificationState.PENDING, 0, 0.0, None, None)  # fmt: skip
    body = payload(row, "STARDUST")
    assert set(body) == {"event", "id", "node", "case", "job", "rule", "destination", "output", "reason", "time"}
    assert body["event"] == "case_failed" and body["reason"] == "12 of 134 referenced images missing"
    json.dumps(body)


def test_a_rules_outputs_are_checked():
    from pydantic import ValidationError

    from dicom_node.rules import Action

    assert Action().outputs == ["rtstruct"] and Action(outputs="seg").outputs == ["seg"]
    assert Action(outputs=["rtstruct", "seg", "overlay"]).outputs == ["rtstruct", "seg", "overlay"]
    for bad, message in (("png", "Input should be 'rtstruct', 'seg' or 'overlay'"), (["seg", "seg"], "listed twice"),
                         ([], "list at least one")):  # fmt: skip
        with pytest.raises(ValidationError, match=message):
            Action(outputs=bad)


def test_metrics_created_once_when_many_threads_count_first(tmp_path):
    """The first count can come from several threads at once (a C-STORE handler and the
    SCP's connection watch: the node once answered its first C-STORE with 0xC001 after a
    port probe): exactly one set of series is registered and every thread gets it."""
    script = """
import sys, threading
from dicom_node import metrics as m
m.use_directory(sys.argv[1])
barrier = threading.Barrier(16)
got, errors = [], []
def first_count():
    barrier.wait()
    try:
        got.append(m.metrics())
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=first_count) for _ in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(errors), len({id(x) for x in got}), errors[:1])
"""
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "metrics")], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["0", "1"], out.stdout
