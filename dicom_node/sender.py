"""Delivery of results: C-STORE to DICOM destinations, atomic writes to export folders.

Each delivery is a ``sends`` row (see :mod:`dicom_node.jobs`): one output of a result
(the RTSTRUCT, the SEG, or the Secondary Capture series of the QA pictures) to one
destination, all of its files in one association. The :class:`Sender` runs in
the receiving process on an apscheduler ``BackgroundScheduler``: a short interval job
picks up due rows (also those revived by ``dicom-node resend`` from another process),
:meth:`Sender.wake` runs it at once when a worker reports a result, and a failed attempt
schedules a one-off run at its retry time. Delays grow as
``backoff_initial_seconds * 2^(attempt-1)`` capped at ``backoff_max_seconds``; after
``send.max_attempts`` the row is ``dead`` (dead letter) until resent by hand; a dead
letter is recorded as a failure to report (:mod:`dicom_node.failures`).

A row is marked ``sending`` before the attempt and ``sent`` right after the peer's
Success, so a restart never sends a result that was delivered (a crash in the middle of
the C-STORE itself re-sends the same SOP Instance, which the peer treats as the same
object).

Rows are :class:`~dicom_node.rows.DeliveryRow` in the states of
:class:`~dicom_node.states.DeliveryState`; the files of a row's output are the job's
:meth:`~dicom_node.rows.JobRow.output_files`, resolved against ``data_dir``.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.audit import AuditLog
from dicom_node.config import Destination, NodeConfig, TlsClient
from dicom_node.db import Database
from dicom_node.durable import publish
from dicom_node.failures import record_failure
from dicom_node.jobs import backoff_seconds
from dicom_node.logs import event, get_logger
from dicom_node.metrics import metrics
from dicom_node.rows import DeliveryRow, JobRow, get_case, get_delivery, get_job
from dicom_node.states import DeliveryKind, DeliveryState, NotificationKind
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["Sender", "c_store_files", "c_echo", "client_ssl_context", "export_file", "DeliveryError"]

log = get_logger(__name__)

_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the storage warnings


class DeliveryError(Exception):
    pass


def client_ssl_context(tls: TlsClient) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.check_hostname = tls.check_hostname
    if not tls.check_hostname:
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.ca_file else ssl.CERT_NONE
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=tls.key_password())
    return ctx


def _requestor_ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def c_echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "STARDUST",
    timeout: float = 10.0,
    tls: TlsClient | None = None,
) -> int:
    """C-ECHO; returns the status (raises :class:`DeliveryError` when no association)."""
    ae = _requestor_ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, host, port, called_aet, tls)
    if not assoc.is_established:
        raise DeliveryError(_assoc_failure(assoc, host, port, called_aet))
    try:
        status = assoc.send_c_echo()
        if not status:
            raise DeliveryError("no response to C-ECHO (timeout or aborted)")
        return int(status.Status)
    finally:
        assoc.release()


def _associate(ae: AE, host: str, port: int, called_aet: str, tls: TlsClient | None, **kw):
    """``ae.associate`` that remembers whether the TCP connection was made at all, and
    the A-ASSOCIATE-RJ PDU if the peer sent one.

    The reject PDU is kept because pynetdicom (3.0) can lose it: on a reject its DUL
    thread queues the reject and closes the socket at once (action AE-4); when that
    happens before the requestor thread checks that the socket is connected, the
    requestor never reads the queued reject and marks the association aborted.
    The operator must still read "rejected" (a configuration matter at the TPS), not
    "aborted" (a network or peer failure).
    """
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    opened: list[bool] = []
    rejects: list = []

    def on_pdu(ev) -> None:
        if isinstance(ev.pdu, A_ASSOCIATE_RJ):
            rejects.append(ev.pdu)

    tls_args = (client_ssl_context(tls), host) if tls is not None and tls.enabled else None
    assoc = ae.associate(
        host,
        port,
        ae_title=called_aet,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _e: opened.append(True)), (evt.EVT_PDU_RECV, on_pdu)],
        **kw,
    )
    assoc.stardust_connected = bool(opened)
    assoc.stardust_reject = rejects[0] if rejects else None
    if assoc.is_established:
        assoc.unbind(evt.EVT_PDU_RECV, on_pdu)  # not needed for the rest of the association
    return assoc


def _assoc_failure(assoc, host: str, port: int, called_aet: str) -> str:
    if not getattr(assoc, "stardust_connected", True):
        return f"cannot connect to {called_aet}@{host}:{port} (refused, unreachable, timed out or TLS failed)"
    reject = getattr(assoc, "stardust_reject", None)
    if assoc.is_rejected or reject is not None:
        prim = reject if reject is not None else assoc.acceptor.primitive
        reason = getattr(prim, "reason_str", None) if prim is not None else None
        return f"association rejected by {called_aet}@{host}:{port}" + (f" ({reason})" if reason else "")
    if assoc.is_aborted:
        return f"association aborted by {called_aet}@{host}:{port}"
    return f"cannot connect to {called_aet}@{host}:{port} (refused, unreachable or timed out)"


def c_store_files(
    paths: list[Path],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "STARDUST",
    timeout: float = 30.0,
    tls: TlsClient | None = None,
    progress=None,
) -> list[tuple[Path, int | None, str]]:
    """Send DICOM files in one association; per file (path, status or None, message).

    Presentation contexts are proposed for each SOP class with the file's own transfer
    syntax first, then the uncompressed ones. Raises :class:`DeliveryError` when no
    association can be made.
    """
    datasets = []
    results: list[tuple[Path, int | None, str]] = []
    contexts: dict[str, list[str]] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            results.append((path, None, f"not readable as DICOM: {type(exc).__name__}: {exc}"))
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        ts = str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
        syntaxes = contexts.setdefault(sop_class, [])
        for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in syntaxes:
                syntaxes.append(t)
        datasets.append((path, ds))
    if not datasets:
        return results
    if len(contexts) > 128:
        raise DeliveryError(f"{len(contexts)} SOP classes: more than one association can negotiate")
    ae = _requestor_ae(calling_aet, timeout)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = _associate(ae, host, port, called_aet, tls, max_pdu=0)
    if not assoc.is_established:
        raise DeliveryError(_assoc_failure(assoc, host, port, called_aet))
    try:
        for path, ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context
                results.append((path, None, f"not accepted by {called_aet}: {exc}"))
                continue
            if progress is not None:
                progress.update(1)
            if not status:
                results.append((path, None, "no response (timeout or association aborted)"))
                if not assoc.is_established:
                    break
                continue
            code = int(status.Status)
            comment = str(status.get("ErrorComment", "") or "")
            results.append((path, code, comment))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def export_file(source: Path, folder: Path, name: str) -> Path:
    """Copy ``source`` into ``folder`` as ``name`` atomically (temp name, fsync, rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        shutil.copyfile(source, tmp)
        publish(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


class Sender:
    def __init__(self, cfg: NodeConfig, db: Database, audit: AuditLog, scheduler, on_dead=None) -> None:
        self.cfg = cfg
        self.db = db
        self.audit = audit
        self.scheduler = scheduler
        self.on_dead = on_dead  # called after a dead letter is recorded (wakes the failure webhook)
        self.pool = ThreadPoolExecutor(max_workers=cfg.send.threads, thread_name_prefix="send")
        self._pump_lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        self.scheduler.add_job(
            self.pump, "interval", seconds=1.0, id="sender-poll", max_instances=1, coalesce=True, replace_existing=True
        )
        self.wake()

    def stop(self) -> None:
        self._stopped = True
        self.pool.shutdown(wait=True, cancel_futures=True)

    def wake(self, *_args) -> None:
        """Look for due deliveries now (a worker finished a job)."""
        if not self._stopped:
            threading.Thread(target=self.pump, name="send-wake", daemon=True).start()

    def pump(self) -> int:
        if self._stopped:
            return 0
        with self._pump_lock:
            now = time.time()
            if self.db.is_postgresql:
                claimed = self._claim_shared(now)
                rows = []
            else:
                rows = self.db.query(
                    "SELECT id FROM sends WHERE state=? AND next_attempt_at <= ? ORDER BY id LIMIT 100",
                    (DeliveryState.PENDING, now),
                )
                claimed = []
            for row in rows:
                with self.db.tx() as c:
                    n = c.execute(
                        "UPDATE sends SET state=?, attempts=attempts+1 WHERE id=? AND state=?",
                        (DeliveryState.SENDING, row["id"], DeliveryState.PENDING),
                    ).rowcount
                if n:
                    claimed.append(row["id"])
        for send_id in claimed:
            try:
                self.pool.submit(self._deliver, send_id)
            except RuntimeError:  # shutting down: the row goes back to pending on restart
                break
        return len(claimed)

    def _claim_shared(self, now: float) -> list[int]:
        """PostgreSQL (senders of several nodes): take the due rows that no other sender is
        taking (``FOR UPDATE SKIP LOCKED``); ``next_attempt_at`` of a row being sent is the
        end of its lease (:func:`dicom_node.jobs.release_expired` requeues it after that)."""
        with self.db.tx(serial=False) as c:
            rows = c.execute(
                "SELECT id FROM sends WHERE state=? AND next_attempt_at <= ? ORDER BY id LIMIT 100" + self.db.lock_rows,
                (DeliveryState.PENDING, now),
            ).fetchall()
            for row in rows:
                c.execute(
                    "UPDATE sends SET state=?, attempts=attempts+1, next_attempt_at=? WHERE id=?",
                    (DeliveryState.SENDING, now + self.cfg.database.delivery_lease_seconds, row["id"]),
                )
        return [row["id"] for row in rows]

    def _deliver(self, send_id: int) -> None:
        row = get_delivery(self.db, send_id)
        job = get_job(self.db, row.job_id) if row is not None else None
        if row is None or job is None:
            return
        start = time.time()
        try:
            files = job.output_files(row.output)
            if not files:
                raise DeliveryError(f"job {job.id} has no {row.output} file recorded")
            if row.kind == DeliveryKind.FOLDER:
                detail = ", ".join(str(export_file(f, row.folder, f.name)) for f in files)  # type: ignore[arg-type]
            else:
                dest = self.cfg.destinations.get(row.destination)
                if dest is None:
                    raise DeliveryError(f"destination {row.destination!r} is not defined in the configuration")
                detail = self._c_store(dest, files)
        except Exception as exc:
            metrics().deliveries.labels(str(row.output), "failed").inc()
            self._failed(row, job, exc)
            return
        metrics().deliveries.labels(str(row.output), "sent").inc()
        now = time.time()
        with self.db.tx() as c:
            c.execute(
                "UPDATE sends SET state=?, sent_at=?, last_error=NULL WHERE id=?", (DeliveryState.SENT, now, send_id)
            )
        case = get_case(self.db, job.case_id)
        ready_at = case.ready_at if case is not None else None
        event(
            log,
            "sent",
            job=row.job_id,
            case=job.case_id,
            destination=row.destination,
            output=row.output,
            attempt=row.attempts,
            seconds=f"{now - start:.3f}",
        )
        self.audit.write(
            "sent",
            case=job.case_id,
            job=row.job_id,
            destination=row.destination,
            output=row.output,
            attempt=row.attempts,
            result=job.result_sop_uid,
            detail=detail,
            since_ready=round(now - ready_at, 3) if ready_at else None,
        )

    def _c_store(self, dest: Destination, paths: list[Path]) -> str:
        """Every file of one output in one association; all must be stored for it to count."""
        results = c_store_files(
            paths,
            dest.host,
            dest.port,
            dest.ae_title,
            calling_aet=dest.calling_ae_title or self.cfg.ae_title,
            timeout=dest.timeout_seconds,
            tls=dest.tls,
        )
        if len(results) < len(paths):
            raise DeliveryError(
                f"{dest.ae_title} took {len(results)} of {len(paths)} files before the association ended"
            )
        for path, status, message in results:
            which = f" for {path.name}" if len(paths) > 1 else ""
            if status is None:
                raise DeliveryError(message + which)
            if status not in _OK_STATUSES:
                raise DeliveryError(
                    f"{dest.ae_title} answered status 0x{status:04X}{which}" + (f" ({message})" if message else "")
                )
        statuses = sorted({f"0x{status:04X}" for _, status, _ in results})
        return f"{dest.ae_title}@{dest.host}:{dest.port} status {'/'.join(statuses)} ({len(results)} files)"

    def _failed(self, row: DeliveryRow, job: JobRow, exc: Exception) -> None:
        attempts = row.attempts
        reason = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
        if attempts >= self.cfg.send.max_attempts:
            with self.db.tx() as c:
                c.execute("UPDATE sends SET state=?, last_error=? WHERE id=?", (DeliveryState.DEAD, reason, row.id))
                record_failure(
                    c,
                    NotificationKind.DELIVERY_DEAD,
                    f"delivery of the {row.output} to {row.destination} gave up after {attempts} attempts: {reason}",
                    case_id=job.case_id,
                    job_id=job.id,
                    rule=job.rule,
                    destination=row.destination,
                    output=row.output,
                )
            metrics().dead_letters.labels(str(row.output)).inc()
            if self.on_dead is not None:
                self.on_dead()
            event(
                log,
                "delivery_dead",
                level=logging.ERROR,
                job=row.job_id,
                destination=row.destination,
                output=row.output,
                attempts=attempts,
                reason=reason,
                hint=f"dicom-node resend {row.job_id}",
            )
            self.audit.write(
                "delivery_failed",
                case=job.case_id,
                job=row.job_id,
                destination=row.destination,
                output=row.output,
                attempts=attempts,
                reason=reason,
                dead=True,
            )
            return
        delay = backoff_seconds(attempts, self.cfg.send.backoff_initial_seconds, self.cfg.send.backoff_max_seconds)
        next_at = time.time() + delay
        with self.db.tx() as c:
            c.execute(
                "UPDATE sends SET state=?, last_error=?, next_attempt_at=? WHERE id=?",
                (DeliveryState.PENDING, reason, next_at, row.id),
            )
        metrics().retries.labels(str(row.output)).inc()
        event(
            log,
            "delivery_retry",
            level=logging.WARNING,
            job=row.job_id,
            destination=row.destination,
            output=row.output,
            attempt=attempts,
            reason=reason,
            retry_in=f"{delay:g}s",
        )
        if not self._stopped:
            try:
                self.scheduler.add_job(
                    self.pump, "date", run_date=datetime.now() + timedelta(seconds=delay), misfire_grace_time=None
                )
            except Exception:  # scheduler stopped; the interval poll or a restart picks it up
                pass
