"""A real PostgreSQL server for the tests: its own cluster in a temporary folder.

``initdb`` in a fresh folder, ``pg_ctl start`` on a free TCP port on 127.0.0.1 (and a
unix socket in the same folder), trust authentication for the local test user, stopped
and removed at the end. PostgreSQL refuses to run as root (CI runs as root): then the
cluster runs as the Debian user ``postgres`` (``runuser``). Absent binaries: the test
skips with the apt-get line.

Each test gets its own empty database (``PostgresServer.new_database``), so that tests
never see each other's rows.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import free_port

INSTALL = "apt-get install postgresql"


def pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def require_postgres() -> Path:
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL is not installed: {INSTALL}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install 'psycopg[binary]'")
    return bindir


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="stardust-pg-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self.user = "stardust"
        self._counter = itertools.count(1)
        self._as: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")  # the Debian package's user
            shutil.chown(self.root, "postgres")
            os.chmod(self.root, 0o755)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self._as, *cmd], check=True, capture_output=True, cwd=self.root, timeout=120)

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-o",
            opts,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"node{next(self._counter)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


_server: PostgresServer | None = None


def server() -> PostgresServer:
    """The session's server (started on first use; stopped by :func:`stop_server`)."""
    global _server
    if _server is None:
        s = PostgresServer(require_postgres())
        s.start()
        _server = s
    return _server


def stop_server() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None


class Databases:
    """The node's database on one backend for one test: ``open(path)`` is ``Database(path)``
    on SQLite and, on PostgreSQL, a new database of the session's server per distinct
    ``path`` (the same path opens the same database again, like a second process would)."""

    def __init__(self, backend: str, pg: PostgresServer | None = None) -> None:
        self.backend = backend
        self.pg = pg
        self._urls: dict[str, str] = {}
        self.opened: list = []

    def url_for(self, path: Path) -> str:
        assert self.pg is not None
        key = str(path)
        if key not in self._urls:
            self._urls[key] = self.pg.new_database()
        return self._urls[key]

    def open(self, path: Path, files_dir: Path | None = None, **kwargs):
        from dicom_node.db import Database

        if self.backend == "sqlite":
            db = Database(path, files_dir=files_dir, **kwargs)
        else:
            from dicom_node.pg import PostgresDatabase

            db = PostgresDatabase(self.url_for(path), files_dir or Path(path).parent, **kwargs)
            self._urls.setdefault(str(db.path), self._urls[str(path)])  # reopen(db) by its path
        self.opened.append(db)
        return db

    def reopen(self, db):
        """Another set of connections to the same database (another process's view)."""
        return self.open(db.path, getattr(db, "files_dir", None))

    def close_all(self) -> None:
        for db in self.opened:
            db.close()
