"""``dicom-node serve``: the node process, wiring every part together.

Start order: lock the data directory (one node per data directory), empty the metrics
directory (:mod:`dicom_node.metrics`), open the database (migrating an older schema,
refusing a newer one: :mod:`dicom_node.migrations`), reconcile the store with the index
(after a crash or power loss), return interrupted jobs and deliveries to their queues,
start the case assembler, the inference workers, the sender, the failure webhook, the
retention schedule, the web page (``web.enabled``), the watch folder, and last the DICOM
listener. Stop order is the reverse; SIGTERM and SIGINT stop the node cleanly (a job
running in a worker is handed back and resumes at the next start).

With ``workers.devices: []`` (or ``serve --no-workers``) it runs no workers of its own:
``dicom-node worker`` processes on this or other hosts take the jobs; their running jobs
are left to them at start (:func:`dicom_node.worker.live_owners`), and their results
reach the sender through its poll of the deliveries.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from dicom_node.audit import AuditLog
from dicom_node.cases import CaseAssembler, Routing
from dicom_node.config import ConfigError, NodeConfig
from dicom_node.db import NODE_LOCK, DatabaseUnavailable, SchemaError, open_database
from dicom_node.jobs import recover_on_start, release_expired
from dicom_node.logs import event, get_logger, load_secret, stop_on_signals
from dicom_node.metrics import use_directory
from dicom_node.notify import Notifier
from dicom_node.retention import run_retention
from dicom_node.rows import CaseRow
from dicom_node.scp import StorageSCP
from dicom_node.sender import Sender
from dicom_node.store import Store
from dicom_node.worker import WorkerSupervisor, live_owners, other_workers, queue_wakeups, supervisor_tag
from inference.limits import InputLimits, set_input_limits

__all__ = ["Node", "NodeError"]

log = get_logger(__name__)


class NodeError(RuntimeError):
    """The node cannot start; the message says why."""


class _Rules:
    """The rules file, reloaded when it changes (a broken edit keeps the previous rules)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.ruleset = None
        self.mtime: float | None = None
        if path is not None:
            self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        from dicom_node.rules import RulesError, RuleSet

        try:
            mtime = self.path.stat().st_mtime  # type: ignore[union-attr]
            ruleset = RuleSet.load(self.path)  # type: ignore[arg-type]
        except (RulesError, OSError) as exc:
            if initial:
                raise NodeError(f"rules: {exc}") from None
            event(log, "rules_reload_failed", level=logging.ERROR, why=str(exc), note="keeping the previous rules")
            self.mtime = self.path.stat().st_mtime if self.path.exists() else None  # type: ignore[union-attr]
            return
        self.ruleset, self.mtime = ruleset, mtime
        if not initial:
            event(log, "rules_reloaded", rules=len(ruleset))

    def current(self):
        if self.path is not None:
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                mtime = None
            if mtime != self.mtime:
                self._load()
        return self.ruleset


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self._lock_fd: int | None = None
        self._stopped = threading.Event()
        self.started = False

    # -- decisions -----------------------------------------------------------------------
    def decide(self, case: CaseRow, image_paths: list[Path], prompt_path: Path) -> Routing:
        return decide_with_rules(self.rules.current(), case, image_paths, prompt_path)

    # -- lifecycle -----------------------------------------------------------------------
    def _lock(self) -> None:
        path = self.cfg.data_dir / NODE_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeError(f"another node is running with data_dir {self.cfg.data_dir} (lock {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def start(self) -> None:
        cfg = self.cfg
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NodeError(f"data_dir: cannot create {cfg.data_dir}: {exc.strerror}") from None
        if not os.access(cfg.data_dir, os.W_OK):
            raise NodeError(f"data_dir: {cfg.data_dir} is not writable by this user")
        self._lock()
        use_directory(cfg.data_dir / "run" / "metrics")  # before anything is counted; the workers inherit it
        # The case assembler reads the prompt RTSTRUCTs: a contour-point limit raised in
        # node.yaml applies to it too, a lowered one is left to the worker, whose refusal
        # reaches the case, the job and the audit (here it would only be a log line).
        set_input_limits(max_contour_points=max(cfg.limits.max_contour_points, InputLimits.max_contour_points))
        t0 = time.time()
        self.secret = load_secret(cfg.data_dir)
        try:
            self.db = open_database(cfg, holds_node_lock=True)
        except (SchemaError, DatabaseUnavailable, ConfigError) as exc:
            raise NodeError(str(exc)) from None
        self.audit = AuditLog(cfg.audit_path, fsync=cfg.audit.fsync)
        if self.db.migration is not None:
            m = self.db.migration
            self.audit.write(
                "schema_migrated",
                from_version=m.from_version,
                to_version=m.to_version,
                backup=str(m.backup),
                seconds=m.seconds,
                **m.counts,
            )
        self.store = Store(
            cfg.store_dir,
            self.db,
            fsync=cfg.storage.fsync,
            min_free_bytes=cfg.storage.min_free_mb * 2**20,
            secret=self.secret,
        )
        reconciled = self.store.reconcile()
        recovered = recover_on_start(self.db, cfg.jobs.max_attempts, keep=live_owners(self.db))
        event(log, "recovered", **reconciled, **recovered, seconds=f"{time.time() - t0:.2f}")
        try:
            self.rules = _Rules(cfg.rules)
        except ConfigError as exc:
            raise NodeError(str(exc)) from None

        run_dir = cfg.data_dir / "run"
        run_dir.mkdir(exist_ok=True)
        self.config_json = run_dir / "node.json"
        tmp = run_dir / "node.json.tmp"
        tmp.write_text(cfg.model_dump_json(indent=1))
        os.replace(tmp, self.config_json)

        self.scheduler = BackgroundScheduler(job_defaults={"misfire_grace_time": 3600, "coalesce": True})
        self.scp = StorageSCP(cfg, self.store)
        self.notifier = Notifier(cfg, self.db, self.scheduler)
        self.sender = Sender(cfg, self.db, self.audit, self.scheduler, on_dead=self.notifier.wake)
        self.tag = supervisor_tag("serve")
        self.supervisor = WorkerSupervisor(
            cfg, self.db, self.audit, self.config_json, on_done=self.sender.wake, tag=self.tag
        )
        self.assembler = CaseAssembler(
            cfg,
            self.db,
            self.store,
            self.audit,
            decide=self.decide,
            is_open=self.scp.is_open,
            on_queued=self.supervisor.wake,
            closed_at=self.scp.closed_at,
            on_failed=self.notifier.wake,
        )
        self.store.listeners.append(self.assembler.wake)
        self.scp.close_listeners.append(self.assembler.wake)
        self.watch = None
        if cfg.watch.enabled:
            from dicom_node.watch import WatchFolder

            self.watch = WatchFolder(cfg, self.store, on_import=self.assembler.wake)

        self.scheduler.start()
        self.scheduler.add_job(
            lambda: run_retention(cfg, self.db, self.store, self.audit),
            CronTrigger.from_crontab(cfg.storage.cleanup_cron),
            id="retention",
            replace_existing=True,
        )
        if self.db.is_postgresql:
            self._start_shared_database_duties()
        self.assembler.start()
        self.supervisor.start()
        self.sender.start()
        self.notifier.start()
        self.web = None
        if cfg.web.enabled:
            self._start_web()
        if self.watch is not None:
            self.watch.start()
        try:
            self.scp.start()
        except OSError as exc:
            self.stop()
            raise NodeError(
                f"network: cannot listen on {cfg.network.bind}:{cfg.network.port}: {exc.strerror or exc}"
            ) from None
        self.started = True
        self.audit.write(
            "node_started", pid=os.getpid(), ae_title=cfg.ae_title, port=self.scp.port, workers=self.supervisor.devices
        )
        event(
            log,
            "node_started",
            ae_title=cfg.ae_title,
            port=self.scp.port,
            workers=",".join(self.supervisor.devices) or "none (dicom-node worker processes)",
            rules=str(cfg.rules) if cfg.rules else "none",
            data_dir=str(cfg.data_dir),
        )

    def _start_shared_database_duties(self) -> None:
        """A database shared by several nodes (PostgreSQL): jobs of a node or worker host that
        died come back when their lease expires (any node releases them), and a job queued by
        another receiver wakes this node's workers (``LISTEN jobs``)."""
        cfg = self.cfg
        self.scheduler.add_job(
            lambda: release_expired(self.db, cfg.jobs.max_attempts) and self.supervisor.wake(),
            "interval",
            seconds=max(1.0, min(10.0, cfg.jobs.lease_seconds / 4)),
            id="release-expired",
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )

        self._wakeups_stop = threading.Event()
        threading.Thread(
            target=queue_wakeups,
            args=(cfg, self.db, self.supervisor.wake, self._wakeups_stop),
            name="queue-wakeups",
            daemon=True,
        ).start()

    def stop(self) -> None:
        if getattr(self, "_wakeups_stop", None) is not None:
            self._wakeups_stop.set()
        if self._stopped.is_set():
            return
        self._stopped.set()
        for name, fn in (
            ("scp", lambda: self.scp.stop()),
            ("watch", lambda: self.watch.stop() if self.watch else None),
            ("web", lambda: self.web.stop() if self.web else None),
            ("notifier", lambda: self.notifier.stop()),
            ("assembler", lambda: self.assembler.stop()),
            ("supervisor", lambda: self.supervisor.stop()),
            ("sender", lambda: self.sender.stop()),
            ("scheduler", lambda: self.scheduler.shutdown(wait=False)),
        ):
            try:
                fn()
            except AttributeError:
                pass  # not started
            except Exception:
                log.exception("stopping %s failed", name)
        try:
            self.audit.write("node_stopped", pid=os.getpid())
            self.audit.close()
        except AttributeError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        event(log, "node_stopped")

    def _start_web(self) -> None:
        from dicom_node.metrics import StateCollector
        from dicom_node.web.app import Actions, create_app
        from dicom_node.web.auth import PasswordFileError
        from dicom_node.web.server import WebError, WebServer
        from dicom_node.web.views import NodeStatus

        cfg, started = self.cfg, time.time()

        def status() -> NodeStatus:
            return NodeStatus(
                listening=self.scp.listening,
                bind=cfg.network.bind,
                port=self.scp.port,
                workers=self.supervisor.status() + other_workers(cfg, self.tag),
                started_at=started,
            )

        state = StateCollector(
            cfg,
            self.db,
            listening=lambda: self.scp.listening,
            workers=lambda: [(w["worker"], w["device"], w["alive"]) for w in self.supervisor.status()],
        )
        try:
            app = create_app(
                cfg,
                self.db,
                status=status,
                actions=Actions(wake_workers=self.supervisor.wake, wake_sender=self.sender.wake),
                state=state,
            )
            self.web = WebServer(cfg, app)
            self.web.start()
        except (PasswordFileError, WebError, ConfigError) as exc:
            self.web = None
            self.stop()
            raise NodeError(f"web.password_file: {exc}" if isinstance(exc, PasswordFileError) else str(exc)) from None

    def serve_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT."""
        stop = stop_on_signals(log)
        self.start()
        print(f"dicom-node: {self.cfg.ae_title} listening on {self.cfg.network.bind}:{self.scp.port}", flush=True)
        if self.web is not None:
            scheme = "https" if self.cfg.web.tls.enabled else "http"
            print(f"dicom-node: web page at {scheme}://{self.cfg.web.bind}:{self.web.port}/", flush=True)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()


def decide_with_rules(ruleset, case: CaseRow, image_paths: list[Path], prompt_path: Path) -> Routing:
    """Evaluate the rules for a ready case (``ruleset`` None: the built-in default action)."""
    from dicom_node.rules import Action, RuleContext

    if ruleset is None:
        action = Action()
        return Routing(
            "built-in default (no rules file configured)",
            action.model_dump(mode="json"),
            [f"no rules file: the default engine ({action.engine}), no destinations"],
        )
    ctx = RuleContext.from_files(image_paths[:1], prompt_path, calling_aet=case.calling_aet, called_aet=case.called_aet)
    decision = ruleset.evaluate(ctx)
    return Routing(
        decision.rule.name if decision.rule is not None else None,
        decision.action.model_dump(mode="json") if decision.action is not None else None,
        list(decision.explanation),
    )


def effective_config_dump(cfg: NodeConfig) -> str:
    """The configuration as JSON (``config check --show``); secrets are never in it."""
    return json.dumps(json.loads(cfg.model_dump_json()), indent=2)
