"""Shared test fixtures. The helpers themselves (peers, the node, phantoms, dciodvfy, waits)
are the package ``tests/helpers``; see its docstring for how tests import it."""

from __future__ import annotations

from pathlib import Path

import pytest

# re-exported: older test modules import these from conftest
from helpers import REPO, SHARED_DATA, free_port, require_tool, shared_path  # noqa: F401


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL cluster of the test session's own (skips where PostgreSQL is absent)."""
    from helpers.postgres import server, stop_server

    yield server()
    stop_server()


@pytest.fixture(params=["sqlite", "postgresql"])
def databases(request):
    """The node's database on SQLite and on PostgreSQL: the same test runs on both."""
    from helpers.postgres import Databases

    pg = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    dbs = Databases(request.param, pg)
    yield dbs
    dbs.close_all()
