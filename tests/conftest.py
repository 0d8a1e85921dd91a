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
