"""The node's SQLite database (WAL): instance index, cases, jobs and deliveries.

One file, ``<data_dir>/node.db``, shared by the receiving process, the worker processes
and the CLI. Each thread gets its own connection; write transactions are short and use
``BEGIN IMMEDIATE`` so that writers queue on the lock instead of failing.

Durability: ``synchronous=NORMAL`` in WAL mode keeps every committed transaction across
a process crash (``kill -9``); after a power loss the last transactions may be missing,
which :meth:`dicom_node.store.Store.reconcile` repairs for the instance index from the
fsync'ed files.

The schema is versioned (``meta.schema_version``): opening a database of an older release
migrates it, a newer one is refused (:mod:`dicom_node.migrations`). File paths in the index
are relative to the folder of the database file, which is ``data_dir``
(:attr:`Database.data_dir`, :mod:`dicom_node.rows`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import migrations
from dicom_node.migrations import NODE_LOCK, SCHEMA_VERSION, MigrationReport, SchemaError

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

__all__ = ["Database", "open_database", "DatabaseUnavailable", "SCHEMA_VERSION", "SchemaError", "NODE_LOCK"]

# The current schema (new databases); an older one is migrated (dicom_node.migrations).

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);

-- every stored instance (one row per SOP Instance UID; a re-sent instance replaces it)
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    modality TEXT,
    frame_of_reference_uid TEXT,
    patient_ref TEXT,
    path TEXT NOT NULL,              -- relative to the store directory
    size INTEGER NOT NULL,
    sha256 TEXT,                     -- content hash (non-image instances only)
    received_at REAL NOT NULL,
    assoc_id TEXT,                   -- NULL: imported from the watch folder or reconciled
    source TEXT NOT NULL,            -- dicom | watch | reconcile
    calling_aet TEXT,
    called_aet TEXT,
    peer TEXT
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_for ON instances(frame_of_reference_uid);
CREATE INDEX IF NOT EXISTS instances_received ON instances(received_at);

-- arrival log: the case assembler processes arrivals in order (cursor in meta)
CREATE TABLE IF NOT EXISTS arrivals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    modality TEXT,
    received_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,             -- waiting | queued | done | failed
    reason TEXT,
    rtstruct_uid TEXT NOT NULL,
    rtstruct_sha256 TEXT NOT NULL,
    prompt_path TEXT NOT NULL,       -- frozen copy (hard link) of the prompt RTSTRUCT, relative to data_dir
    study_uid TEXT,
    patient_ref TEXT,
    ref_series_uids TEXT,            -- JSON list
    frame_of_reference_uid TEXT,
    n_refs INTEGER NOT NULL DEFAULT 0,
    image_series_uid TEXT,
    n_images INTEGER,
    mode TEXT,                       -- references | series-fallback | frame-of-reference-fallback
    source TEXT,
    calling_aet TEXT,
    called_aet TEXT,
    created_at REAL NOT NULL,
    last_progress_at REAL NOT NULL,
    ready_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS cases_state ON cases(state);
CREATE INDEX IF NOT EXISTS cases_rtstruct ON cases(rtstruct_uid);

CREATE TABLE IF NOT EXISTS case_refs (
    case_id INTEGER NOT NULL REFERENCES cases(id),
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (case_id, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS case_refs_uid ON case_refs(sop_instance_uid);

-- the images a ready case is processed with (frozen when the case becomes ready)
CREATE TABLE IF NOT EXISTS case_images (
    case_id INTEGER NOT NULL REFERENCES cases(id),
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (case_id, sop_instance_uid)
);

CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id INTEGER NOT NULL UNIQUE REFERENCES cases(id),
    state TEXT NOT NULL,             -- pending | running | done | failed
    rule TEXT,
    action TEXT NOT NULL,            -- JSON of the rule's action
    explanation TEXT,                -- JSON list of lines
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    result_path TEXT,                -- relative to data_dir
    result_sop_uid TEXT,
    result_series_uid TEXT,
    engine TEXT,
    inference_seconds REAL,
    detail TEXT                      -- JSON: warnings, per-target info
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);

-- deliveries of a job's result: one row per destination (DICOM node or export folder) and output
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,       -- destination name, or folder:<path>
    kind TEXT NOT NULL,              -- dicom | folder
    state TEXT NOT NULL,             -- pending | sending | sent | dead
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    output TEXT NOT NULL DEFAULT 'rtstruct',  -- rtstruct | seg | overlay
    UNIQUE (job_id, destination, output)
);
CREATE INDEX IF NOT EXISTS sends_due ON sends(state, next_attempt_at);

-- failures to report (case failed, job failed, delivery dead-lettered): the failure
-- webhook's outbox, and the health page's "last errors"
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,              -- case_failed | job_failed | delivery_dead
    case_id INTEGER,
    job_id INTEGER,
    rule TEXT,
    destination TEXT,
    output TEXT,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,             -- pending | sending | sent | dead | unsent
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications(state, next_attempt_at);
"""


class Database:
    """Thread-local SQLite connections to one database file.

    Opening it creates the schema in an empty file, migrates an older schema in place or
    refuses a newer one (:class:`SchemaError`; :func:`dicom_node.migrations.upgrade`).
    ``holds_node_lock``: the caller holds ``data_dir/node.lock`` (``dicom-node serve``);
    anyone else migrates only when no node is running there. :attr:`migration` tells what
    was migrated (None: nothing).
    """

    is_postgresql = False
    #: appended to a claim's SELECT on PostgreSQL (``FOR UPDATE SKIP LOCKED``); SQLite's
    #: transactions are serialised already
    lock_rows = ""

    def __init__(
        self, path: Path, timeout: float = 30.0, *, holds_node_lock: bool = False, files_dir: Path | None = None
    ) -> None:
        self.path = Path(path)
        self.files_dir = Path(files_dir) if files_dir is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._local = threading.local()
        self.migration: MigrationReport | None = None
        try:
            if migrations.read_version(self.conn) is None:
                self._create()
            else:
                self.migration = migrations.upgrade(self, holds_node_lock=holds_node_lock)
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        """The current schema in an empty file, with its version, in one transaction."""
        self.conn.executescript(
            "BEGIN IMMEDIATE;\n"
            + _SCHEMA
            + f"INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;"
        )

    @property
    def data_dir(self) -> Path:
        """The folder paths in the index are relative to: ``shared_dir`` where one is set,
        else the folder of the database file, ``data_dir``."""
        return self.files_dir or self.path.parent

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self, serial: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on success, rolled back on error.

        ``serial`` matters on PostgreSQL only (:meth:`dicom_node.pg.PostgresDatabase.tx`):
        SQLite's write transactions are always one at a time.
        """
        conn = self.conn
        for attempt in range(50):
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:  # busy beyond busy_timeout: retry a little
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.05)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, params).fetchone()

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        return row["value"] if row else default

    def set_meta(self, key: str, value: Any, conn: sqlite3.Connection | None = None) -> None:
        (conn or self.conn).execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    def notify(self, channel: str) -> None:
        """Wake-ups between processes are PostgreSQL's (``NOTIFY``); on SQLite, waiters poll."""

    def wait(self, channels, timeout: float) -> set[str]:
        """On SQLite: sleep ``timeout`` seconds (the caller polls the database afterwards);
        returns no channel. On PostgreSQL it returns early on a :meth:`notify`."""
        if timeout > 0:
            time.sleep(timeout)
        return set()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def open_database(cfg: NodeConfig, *, holds_node_lock: bool = False) -> Database:
    """The node's database as ``cfg.database`` says: the SQLite file in ``data_dir``
    (default) or the PostgreSQL server of a multi-host deployment
    (:class:`dicom_node.pg.PostgresDatabase`, same interface). Index paths are relative to
    ``cfg.files_dir`` (``shared_dir``, default ``data_dir``).

    Raises :class:`SchemaError` (schema refused), :class:`dicom_node.config.ConfigError`
    (password not readable) or :class:`DatabaseUnavailable` (PostgreSQL cannot be reached).
    """
    settings = cfg.database
    if not settings.is_postgresql:
        files_dir = cfg.shared_dir if cfg.shared_dir is not None and cfg.shared_dir != cfg.data_dir else None
        return Database(cfg.db_path, holds_node_lock=holds_node_lock, files_dir=files_dir)
    import psycopg

    from dicom_node import jobs
    from dicom_node.pg import PostgresDatabase

    kwargs: dict[str, Any] = {"connect_timeout": max(1, int(settings.connect_timeout_seconds))}
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
        value = getattr(settings, key)
        if value is not None:
            kwargs[key] = str(value)
    jobs.set_node_identity(cfg.data_dir)
    try:
        return PostgresDatabase(  # type: ignore[return-value]
            settings.url,
            cfg.files_dir,
            password=settings.password(),
            connect_kwargs=kwargs,
            holds_node_lock=holds_node_lock,
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(f"database: cannot connect to {_safe_url(settings.url)} ({first})") from None


class DatabaseUnavailable(RuntimeError):
    """The configured PostgreSQL server cannot be reached or refused the login."""


def _safe_url(url: str) -> str:
    from dicom_node.pg import _describe

    return _describe(url)
