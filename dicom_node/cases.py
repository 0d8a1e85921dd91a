"""Case assembly: a prompt RTSTRUCT plus the image series it refers to.

The assembler runs in a thread of the receiving process. It reads the arrival log that
:class:`~dicom_node.store.Store` appends to (so nothing is missed across restarts: the
cursor is in the database), creates a case for every prompt-bearing RTSTRUCT and decides
when each waiting case is ready:

* **references** (the normal way): every image the RTSTRUCT references is stored, and the
  association that brought the last of these pieces (RTSTRUCT included) has been released
  (or ``cases.settle_seconds`` have passed since that piece, for peers that keep an
  association open). There is no fixed quiet time: a case completed by one association is
  ready the moment that association is released. The case's images are exactly the
  referenced ones (of the series most of them belong to), never other instances that
  share the SeriesInstanceUID: a localizer or a damaged re-sent slice with the CT's series
  UID does not spoil a case whose references are good.
* **fallback** when the per-image references are stale (none of them is stored): the
  images of the referenced series, or else of the RTSTRUCT's frame of reference, once the
  association that brought the last of them is released and
  ``cases.stale_reference_wait_seconds`` have passed without more of them arriving. The
  case takes them all; the worker keeps their largest geometrically consistent set
  (:mod:`rtstruct.selection`) and logs and audits what it left out.

Images may come before or after the RTSTRUCT, in one association or several, interleaved
with other patients. A case whose pieces stop arriving fails after
``cases.incomplete_timeout_seconds`` with a reason such as
"12 of 134 referenced images missing". An RTSTRUCT re-sent with changed content (the
planner's refinement) makes a new case; re-sent unchanged while its case is in progress or
done, it is ignored (no duplicate result).

A ready case gets its image list frozen, the rules decide what to do with it, and a job is
queued in the same transaction (:mod:`dicom_node.jobs`).

States: :class:`~dicom_node.states.CaseState` (``waiting -> queued -> done | failed``);
the images were chosen as :class:`~dicom_node.states.CaseMode` says. The prompt copy is
recorded relative to ``data_dir`` (:func:`dicom_node.rows.index_path`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.durable import publish
from dicom_node.failures import record_failure
from dicom_node.logs import event, get_logger
from dicom_node.metrics import metrics
from dicom_node.rows import CaseRow, index_path
from dicom_node.states import ACTIVE_CASE_STATES, CaseMode, CaseState, NotificationKind
from dicom_node.store import Store
from dicom_node.uids import is_valid_uid
from rtstruct.headers import IMAGE_MODALITIES

__all__ = ["CaseAssembler", "Routing"]

_SUPERSEDED = "superseded by a changed version of the same RTSTRUCT"

log = get_logger(__name__)

_IMAGE_SQL = "(" + ",".join(f"'{m}'" for m in IMAGE_MODALITIES) + ")"


@dataclass
class Routing:
    """What the rules decided for a ready case (``action`` None: not processed)."""

    rule: str | None
    action: dict | None
    explanation: list[str]


#: decide(case, image_paths, prompt_path) -> Routing
Decider = Callable[[CaseRow, list[Path], Path], Routing]


class CaseAssembler:
    def __init__(
        self,
        cfg: NodeConfig,
        db: Database,
        store: Store,
        audit: AuditLog,
        decide: Decider,
        is_open: Callable[[str | None], bool],
        on_queued: Callable[[int], None] | None = None,
        closed_at: Callable[[str | None], float | None] | None = None,
        on_failed: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.store = store
        self.audit = audit
        self.decide = decide
        self.is_open = is_open
        self.on_queued = on_queued
        self.closed_at = closed_at  # when an association was released (the metric release -> ready)
        self.on_failed = on_failed  # a failure was recorded (wakes the failure webhook)
        self.prompts_dir = cfg.prompts_dir
        self.prompts_dir.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tick_seconds = 0.5

    # -- thread --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="case-assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self, *_args) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.step()
            except Exception:
                log.exception("case assembler step failed (will retry)")
                time.sleep(1.0)

    def step(self, now: float | None = None) -> None:
        """Process new arrivals, then re-evaluate every waiting case (public for tests)."""
        self.process_arrivals()
        self.evaluate_waiting(now)

    # -- arrivals ------------------------------------------------------------------------
    def process_arrivals(self) -> int:
        cursor = int(self.db.get_meta("assembler_cursor", "0") or 0)
        rows = self.db.query(
            "SELECT seq, sop_instance_uid, modality FROM arrivals WHERE seq > ? ORDER BY seq LIMIT 5000", (cursor,)
        )
        for row in rows:
            if row["modality"] == "RTSTRUCT":
                try:
                    self._handle_rtstruct(row["sop_instance_uid"])
                except Exception:
                    log.exception("cannot assemble a case from RTSTRUCT %s", row["sop_instance_uid"])
            cursor = row["seq"]
        if rows:
            with self.db.tx() as c:
                # never backwards: several assemblers (receivers) may share the database
                stored = c.execute("SELECT value FROM meta WHERE key = 'assembler_cursor'").fetchone()
                if stored is None or int(stored["value"] or 0) < cursor:
                    self.db.set_meta("assembler_cursor", cursor, c)
        return len(rows)

    def _handle_rtstruct(self, uid: str) -> None:
        from rtstruct.prompts import find_prompt_rois
        from rtstruct.reader import RTStructError, read_rtstruct

        inst = self.db.one("SELECT * FROM instances WHERE sop_instance_uid = ?", (uid,))
        if inst is None:  # deleted since (retention)
            return
        path = self.store.abspath(inst["path"])
        try:
            ss = read_rtstruct(path)
        except (RTStructError, OSError, ValueError) as exc:
            event(log, "rtstruct_unreadable", level=logging.WARNING, sop=uid, why=str(exc))
            return
        except Exception as exc:  # pydicom errors of all kinds on broken files
            event(log, "rtstruct_unreadable", level=logging.WARNING, sop=uid, why=f"{type(exc).__name__}: {exc}")
            return
        prompts = find_prompt_rois(ss)
        if not prompts:
            event(log, "rtstruct_without_prompts", sop=uid, rois=len(ss.rois))
            return
        digest = inst["sha256"]
        previous = self.db.query(
            "SELECT id, state, rtstruct_sha256 FROM cases WHERE rtstruct_uid = ? ORDER BY id", (uid,)
        )
        for prev in previous:
            if prev["rtstruct_sha256"] == digest and prev["state"] in (*ACTIVE_CASE_STATES, CaseState.DONE):
                event(
                    log,
                    "prompt_resent_unchanged",
                    sop=uid,
                    case=prev["id"],
                    state=prev["state"],
                    note="ignored; change the RTSTRUCT or use 'dicom-node jobs retry' to run it again",
                )
                return
        refs = [u for u in ss.referenced_image_uids if is_valid_uid(u)]
        dropped = len(ss.referenced_image_uids) - len(refs)
        series = [u for u in ss.referenced_series_uids if is_valid_uid(u)]
        frames = [u for u in ss.frame_of_reference_uids if is_valid_uid(u)]
        if dropped:
            event(log, "rtstruct_bad_references", level=logging.WARNING, sop=uid, invalid=dropped)
        prompt_path = self._freeze_prompt(path, digest)
        now = time.time()
        with self.db.tx() as c:
            # again, inside the (serialised) transaction: another receiver of a deployment that
            # shares one database may have made the case from this RTSTRUCT in the meantime
            previous = c.execute(
                "SELECT id, state, rtstruct_sha256 FROM cases WHERE rtstruct_uid = ? ORDER BY id", (uid,)
            ).fetchall()
            if any(
                p["rtstruct_sha256"] == digest and p["state"] in (*ACTIVE_CASE_STATES, CaseState.DONE) for p in previous
            ):
                return
            for prev in previous:
                if prev["state"] == CaseState.WAITING and prev["rtstruct_sha256"] != digest:
                    self._set_failed(c, prev["id"], _SUPERSEDED, now)
            cur = c.execute(
                """INSERT INTO cases (state, rtstruct_uid, rtstruct_sha256, prompt_path, study_uid, patient_ref,
                       ref_series_uids, frame_of_reference_uid, n_refs, source, calling_aet, called_aet,
                       created_at, last_progress_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    CaseState.WAITING,
                    uid,
                    digest,
                    index_path(prompt_path, self.db.data_dir),
                    inst["study_uid"],
                    inst["patient_ref"],
                    json.dumps(series),
                    frames[0] if frames else None,
                    len(refs),
                    inst["source"],
                    inst["calling_aet"],
                    inst["called_aet"],
                    now,
                    now,
                ),
            )
            case_id = cur.lastrowid
            c.executemany(
                "INSERT OR IGNORE INTO case_refs (case_id, sop_instance_uid) VALUES (?, ?)",
                [(case_id, u) for u in refs],
            )
        for prev in previous:
            if prev["state"] == CaseState.WAITING and prev["rtstruct_sha256"] != digest:
                event(log, "case_failed", level=logging.WARNING, case=prev["id"], reason=_SUPERSEDED, by_case=case_id)
                self.audit.write("case_failed", case=prev["id"], reason=_SUPERSEDED, by_case=case_id)
        event(
            log,
            "case_created",
            case=case_id,
            rtstruct=uid,
            refs=len(refs),
            series=len(series),
            prompts=",".join(r.name for r in prompts),
            patient=inst["patient_ref"],
            source=inst["source"],
        )
        self.audit.write(
            "case_created",
            case=case_id,
            rtstruct=uid,
            refs=len(refs),
            patient=inst["patient_ref"],
            received=inst["received_at"],
            source=inst["source"],
            calling_aet=inst["calling_aet"],
        )

    def _freeze_prompt(self, path: Path, digest: str) -> Path:
        """A content-addressed hard link (or copy) of the prompt RTSTRUCT for the case."""
        target = self.prompts_dir / f"{digest}.dcm"
        if target.exists():
            return target
        tmp = self.prompts_dir / f".{digest}.{threading.get_ident()}.tmp"
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        publish(tmp, target)
        return target

    # -- readiness -----------------------------------------------------------------------
    def evaluate_waiting(self, now: float | None = None) -> None:
        for row in self.db.query("SELECT * FROM cases WHERE state = ? ORDER BY id", (CaseState.WAITING,)):
            try:
                self._evaluate(CaseRow.from_row(row, self.db.data_dir), now if now is not None else time.time())
            except Exception:
                log.exception("cannot evaluate case %s", row["id"])

    def _images_of_series(self, series_uid: str) -> list:
        return self.db.query(
            f"SELECT sop_instance_uid, path, received_at, assoc_id FROM instances "
            f"WHERE series_uid = ? AND modality IN {_IMAGE_SQL}",
            (series_uid,),
        )

    def _evaluate(self, case: CaseRow, now: float) -> None:
        cid = case.id
        rt = self.db.one("SELECT received_at, assoc_id FROM instances WHERE sop_instance_uid = ?", (case.rtstruct_uid,))
        rt_piece = (rt["received_at"], rt["assoc_id"]) if rt else (case.created_at, None)
        present = self.db.query(
            f"""SELECT i.sop_instance_uid, i.series_uid, i.path, i.received_at, i.assoc_id
                FROM case_refs r JOIN instances i ON i.sop_instance_uid = r.sop_instance_uid
                WHERE r.case_id = ? AND i.modality IN {_IMAGE_SQL}""",
            (cid,),
        )
        n_refs = case.n_refs
        mode: CaseMode | None = None
        images: list = []
        pieces = [rt_piece]
        wait_for_quiet = self.cfg.cases.settle_seconds
        if n_refs and len(present) == n_refs:
            mode = CaseMode.REFERENCES
            series_uid = Counter(r["series_uid"] for r in present).most_common(1)[0][0]
            # exactly the referenced images (of that series): strays that share the
            # SeriesInstanceUID (a localizer, a damaged re-sent slice) are not the case's
            images = [r for r in present if r["series_uid"] == series_uid]
            pieces += [(r["received_at"], r["assoc_id"]) for r in present]
        elif not present:
            series_uid, mode = self._fallback_series(case)
            if series_uid is not None:
                images = self._images_of_series(series_uid)
                pieces += [(r["received_at"], r["assoc_id"]) for r in images]
                wait_for_quiet = self.cfg.cases.stale_reference_wait_seconds
        else:
            pieces += [(r["received_at"], r["assoc_id"]) for r in present]

        last_time, last_assoc = max(pieces, key=lambda p: p[0])
        progress = max(case.last_progress_at, last_time)
        if progress > case.last_progress_at:
            self.db.execute(
                "UPDATE cases SET last_progress_at = ? WHERE id = ? AND state = ?", (progress, cid, CaseState.WAITING)
            )

        if mode is not None and images:
            released = not self.is_open(last_assoc)
            if mode == CaseMode.REFERENCES:
                ready = released or now - last_time >= self.cfg.cases.settle_seconds
            else:  # fallback: the last association over *and* a quiet time
                ready = released and now - last_time >= wait_for_quiet
            if ready:
                released_at = self.closed_at(last_assoc) if released and self.closed_at is not None else None
                self._make_ready(case, mode, series_uid, images, now, last_time)
                metrics().release_to_ready.observe(max(0.0, now - max(last_time, released_at or 0.0)))
                return
        if now - progress >= self.cfg.cases.incomplete_timeout_seconds:
            if n_refs:
                missing = n_refs - len(present)
                if present:
                    reason = f"{missing} of {n_refs} referenced images missing"
                else:
                    reason = f"{missing} of {n_refs} referenced images missing (none of them arrived)"
            else:
                reason = "the RTSTRUCT references no images and no images of its series or frame of reference arrived"
            reason += f" after {self.cfg.cases.incomplete_timeout_seconds:g} s"
            self._fail(cid, reason, now)

    def _fallback_series(self, case: CaseRow) -> tuple[str | None, CaseMode | None]:
        for series_uid in case.ref_series_uids:
            if self._images_of_series(series_uid):
                return series_uid, CaseMode.SERIES_FALLBACK
        if case.frame_of_reference_uid:
            rows = self.db.query(
                f"""SELECT series_uid, count(*) AS n, max(received_at) AS last FROM instances
                    WHERE frame_of_reference_uid = ? AND modality IN {_IMAGE_SQL}
                    GROUP BY series_uid ORDER BY n DESC, last DESC""",
                (case.frame_of_reference_uid,),
            )
            if rows:
                return rows[0]["series_uid"], CaseMode.FRAME_OF_REFERENCE_FALLBACK
        return None, None

    @staticmethod
    def _set_failed(c, cid: int, reason: str, now: float) -> int:
        """A waiting case fails (inside the caller's transaction); 1 if it was waiting."""
        return c.execute(
            "UPDATE cases SET state=?, reason=?, finished_at=? WHERE id=? AND state=?",
            (CaseState.FAILED, reason, now, cid, CaseState.WAITING),
        ).rowcount

    def _fail(self, cid: int, reason: str, now: float) -> None:
        with self.db.tx() as c:
            changed = self._set_failed(c, cid, reason, now)
            if changed:
                record_failure(c, NotificationKind.CASE_FAILED, reason, case_id=cid, now=now)
        if changed and self.on_failed is not None:
            self.on_failed()
        if changed:
            event(log, "case_failed", level=logging.WARNING, case=cid, reason=reason)
            self.audit.write("case_failed", case=cid, reason=reason)

    def _make_ready(
        self, case: CaseRow, mode: CaseMode, series_uid: str, images: list, now: float, last_time: float
    ) -> None:
        cid = case.id
        image_paths = [self.store.abspath(r["path"]) for r in images]
        try:
            decision = self.decide(case, image_paths, case.prompt_path)
        except Exception as exc:
            log.exception("rules evaluation failed for case %s", cid)
            decision = Routing(None, None, [f"rules evaluation failed: {type(exc).__name__}: {exc}"])
        with self.db.tx() as c:
            changed = c.execute(
                """UPDATE cases SET state=?, mode=?, image_series_uid=?, n_images=?, ready_at=?
                   WHERE id=? AND state=?""",
                (
                    CaseState.QUEUED if decision.action is not None else CaseState.FAILED,
                    mode,
                    series_uid,
                    len(images),
                    now,
                    cid,
                    CaseState.WAITING,
                ),
            ).rowcount
            if not changed:
                return
            c.executemany(
                "INSERT OR IGNORE INTO case_images (case_id, sop_instance_uid) VALUES (?, ?)",
                [(cid, r["sop_instance_uid"]) for r in images],
            )
            reason = None
            if decision.action is None:
                reason = decision.explanation[-1] if decision.explanation else "no rule matched"
                c.execute("UPDATE cases SET reason=?, finished_at=? WHERE id=?", (reason, now, cid))
                record_failure(c, NotificationKind.CASE_FAILED, reason, case_id=cid, now=now)
            else:
                from dicom_node.jobs import create_job

                job_id = create_job(c, cid, decision.rule, decision.action, decision.explanation, now)
                self.db.notify("jobs")  # workers of every host (PostgreSQL LISTEN); at commit
        received = [r["received_at"] for r in images]
        self.audit.write(
            "case_ready",
            case=cid,
            mode=mode,
            images=len(images),
            series=series_uid,
            first_image_received=round(min(received), 4),
            last_image_received=round(max(received), 4),
            last_piece=round(last_time, 4),
            waited=round(now - last_time, 4),
        )
        if decision.action is None:
            # The same reason in the log, the audit and the case row.
            event(
                log,
                "case_not_processed",
                level=logging.WARNING,
                case=cid,
                reason=reason,
                why=" | ".join(decision.explanation),
            )
            self.audit.write("case_failed", case=cid, reason=reason)
            if self.on_failed is not None:
                self.on_failed()
            return
        event(
            log,
            "case_ready",
            case=cid,
            job=job_id,
            mode=mode,
            images=len(images),
            rule=decision.rule,
            waited_after_last_piece=f"{now - last_time:.3f}s",
        )
        self.audit.write("job_queued", case=cid, job=job_id, rule=decision.rule)
        if self.on_queued is not None:
            self.on_queued(job_id)
