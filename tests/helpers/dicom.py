"""dciodvfy (dicom3tools): the IOD checker every written DICOM file must pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .env import require_tool


def dciodvfy_report(path: Path) -> tuple[list[str], list[str]]:
    """(``Error`` lines, ``Warning`` lines) that dciodvfy prints for one file."""
    exe = require_tool("dciodvfy")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, errors="replace", timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for a file (warnings are not errors)."""
    return dciodvfy_report(path)[0]
