"""Durable file operations: what has been acknowledged must survive a crash or power loss.

A file is durable once its bytes are fsync'ed *and* the directory entry that names it is
fsync'ed; writing to a temporary name first and renaming makes the switch atomic.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | Path, final: str | Path) -> None:
    """fsync ``tmp``, rename it to ``final`` (same directory) and fsync that directory."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)
