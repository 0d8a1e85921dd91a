"""Failures an operator must hear about, recorded where they happen (``notifications`` rows).

Every such failure is recorded *in the transaction that makes it* (:func:`record_failure`),
whichever process that is (the receiver, a worker, the CLI):

* ``case_failed``: a case was not processed (its images did not arrive in time, no rule
  matched, the rules could not be evaluated). A case replaced by the planner's corrected
  prompt ("superseded") is not a failure;
* ``job_failed``: its segmentation failed for good (a refused prompt, an unusable series,
  a worker that died on it ``jobs.max_attempts`` times);
* ``delivery_dead``: a delivery was dead-lettered after ``send.max_attempts``.

The rows are the health page's "last errors" and the outbox of the failure webhook
(:mod:`dicom_node.notify`). Reasons are the planner's words ("12 of 134 referenced images
missing"); they carry no patient name or ID.
"""

from __future__ import annotations

import sqlite3
import time

from dicom_node.db import Database
from dicom_node.rows import NotificationRow
from dicom_node.states import NotificationKind, NotificationState

__all__ = ["record_failure", "recent_failures"]


def record_failure(
    c: sqlite3.Connection,
    kind: NotificationKind,
    reason: str,
    *,
    case_id: int | None = None,
    job_id: int | None = None,
    rule: str | None = None,
    destination: str | None = None,
    output: str | None = None,
    now: float | None = None,
) -> int:
    """Record a failure inside the caller's transaction; returns the row id."""
    now = now if now is not None else time.time()
    cur = c.execute(
        """INSERT INTO notifications (kind, case_id, job_id, rule, destination, output, reason, created_at, state,
                                      next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            NotificationKind(kind),
            case_id,
            job_id,
            rule,
            destination,
            output,
            reason,
            now,
            NotificationState.PENDING,
            now,
        ),
    )
    return int(cur.lastrowid)


def recent_failures(db: Database, limit: int = 10) -> list[NotificationRow]:
    """The newest failures, newest first (the health page's "last errors")."""
    rows = db.query("SELECT * FROM notifications ORDER BY id DESC LIMIT ?", (limit,))
    return [NotificationRow.from_row(r) for r in rows]
