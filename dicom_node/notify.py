"""The optional failure webhook: each recorded failure (:mod:`dicom_node.failures`) POSTed once.

When ``webhook.url`` is set, the :class:`Notifier` in the receiving process POSTs each
``notifications`` row once as JSON::

    {"event": "delivery_dead", "id": 12, "node": "STARDUST", "case": 7, "job": 7,
     "rule": "lung-ct", "destination": "tps", "output": "rtstruct",
     "reason": "cannot connect to TPS_IMPORT@10.1.2.10:104 (...)", "time": "2026-12-01T10:00:00+01:00"}

with no patient name, ID or UID in it. A POST that fails (no connection, timeout, an
answer other than 2xx) is retried after ``backoff_initial_seconds``, doubled after each
failure up to ``backoff_max_seconds``; after ``webhook.max_attempts`` the row is ``dead``.
A row is ``sending`` during the POST and ``sent`` after the 2xx answer, so a restart
never reports a failure twice unless the node died in the middle of a POST; ``id`` lets
the receiver recognise such a repeat. Without a webhook, rows are marked ``unsent`` and
only shown.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from datetime import datetime, timedelta

from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.jobs import backoff_seconds
from dicom_node.logs import event, get_logger
from dicom_node.metrics import metrics
from dicom_node.rows import NotificationRow
from dicom_node.states import NotificationState

__all__ = ["Notifier", "payload"]

log = get_logger(__name__)


def payload(row: NotificationRow, node: str) -> dict:
    """The JSON body of the webhook for one failure (no PHI: numbers, names from the configuration, the reason)."""
    return {
        "event": str(row.kind),
        "id": row.id,
        "node": node,
        "case": row.case_id,
        "job": row.job_id,
        "rule": row.rule,
        "destination": row.destination,
        "output": row.output,
        "reason": row.reason,
        "time": datetime.fromtimestamp(row.created_at).astimezone().isoformat(timespec="seconds"),
    }


class Notifier:
    """Posts pending ``notifications`` rows to ``webhook.url`` (in the receiving process)."""

    def __init__(self, cfg: NodeConfig, db: Database, scheduler) -> None:
        self.cfg = cfg
        self.db = db
        self.scheduler = scheduler
        self._lock = threading.Lock()
        self._stopped = False
        self._client = None

    def start(self) -> None:
        # a POST interrupted by a stop or crash is due again (on a database shared by several
        # nodes, PostgreSQL, by its lease instead: another node may be posting it now)
        if not self.db.is_postgresql:
            with self.db.tx() as c:
                c.execute(
                    "UPDATE notifications SET state=?, next_attempt_at=? WHERE state=?",
                    (NotificationState.PENDING, time.time(), NotificationState.SENDING),
                )
        self.scheduler.add_job(
            self.pump,
            "interval",
            seconds=1.0,
            id="notifier-poll",
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )

    def stop(self) -> None:
        self._stopped = True
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def wake(self, *_args) -> None:
        if not self._stopped:
            threading.Thread(target=self.pump, name="notify-wake", daemon=True).start()

    def _http(self):
        import httpx

        if self._client is None:
            hook = self.cfg.webhook
            verify: ssl.SSLContext | bool = True
            if hook.ca_file is not None:
                verify = ssl.create_default_context(cafile=str(hook.ca_file))
            self._client = httpx.Client(timeout=hook.timeout_seconds, verify=verify, follow_redirects=False)
        return self._client

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "stardust-dicom-node"}
        env = self.cfg.webhook.token_env
        if env:
            token = os.environ.get(env)
            if token:
                headers["Authorization"] = f"Bearer {token}"
        return headers

    def pump(self) -> int:
        """Post every due row once; returns how many were posted successfully."""
        if self._stopped:
            return 0
        hook = self.cfg.webhook
        now = time.time()
        if hook.url is None:
            with self.db.tx() as c:
                c.execute(
                    "UPDATE notifications SET state=? WHERE state=?",
                    (NotificationState.UNSENT, NotificationState.PENDING),
                )
            return 0
        sent = 0
        with self._lock:
            rows = self.db.query(
                "SELECT * FROM notifications WHERE state=? AND next_attempt_at <= ? ORDER BY id LIMIT 50",
                (NotificationState.PENDING, now),
            )
            for raw in rows:
                if self._stopped:
                    break
                with self.db.tx(serial=False) as c:
                    if self.db.is_postgresql:  # several nodes: skip a row another node is taking
                        free = c.execute(
                            "SELECT id FROM notifications WHERE id=? AND state=?" + self.db.lock_rows,
                            (raw["id"], NotificationState.PENDING),
                        ).fetchone()
                        claimed = 0
                        if free is not None:
                            claimed = c.execute(
                                "UPDATE notifications SET state=?, attempts=attempts+1, next_attempt_at=? WHERE id=?",
                                (NotificationState.SENDING, now + self.cfg.database.delivery_lease_seconds, raw["id"]),
                            ).rowcount
                    else:
                        claimed = c.execute(
                            "UPDATE notifications SET state=?, attempts=attempts+1 WHERE id=? AND state=?",
                            (NotificationState.SENDING, raw["id"], NotificationState.PENDING),
                        ).rowcount
                if claimed:
                    row = NotificationRow.from_row(self.db.one("SELECT * FROM notifications WHERE id=?", (raw["id"],)))
                    sent += self._post(row)
        return sent

    def _post(self, row: NotificationRow) -> int:
        hook = self.cfg.webhook
        body = json.dumps(payload(row, self.cfg.ae_title)).encode("utf-8")
        try:
            answer = self._http().post(str(hook.url), content=body, headers=self._headers())
            if not 200 <= answer.status_code < 300:
                raise OSError(f"the webhook answered HTTP {answer.status_code}")
        except Exception as exc:  # httpx errors, OSError: retried
            reason = str(exc) or type(exc).__name__
            self._failed(row, reason)
            return 0
        with self.db.tx() as c:
            c.execute(
                "UPDATE notifications SET state=?, sent_at=?, last_error=NULL WHERE id=?",
                (NotificationState.SENT, time.time(), row.id),
            )
        metrics().webhook_posts.labels("sent").inc()
        event(log, "webhook_sent", notification=row.id, kind=row.kind, case=row.case_id, attempt=row.attempts)
        return 1

    def _failed(self, row: NotificationRow, reason: str) -> None:
        hook = self.cfg.webhook
        if row.attempts >= hook.max_attempts:
            with self.db.tx() as c:
                c.execute(
                    "UPDATE notifications SET state=?, last_error=? WHERE id=?",
                    (NotificationState.DEAD, reason, row.id),
                )
            metrics().webhook_posts.labels("dead").inc()
            event(
                log,
                "webhook_gave_up",
                level=logging.ERROR,
                notification=row.id,
                kind=row.kind,
                case=row.case_id,
                attempts=row.attempts,
                reason=reason,
            )
            return
        delay = backoff_seconds(row.attempts, hook.backoff_initial_seconds, hook.backoff_max_seconds)
        with self.db.tx() as c:
            c.execute(
                "UPDATE notifications SET state=?, last_error=?, next_attempt_at=? WHERE id=?",
                (NotificationState.PENDING, reason, time.time() + delay, row.id),
            )
        metrics().webhook_posts.labels("failed").inc()
        event(
            log,
            "webhook_retry",
            level=logging.WARNING,
            notification=row.id,
            attempt=row.attempts,
            reason=reason,
            retry_in=f"{delay:g}s",
        )
        if not self._stopped:
            try:
                self.scheduler.add_job(
                    self.pump, "date", run_date=datetime.now() + timedelta(seconds=delay), misfire_grace_time=None
                )
            except Exception:  # the scheduler stopped: the interval poll or a restart picks it up
                pass
