"""Listing the files below a folder the way a user expects: symlinked folders included.

Archives are often assembled from links (``study/lung -> /mnt/pacs-export/lung``);
``Path.rglob`` does not descend into linked folders, so such a dataset looked empty.
:func:`files_under` follows links to folders and visits each real folder once, so a
link back to a parent (a cycle) or two links to one folder neither loop nor count files
twice.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["files_under"]


def files_under(root: str | os.PathLike, skip_hidden: bool = False) -> list[Path]:
    """Every regular file below ``root`` (recursively, following symlinks), sorted.

    Paths are given as reached from ``root`` (through the links), not resolved. With
    ``skip_hidden``, files and folders whose name starts with ``.`` are left out.
    Unreadable folders and dangling links are passed over.
    """
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if skip_hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            filenames = [f for f in filenames if not f.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file():
                out.append(path)
    return sorted(out)
