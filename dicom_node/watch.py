"""The watch folder: DICOM files dropped into ``watch.import_dir`` enter the store.

A watchdog observer reports new and changed files (recursively); a scanner thread imports
each file once its size and modification time have not changed for
``watch.stable_seconds`` (a copy in progress is never read half-way). Import goes through
:meth:`dicom_node.store.Store.import_file`, the same checks and durable write as a
C-STORE, with ``source='watch'`` and the calling AE title ``watch.calling_aet`` for the
rules. Imported files are removed (``delete_after_import``). Files that are not DICOM (or
are broken) are left in place with one log line each and not retried until they change
(a rescan that finds such a file unchanged says so at DEBUG: ``watch_unchanged``).
Hidden files (names starting with ``.``) are ignored: copy tools use them for partial
files. A full rescan runs at start and every minute, in case the OS dropped events.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from dicom_node.config import NodeConfig
from dicom_node.logs import event, get_logger
from dicom_node.states import InstanceSource
from dicom_node.store import Origin, OutOfSpace, Store, StoreError

__all__ = ["WatchFolder"]

log = get_logger(__name__)


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: WatchFolder) -> None:
        self.owner = owner

    def on_created(self, ev: FileSystemEvent) -> None:
        if not ev.is_directory:
            self.owner.candidate(Path(ev.src_path))
        else:
            self.owner.request_rescan()

    def on_modified(self, ev: FileSystemEvent) -> None:
        if not ev.is_directory:
            self.owner.candidate(Path(ev.src_path))

    def on_moved(self, ev: FileSystemEvent) -> None:
        if not ev.is_directory:
            self.owner.candidate(Path(ev.dest_path))
        else:
            self.owner.request_rescan()

    def on_closed(self, ev: FileSystemEvent) -> None:
        if not ev.is_directory:
            self.owner.candidate(Path(ev.src_path))


class WatchFolder:
    def __init__(self, cfg: NodeConfig, store: Store, on_import: Callable[[], None] | None = None) -> None:
        assert cfg.watch.import_dir is not None
        self.cfg = cfg
        self.root = Path(cfg.watch.import_dir)
        self.store = store
        self.on_import = on_import
        self.stable = cfg.watch.stable_seconds
        self._candidates: dict[Path, tuple[int, float, float]] = {}  # path -> (size, mtime, since)
        self._ignored: dict[Path, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rescan = threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None
        self.imported = 0

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(self), str(self.root), recursive=True)
        observer.start()
        self._observer = observer
        self._rescan.set()
        self._thread = threading.Thread(target=self._run, name="watch-folder", daemon=True)
        self._thread.start()
        event(log, "watching", folder=str(self.root), stable_seconds=self.stable)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def request_rescan(self) -> None:
        self._rescan.set()

    def candidate(self, path: Path) -> None:
        if path.name.startswith("."):
            return
        with self._lock:
            if path not in self._candidates:
                self._candidates[path] = (-1, -1.0, time.monotonic())

    def _scan_all(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                self.candidate(Path(dirpath) / name)

    def _run(self) -> None:
        last_full = 0.0
        while not self._stop.wait(0.2):
            if self._rescan.is_set() or time.monotonic() - last_full > 60:
                self._rescan.clear()
                last_full = time.monotonic()
                try:
                    self._scan_all()
                except OSError as exc:
                    event(log, "watch_scan_failed", level=logging.WARNING, why=str(exc))
            try:
                self._check()
            except Exception:
                log.exception("watch folder check failed")

    def _check(self) -> None:
        now = time.monotonic()
        with self._lock:
            items = list(self._candidates.items())
        imported = 0
        for path, (size, mtime, since) in items:
            if self._stop.is_set():
                break
            try:
                st = path.stat()
            except FileNotFoundError:
                with self._lock:
                    self._candidates.pop(path, None)
                continue
            if (st.st_size, st.st_mtime) != (size, mtime):
                with self._lock:
                    self._candidates[path] = (st.st_size, st.st_mtime, now)
                continue
            if now - since < self.stable:
                continue
            if self._ignored.get(path) == (st.st_size, st.st_mtime):
                with self._lock:
                    self._candidates.pop(path, None)
                event(
                    log,
                    "watch_unchanged",
                    level=logging.DEBUG,
                    file=str(self._rel(path)),
                    note="not read again until it changes",
                )
                continue
            if self._import(path, st):
                imported += 1
        if imported and self.on_import is not None:
            self.on_import()

    def _rel(self, path: Path) -> Path:
        return path.relative_to(self.root) if path.is_relative_to(self.root) else path

    def _import(self, path: Path, st: os.stat_result) -> bool:
        rel = self._rel(path)
        try:
            stored = self.store.import_file(
                path, Origin(source=InstanceSource.WATCH, calling_aet=self.cfg.watch.calling_aet)
            )
        except OutOfSpace as exc:
            event(log, "watch_deferred", level=logging.WARNING, file=str(rel), why=str(exc))
            with self._lock:  # try again later
                self._candidates[path] = (st.st_size, st.st_mtime, time.monotonic() + 30)
            return False
        except (StoreError, OSError) as exc:
            event(log, "watch_ignored", level=logging.WARNING, file=str(rel), why=str(exc))
            self._ignored[path] = (st.st_size, st.st_mtime)
            with self._lock:
                self._candidates.pop(path, None)
            return False
        with self._lock:
            self._candidates.pop(path, None)
        self.imported += 1
        if self.cfg.watch.delete_after_import:
            try:
                path.unlink()
                self._prune(path.parent)
            except OSError as exc:
                event(log, "watch_cannot_remove", level=logging.WARNING, file=str(rel), why=str(exc))
        else:
            self._ignored[path] = (st.st_size, st.st_mtime)  # imported: not again unless it changes
        event(log, "watch_imported", level=logging.DEBUG, file=str(rel), sop=stored.header.sop_instance_uid)
        return True

    def _prune(self, folder: Path) -> None:
        """Remove emptied sub-folders (never the import folder itself)."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent
