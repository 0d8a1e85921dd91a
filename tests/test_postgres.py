"""The database on PostgreSQL (``database:``): configuration, schema, translation, claims
across processes and wake-ups, against a real PostgreSQL server the test starts itself."""

from __future__ import annotations

import threading
import time

import pytest

from dicom_node import jobs as q
from dicom_node.config import ConfigError, config_from_data
from dicom_node.db import Database, SchemaError, open_database
from dicom_node.migrations import SCHEMA_VERSION


def _cfg(tmp_path, **extra):
    return config_from_data({"access": {"calling_aets": ["X"]}, "data_dir": str(tmp_path / "data"), **extra})


def test_default_is_the_sqlite_file_in_data_dir(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.database.url == "sqlite" and cfg.files_dir == cfg.data_dir
    db = open_database(cfg)
    assert isinstance(db, Database) and db.path == cfg.data_dir / "node.db" and db.data_dir == cfg.data_dir
    assert cfg.store_dir == cfg.data_dir / "store" and cfg.prompts_dir == cfg.data_dir / "prompts"


def test_shared_dir_holds_the_files_and_index_paths(tmp_path):
    cfg = _cfg(tmp_path, shared_dir=str(tmp_path / "shared"))
    assert cfg.store_dir == tmp_path / "shared" / "store" and cfg.results_dir == tmp_path / "shared" / "results"
    db = open_database(cfg)
    assert db.path == cfg.data_dir / "node.db" and db.data_dir == tmp_path / "shared"


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgresql://node:secret@db.example/stardust", "no password in the URL"),
        ("mysql://node@db/stardust", "neither 'sqlite' nor"),
        ("postgresql://node@db.example", "names no database"),
    ],
)
def test_database_urls_refused(tmp_path, url, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, database={"url": url})


def test_password_from_environment_or_file(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, database={"url": "postgresql://node@db/stardust", "password_env": "STARDUST_DB_PW"})
    assert any("STARDUST_DB_PW is not set" in p for p in cfg.problems())
    monkeypatch.setenv("STARDUST_DB_PW", "pw1")
    assert cfg.database.password() == "pw1"
    (tmp_path / "pw").write_text("pw2\n")
    cfg = _cfg(tmp_path, database={"url": "postgresql://node@db/stardust", "password_file": str(tmp_path / "pw")})
    assert cfg.database.password() == "pw2"


def test_new_postgresql_database_gets_the_current_schema_and_a_newer_is_refused(postgres_server, tmp_path):
    url = postgres_server.new_database()
    cfg = _cfg(tmp_path, database={"url": url})
    db = open_database(cfg)
    assert db.is_postgresql and db.get_meta("schema_version") == str(SCHEMA_VERSION) and db.migration is None
    cols = {
        r["column_name"]: r["data_type"]
        for r in db.query("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'jobs'")
    }
    assert cols["lease_expires"] == "double precision" and cols["id"] == "bigint"
    db.close()
    assert open_database(cfg).get_meta("schema_version") == str(SCHEMA_VERSION)  # opened again as it is
    db = open_database(cfg)
    db.set_meta("schema_version", SCHEMA_VERSION + 1)
    db.close()
    with pytest.raises(SchemaError, match="newer release"):
        open_database(cfg)


def test_unreachable_server_is_one_sentence(tmp_path):
    from helpers import free_port

    from dicom_node.db import DatabaseUnavailable

    cfg = _cfg(tmp_path, database={"url": f"postgresql://node@127.0.0.1:{free_port()}/x", "connect_timeout_seconds": 2})
    with pytest.raises(DatabaseUnavailable, match="cannot connect to postgresql://127.0.0.1"):
        open_database(cfg)


def test_claims_race_across_connections_and_notify_wakes(databases, tmp_path):
    """Eight claimers on their own connections: every job exactly once (SKIP LOCKED)."""
    db = databases.open(tmp_path / "node.db")
    now = time.time()
    ids = []
    for _ in range(40):
        with db.tx() as c:
            cid = c.execute(
                """INSERT INTO cases (state, rtstruct_uid, rtstruct_sha256, prompt_path, n_refs, created_at,
                       last_progress_at) VALUES ('queued', '1.2', 'h', 'p', 1, ?, ?)""",
                (now, now),
            ).lastrowid
            ids.append(q.create_job(c, cid, "r", {}, [], now))
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(n):
        mine = databases.reopen(db)
        while (job := q.claim_job(mine, f"w{n}", 30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ids
    got: list[set[str]] = []
    waiter = threading.Thread(target=lambda: got.append(db.wait(["jobs"], 20.0 if db.is_postgresql else 0.1)))
    waiter.start()
    time.sleep(0.5)
    other = databases.reopen(db)
    with other.tx():
        other.notify("jobs")
    waiter.join()
    assert got == [{"jobs"}] if db.is_postgresql else got == [set()]


def test_translation_of_the_nodes_sqlite_dialect():
    from dicom_node.pg import translate

    assert translate("INSERT OR IGNORE INTO case_refs (case_id, sop_instance_uid) VALUES (?, ?)")[0] == (
        "INSERT INTO case_refs (case_id, sop_instance_uid) VALUES (%s, %s) ON CONFLICT DO NOTHING"
    )
    text, _plain, returning = translate("INSERT INTO jobs (case_id) VALUES (?)")
    assert text.endswith("RETURNING id") and returning == "id"
    assert translate("INSERT INTO arrivals (sop_instance_uid) VALUES (?)")[2] == "seq"
    assert translate("INSERT INTO meta(key, value) VALUES (?, ?)")[2] is None  # no generated id
    text = translate("SELECT x FROM t WHERE a LIKE ? AND b = '50%?' AND c < :cutoff AND instr(d, 'e') > 0")[0]
    assert text == "SELECT x FROM t WHERE a LIKE %s AND b = '50%%?' AND c < %(cutoff)s AND strpos(d, 'e') > 0"
    assert "string_agg(" in translate("SELECT group_concat(s.state, ', ') FROM sends s")[0]
    with pytest.raises(ValueError, match="INSERT OR REPLACE"):
        translate("INSERT OR REPLACE INTO meta VALUES (?, ?)")


def test_job_list_and_detail_with_deliveries(databases, tmp_path):
    """``dicom-node jobs`` and ``jobs show``: the deliveries column is an aggregate."""
    db = databases.open(tmp_path / "node.db")
    now = time.time()
    with db.tx() as c:
        cid = c.execute(
            """INSERT INTO cases (state, rtstruct_uid, rtstruct_sha256, prompt_path, n_refs, created_at,
                   last_progress_at) VALUES ('queued', '1.2', 'h', 'prompts/h.dcm', 1, ?, ?)""",
            (now, now),
        ).lastrowid
        jid = q.create_job(c, cid, "r", {}, [], now)
    job = q.claim_job(db, "w", 30)
    assert q.complete_job(
        db, jid, "w", result_path=tmp_path / "results" / "1" / "RS.1.dcm", result_sop_uid="1.9",
        result_series_uid="1.8", engine="classic", inference_seconds=1.5, detail={"files": {}},
        deliveries=[("tps", "dicom"), ("folder:/x", "folder")], outputs=("rtstruct", "seg"),
    )  # fmt: skip
    (summary,) = q.list_jobs(db)
    assert summary.id == job.id and summary.state == "done"
    assert sorted(summary.deliveries.split(", ")) == sorted(
        ["tps=pending", "tps/seg=pending", "folder:/x=pending", "folder:/x/seg=pending"]
    )
    detail = q.job_detail(db, jid)
    assert detail.case.prompt_path == tmp_path / "prompts" / "h.dcm"
    assert detail.job.result_path == tmp_path / "results" / "1" / "RS.1.dcm"
    assert len(detail.sends) == 4
    assert q.resend_job(db, jid, "tps") == 2


def test_connections_of_ended_threads_are_closed(postgres_server, tmp_path):
    """The sender and the assembler use short-lived threads: their connections must not
    pile up on the server (max_connections)."""
    from dicom_node.pg import PostgresDatabase

    url = postgres_server.new_database()
    db = PostgresDatabase(url, tmp_path)

    def count() -> int:
        return db.one("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()")["n"]

    before = count()
    for _ in range(60):
        t = threading.Thread(target=lambda: db.one("SELECT 1"))
        t.start()
        t.join()
    import gc

    gc.collect()
    assert count() <= before + 2
    db.close()
