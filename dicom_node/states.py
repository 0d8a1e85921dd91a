"""The fixed vocabularies stored in the node's database: states, sources, modes, kinds.

Each is a :class:`enum.StrEnum`, so a member *is* the string stored in the database
(``JobState.PENDING == "pending"``): it can be passed as an SQL parameter, compared with a
value read back, written to JSON and formatted without conversion. The strings are part of
the database format; changing one needs a migration (:mod:`dicom_node.migrations`).

Lifecycles (see :mod:`dicom_node.jobs` and :mod:`dicom_node.cases`)::

    case      waiting -> queued -> done | failed        (waiting -> failed: timeout, no rule)
    job       pending -> running -> done | failed       (running -> pending: lost worker, retry)
    delivery  pending -> sending -> sent | dead         (sending -> pending: failed attempt)
    notice    pending -> sending -> sent | dead | unsent  (unsent: no webhook configured)
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CaseState",
    "JobState",
    "DeliveryState",
    "InstanceSource",
    "CaseMode",
    "DeliveryKind",
    "OutputKind",
    "NotificationKind",
    "NotificationState",
    "ACTIVE_CASE_STATES",
    "OPEN_DELIVERY_STATES",
]


class CaseState(StrEnum):
    """``cases.state``."""

    WAITING = "waiting"  # the prompt is stored, images or the end of their association are awaited
    QUEUED = "queued"  # ready: images frozen, a job is queued or running
    DONE = "done"  # its job finished with a result
    FAILED = "failed"  # timed out, superseded, no rule matched, or its job failed


class JobState(StrEnum):
    """``jobs.state``."""

    PENDING = "pending"  # waiting for a worker
    RUNNING = "running"  # claimed by a worker that holds the lease
    DONE = "done"  # result written, deliveries created
    FAILED = "failed"  # a permanent error, or out of attempts


class DeliveryState(StrEnum):
    """``sends.state``."""

    PENDING = "pending"  # due at ``next_attempt_at``
    SENDING = "sending"  # an attempt is under way
    SENT = "sent"  # the peer answered Success (or the export file is in place)
    DEAD = "dead"  # dead letter after ``send.max_attempts``; ``dicom-node resend`` revives it


class InstanceSource(StrEnum):
    """``instances.source`` (and ``cases.source``, copied from the prompt's instance)."""

    DICOM = "dicom"  # received by C-STORE
    WATCH = "watch"  # imported from the watch folder
    RECONCILE = "reconcile"  # found on disk without an index row (after a crash or power loss)


class CaseMode(StrEnum):
    """``cases.mode``: how the images of a ready case were chosen."""

    REFERENCES = "references"  # every image the RTSTRUCT references
    SERIES_FALLBACK = "series-fallback"  # stale references: the referenced series
    FRAME_OF_REFERENCE_FALLBACK = "frame-of-reference-fallback"  # else the largest series on its frame


class DeliveryKind(StrEnum):
    """``sends.kind``."""

    DICOM = "dicom"  # C-STORE to a configured destination
    FOLDER = "folder"  # an export folder (``destination`` is ``folder:<path>``)


class OutputKind(StrEnum):
    """``sends.output``: which of a result's outputs a delivery carries (a rule's ``outputs``)."""

    RTSTRUCT = "rtstruct"  # the result RT Structure Set (one instance)
    SEG = "seg"  # the same masks as a DICOM Segmentation (one instance)
    OVERLAY = "overlay"  # the QA pictures as a Secondary Capture series (one instance per picture)


class NotificationKind(StrEnum):
    """``notifications.kind``: what failed."""

    CASE_FAILED = "case_failed"  # a case was not processed (images missing, no rule matched)
    JOB_FAILED = "job_failed"  # its segmentation failed for good
    DELIVERY_DEAD = "delivery_dead"  # a delivery was dead-lettered after send.max_attempts


class NotificationState(StrEnum):
    """``notifications.state``: the failure webhook's delivery of one failure."""

    PENDING = "pending"  # due at ``next_attempt_at``
    SENDING = "sending"  # a POST is under way
    SENT = "sent"  # the webhook answered 2xx
    DEAD = "dead"  # gave up after webhook.max_attempts
    UNSENT = "unsent"  # no webhook was configured when it was due (kept for the health page)


#: a case in these states still needs its instances and prompt (retention keeps them)
ACTIVE_CASE_STATES = (CaseState.WAITING, CaseState.QUEUED)
#: a delivery in these states still needs its result file
OPEN_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.SENDING)
