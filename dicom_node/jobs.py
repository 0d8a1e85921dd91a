"""The persistent job queue (SQLite) and the delivery records of results.

Job states: ``pending -> running -> done | failed``. A worker *claims* the oldest pending
job atomically and holds a *lease* (``lease_owner``, ``lease_expires``) that it renews
while it works; a job whose worker died (crash, ``kill -9``, lost lease) goes back to
``pending`` and is attempted again, up to ``jobs.max_attempts``. There is one job per case
(``UNIQUE(case_id)``) and a job is claimed by one worker at a time, so the same case is
never segmented twice concurrently.

A worker finishes a job with :func:`complete_job`, which in one transaction marks it done
and creates one ``sends`` row per destination (DICOM node or export folder) and output of
the rule (``rtstruct``, ``seg``, ``overlay``: each delivered on its own). The sender
marks each row ``sent`` once the peer answered Success, so a restart never sends a result
again; rows that fail are retried with capped exponential backoff and end ``dead`` after
``send.max_attempts`` (``dicom-node resend JOB`` revives them).

The states are :class:`~dicom_node.states.JobState` and
:class:`~dicom_node.states.DeliveryState`; rows come back as the types of
:mod:`dicom_node.rows`.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.db import Database
from dicom_node.failures import record_failure
from dicom_node.rows import CaseRow, DeliveryRow, JobRow, JobSummary, deliveries_of, get_case, get_job, index_path
from dicom_node.states import CaseState, DeliveryKind, DeliveryState, JobState, NotificationKind, OutputKind

__all__ = [
    "create_job",
    "claim_job",
    "renew_lease",
    "complete_job",
    "fail_job",
    "release_owner",
    "expired_owners",
    "release_expired",
    "set_node_identity",
    "recover_on_start",
    "retry_job",
    "resend_job",
    "job_detail",
    "list_jobs",
    "running_owners",
    "has_pending_jobs",
    "backoff_seconds",
    "JobError",
    "JobDetail",
]


class JobError(ValueError):
    """A job operation that cannot be done (unknown id, wrong state); message says why."""


_node_identity: str | None = None


def set_node_identity(data_dir: Path) -> None:
    """Name this node in lease owners by its host *and* its ``data_dir`` (PostgreSQL).

    With one database per node (SQLite) the host name tells the workers apart; with a
    database shared by several nodes, two nodes on one host (or containers with one host
    name) must not release or recover each other's jobs. Called by
    :func:`dicom_node.db.open_database`, so every process of a node agrees.
    """
    global _node_identity
    import hashlib
    import os

    _node_identity = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:8]


def owner_name(worker: str | int) -> str:
    host = socket.gethostname() if _node_identity is None else f"{socket.gethostname()}/{_node_identity}"
    return f"{host}:worker{worker}"


def create_job(
    c: sqlite3.Connection,
    case_id: int,
    rule: str | None,
    action: dict,
    explanation: list[str],
    now: float | None = None,
) -> int:
    """Insert a pending job for ``case_id`` inside the caller's transaction."""
    cur = c.execute(
        """INSERT INTO jobs (case_id, state, rule, action, explanation, created_at)
           VALUES (?, ?, ?, ?, ?, ?)""",
        (case_id, JobState.PENDING, rule, json.dumps(action), json.dumps(explanation), now or time.time()),
    )
    return int(cur.lastrowid)


def claim_job(db: Database, owner: str, lease_seconds: float) -> JobRow | None:
    """Atomically take the oldest pending job (running, attempts+1, leased to ``owner``)."""
    now = time.time()
    with db.tx(serial=False) as c:
        row = c.execute(
            "SELECT id FROM jobs WHERE state = ? ORDER BY id LIMIT 1" + db.lock_rows, (JobState.PENDING,)
        ).fetchone()
        if row is None:
            return None
        c.execute(
            """UPDATE jobs SET state=?, attempts=attempts+1, lease_owner=?, lease_expires=?,
                   started_at=?, error=NULL WHERE id=? AND state=?""",
            (JobState.RUNNING, owner, now + lease_seconds, now, row["id"], JobState.PENDING),
        )
        job = c.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
    return JobRow.from_row(job, db.data_dir)


def renew_lease(db: Database, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when the job is no longer ours (it was handed to another worker)."""
    with db.tx() as c:
        n = c.execute(
            "UPDATE jobs SET lease_expires=? WHERE id=? AND state=? AND lease_owner=?",
            (time.time() + lease_seconds, job_id, JobState.RUNNING, owner),
        ).rowcount
    return n == 1


def complete_job(
    db: Database,
    job_id: int,
    owner: str,
    *,
    result_path: Path | str,
    result_sop_uid: str,
    result_series_uid: str,
    engine: str,
    inference_seconds: float,
    detail: dict[str, Any],
    deliveries: list[tuple[str, DeliveryKind]],
    outputs: tuple[OutputKind | str, ...] = (OutputKind.RTSTRUCT,),
) -> bool:
    """Mark the job done and create its delivery rows; False if the lease was lost.

    ``result_path`` (a file under ``data_dir``) is recorded relative to ``data_dir``. One
    delivery row per destination and output (``detail["files"]`` lists each output's files).
    """
    now = time.time()
    with db.tx() as c:
        n = c.execute(
            """UPDATE jobs SET state=?, finished_at=?, lease_owner=NULL, lease_expires=NULL,
                   result_path=?, result_sop_uid=?, result_series_uid=?, engine=?, inference_seconds=?,
                   detail=?, error=NULL
               WHERE id=? AND state=? AND lease_owner=?""",
            (
                JobState.DONE,
                now,
                index_path(result_path, db.data_dir),
                result_sop_uid,
                result_series_uid,
                engine,
                inference_seconds,
                json.dumps(detail),
                job_id,
                JobState.RUNNING,
                owner,
            ),
        ).rowcount
        if n != 1:
            return False
        for destination, kind in deliveries:
            for output in outputs:
                c.execute(
                    """INSERT OR IGNORE INTO sends (job_id, destination, kind, state, next_attempt_at, output)
                       VALUES (?, ?, ?, ?, ?, ?)""",
                    (job_id, destination, DeliveryKind(kind), DeliveryState.PENDING, now, OutputKind(output)),
                )
        c.execute(
            "UPDATE cases SET state=?, finished_at=? WHERE id=(SELECT case_id FROM jobs WHERE id=?)",
            (CaseState.DONE, now, job_id),
        )
    return True


def _fail_case_of_job(c: sqlite3.Connection, job_id: int, reason: str, now: float) -> None:
    c.execute(
        "UPDATE cases SET state=?, reason=?, finished_at=? WHERE id=(SELECT case_id FROM jobs WHERE id=?)",
        (CaseState.FAILED, reason, now, job_id),
    )
    job = c.execute("SELECT case_id, rule FROM jobs WHERE id=?", (job_id,)).fetchone()
    record_failure(
        c, NotificationKind.JOB_FAILED, reason, case_id=job["case_id"], job_id=job_id, rule=job["rule"], now=now
    )


def fail_job(db: Database, job_id: int, owner: str, error: str, retryable: bool, max_attempts: int) -> JobState | None:
    """Record a failure: back to ``pending`` (retryable, attempts left) or ``failed``.

    Returns the job's state after the call (None: there is no such job); a job that is
    not running under ``owner`` any more is left as it is.
    """
    now = time.time()
    with db.tx() as c:
        job = c.execute("SELECT attempts, state, lease_owner FROM jobs WHERE id=?", (job_id,)).fetchone()
        if job is None:
            return None
        if job["state"] != JobState.RUNNING or job["lease_owner"] != owner:
            return JobState(job["state"])
        state = JobState.PENDING if retryable and job["attempts"] < max_attempts else JobState.FAILED
        c.execute(
            """UPDATE jobs SET state=?, error=?, lease_owner=NULL, lease_expires=NULL, finished_at=? WHERE id=?""",
            (state, error, now if state == JobState.FAILED else None, job_id),
        )
        if state == JobState.FAILED:
            _fail_case_of_job(c, job_id, error, now)
    return state


def _release(c, jobs: list, why: str, max_attempts: int, now: float) -> list[tuple[int, JobState]]:
    out = []
    for job in jobs:
        if job["attempts"] >= max_attempts:
            error = f"{why}; gave up after {job['attempts']} attempts"
            c.execute(
                "UPDATE jobs SET state=?, error=?, lease_owner=NULL, lease_expires=NULL, finished_at=? WHERE id=?",
                (JobState.FAILED, error, now, job["id"]),
            )
            _fail_case_of_job(c, job["id"], error, now)
            out.append((job["id"], JobState.FAILED))
        else:
            c.execute(
                "UPDATE jobs SET state=?, error=?, lease_owner=NULL, lease_expires=NULL WHERE id=?",
                (JobState.PENDING, why, job["id"]),
            )
            out.append((job["id"], JobState.PENDING))
    return out


def release_owner(db: Database, owner: str, why: str, max_attempts: int) -> list[tuple[int, JobState]]:
    """A worker is gone: its running jobs go back to pending (or fail after max attempts)."""
    now = time.time()
    with db.tx() as c:
        jobs = c.execute(
            "SELECT id, attempts FROM jobs WHERE state=? AND lease_owner=?", (JobState.RUNNING, owner)
        ).fetchall()
        return _release(c, jobs, why, max_attempts, now)


def running_owners(db: Database, prefix: str = "") -> list[str]:
    """Lease owners of running jobs whose name starts with ``prefix`` (SQL LIKE)."""
    rows = db.query(
        "SELECT DISTINCT lease_owner FROM jobs WHERE state=? AND lease_owner LIKE ?", (JobState.RUNNING, prefix + "%")
    )
    return [r["lease_owner"] for r in rows if r["lease_owner"]]


def has_pending_jobs(db: Database) -> bool:
    return db.one("SELECT 1 FROM jobs WHERE state=? LIMIT 1", (JobState.PENDING,)) is not None


def release_expired(db: Database, max_attempts: int, now: float | None = None) -> list[tuple[int, JobState]]:
    """Jobs whose lease expired (their worker or its whole host is gone: kill -9, a cut
    network) go back to pending, or fail after ``max_attempts``: any node may call it.

    On PostgreSQL also deliveries and webhook POSTs left 'sending' past their lease
    (``next_attempt_at`` of a row being sent, ``database.delivery_lease_seconds``) by a
    node that died become due again.
    """
    from dicom_node.states import NotificationState

    now = now or time.time()
    if db.is_postgresql:
        with db.tx() as c:
            c.execute(
                "UPDATE sends SET state=?, next_attempt_at=? WHERE state=? AND next_attempt_at < ?",
                (DeliveryState.PENDING, now, DeliveryState.SENDING, now),
            )
            c.execute(
                "UPDATE notifications SET state=?, next_attempt_at=? WHERE state=? AND next_attempt_at < ?",
                (NotificationState.PENDING, now, NotificationState.SENDING, now),
            )
    with db.tx() as c:
        jobs = c.execute(
            "SELECT id, attempts, lease_owner FROM jobs WHERE state=? AND lease_expires < ?", (JobState.RUNNING, now)
        ).fetchall()
        out = []
        for job in jobs:
            out += _release(c, [job], f"the lease of {job['lease_owner']} expired", max_attempts, now)
        return out


def expired_owners(db: Database, now: float | None = None) -> list[str]:
    """Owners of running jobs whose lease has expired (a hung worker)."""
    now = now or time.time()
    rows = db.query(
        "SELECT DISTINCT lease_owner FROM jobs WHERE state=? AND lease_expires < ?", (JobState.RUNNING, now)
    )
    return [r["lease_owner"] for r in rows if r["lease_owner"]]


def recover_on_start(db: Database, max_attempts: int, keep: frozenset[str] | set[str] = frozenset()) -> dict[str, int]:
    """At node start no worker of this node is alive: its running jobs return to pending,
    'sending' rows to pending.

    ``keep``: lease owners whose jobs stay running (workers of ``dicom-node worker``
    processes sharing the database, :func:`dicom_node.worker.live_owners`). On a database
    shared by several nodes (PostgreSQL) only this node's jobs are released (the others'
    return by their lease, :func:`release_expired`), and 'sending' rows are left alone:
    another node may be sending them now.
    """
    counts = {"jobs_requeued": 0, "jobs_failed": 0, "sends_requeued": 0}
    owners = [
        r["lease_owner"] for r in db.query("SELECT DISTINCT lease_owner FROM jobs WHERE state=?", (JobState.RUNNING,))
    ]
    if db.is_postgresql:
        owners = [o for o in owners if o and o.startswith(owner_name(""))]
    for owner in owners:
        if owner in keep:
            continue
        for _job, state in release_owner(db, owner, "the node stopped while this job was running", max_attempts):
            counts["jobs_requeued" if state == JobState.PENDING else "jobs_failed"] += 1
    if db.is_postgresql:
        return counts
    with db.tx() as c:
        counts["sends_requeued"] = c.execute(
            "UPDATE sends SET state=?, next_attempt_at=? WHERE state=?",
            (DeliveryState.PENDING, time.time(), DeliveryState.SENDING),
        ).rowcount
    return counts


def retry_job(db: Database, job_id: int) -> None:
    """``dicom-node jobs retry``: a failed job runs again (attempts reset)."""
    with db.tx() as c:
        job = c.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if job is None:
            raise JobError(f"no job {job_id}")
        if job["state"] != JobState.FAILED:
            hint = " (use 'dicom-node resend' to deliver its result again)" if job["state"] == JobState.DONE else ""
            raise JobError(f"job {job_id} is {job['state']}; only failed jobs can be retried{hint}")
        c.execute(
            "UPDATE jobs SET state=?, attempts=0, error=NULL, finished_at=NULL WHERE id=?", (JobState.PENDING, job_id)
        )
        c.execute(
            "UPDATE cases SET state=?, reason=NULL, finished_at=NULL WHERE id=(SELECT case_id FROM jobs WHERE id=?)",
            (CaseState.QUEUED, job_id),
        )


def resend_job(db: Database, job_id: int, destination: str | None = None) -> int:
    """``dicom-node resend``: deliver a done job's result again; returns the rows re-queued."""
    with db.tx() as c:
        job = c.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if job is None:
            raise JobError(f"no job {job_id}")
        if job["state"] != JobState.DONE:
            raise JobError(f"job {job_id} is {job['state']}: it has no result to send")
        rows = c.execute("SELECT id, destination, state FROM sends WHERE job_id=?", (job_id,)).fetchall()
        if destination is not None:
            rows = [r for r in rows if r["destination"] == destination]
            if not rows:
                raise JobError(f"job {job_id} has no delivery to {destination!r}")
        if not rows:
            raise JobError(f"job {job_id} has no destinations (its rule names none)")
        busy = [r["destination"] for r in rows if r["state"] == DeliveryState.SENDING]
        if busy:
            raise JobError(f"job {job_id} is being sent to {', '.join(busy)} right now; try again in a moment")
        for r in rows:
            c.execute(
                "UPDATE sends SET state=?, attempts=0, next_attempt_at=?, last_error=NULL WHERE id=?",
                (DeliveryState.PENDING, time.time(), r["id"]),
            )
    return len(rows)


def backoff_seconds(attempt: int, initial: float, maximum: float) -> float:
    """Delay before attempt ``attempt + 1`` after ``attempt`` failures: initial * 2^(n-1), capped."""
    return min(maximum, initial * (2 ** max(0, attempt - 1)))


def list_jobs(db: Database, limit: int = 50, state: JobState | str | None = None) -> list[JobSummary]:
    sql = """SELECT j.id, j.case_id, j.state, j.rule, j.attempts, j.created_at, j.started_at, j.finished_at,
                    j.error, j.engine, j.inference_seconds, c.patient_ref, c.n_images, c.mode,
                    (SELECT group_concat(s.destination || CASE WHEN s.output = 'rtstruct' THEN '' ELSE '/' || s.output END
                             || '=' || s.state, ', ') FROM sends s WHERE s.job_id=j.id)
                        AS deliveries
             FROM jobs j JOIN cases c ON c.id = j.case_id"""
    params: tuple = ()
    if state:
        sql += " WHERE j.state = ?"
        params = (JobState(state),)
    sql += " ORDER BY j.id DESC LIMIT ?"
    return [JobSummary.from_row(r) for r in db.query(sql, params + (limit,))]


@dataclass(frozen=True)
class JobDetail:
    """A job with its case and its deliveries (``dicom-node jobs show``)."""

    job: JobRow
    case: CaseRow
    sends: list[DeliveryRow]


def job_detail(db: Database, job_id: int) -> JobDetail:
    job = get_job(db, job_id)
    if job is None:
        raise JobError(f"no job {job_id}")
    case = get_case(db, job.case_id)
    if case is None:  # jobs.case_id references cases(id); only a damaged database gets here
        raise JobError(f"job {job_id} refers to case {job.case_id}, which is not in the database")
    return JobDetail(job, case, deliveries_of(db, job_id))
