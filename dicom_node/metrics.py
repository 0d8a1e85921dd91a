"""Prometheus metrics (prometheus-client), all named ``stardust_*``, served at ``/metrics``.

Two kinds of numbers, from two sources:

* **Events** (counters and histograms) are counted by the process that sees them: the
  receiving process (associations, instances, bytes, release-to-ready, deliveries,
  retries, dead letters, worker restarts, webhook posts) and each inference worker
  (inference seconds, seconds per slice, job outcomes). They use prometheus-client's
  *multiprocess mode*: :func:`use_directory` (called by the node before anything is
  counted) points ``PROMETHEUS_MULTIPROC_DIR`` at ``<data_dir>/run/metrics``, emptied at
  every start; the workers inherit it, each process writes its own memory-mapped files
  there, and the receiving process adds them all up when it is scraped. So the numbers of
  a worker survive its restart (its files stay until the node restarts), and one
  endpoint shows the whole node. Counters start again from zero when the node restarts,
  which Prometheus' ``rate()`` and ``increase()`` expect.
* **State** (gauges) is read when scraped (:class:`StateCollector`): cases, jobs and
  deliveries by state from the database, free space against the floor, whether the DICOM
  listener is up and which workers are alive. The database is the truth about state
  (other processes, ``dicom-node resend`` among them, change it), so these gauges are
  right after any restart and need no bookkeeping.

Labels are small fixed vocabularies (outcomes, statuses, modalities, engines, outputs,
worker numbers): never a patient, study or UID.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from dicom_node.config import NodeConfig
    from dicom_node.db import Database

__all__ = ["metrics", "use_directory", "multiprocess_directory", "StateCollector", "exposition", "CONTENT_TYPE"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: the text exposition format's content type
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_INFERENCE_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_PER_SLICE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
_READY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


def use_directory(path: Path) -> Path:
    """Count in multiprocess mode, in ``path`` (emptied first); child processes inherit it.

    Must run before this process creates its first metric: prometheus-client decides how
    values are stored when it is first imported.
    """
    if "prometheus_client" in sys.modules:
        from prometheus_client import values

        if not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError("prometheus_client was imported before the metrics directory was set")
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def multiprocess_directory() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


class Metrics:
    """The node's counters and histograms (one set per process: :func:`metrics`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.associations = Counter(
            "stardust_associations",
            "DICOM associations by outcome (released, aborted, closed, rejected) and reason of a rejection",
            ["outcome", "reason"],
        )
        self.connections_dropped = Counter(
            "stardust_connections_dropped", "Inbound connections that misbehaved (one WARNING each), by kind", ["kind"]
        )
        self.instances_received = Counter(
            "stardust_instances_received", "Instances stored and answered Success, by modality", ["modality"]
        )
        self.instances_refused = Counter(
            "stardust_instances_refused", "Instances refused, by DICOM status (0xA700 out of space, ...)", ["status"]
        )
        self.bytes_received = Counter("stardust_received_bytes", "Bytes of instances stored")
        self.release_to_ready = Histogram(
            "stardust_release_to_ready_seconds",
            "Seconds from the release of the association that completed a case (or its last piece) to the case ready",
            buckets=_READY_BUCKETS,
        )
        self.inference = Histogram(
            "stardust_inference_seconds",
            "Seconds a worker took for a job (load, segment, write the outputs), by engine",
            ["engine"],
            buckets=_INFERENCE_BUCKETS,
        )
        self.seconds_per_slice = Histogram(
            "stardust_inference_seconds_per_slice",
            "Segmentation seconds per segmented slice, by engine",
            ["engine"],
            buckets=_PER_SLICE_BUCKETS,
        )
        self.jobs = Counter(
            "stardust_jobs_finished", "Jobs a worker finished, by outcome (done, failed, retry)", ["outcome"]
        )
        self.deliveries = Counter(
            "stardust_deliveries",
            "Delivery attempts by output (rtstruct, seg, overlay) and outcome (sent, failed)",
            ["output", "outcome"],
        )
        self.retries = Counter(
            "stardust_delivery_retries", "Failed delivery attempts that were scheduled again, by output", ["output"]
        )
        self.dead_letters = Counter(
            "stardust_dead_letters", "Deliveries dead-lettered after send.max_attempts, by output", ["output"]
        )
        self.worker_restarts = Counter(
            "stardust_worker_restarts", "Inference workers that died and were started again, by worker", ["worker"]
        )
        self.webhook_posts = Counter(
            "stardust_webhook_posts", "Failure webhook POSTs by outcome (sent, failed, dead)", ["outcome"]
        )


_metrics: Metrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> Metrics:
    """This process's :class:`Metrics` (created on first use, once: the first associations
    of a node call this from several threads at once, and a second :class:`Metrics` would
    register its series twice and fail their C-STORE)."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


class StateCollector:
    """Gauges read at scrape time from the database, the disk and the running node.

    ``listening()`` says whether the DICOM listener is up; ``workers()`` gives
    ``(index, device, alive)`` per worker. Both are None outside the node.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        db: Database,
        listening: Callable[[], bool] | None = None,
        workers: Callable[[], list[tuple[int, str, bool]]] | None = None,
    ) -> None:
        self.cfg, self.db, self.listening, self.workers = cfg, db, listening, workers

    def describe(self) -> list:
        return []  # not checked at registration: collect() reads the database

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        from dicom_node import __version__
        from dicom_node.states import CaseState, DeliveryState, JobState

        info = InfoMetricFamily("stardust_node", "The node's version and AE title")
        info.add_metric([], {"version": __version__, "ae_title": self.cfg.ae_title})
        yield info
        for name, table, states, what in (
            ("stardust_cases", "cases", CaseState, "Cases by state"),
            ("stardust_jobs", "jobs", JobState, "Jobs by state (pending: the queue depth)"),
            ("stardust_deliveries_by_state", "sends", DeliveryState, "Deliveries by state (dead: dead letters)"),
        ):
            counts = {
                r["state"]: r["n"] for r in self.db.query(f"SELECT state, count(*) AS n FROM {table} GROUP BY state")
            }
            family = GaugeMetricFamily(name, what, labels=["state"])
            for state in states:
                family.add_metric([str(state)], counts.get(state, 0))
            yield family
        try:
            usage = shutil.disk_usage(self.cfg.data_dir)
        except OSError:
            usage = None
        if usage is not None:
            yield GaugeMetricFamily("stardust_disk_free_bytes", "Free space in data_dir", value=usage.free)
        yield GaugeMetricFamily(
            "stardust_disk_floor_bytes",
            "storage.min_free_mb: below this free space new images are refused (0xA700)",
            value=self.cfg.storage.min_free_mb * 2**20,
        )
        if self.listening is not None:
            yield GaugeMetricFamily(
                "stardust_scp_listening", "1 while the DICOM listener accepts associations", value=int(self.listening())
            )
        if self.workers is not None:
            up = GaugeMetricFamily(
                "stardust_worker_up", "1 while the inference worker runs", labels=["worker", "device"]
            )
            for index, device, alive in self.workers():
                up.add_metric([str(index), device], int(alive))
            yield up


class _ThisProcess:
    """The counters of this process only (outside multiprocess mode: tests, one-shot tools)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY

        for family in REGISTRY.collect():
            if family.name.startswith("stardust_"):
                yield family


def exposition(state: StateCollector | None = None) -> bytes:
    """The text exposition of every process's counters plus the state gauges."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    metrics()  # this process's families exist even before anything was counted
    registry = CollectorRegistry(auto_describe=False)
    directory = multiprocess_directory()
    if directory is not None:
        MultiProcessCollector(registry, path=str(directory))
    else:
        registry.register(_ThisProcess())
    if state is not None:
        registry.register(state)
    return generate_latest(registry)


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters stay in the sums)."""
    directory = multiprocess_directory()
    if directory is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(directory))
