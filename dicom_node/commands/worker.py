"""``dicom-node worker [-c CONFIG]``: inference workers only (a GPU host), no DICOM, no web.

The process runs a :class:`~dicom_node.worker.WorkerSupervisor` (one worker per entry of
``workers.devices``, restarted when it dies) against the database and store of the
deployment, which ``dicom-node serve`` owns:

* it never takes ``data_dir/node.lock`` (serve's exclusive lock) and never migrates the
  schema: a database of another schema version is refused (serve migrates; start the
  workers after it);
* its metrics go to ``run/metrics-w<pid>`` and its workers describe themselves in
  ``run/worker-w<pid>-<index>.json``, next to serve's files and not over them;
* results are written under the store and completed in the database; serve's sender
  finds them at its next poll (every second);
* it learns of queued jobs through :func:`dicom_node.worker.queue_wakeups`;
* SIGTERM/SIGINT: idle workers stop, a worker in a job finishes it (``--stop-timeout``
  seconds at most, then it is killed and its job handed back to the queue).
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import sys
import threading

from dicom_node.cli import CommandError


def register(sub) -> None:
    p = sub.add_parser(
        "worker", help="run inference workers only (a GPU host), against the database and store of a serve process"
    )
    p.add_argument(
        "-c",
        "--config",
        help="node.yaml (default: $STARDUST_CONFIG, /etc/stardust/node.yaml, or the repository's config/node.yaml)",
    )
    p.add_argument("--data-dir", help="override data_dir")
    p.add_argument("--device", action="append", help="override workers.devices (repeat for several)")
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=60.0,
        help="seconds a worker may take to finish its job after SIGTERM before it is killed and the job "
        "handed back (default 60)",
    )
    p.set_defaults(func=run)


def open_worker_database(cfg):
    """The deployment's database, as a worker process may open it: existing, at this
    release's schema (it never creates or migrates one). Raises :class:`CommandError`.

    A ``database:`` URL other than sqlite goes to :func:`dicom_node.db.open_database`
    (PostgreSQL), its errors in one sentence."""
    from dicom_node.db import SchemaError, open_database
    from dicom_node.migrations import SCHEMA_VERSION, read_version

    if str(cfg.database.url or "sqlite") != "sqlite":
        try:
            return open_database(cfg)
        except Exception as exc:  # unreachable server, refused login, other schema: one sentence
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CommandError(text if text.startswith("database") else f"database: {text}") from None
    path = cfg.db_path
    if not path.is_file():
        raise CommandError(
            f"database: {path} does not exist: start dicom-node serve first (it creates the database), "
            "or point data_dir at the serve process's data directory"
        )
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            version = read_version(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise CommandError(f"database: cannot read {path}: {exc}") from None
    except SchemaError as exc:
        raise CommandError(f"database: {path}: {exc}") from None
    if version != SCHEMA_VERSION:
        newer = version is not None and version > SCHEMA_VERSION
        raise CommandError(
            f"database: {path} is at schema {version} and this release needs schema {SCHEMA_VERSION}: "
            + (
                "upgrade this host to the release of the serve process"
                if newer
                else "start dicom-node serve of this release first (it migrates the database), then the workers"
            )
        )
    try:
        return open_database(cfg)
    except (SchemaError, sqlite3.Error, OSError) as exc:
        raise CommandError(f"database: {path}: {exc}") from None


def _remove_stale_files(run_dir) -> None:
    """Files of worker processes of this data_dir that died without cleaning up (kill -9)."""
    import re

    for path in list(run_dir.glob("metrics-w*")) + list(run_dir.glob("node-w*.json")) + list(run_dir.glob("worker-w*")):
        m = re.match(r"(?:metrics-w|node-w|worker-w)(\d+)", path.name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (or another user's): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def run(args) -> int:
    from dicom_node.config import ConfigError, load_config
    from dicom_node.logs import event, get_logger, setup_logging, stop_on_signals

    overrides: dict = {}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.device:
        overrides["workers"] = {"devices": list(args.device)}
    try:
        cfg = load_config(args.config, overrides=overrides or None)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    if not cfg.workers.devices:
        raise CommandError("workers.devices is empty: a worker process needs at least one device (auto, cpu, cuda:N)")
    if not cfg.data_dir.is_dir():
        raise CommandError(
            f"data_dir: {cfg.data_dir} does not exist: start dicom-node serve first, or mount the shared directory"
        )
    level = cfg.logging.level if args.verbose == 0 else ("DEBUG" if args.verbose > 1 else "INFO")
    setup_logging(level, cfg.logging.format, cfg.logging.file)
    log = get_logger("dicom_node.commands.worker")

    from dicom_node.metrics import use_directory

    run_dir = cfg.data_dir / "run"
    pid = os.getpid()
    _remove_stale_files(run_dir)
    metrics_dir = run_dir / f"metrics-w{pid}"
    use_directory(metrics_dir)  # before anything is counted; serve empties only its own run/metrics
    db = open_worker_database(cfg)

    from dicom_node.audit import AuditLog
    from dicom_node.worker import WorkerSupervisor, queue_wakeups, supervisor_tag

    audit = AuditLog(cfg.audit_path, fsync=cfg.audit.fsync)
    tag = supervisor_tag("worker")
    config_json = run_dir / f"node-{tag}.json"
    tmp = run_dir / f".node-{tag}.json.tmp"
    tmp.write_text(cfg.model_dump_json(indent=1))
    os.replace(tmp, config_json)

    stop = stop_on_signals(log)
    supervisor = WorkerSupervisor(cfg, db, audit, config_json, tag=tag)
    supervisor.start()
    wakeups = threading.Thread(
        target=queue_wakeups, args=(cfg, db, supervisor.wake, stop), name="queue-wakeups", daemon=True
    )
    wakeups.start()
    host = socket.gethostname()
    audit.write("worker_process_started", pid=pid, host=host, tag=tag, workers=supervisor.devices)
    event(log, "worker_process_started", tag=tag, workers=",".join(supervisor.devices), data_dir=str(cfg.data_dir))
    print(
        f"dicom-node: worker process {tag} on {host}: {len(supervisor.devices)} worker(s) {supervisor.devices}",
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        supervisor.stop(timeout=args.stop_timeout)
        wakeups.join(timeout=5)
        audit.write("worker_process_stopped", pid=pid, tag=tag)
        audit.close()
        config_json.unlink(missing_ok=True)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        event(log, "worker_process_stopped", tag=tag)
    sys.stdout.flush()
    return 0
