"""Schema versions of the node's database, and the migrations from one to the next.

The version is ``meta.schema_version``. Every process that opens the database
(:class:`dicom_node.db.Database`: the node, its workers, ``dicom-node jobs`` and
``resend``) checks it first:

* an empty file gets the current schema;
* the current version is used as it is;
* a **newer** version is refused (:class:`SchemaError`): an older release must not
  guess at data written by a newer one;
* an **older** version is migrated in place: with the write lock held (``BEGIN
  IMMEDIATE``), the database is first copied with SQLite's online backup API to
  ``node.db.v<old>.bak`` beside it (fsync'ed), then every step from the old version to the
  current one runs in that same transaction, and the new version is committed with them.
  A step that fails rolls everything back: the database is as it was and the copy stays.

A process that does not hold the node's lock (``node.lock`` in ``data_dir``; the CLI, a
worker) migrates only when no node is running there: a node of the previous release that
is still running would not understand the migrated data.

**Adding a migration.** Change the schema in :mod:`dicom_node.db` (``_SCHEMA`` is always
the current schema, used for new databases) and append one function to
:data:`MIGRATIONS` that turns a database of the previous version into one of the new
version: docstring first (what changes, why, what happens to existing rows), plain
``conn.execute`` statements only (``executescript`` would commit the transaction), no
reading of files or configuration, no imports from the rest of the node (a migration must
do tomorrow what it does today). The upgrade test (``tests/test_upgrade.py``) checks that
a migrated database has the same schema as a new one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.durable import publish
from dicom_node.logs import event, get_logger

if TYPE_CHECKING:
    from dicom_node.db import Database

__all__ = [
    "upgrade_postgresql",
    "SchemaError",
    "MigrationReport",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "read_version",
    "upgrade",
    "backup_path",
]

log = get_logger(__name__)

#: the node's lock file in data_dir (held by ``dicom-node serve`` while it runs)
NODE_LOCK = "node.lock"


class SchemaError(RuntimeError):
    """This release cannot use the database as it is; the message says why and what to do."""


# ======================================================================================
# The migrations: MIGRATIONS[k] turns schema k+1 into schema k+2
# ======================================================================================
def _relative_to(path: str, data_dir: Path) -> str | None:
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    for base, candidate in ((data_dir, p), (Path(os.path.realpath(data_dir)), Path(os.path.realpath(p)))):
        if candidate.is_relative_to(base):
            return candidate.relative_to(base).as_posix()
    return None


def paths_relative_to_data_dir(conn: sqlite3.Connection, data_dir: Path) -> dict[str, int]:
    """Schema 1 -> 2: file paths in the index become relative to ``data_dir``.

    Schema 1 stored absolute paths in ``cases.prompt_path``
    (``/var/lib/stardust/prompts/<sha256>.dcm``) and ``jobs.result_path``
    (``/var/lib/stardust/results/<job>/RS.<uid>.dcm``), so ``data_dir`` could not be moved
    to a bigger disk. Schema 2 stores ``prompts/<sha256>.dcm`` and
    ``results/<job>/RS.<uid>.dcm``; readers resolve them against the configured
    ``data_dir`` (:func:`dicom_node.rows.resolve_path`). ``data_dir`` is the folder of the
    database file. A path that is not under it (it should not exist) is kept absolute
    and logged at WARNING. ``instances.path`` is already relative to ``<data_dir>/store``
    and stays as it is. No table or column changes.
    """
    counts = {"paths_made_relative": 0, "paths_kept_absolute": 0}
    for table, column in (("cases", "prompt_path"), ("jobs", "result_path")):
        rows = conn.execute(f"SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL").fetchall()
        for row_id, path in rows:
            relative = _relative_to(path, data_dir)
            if relative is None:
                counts["paths_kept_absolute"] += 1
                event(
                    log,
                    "migration_path_outside_data_dir",
                    level=logging.WARNING,
                    table=table,
                    id=row_id,
                    path=path,
                    data_dir=str(data_dir),
                    note="kept absolute; this file will not follow a move of data_dir",
                )
            elif relative != path:
                conn.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", (relative, row_id))
                counts["paths_made_relative"] += 1
    return counts


def deliveries_per_output_and_notifications(conn: sqlite3.Connection, data_dir: Path) -> dict[str, int]:
    """Schema 2 -> 3: a delivery row per destination *and output*; the failure outbox.

    A rule may now send more than the RTSTRUCT (``outputs: [rtstruct, seg, overlay]``), and
    each output is delivered, retried and dead-lettered on its own (a TPS that refuses
    DICOM SEG must not hold back the RTSTRUCT). ``sends`` gets the column ``output``
    (``rtstruct`` | ``seg`` | ``overlay``) and its uniqueness becomes
    ``UNIQUE(job_id, destination, output)``. SQLite cannot change a table's constraints, so
    the table is rebuilt: renamed aside, created anew, every row copied with its id, state,
    attempts and times unchanged and ``output = 'rtstruct'`` (the only output schema 2
    delivered), then the old table and its index dropped and the index created again.
    No other table references ``sends``.

    New table ``notifications``: one row per failure to report (a case failed, a job
    failed, a delivery was dead-lettered), the outbox of the failure webhook and the
    health page's list of last errors. It starts empty: failures before the upgrade
    are not reported.
    """
    conn.execute("ALTER TABLE sends RENAME TO sends_schema2")
    conn.execute(
        """CREATE TABLE sends (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            destination TEXT NOT NULL,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            sent_at REAL,
            output TEXT NOT NULL DEFAULT 'rtstruct',
            UNIQUE (job_id, destination, output)
        )"""
    )
    copied = conn.execute(
        """INSERT INTO sends (id, job_id, destination, kind, state, attempts, next_attempt_at, last_error,
                              sent_at, output)
           SELECT id, job_id, destination, kind, state, attempts, next_attempt_at, last_error, sent_at, 'rtstruct'
           FROM sends_schema2 ORDER BY id"""
    ).rowcount
    conn.execute("DROP TABLE sends_schema2")
    conn.execute("CREATE INDEX sends_due ON sends(state, next_attempt_at)")
    conn.execute(
        """CREATE TABLE notifications (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            case_id INTEGER,
            job_id INTEGER,
            rule TEXT,
            destination TEXT,
            output TEXT,
            reason TEXT NOT NULL,
            created_at REAL NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            sent_at REAL
        )"""
    )
    conn.execute("CREATE INDEX notifications_due ON notifications(state, next_attempt_at)")
    return {"deliveries_copied": copied}


#: one function per version step, in order
MIGRATIONS: list[Callable[[sqlite3.Connection, Path], dict[str, int] | None]] = [
    paths_relative_to_data_dir,  # 1 -> 2
    deliveries_per_output_and_notifications,  # 2 -> 3
]

#: the schema this release reads and writes
SCHEMA_VERSION = 1 + len(MIGRATIONS)

#: the first schema a PostgreSQL database can have (support began with it): a new one is
#: created at :data:`SCHEMA_VERSION`
FIRST_POSTGRESQL_VERSION = 3

#: PostgreSQL's steps, keyed by the version they start from (``{3: step_3_to_4, ...}``):
#: a migration added after schema 3 needs its PostgreSQL step here too (same docstring
#: rules; ``c.execute`` with the node's portable SQL, the translation of
#: :mod:`dicom_node.pg`)
POSTGRESQL_MIGRATIONS: dict[int, Callable] = {}


# ======================================================================================
# The machinery
# ======================================================================================
@dataclass(frozen=True)
class MigrationReport:
    """What :func:`upgrade` did (for the log and the audit trail)."""

    from_version: int
    to_version: int
    backup: Path
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)


def read_version(conn: sqlite3.Connection) -> int | None:
    """The database's schema version; None for an empty database (no tables)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if "meta" not in tables:
        raise SchemaError("the file has tables but no schema version: it is not a database of this node")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        # schema 1 created its tables before it recorded the version: a crash in between
        return 1
    try:
        return int(row[0])
    except ValueError:
        raise SchemaError(f"the schema version {row[0]!r} in the meta table is not a number") from None


def backup_path(db_path: Path, version: int) -> Path:
    """Where the copy of a schema ``version`` database is made before it is migrated."""
    return db_path.with_name(f"{db_path.name}.v{version}.bak")


def _newer(db_path: Path, version: int) -> SchemaError:
    ours = backup_path(db_path, SCHEMA_VERSION)
    restore = (
        f" or restore the backup {ours} that the newer release made before it migrated the database "
        f"(stop the node, remove {db_path.name}-wal and {db_path.name}-shm, copy the backup to {db_path.name}; "
        "what the newer release did since is lost)"
        if ours.exists()
        else ""
    )
    return SchemaError(
        f"{db_path}: this database was written by a newer release (schema {version}); this release reads "
        f"schema {SCHEMA_VERSION}: upgrade the node{restore}"
    )


@contextmanager
def _no_running_node(db_path: Path, holds_node_lock: bool, version: int) -> Iterator[None]:
    """Hold the node's lock while migrating; refuse when a node is running on this data_dir."""
    lock = db_path.parent / NODE_LOCK
    if holds_node_lock:
        yield
        return
    try:
        fd = os.open(lock, os.O_RDONLY)  # never created here: it must stay the service user's file
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SchemaError(
                f"{db_path} is at schema {version} and this release needs schema {SCHEMA_VERSION}, but a node "
                f"(of the previous release) is running with this data directory ({lock} is locked): restart the "
                "service with this release, which migrates the database, then run this command again"
            ) from None
        yield
    finally:
        os.close(fd)


def _backup(db: Database, version: int) -> Path:
    """Copy the database (its committed state) to ``node.db.v<version>.bak``, durably.

    The copy is made through a second connection: SQLite refuses to back up from a
    connection that holds the write transaction, and readers are not blocked by it (WAL).
    """
    final = backup_path(db.path, version)
    tmp = final.with_name(final.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(db.path, timeout=db.timeout)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            finally:
                dst.close()
        finally:
            src.close()
        publish(tmp, final)
    except (sqlite3.Error, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise SchemaError(
            f"{db.path}: cannot copy the database to {final} before migrating it from schema {version} to "
            f"{SCHEMA_VERSION} ({exc}); it is unchanged: make room in {db.path.parent} and start again"
        ) from None
    return final


def upgrade(db: Database, *, holds_node_lock: bool = False) -> MigrationReport | None:
    """Bring an existing database to :data:`SCHEMA_VERSION`; None when it already is.

    Raises :class:`SchemaError` for a newer schema, when another node is running on an
    old one, when the backup cannot be made, and when a step fails (rolled back).
    """
    conn = db.conn
    version = read_version(conn)
    if version is None or version == SCHEMA_VERSION:
        return None
    if version > SCHEMA_VERSION:
        raise _newer(db.path, version)
    with _no_running_node(db.path, holds_node_lock, version):
        t0 = time.monotonic()
        counts: dict[str, int] = {}
        with db.tx() as c:
            version = read_version(c)  # again, under the write lock: another process may have done it
            if version is None or version == SCHEMA_VERSION:
                return None
            if version > SCHEMA_VERSION:
                raise _newer(db.path, version)
            backup = _backup(db, version)
            step = version
            try:
                for step in range(version, SCHEMA_VERSION):
                    for key, n in (MIGRATIONS[step - 1](c, db.data_dir) or {}).items():
                        counts[key] = counts.get(key, 0) + n
                c.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )
            except Exception as exc:
                raise SchemaError(
                    f"{db.path}: migrating the database from schema {version} to {SCHEMA_VERSION} failed at the "
                    f"step {step} -> {step + 1} ({type(exc).__name__}: {exc}); it is unchanged (rolled back) and "
                    f"a copy is at {backup}: this release cannot run on it, report the problem with the log"
                ) from exc
    report = MigrationReport(version, SCHEMA_VERSION, backup, round(time.monotonic() - t0, 3), counts)
    event(
        log,
        "schema_migrated",
        database=str(db.path),
        from_version=version,
        to_version=SCHEMA_VERSION,
        backup=str(backup),
        seconds=f"{report.seconds:.3f}",
        **counts,
    )
    return report


def upgrade_postgresql(db, c, version: int) -> MigrationReport:
    """Bring a PostgreSQL database at ``version`` to :data:`SCHEMA_VERSION` inside the
    caller's (serialised) transaction ``c``: every step of :data:`POSTGRESQL_MIGRATIONS`
    in order, then the new version; a failing step rolls everything back. There is no file
    to copy: back the database up with ``pg_dump`` before upgrading the first host."""
    t0 = time.monotonic()
    counts: dict[str, int] = {}
    for step in range(version, SCHEMA_VERSION):
        fn = POSTGRESQL_MIGRATIONS.get(step)
        if fn is None:
            raise SchemaError(
                f"{db.path}: this release cannot migrate a PostgreSQL database from schema {step} to {step + 1}: "
                "no PostgreSQL step exists for it"
            )
        try:
            for key, n in (fn(c, db.data_dir) or {}).items():
                counts[key] = counts.get(key, 0) + n
        except Exception as exc:
            raise SchemaError(
                f"{db.path}: migrating the database from schema {version} to {SCHEMA_VERSION} failed at the step "
                f"{step} -> {step + 1} ({type(exc).__name__}: {exc}); it is unchanged (rolled back)"
            ) from exc
    c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    report = MigrationReport(version, SCHEMA_VERSION, Path("-"), round(time.monotonic() - t0, 3), counts)
    event(log, "schema_migrated", database=str(db.path), from_version=version, to_version=SCHEMA_VERSION, **counts)
    return report
