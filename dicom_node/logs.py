"""Structured logs: one event name plus key=value fields, as text or JSON lines.

No patient name or patient ID is ever logged at INFO: identify things by UIDs, case and
job numbers, or :func:`patient_ref` (a keyed hash of the patient ID that is stable on
this installation and cannot be reversed without the node's secret).

Usage::

    log = get_logger(__name__)
    event(log, "stored", sop=uid, bytes=n)              # INFO
    event(log, "refused", level=logging.WARNING, why=...)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "event",
    "get_logger",
    "setup_logging",
    "patient_ref",
    "load_secret",
    "JsonFormatter",
    "TextFormatter",
    "route_pynetdicom_records",
    "stop_on_signals",
]

_secret: bytes | None = None
_secret_lock = threading.Lock()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def stop_on_signals(logger: logging.Logger) -> threading.Event:
    """An event set by SIGTERM or SIGINT, each logged as a ``signal`` event (call it from the
    main thread of a long-running command: ``serve``, ``worker``)."""
    stop = threading.Event()

    def _signal(signum, _frame) -> None:
        event(logger, "signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    return stop


def event(logger: logging.Logger, name: str, level: int = logging.INFO, exc_info: Any = None, **fields: Any) -> None:
    """Log event ``name`` with structured ``fields`` (rendered by the configured formatter)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)


def _render(value: Any) -> str:
    text = str(value)
    if text == "" or any(c.isspace() for c in text) or '"' in text or "=" in text:
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2024-05-01T10:00:00.123 INFO dicom_node.scp: stored sop=1.2.3 bytes=525312``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        line = f"{ts} {record.levelname} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_render(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for k, v in (getattr(record, "fields", None) or {}).items():
            obj[k] = v if isinstance(v, (int, float, bool, type(None))) else str(v)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text", file: Path | None = None) -> None:
    """Configure the root logger (replaces earlier handlers) and quieten pynetdicom.

    pynetdicom's own standard event logging is switched off (it is chatty and costs time
    per PDU); the node logs associations and stores itself.
    """
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if file is not None:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)


def _pynetdicom_loggers() -> list[logging.Logger]:
    """pynetdicom's loggers: one per module (``pynetdicom.dul``, ``pynetdicom.fsm`` ...) and their parent.

    A filter on a logger sees only the records logged to that logger itself, not those
    its children propagate, so every module's logger gets the filter.
    """
    import pynetdicom  # noqa: F401  (imports its modules, which create their loggers)

    names = [n for n in logging.root.manager.loggerDict if n == "pynetdicom" or n.startswith("pynetdicom.")]
    return [logging.getLogger(n) for n in sorted(names)]


class _RouteFilter(logging.Filter):
    """Offers each WARNING-or-worse record to ``sink``; a record it takes is logged at DEBUG or not at all."""

    def __init__(self, sink: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__("stardust-pynetdicom-route")
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            taken = self.sink(record)
        except Exception:  # a broken sink must not lose the record
            return True
        if not taken:
            return True
        # demoted: the traceback stays available to whoever runs the node at DEBUG
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("dicom_node").isEnabledFor(logging.DEBUG)


def route_pynetdicom_records(sink: Callable[[logging.LogRecord], bool]) -> Callable[[], None]:
    """Hand pynetdicom's WARNING and ERROR records to ``sink`` before they are logged.

    pynetdicom logs a malformed PDU, a peer that closes mid-PDU or a timeout as ERROR,
    often with a traceback, from the threads of the association. ``sink(record)`` returns
    True when the record is about a connection it accounts for (the SCP then writes one
    WARNING for the whole connection); such records are logged at DEBUG only (with their
    traceback), others pass unchanged. Returns the function that removes the routing.
    """
    route = _RouteFilter(sink)
    loggers = _pynetdicom_loggers()
    for logger in loggers:
        logger.addFilter(route)

    def remove() -> None:
        for logger in loggers:
            logger.removeFilter(route)

    return remove


def load_secret(data_dir: Path) -> bytes:
    """The installation's secret for :func:`patient_ref` (created 0600 on first use)."""
    global _secret
    with _secret_lock:
        if _secret is not None:
            return _secret
        path = Path(data_dir) / "secret.key"
        try:
            _secret = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError):
            path.parent.mkdir(parents=True, exist_ok=True)
            value = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) if not path.exists() else None
            if fd is None:  # unreadable or corrupt existing file: keep a per-process secret
                _secret = value
                return value
            with os.fdopen(fd, "w") as f:
                f.write(value.hex())
            _secret = value
        return _secret


def patient_ref(patient_id: str | None, secret: bytes | None = None) -> str:
    """A short keyed hash of a patient ID for logs and the index (``p:1a2b3c4d5e6f``)."""
    if not patient_id:
        return "p:none"
    key = secret if secret is not None else (_secret or b"stardust-unkeyed")
    return "p:" + hmac.new(key, str(patient_id).encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:12]
