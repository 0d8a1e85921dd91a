"""Schema versions and migrations: the machinery, and an upgrade from the previous release.

The upgrade test runs the release before schema 2 (commit ``8c478e1``, taken from git
history) on a fresh data directory, leaves it with a delivered case, a case whose delivery
is pending and images without their prompt, kills it, and starts today's node on the same
data: the database is migrated and every result is delivered exactly once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from helpers import (
    CLI,
    PY,
    REPO,
    NodeProcess,
    StoreSCP,
    image_files,
    phantom,
    storescu,
    wait_for,
    write_config,
)

from dicom_node import migrations
from dicom_node.cli import main as cli_main
from dicom_node.db import _SCHEMA, SCHEMA_VERSION, Database, SchemaError
from dicom_node.migrations import NODE_LOCK, backup_path
from dicom_node.rows import get_case, get_job
from dicom_node.states import CaseState, DeliveryKind, DeliveryState, JobState

#: main's head before the restructuring: the last release with schema 1
OLD_RELEASE = "8c478e1"


# ======================================================================================
# A schema 1 database, made by hand (the unit tests need no git)
# ======================================================================================
#: ``sends`` as schemas 1 and 2 had it (schema 3 adds ``output``; it has no ``notifications``)
SENDS_SCHEMA_2 = """
DROP TABLE notifications;
DROP TABLE sends;
CREATE TABLE sends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (job_id, destination)
);
CREATE INDEX sends_due ON sends(state, next_attempt_at);
"""


def make_v1(data_dir: Path, outside: Path | None = None, version: int = 1) -> dict:
    """A schema 1 database with one done case (prompt and result files, absolute paths).

    Schema 1 has the same tables as schema 2 (migration 2 changes only data): today's DDL
    with ``sends`` as it was (:data:`SENDS_SCHEMA_2`) builds it. ``outside``: a second case
    whose prompt lies outside data_dir. ``version`` 2: the same rows with relative paths.
    """
    data_dir.mkdir(parents=True)
    prompt = data_dir / "prompts" / "abc.dcm"
    result = data_dir / "results" / "1" / "RS.1.2.3.dcm"
    for path, text in ((prompt, "prompt"), (result, "result")):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    conn = sqlite3.connect(data_dir / "node.db", isolation_level=None)
    conn.executescript(_SCHEMA)
    conn.executescript(SENDS_SCHEMA_2)
    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    now = time.time()
    for n, path in enumerate([prompt] + ([outside] if outside else []), start=1):
        conn.execute(
            """INSERT INTO cases (state, rtstruct_uid, rtstruct_sha256, prompt_path, n_refs, created_at,
                   last_progress_at, ref_series_uids, mode, source) VALUES ('done', ?, ?, ?, 1, ?, ?, '["1.5"]',
                   'references', 'dicom')""",
            (f"1.2.{n}", f"h{n}", str(path) if version == 1 else str(path.relative_to(data_dir)), now, now),
        )
    conn.execute(
        """INSERT INTO jobs (case_id, state, rule, action, explanation, created_at, result_path, result_sop_uid,
               detail) VALUES (1, 'done', 'r', '{"engine": "classic", "destinations": []}', '["why"]', ?, ?,
               '1.2.3', '{"rois": "GTV_AI"}')""",
        (now, str(result) if version == 1 else str(result.relative_to(data_dir))),
    )
    conn.close()
    return {"db": data_dir / "node.db", "prompt": prompt, "result": result}


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def schema_of(path: Path) -> dict:
    """Tables with their columns, indexes and foreign keys (not the SQL text: comments differ)."""
    conn = sqlite3.connect(path)
    try:
        out = {}
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            indexes = {
                name: (unique, conn.execute(f"PRAGMA index_xinfo('{name}')").fetchall())
                for _seq, name, unique, *_ in conn.execute(f"PRAGMA index_list('{table}')")
            }
            out[table] = (
                conn.execute(f"PRAGMA table_info('{table}')").fetchall(),
                indexes,
                conn.execute(f"PRAGMA foreign_key_list('{table}')").fetchall(),
            )
        return out
    finally:
        conn.close()


def version_of(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    finally:
        conn.close()


# ======================================================================================
# The machinery
# ======================================================================================
def test_a_new_database_has_the_current_schema(tmp_path):
    db = Database(tmp_path / "node.db")
    assert db.migration is None
    assert db.get_meta("schema_version") == str(SCHEMA_VERSION) == "3"
    assert not list(tmp_path.glob("*.bak"))


def test_schema_1_is_migrated_in_place_after_a_backup(tmp_path, caplog):
    v1 = make_v1(tmp_path / "data", outside=Path("/srv/elsewhere/prompt.dcm"))
    before = dump(v1["db"])
    with caplog.at_level("WARNING", logger="dicom_node.migrations"):
        db = Database(v1["db"])
    report = db.migration
    assert (report.from_version, report.to_version) == (1, 3)
    assert report.counts == {"paths_made_relative": 2, "paths_kept_absolute": 1, "deliveries_copied": 0}
    assert db.get_meta("schema_version") == "3"
    rows = {r["id"]: r["prompt_path"] for r in db.query("SELECT id, prompt_path FROM cases")}
    assert rows == {1: "prompts/abc.dcm", 2: "/srv/elsewhere/prompt.dcm"}  # outside data_dir: kept, with a warning
    assert db.one("SELECT result_path FROM jobs")["result_path"] == "results/1/RS.1.2.3.dcm"
    (warning,) = [r for r in caplog.records if r.getMessage() == "migration_path_outside_data_dir"]
    assert warning.levelname == "WARNING" and warning.fields["path"] == "/srv/elsewhere/prompt.dcm"
    # the backup is the schema 1 database as it was, one self-contained file
    backup = report.backup
    assert backup == backup_path(v1["db"], 1) == tmp_path / "data" / "node.db.v1.bak"
    assert dump(backup) == before
    assert not Path(f"{backup}-wal").exists() and not list(backup.parent.glob("*.tmp"))
    # readers get paths under data_dir, decoded rows
    case, job = get_case(db, 1), get_job(db, 1)
    assert case.prompt_path == v1["prompt"] and case.prompt_path.read_text() == "prompt"
    assert case.state == CaseState.DONE and case.ref_series_uids == ("1.5",)
    assert job.result_path == v1["result"] and job.action["engine"] == "classic" and job.detail == {"rois": "GTV_AI"}


def test_migrating_twice_is_a_no_op(tmp_path):
    v1 = make_v1(tmp_path / "data")
    Database(v1["db"]).close()
    backup = backup_path(v1["db"], 1)
    stamp, after = backup.stat().st_mtime_ns, dump(v1["db"])
    db = Database(v1["db"])
    assert db.migration is None and migrations.upgrade(db) is None
    assert dump(v1["db"]) == after and backup.stat().st_mtime_ns == stamp


def test_schema_2_deliveries_become_rtstruct_deliveries(tmp_path):
    v2 = make_v1(tmp_path / "data", version=2)
    conn = sqlite3.connect(v2["db"])
    with conn:
        for n, (dest, state) in enumerate([("tps", "sent"), ("folder:/x", "dead"), ("pacs", "pending")], start=3):
            conn.execute(
                """INSERT INTO sends (id, job_id, destination, kind, state, attempts, next_attempt_at, last_error,
                       sent_at) VALUES (?, 1, ?, 'dicom', ?, ?, 5.0, ?, ?)""",
                (n, dest, state, n, None if state == "sent" else "refused", 7.0 if state == "sent" else None),
            )
    before = [r[:9] for r in sqlite3.connect(v2["db"]).execute("SELECT * FROM sends ORDER BY id")]
    db = Database(v2["db"])
    assert (db.migration.from_version, db.migration.to_version) == (2, 3)
    assert db.migration.counts == {"deliveries_copied": 3}
    rows = [tuple(r) for r in db.query("SELECT * FROM sends ORDER BY id")]
    assert [r[:9] for r in rows] == before and [r[9] for r in rows] == ["rtstruct"] * 3  # ids, states, times kept
    fresh = tmp_path / "fresh.db"
    Database(fresh).close()
    assert schema_of(v2["db"]) == schema_of(fresh)
    # the new uniqueness: a second output for the same destination is a new row, the same output is not
    with db.tx() as c:
        c.execute(
            "INSERT INTO sends (job_id, destination, kind, state, next_attempt_at, output) "
            "VALUES (1, 'tps', 'dicom', 'pending', 0, 'seg')"
        )
        with pytest.raises(sqlite3.IntegrityError):
            c.execute(
                "INSERT INTO sends (job_id, destination, kind, state, next_attempt_at) "
                "VALUES (1, 'tps', 'dicom', 'pending', 0)"
            )
    assert db.query("SELECT count(*) AS n FROM notifications")[0]["n"] == 0
    with db.tx() as c:  # ids go on after the copied rows
        new_id = c.execute(
            "INSERT INTO sends (job_id, destination, kind, state, next_attempt_at) "
            "VALUES (1, 'other', 'dicom', 'pending', 0)"
        ).lastrowid
    assert new_id > 5


def test_a_newer_schema_is_refused_by_the_node_and_the_cli(tmp_path, capsys):
    config = write_config(tmp_path / "node")
    data = tmp_path / "node" / "data"
    Database(data / "node.db").close()
    conn = sqlite3.connect(data / "node.db")
    with conn:
        conn.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    conn.close()
    before = dump(data / "node.db")
    expected = "this database was written by a newer release (schema 4); this release reads schema 3: upgrade the node"
    with pytest.raises(SchemaError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Database(data / "node.db")
    out = subprocess.run([*CLI, "serve", "-c", str(config)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and expected in out.stderr, out.stderr
    assert cli_main(["jobs", "-c", str(config), "list"]) == 2
    assert expected in capsys.readouterr().err
    assert dump(data / "node.db") == before


def test_the_refusal_names_the_backup_of_this_release(tmp_path):
    db_path = tmp_path / "node.db"
    Database(db_path).close()
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    conn.close()
    backup_path(db_path, 3).write_bytes(b"")  # what a newer release would leave before its migration
    with pytest.raises(SchemaError, match=r"restore the backup .*node\.db\.v3\.bak.*remove node\.db-wal"):
        Database(db_path)


def test_a_failed_migration_leaves_the_database_untouched(tmp_path, monkeypatch):
    v1 = make_v1(tmp_path / "data")
    before = dump(v1["db"])

    def broken(conn, data_dir):
        migrations.paths_relative_to_data_dir(conn, data_dir)  # changes rows, then fails
        conn.execute("UPDATE cases SET state = 'changed'")
        raise RuntimeError("simulated failure in the middle of the step")

    monkeypatch.setattr(migrations, "MIGRATIONS", [broken])
    with pytest.raises(SchemaError) as info:
        Database(v1["db"])
    message = str(info.value)
    assert "migrating the database from schema 1 to 3 failed at the step 1 -> 2" in message
    assert "simulated failure" in message and "unchanged (rolled back)" in message
    assert dump(v1["db"]) == before  # rolled back: schema 1, absolute paths
    assert dump(backup_path(v1["db"], 1)) == before
    monkeypatch.undo()
    assert Database(v1["db"]).migration is not None  # the real migration then succeeds


def test_a_cli_does_not_migrate_under_a_running_node(tmp_path, capsys):
    config = write_config(tmp_path / "node")
    v1 = make_v1(tmp_path / "node" / "data")
    lock = tmp_path / "node" / "data" / NODE_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a node of the previous release is running
        assert cli_main(["jobs", "-c", str(config), "list"]) == 2
        err = capsys.readouterr().err
        assert "is at schema 1 and this release needs schema 3, but a node" in err and "restart the service" in err
        assert version_of(v1["db"]) == "1" and not backup_path(v1["db"], 1).exists()
    finally:
        os.close(fd)
    assert cli_main(["jobs", "-c", str(config), "list", "--json"]) == 0  # no node: the CLI migrates
    assert json.loads(capsys.readouterr().out)[0]["state"] == "done"
    assert version_of(v1["db"]) == "3" and backup_path(v1["db"], 1).exists()


def test_a_data_dir_moved_after_the_migration_still_works(tmp_path):
    from apscheduler.schedulers.background import BackgroundScheduler

    from dicom_node.audit import AuditLog
    from dicom_node.config import config_from_data
    from dicom_node.jobs import job_detail
    from dicom_node.sender import Sender

    v1 = make_v1(tmp_path / "old")
    Database(v1["db"]).close()
    moved = tmp_path / "bigger-disk" / "stardust"
    shutil.copytree(tmp_path / "old", moved)
    shutil.rmtree(tmp_path / "old")  # nothing may still point there
    export = tmp_path / "export"
    cfg = config_from_data({"access": {"calling_aets": ["X"]}, "data_dir": str(moved)})
    db = Database(cfg.db_path)
    detail = job_detail(db, 1)
    assert detail.case.prompt_path == moved / "prompts" / "abc.dcm" and detail.case.prompt_path.read_text() == "prompt"
    assert detail.job.result_path == moved / "results" / "1" / "RS.1.2.3.dcm" and detail.job.result_path.exists()
    # the sender finds the result at its new place
    with db.tx() as c:
        c.execute(
            "INSERT INTO sends (job_id, destination, kind, state, next_attempt_at) VALUES (1, ?, ?, ?, 0)",
            (f"folder:{export}", DeliveryKind.FOLDER, DeliveryState.PENDING),
        )
    scheduler = BackgroundScheduler()
    scheduler.start()
    sender = Sender(cfg, db, AuditLog(moved / "audit.jsonl"), scheduler)
    try:
        sender.start()
        wait_for(lambda: db.one("SELECT state FROM sends")["state"] == DeliveryState.SENT, 30, what="the export")
    finally:
        sender.stop()
        scheduler.shutdown(wait=False)
    assert (export / "RS.1.2.3.dcm").read_text() == "result"


# ======================================================================================
# The upgrade from the previous release
# ======================================================================================
@pytest.fixture(scope="module")
def old_release(tmp_path_factory) -> Path:
    """The source tree of the release before schema 2, from git history."""
    git = shutil.which("git")
    if git is None:
        pytest.skip(f"git is not installed: the upgrade test takes the previous release ({OLD_RELEASE}) from history")
    found = subprocess.run(
        [git, "-C", str(REPO), "cat-file", "-e", f"{OLD_RELEASE}^{{commit}}"], capture_output=True, text=True
    )
    if found.returncode != 0:
        pytest.skip(
            f"commit {OLD_RELEASE} (the release before schema 2) is not in this clone (a shallow clone or an "
            f"unpacked archive?): fetch the history ('git fetch --unshallow') to run the upgrade test"
        )
    tree = tmp_path_factory.mktemp("old-release")
    archive = subprocess.run(
        [git, "-C", str(REPO), "archive", "--format=tar", OLD_RELEASE], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    probe = subprocess.run(
        [PY, "-c", "import dicom_node.db as d; print(d.__file__); print(d.SCHEMA_VERSION)"],
        capture_output=True,
        text=True,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
    )
    where, version = probe.stdout.split()
    assert Path(where).is_relative_to(tree) and version == "1", probe.stdout
    return tree


def _store_requests(scp: StoreSCP) -> int:
    return scp.log_path.read_text(errors="replace").count("Received Store Request")


def _sent(node: NodeProcess) -> list[dict]:
    return [s for s in node.sends() if s["state"] == DeliveryState.SENT]


@pytest.mark.network
@pytest.mark.slow
def test_upgrade_from_the_previous_release(tmp_path, old_release):
    t0 = time.monotonic()
    first, second, third = phantom(1), phantom(2), phantom(3)
    tps = StoreSCP(tmp_path / "tps", extra=["-v"])
    config = write_config(
        tmp_path / "node",
        destinations={"tps": tps.destination()},
        send={"max_attempts": 1000},  # the delivery must stay pending while the TPS is down
    )
    old = NodeProcess(config, tree=old_release)
    node = None
    try:
        # -- the previous release: case 1 delivered, case 2 done but its delivery pending,
        #    images of case 3 without their prompt
        tps.start()
        old.start()
        assert storescu([first["images"], first["prompt"]], old.port).returncode == 0
        wait_for(lambda: len(_sent(old)) == 1, 180, 0.1, "case 1 delivered by the old release")
        tps.stop()
        requests_before = _store_requests(tps)
        assert requests_before == 1 and len(tps.files()) == 1
        assert storescu([second["images"], second["prompt"]], old.port).returncode == 0
        wait_for(
            lambda: [s for s in old.sends() if s["job_id"] == 2 and s["attempts"] >= 1 and s["last_error"]],
            180,
            0.1,
            "a failed delivery of case 2 (the TPS is down)",
        )
        assert storescu(image_files(third), old.port).returncode == 0
        sent_before = {s["id"]: (s["attempts"], s["sent_at"]) for s in _sent(old)}
        old.kill9()
        t_old = time.monotonic() - t0

        db_path = old.data_dir / "node.db"
        assert version_of(db_path) == "1"
        assert [c["state"] for c in old.cases()] == ["done", "done"]  # case 3 has no prompt yet
        assert all(Path(c["prompt_path"]).is_absolute() for c in old.cases())
        assert all(Path(j["result_path"]).is_absolute() for j in old.jobs())
        n_third = len(image_files(third))
        n_instances = len(image_files(first)) + len(image_files(second)) + 2 + n_third
        assert old.query("SELECT count(*) AS n FROM instances")[0]["n"] == n_instances
        v1_dump = dump(db_path)

        # -- today's node on the same data, the TPS up again
        tps = StoreSCP(tmp_path / "tps", port=tps.port, extra=["-v"]).start()
        t1 = time.monotonic()
        node = NodeProcess(config).start()
        assert version_of(db_path) == str(SCHEMA_VERSION)
        backup = backup_path(db_path, 1)
        assert backup.exists() and version_of(backup) == "1"
        assert dump(backup) == v1_dump  # the database as the old release left it
        fresh = tmp_path / "fresh.db"
        Database(fresh).close()
        assert schema_of(db_path) == schema_of(fresh)  # migrated = created new
        cases, jobs = node.cases(), node.jobs()
        assert [c["prompt_path"] for c in cases] == [f"prompts/{c['rtstruct_sha256']}.dcm" for c in cases]
        assert all(j["result_path"] == f"results/{j['id']}/RS.{j['result_sop_uid']}.dcm" for j in jobs)
        assert [e for e in node.audit() if e["event"] == "schema_migrated"][0]["paths_made_relative"] == 4

        wait_for(lambda: len(_sent(node)) == 2, 120, 0.1, "the pending delivery of case 2")
        t_pending = time.monotonic() - t1
        assert storescu([third["prompt"]], node.port).returncode == 0
        wait_for(lambda: len(_sent(node)) == 3, 180, 0.1, "case 3 delivered")
        t_third = time.monotonic() - t1

        # -- every result delivered exactly once
        jobs, sends = node.jobs(), node.sends()
        assert [j["state"] for j in jobs] == [JobState.DONE] * 3 and [j["attempts"] for j in jobs] == [1, 1, 1]
        assert [c["state"] for c in node.cases()] == [CaseState.DONE] * 3
        assert sorted(s["job_id"] for s in sends) == [1, 2, 3]  # one delivery row per job
        assert all(s["state"] == DeliveryState.SENT for s in sends)  # none left that could be sent again
        for send_id, before in sent_before.items():  # case 1's delivery was not touched
            assert next((s["attempts"], s["sent_at"]) for s in sends if s["id"] == send_id) == before
        at_tps = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in tps.files())
        assert at_tps == sorted(j["result_sop_uid"] for j in jobs)
        assert requests_before + _store_requests(tps) == 3
        sent_events = [e["job"] for e in node.audit() if e["event"] == "sent"]
        assert sorted(sent_events) == [1, 2, 3]  # both releases together: one each
        node.stop()
        node = None

        # -- the migrated data directory can move
        moved = tmp_path / "moved" / "data"
        shutil.copytree(old.data_dir, moved)
        db = Database(moved / "node.db")
        for job in jobs:
            row = get_job(db, job["id"])
            assert row.result_path.is_relative_to(moved) and row.result_path.exists()
            case = get_case(db, row.case_id)
            assert case.prompt_path.is_relative_to(moved) and case.prompt_path.exists()
        db.close()
        print(
            f"\nupgrade: old release {t_old:.1f} s (2 cases, 1 delivered, {n_third} images without prompt); "
            f"today's node: pending delivery after {t_pending:.1f} s, case 3 delivered after {t_third:.1f} s; "
            f"{len(at_tps)} results at the TPS, {requests_before + _store_requests(tps)} C-STOREs"
        )
    finally:
        old.stop()
        if node is not None:
            node.stop()
        tps.stop()
