"""Retention: delete old instances, prompts and results, never anything still needed.

Run by the scheduler (``storage.cleanup_cron``). An item older than
``storage.retention_days`` is deleted unless:

* an instance belongs to an unfinished case (waiting or queued: its RTSTRUCT, a referenced
  image, an image of its chosen or referenced series or of its frame of reference);
* a result still has a delivery that is pending or being sent;
* a prompt copy belongs to an unfinished case.

Dead-lettered deliveries do not hold results forever: after the retention period they go
too (the audit trail keeps the record), and so do recorded failures (``notifications``)
that the webhook has reported or could not report.
"""

from __future__ import annotations

import shutil
import time

from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.logs import event, get_logger
from dicom_node.rows import resolve_path
from dicom_node.states import ACTIVE_CASE_STATES, OPEN_DELIVERY_STATES, JobState, NotificationState
from dicom_node.store import Store

__all__ = ["run_retention"]

log = get_logger(__name__)

_PROTECTED_INSTANCES = """
SELECT i.sop_instance_uid FROM instances i
WHERE i.received_at < :cutoff
  AND NOT EXISTS (SELECT 1 FROM case_refs r JOIN cases c ON c.id = r.case_id
                  WHERE r.sop_instance_uid = i.sop_instance_uid AND c.state IN (:active1, :active2))
  AND NOT EXISTS (SELECT 1 FROM case_images ci JOIN cases c ON c.id = ci.case_id
                  WHERE ci.sop_instance_uid = i.sop_instance_uid AND c.state IN (:active1, :active2))
  AND NOT EXISTS (SELECT 1 FROM cases c WHERE c.state IN (:active1, :active2) AND (
                      c.rtstruct_uid = i.sop_instance_uid
                      OR c.image_series_uid = i.series_uid
                      OR (c.frame_of_reference_uid IS NOT NULL AND c.frame_of_reference_uid = i.frame_of_reference_uid)
                      OR instr(c.ref_series_uids, '"' || i.series_uid || '"') > 0))
"""


def run_retention(
    cfg: NodeConfig, db: Database, store: Store, audit: AuditLog | None = None, now: float | None = None
) -> dict[str, int]:
    now = now if now is not None else time.time()
    cutoff = now - cfg.storage.retention_days * 86400
    active = dict(zip(("active1", "active2"), ACTIVE_CASE_STATES, strict=True))
    uids = [r["sop_instance_uid"] for r in db.query(_PROTECTED_INSTANCES, {"cutoff": cutoff, **active})]
    counts = {"instances": store.delete_instances(uids), "results": 0, "prompts": 0, "arrivals": 0}

    # results: job finished before the cutoff and no delivery still pending/sending
    for job in db.query(
        """SELECT j.id, j.result_path FROM jobs j
           WHERE j.state = ? AND j.finished_at < ? AND j.result_path IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM sends s WHERE s.job_id = j.id AND s.state IN (?, ?))""",
        (JobState.DONE, cutoff, *OPEN_DELIVERY_STATES),
    ):
        folder = resolve_path(job["result_path"], db.data_dir).parent
        if folder.exists() and cfg.results_dir in folder.parents:
            shutil.rmtree(folder, ignore_errors=True)
            counts["results"] += 1

    # prompt copies of finished cases
    keep = {
        resolve_path(r["prompt_path"], db.data_dir)
        for r in db.query("SELECT prompt_path FROM cases WHERE state IN (?, ?)", ACTIVE_CASE_STATES)
    }
    prompts_dir = cfg.prompts_dir
    if prompts_dir.exists():
        for path in prompts_dir.glob("*.dcm"):
            if path not in keep and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                counts["prompts"] += 1

    # the processed part of the arrival log
    cursor = int(db.get_meta("assembler_cursor", "0") or 0)
    with db.tx() as c:
        counts["arrivals"] = c.execute(
            "DELETE FROM arrivals WHERE seq <= ? AND received_at < ?", (cursor, cutoff)
        ).rowcount
        # reported (or unreportable) failures: the audit trail keeps the record
        counts["notifications"] = c.execute(
            "DELETE FROM notifications WHERE created_at < ? AND state NOT IN (?, ?)",
            (cutoff, NotificationState.PENDING, NotificationState.SENDING),
        ).rowcount
    event(log, "retention", **counts, retention_days=cfg.storage.retention_days)
    if audit is not None:
        audit.write("retention", **counts)
    return counts
