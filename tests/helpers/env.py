"""The test environment: the repository, the real data in ../shared/data, external programs, free ports."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

#: the checkout under test (a worktree tests its own tree)
REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("STARDUST_SHARED_DATA", REPO.parent / "shared" / "data"))

APT_HINT = {
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "dcmdump": "dcmtk",
    "dciodvfy": "dicom3tools",
    "Orthanc": "orthanc",
}


def require_tool(name: str) -> str:
    """Path of an external program, or skip the test saying how to install it."""
    path = shutil.which(name)
    if path is None:
        pkg = APT_HINT.get(name, name)
        pytest.skip(f"{name} not found: install it with 'sudo apt-get install {pkg}' (or run 'make test' as root)")
    return path


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when it is absent (a user's fresh checkout)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not available: {path} (see ../shared/data/README.md)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
