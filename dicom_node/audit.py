"""The audit trail: an append-only JSON-lines file, one event per line.

Each line has ``ts`` (Unix time, seconds), ``iso`` (local time), ``event`` and fields. Per
case the events are ``case_created``, ``case_ready`` (or ``case_failed``), ``job_queued``,
``inference_start``, ``inference_end`` (or ``job_failed``), ``sent`` (one per destination)
and ``delivery_failed``. Several processes (receiver, workers, CLI) append to the same
file: each event is a single ``write`` on a descriptor opened with ``O_APPEND``, which the
kernel keeps whole. No patient names or IDs are written (UIDs and hashed references only).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "read_audit"]


class AuditLog:
    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, event: str, **fields: Any) -> None:
        now = time.time()
        record = {"ts": round(now, 4), "iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)), "event": event}
        record.update(fields)
        line = (json.dumps(record, default=str, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            os.write(self._fd, line)
            if self.fsync:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_audit(path: Path) -> Iterator[dict[str, Any]]:
    """The events of an audit file, oldest first (a torn last line is skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        return
