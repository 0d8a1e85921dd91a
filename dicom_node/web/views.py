"""What the pages show, read from the database, the result folders and the running node.

Plain functions returning dictionaries and rows for the templates (:mod:`dicom_node.web.app`);
nothing here writes. Patient identity (name, ID) is read from the case's prompt file only
when ``web.show_patient_identity`` is true; otherwise the pages know the hashed
reference only.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.failures import recent_failures
from dicom_node.rows import CaseRow, DeliveryRow, JobRow, deliveries_of, get_case
from dicom_node.states import CaseState, DeliveryState, JobState

__all__ = ["NodeStatus", "health", "cases", "case_page", "CaseLine", "qa_file", "CASE_STATES"]

CASE_STATES = [str(s) for s in CaseState]
_SLICE = re.compile(r"\bslice (\d+)\b")


def one_based(text: str) -> str:
    """The engine's reasons count slices from 0; the pages count from 1, as the pictures do."""
    return _SLICE.sub(lambda m: f"slice {int(m.group(1)) + 1}", text)


@dataclass
class NodeStatus:
    """What only the running node knows (absent when the app runs outside it, in tests)."""

    listening: bool | None = None
    bind: str | None = None
    port: int | None = None
    workers: list[dict] = field(default_factory=list)
    started_at: float | None = None


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value < 100 else f"{value / 60:.1f} min"


@lru_cache(maxsize=512)
def _identity(path: str, mtime_ns: int) -> tuple[str, str]:
    from rtstruct.headers import read_header

    ds = read_header(path)
    return str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")


def patient_identity(case: CaseRow) -> tuple[str, str] | None:
    """(name, ID) from the prompt file; None when it is gone (retention) or unreadable."""
    try:
        return _identity(str(case.prompt_path), case.prompt_path.stat().st_mtime_ns)
    except Exception:
        return None


def health(cfg: NodeConfig, db: Database, node: NodeStatus) -> dict[str, Any]:
    try:
        usage = shutil.disk_usage(cfg.data_dir)
        free, total = usage.free, usage.total
    except OSError:
        free = total = None
    floor = cfg.storage.min_free_mb * 2**20
    jobs = {r["state"]: r["n"] for r in db.query("SELECT state, count(*) AS n FROM jobs GROUP BY state")}
    sends = {r["state"]: r["n"] for r in db.query("SELECT state, count(*) AS n FROM sends GROUP BY state")}
    cases_ = {r["state"]: r["n"] for r in db.query("SELECT state, count(*) AS n FROM cases GROUP BY state")}
    retrying = db.query(
        "SELECT * FROM sends WHERE state = ? AND attempts > 0 ORDER BY next_attempt_at LIMIT 10",
        (DeliveryState.PENDING,),
    )
    return {
        "node": node,
        "ae_title": cfg.ae_title,
        "dicom_port": node.port or cfg.network.port,
        "dicom_bind": node.bind or cfg.network.bind,
        "tls": cfg.tls.enabled,
        "disk_free": free,
        "disk_total": total,
        "disk_floor": floor,
        "disk_ok": free is None or free >= floor,
        "queue": {s: jobs.get(s, 0) for s in (JobState.PENDING, JobState.RUNNING)},
        "cases": {str(s): cases_.get(s, 0) for s in CaseState},
        "deliveries_waiting": sends.get(DeliveryState.PENDING, 0) + sends.get(DeliveryState.SENDING, 0),
        "deliveries_dead": sends.get(DeliveryState.DEAD, 0),
        "retrying": [DeliveryRow.from_row(r) for r in retrying],
        "failures": recent_failures(db, 10),
        "when": _when,
    }


@dataclass
class CaseLine:
    """One line of the cases page."""

    case: CaseRow
    job: JobRow | None
    deliveries: list[DeliveryRow]
    identity: tuple[str, str] | None = None

    @property
    def delivered_at(self) -> float | None:
        sent = [d.sent_at for d in self.deliveries if d.state == DeliveryState.SENT and d.sent_at]
        return max(sent) if sent else None

    @property
    def reasons(self) -> list[str]:
        """Why this case has no (complete) result, in the words the node uses for the planner."""
        out = []
        if self.case.state == CaseState.FAILED and self.case.reason:
            out.append(self.case.reason)
        if self.job is not None and self.job.state == JobState.FAILED and self.job.error and self.job.error not in out:
            out.append(self.job.error)
        for d in self.deliveries:
            if d.state == DeliveryState.DEAD:
                out.append(
                    f"delivery to {d.destination} ({d.output}) gave up after {d.attempts} attempts: {d.last_error}"
                )
        return out

    @property
    def timings(self) -> dict[str, str]:
        c, j = self.case, self.job
        ready = _secs(c.ready_at - c.created_at) if c.ready_at else "-"
        delivered = self.delivered_at
        return {
            "received": _when(c.created_at),
            "ready": ready if c.ready_at is None else f"+{ready}",
            "inference": _secs(j.inference_seconds) if j is not None else "-",
            "delivered": f"+{_secs(delivered - c.ready_at)}" if delivered and c.ready_at else "-",
        }


def _line(cfg: NodeConfig, db: Database, row) -> CaseLine:
    case = CaseRow.from_row(row, db.data_dir)
    job_row = db.one("SELECT * FROM jobs WHERE case_id = ?", (case.id,))
    job = JobRow.from_row(job_row, db.data_dir) if job_row is not None else None
    deliveries = deliveries_of(db, job.id) if job is not None else []
    identity = patient_identity(case) if cfg.web.show_patient_identity else None
    return CaseLine(case, job, deliveries, identity)


def cases(cfg: NodeConfig, db: Database, state: str | None, before: int | None) -> dict[str, Any]:
    limit = cfg.web.cases_per_page
    sql, params = "SELECT * FROM cases", []
    where = []
    if state:
        where.append("state = ?")
        params.append(state)
    if before:
        where.append("id < ?")
        params.append(before)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    rows = db.query(sql, (*params, limit + 1))
    lines = [_line(cfg, db, r) for r in rows[:limit]]
    return {
        "lines": lines,
        "state": state,
        "states": CASE_STATES,
        "older": lines[-1].case.id if len(rows) > limit else None,
        "show_identity": cfg.web.show_patient_identity,
    }


def case_page(cfg: NodeConfig, db: Database, case_id: int) -> dict[str, Any] | None:
    case = get_case(db, case_id)
    if case is None:
        return None
    line = _line(cfg, db, db.one("SELECT * FROM cases WHERE id = ?", (case_id,)))
    job = line.job
    detail = (job.detail if job is not None else None) or {}
    images = db.one(
        """SELECT min(i.received_at) AS first, max(i.received_at) AS last FROM case_images ci
           JOIN instances i ON i.sop_instance_uid = ci.sop_instance_uid WHERE ci.case_id = ?""",
        (case_id,),
    )
    targets = []
    qa = detail.get("qa", [])
    for t in detail.get("targets", []):
        scores = t.get("slice_scores", {})
        areas = t.get("slice_areas_mm2", {})
        positions = t.get("slice_positions_mm", {})
        prompted = set(t.get("prompted_slices", []))
        slices = sorted({int(k) for k in scores} | {int(k) for k in areas})
        targets.append(
            {
                "roi": t.get("roi"),
                "slices": t.get("slices"),
                "seconds": t.get("seconds"),
                "stop_reasons": {k: one_based(v) for k, v in t.get("stop_reasons", {}).items()},
                "prompted": sorted(prompted),
                "rows": [
                    {
                        "k": k,
                        "score": scores.get(str(k)),
                        "area": areas.get(str(k)),
                        "position": positions.get(str(k)),
                        "prompted": k in prompted,
                    }
                    for k in slices
                ],
                "pictures": [q for q in qa if q.get("roi") == t.get("roi")],
            }
        )
    return {
        "line": line,
        "case": case,
        "job": job,
        "detail": detail,
        "targets": targets,
        "first_image": _when(images["first"]) if images and images["first"] else "-",
        "last_image": _when(images["last"]) if images and images["last"] else "-",
        "when": _when,
        "secs": _secs,
        "show_identity": cfg.web.show_patient_identity,
    }


def qa_file(db: Database, case_id: int, name: str) -> Path | None:
    """The QA picture ``name`` of the case's result, if the result lists it (no other file)."""
    job_row = db.one("SELECT * FROM jobs WHERE case_id = ?", (case_id,))
    if job_row is None:
        return None
    job = JobRow.from_row(job_row, db.data_dir)
    for q in (job.detail or {}).get("qa", []):
        if Path(q.get("file", "")).name == name and job.result_path is not None:
            path = job.result_path.parent / "qa" / name
            return path if path.is_file() else None
    return None
