"""Inference workers: separate processes that take jobs from the queue, and their supervisor.

A worker (``python -m dicom_node.worker``) is a long-lived process per device (one per
GPU, or one on the CPU). It keeps engines loaded between jobs
(:func:`inference.engine.get_engine` caches them per process), claims a job with a lease,
renews the lease while it works, writes the result RTSTRUCT, its QA pictures and the
rule's other outputs atomically under ``<data_dir>/results/<job>/``
(:mod:`dicom_node.outputs`) and completes the job, which creates the delivery rows. It
never talks DICOM: the receiving process sends results. It counts its jobs in the node's
metrics (:mod:`dicom_node.metrics`) and describes itself (device, engines loaded, current
job) in ``<data_dir>/run/worker-<tag>-<index>.json`` for the health page.

The receiving process runs a :class:`WorkerSupervisor`. A worker's crash (CUDA error,
out of memory, ``kill -9``) therefore cannot stop reception: the supervisor notices the
exit, hands the dead worker's job back to the queue (or fails it after
``jobs.max_attempts``) and starts a new worker after a backoff. Workers die with the
receiving process (``PR_SET_PDEATHSIG``), so no orphan keeps a lease.

The supervisor wakes idle workers by writing a byte to their stdin; a worker reports a
finished job with a line ``done <job>`` on its stdout, which wakes the sender at once.
Logs go to stderr (inherited).

Roles: ``dicom-node serve`` runs a supervisor for its local workers (none with
``workers.devices: []``); ``dicom-node worker`` (:mod:`dicom_node.commands.worker`) runs
a supervisor and its workers only, against the same database (GPU hosts). Lease owners
are ``<host>:worker<index>.<tag>:<pid>`` where the tag names the supervising process
(:func:`supervisor_tag`), so no supervisor mistakes another process's worker for its own;
each supervisor hands back the jobs of *other* processes' workers whose lease expired.
A job finished in another process reaches the sender of ``serve`` through its poll of
the deliveries (every second); a job queued by ``serve`` reaches the workers of another
process through :func:`queue_wakeups` and their own poll (``workers.poll_seconds``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.db import Database, open_database
from dicom_node.jobs import (
    claim_job,
    complete_job,
    fail_job,
    has_pending_jobs,
    owner_name,
    release_owner,
    renew_lease,
    running_owners,
)
from dicom_node.logs import event, get_logger
from dicom_node.metrics import mark_process_dead, metrics
from dicom_node.rows import CaseRow, JobRow, get_case
from dicom_node.states import CaseMode, DeliveryKind, InstanceSource, JobState

__all__ = [
    "WorkerSupervisor",
    "run_worker",
    "resolve_devices",
    "main",
    "PermanentJobError",
    "supervisor_tag",
    "live_owners",
    "other_workers",
    "queue_wakeups",
]

log = get_logger("dicom_node.worker")

#: what run_job reports when the job was taken from this worker (its result is discarded)
LOST = "lost"
#: the words a worker writes to its stdout (``<word> <job id>``)
_REPORTS = (JobState.DONE, JobState.FAILED, JobState.PENDING, LOST)


class PermanentJobError(Exception):
    """A job that cannot succeed by trying again (bad prompt, bad series); message says why."""


# ======================================================================================
# Worker process
# ======================================================================================
def _set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphan workers)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the worker also checks its parent pid
        pass


def segment_for_job(
    prompt_path: Path,
    image_paths: list[Path],
    series_uid: str | None,
    action,
    device: str,
    allow_frame_of_reference_only: bool,
    cache_dir: Path | None = None,
    select_consistent: bool = False,
    on_left_out: Callable[[int, list], None] | None = None,
):
    """Run the segmentation chain for one job's case; returns (:class:`~dicom_node.pipeline.CaseResult`, info dict).

    The chain is :func:`dicom_node.pipeline.segment_case` (shared with ``dicom-node segment``),
    with the rule's engine (on this worker's device), options, output name and colour.
    Problems of the input (:class:`dicom_node.pipeline.CaseError`) raise
    :class:`PermanentJobError` with the reason; anything else propagates (the job is
    retried in a fresh worker).

    ``select_consistent`` (cases assembled from stale references, which take every image
    of a series or frame of reference) builds the volume from the largest geometrically
    consistent set of the images (:mod:`rtstruct.selection`); ``on_left_out(kept, left_out)``
    is told what was left out (:class:`rtstruct.selection.LeftOut` items), also when the
    rest is then refused, and ``info["left_out"]`` lists the reasons.
    """
    from dicom_node.pipeline import CaseError, RoiNaming, segment_case

    volume, load_seconds, left_out = None, 0.0, []
    if select_consistent:
        volume, load_seconds, left_out = _load_consistent(image_paths, series_uid, on_left_out)
    try:
        case = segment_case(
            image_paths,
            prompt_path,
            engine=action.engine_spec().for_worker(device, None if cache_dir is None else str(cache_dir)),
            options=action.segment_options(),
            naming=RoiNaming(template=action.output_roi_name, color=tuple(action.output_color or (255, 0, 0))),
            allow_frame_of_reference_only=allow_frame_of_reference_only,
            series_instance_uid=series_uid,
            volume=volume,
        )
    except CaseError as exc:
        raise PermanentJobError(str(exc)) from None
    case.load_seconds += load_seconds
    case.seconds += load_seconds
    first = case.targets[0].result
    _dz, dy, dx = case.volume.spacing
    info = {
        "engine": first.engine,
        "algorithm": first.algorithm_name,
        "mode": first.mode,
        "rois": ",".join(t.roi_name for t in case.targets),
        "targets": [
            {
                "roi": t.roi_name,
                "slices": int(t.result.mask.any(axis=(1, 2)).sum()),
                "voxels": int(t.result.mask.sum()),
                "seconds": round(t.result.seconds, 3),
                "prompted_slices": [int(k) for k in t.target.anchor_slices],
                "stop_reasons": dict(t.result.stop_reasons),
                # per slice of the result (0-based index -> value): the engine's score, the area delivered
                "slice_scores": {
                    str(k): None if v is None else round(float(v), 4) for k, v in sorted(t.result.slice_scores.items())
                },
                "slice_areas_mm2": {
                    str(int(k)): round(float(t.result.mask[k].sum()) * dy * dx, 1)
                    for k in t.result.mask.any(axis=(1, 2)).nonzero()[0]
                },
                "slice_positions_mm": {
                    str(int(k)): round(
                        float(case.volume.geometry.slice_position(int(k)) @ case.volume.geometry.normal), 2
                    )
                    for k in t.result.mask.any(axis=(1, 2)).nonzero()[0]
                },
            }
            for t in case.targets
        ],
        "warnings": list(case.warnings) + ([_left_out_line(left_out)] if left_out else []),
        "load_seconds": round(case.load_seconds, 3),
        "slices": case.volume.shape[0],
        "left_out": [item.reason for item in left_out],
    }
    return case, info


def _load_consistent(
    image_paths: list[Path], series_uid: str | None, on_left_out: Callable[[int, list], None] | None
) -> tuple:
    """The volume of the largest consistent set of ``image_paths`` (``load_series`` with
    ``select_consistent``): (volume, seconds, left-out items). What was left out is told
    to ``on_left_out`` before a refusal of the rest propagates, as :class:`PermanentJobError`
    with the text :func:`dicom_node.pipeline.load_volume` gives."""
    from rtstruct.series import VolumeError, load_series

    left_out: list = []
    t0 = time.perf_counter()
    try:
        volume = load_series(image_paths, series_instance_uid=series_uid, select_consistent=True, left_out=left_out)
    except VolumeError as exc:
        raise PermanentJobError(f"image series unusable: {exc}") from None
    finally:
        if left_out and on_left_out is not None:
            on_left_out(len(image_paths) - sum(item.count for item in left_out), left_out)
    return volume, time.perf_counter() - t0, left_out


def _left_out_reporter(audit: AuditLog, job_id: int, case_id: int) -> Callable[[int, list], None]:
    """``on_left_out`` of a job: one WARNING line and one audit record saying how many of
    the case's images were kept and what was left out and why (counts, sizes, SOP class
    names: no patient data)."""

    def report(kept: int, left_out: list) -> None:
        reasons = [item.reason for item in left_out]
        n = sum(item.count for item in left_out)
        event(
            log,
            "images_left_out",
            level=logging.WARNING,
            job=job_id,
            case=case_id,
            kept=kept,
            left_out=n,
            why="; ".join(reasons),
        )
        audit.write("images_left_out", case=case_id, job=job_id, kept=kept, left_out=n, reasons=reasons)

    return report


def _left_out_line(left_out: list) -> str:
    """What selection left out, as one line: "4 of the case's images left out: ..."."""
    n = sum(item.count for item in left_out)
    return f"{n} of the case's images left out: " + "; ".join(item.reason for item in left_out)


class _LeaseKeeper(threading.Thread):
    def __init__(self, db: Database, job_id: int, owner: str, lease: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.db, self.job_id, self.owner, self.lease = db, job_id, owner, lease
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stop_event.wait(self.lease / 3):
            try:
                if not renew_lease(self.db, self.job_id, self.owner, self.lease):
                    self.lost = True
                    return
            except Exception:
                log.exception("lease renewal failed")


def _deliveries(cfg: NodeConfig, action: dict, case: CaseRow) -> list[tuple[str, DeliveryKind]]:
    out: list[tuple[str, DeliveryKind]] = [(name, DeliveryKind.DICOM) for name in action.get("destinations") or []]
    folders = []
    if action.get("export_folder"):
        folders.append(str(action["export_folder"]))
    if case.source == InstanceSource.WATCH and cfg.watch.export_dir is not None:
        folders.append(str(cfg.watch.export_dir))
    for folder in dict.fromkeys(folders):
        out.append((f"folder:{folder}", DeliveryKind.FOLDER))
    return out


def run_job(cfg: NodeConfig, db: Database, audit: AuditLog, job: JobRow, owner: str, device: str) -> str:
    """Process one claimed job; returns its new state (a :class:`JobState`), or :data:`LOST`."""
    try:
        state = _run_job(cfg, db, audit, job, owner, device)
    except Exception:
        metrics().jobs.labels("error").inc()  # the worker exits; the job runs again in a fresh one
        raise
    outcome = {JobState.DONE: "done", JobState.FAILED: "failed", JobState.PENDING: "retry"}.get(state)
    if outcome is not None:
        metrics().jobs.labels(outcome).inc()
    return state


def _run_job(cfg: NodeConfig, db: Database, audit: AuditLog, job: JobRow, owner: str, device: str) -> str:
    job_id, case_id = job.id, job.case_id
    case = get_case(db, case_id)
    if case is None:  # jobs.case_id references cases(id); only a damaged database gets here
        raise RuntimeError(f"job {job_id} refers to case {case_id}, which is not in the database")
    images = db.query(
        """SELECT i.path FROM case_images ci JOIN instances i ON i.sop_instance_uid = ci.sop_instance_uid
           WHERE ci.case_id = ?""",
        (case_id,),
    )
    image_paths = [cfg.store_dir / r["path"] for r in images]
    action = job.action
    keeper = _LeaseKeeper(db, job_id, owner, cfg.jobs.lease_seconds)
    keeper.start()
    start = time.time()
    audit.write("inference_start", case=case_id, job=job_id, attempt=job.attempts, worker=owner, device=device)
    event(log, "inference_start", job=job_id, case=case_id, images=len(image_paths), attempt=job.attempts)
    try:
        if len(image_paths) != case.n_images:
            raise PermanentJobError(
                f"{(case.n_images or 0) - len(image_paths)} of the case's {case.n_images} images are no longer "
                "in the store"
            )
        from dicom_node.outputs import write_outputs
        from dicom_node.rules import Action

        rule_action = Action.model_validate(action)
        result, info = segment_for_job(
            case.prompt_path,
            image_paths,
            case.image_series_uid,
            rule_action,
            device,
            allow_frame_of_reference_only=case.mode != CaseMode.REFERENCES,
            cache_dir=cfg.cache_dir,
            select_consistent=case.mode != CaseMode.REFERENCES,
            on_left_out=_left_out_reporter(audit, job_id, case_id),
        )
        ds = result.dataset
        written = write_outputs(
            cfg.results_dir / str(job_id),
            result,
            list(rule_action.outputs),
            rule_action.window,
            image_paths,
            cfg.files_dir,
        )
        result_path = cfg.files_dir / written.files["rtstruct"][0]
        info.update(files=written.files, qa=written.qa, outputs=list(rule_action.outputs))
        info["warnings"] = list(info["warnings"]) + written.warnings
    except PermanentJobError as exc:
        keeper.stop_event.set()
        state = fail_job(db, job_id, owner, str(exc), retryable=False, max_attempts=cfg.jobs.max_attempts)
        event(log, "job_failed", level=logging.WARNING, job=job_id, case=case_id, reason=str(exc))
        audit.write("job_failed", case=case_id, job=job_id, reason=str(exc), state=state)
        return state or LOST
    except Exception as exc:
        keeper.stop_event.set()
        reason = f"{type(exc).__name__}: {exc}"
        state = fail_job(db, job_id, owner, reason, retryable=True, max_attempts=cfg.jobs.max_attempts)
        event(
            log, "job_error", level=logging.ERROR, job=job_id, case=case_id, reason=reason, state=state, exc_info=True
        )
        audit.write("job_failed", case=case_id, job=job_id, reason=reason, state=state)
        raise  # the worker exits: a fresh process after an unexpected error (CUDA state, memory)
    keeper.stop_event.set()
    seconds = time.time() - start
    done = complete_job(
        db,
        job_id,
        owner,
        result_path=result_path,
        result_sop_uid=str(ds.SOPInstanceUID),
        result_series_uid=str(ds.SeriesInstanceUID),
        engine=str(info.get("engine", action.get("engine"))),
        inference_seconds=seconds,
        detail=info,
        deliveries=_deliveries(cfg, action, case),
        outputs=tuple(rule_action.outputs),
    )
    if not done or keeper.lost:
        event(
            log,
            "job_lease_lost",
            level=logging.WARNING,
            job=job_id,
            note="another worker owns the job now; this result is discarded",
        )
        shutil.rmtree(result_path.parent, ignore_errors=True)
        return LOST
    engine = str(info.get("engine", action.get("engine")))
    metrics().inference.labels(engine).observe(seconds)
    segmented = sum(t["slices"] for t in info["targets"])
    segment_seconds = sum(t["seconds"] for t in info["targets"])
    if segmented:
        metrics().seconds_per_slice.labels(engine).observe(segment_seconds / segmented)
    audit.write(
        "inference_end",
        case=case_id,
        job=job_id,
        seconds=round(seconds, 3),
        engine=info.get("engine"),
        result=str(ds.SOPInstanceUID),
    )
    event(
        log,
        "inference_end",
        job=job_id,
        case=case_id,
        seconds=f"{seconds:.2f}",
        engine=info.get("engine"),
        rois=info.get("rois"),
    )
    return JobState.DONE


def warm_up(cfg: NodeConfig, device: str) -> tuple[float, list]:
    """Import the segmentation chain and build the engines the rules use, before any job.

    The first case then costs no import or model-loading time. A model that cannot be
    loaded is logged here and fails its jobs with the same reason later. Returns the
    seconds it took and the :class:`~inference.engine.EngineSpec` of each engine loaded.
    """
    t0 = time.perf_counter()
    import dicom_node.pipeline  # noqa: F401
    import rtstruct.prompts  # noqa: F401
    import rtstruct.series  # noqa: F401
    import rtstruct.writer  # noqa: F401
    from inference.engine import DEFAULT_ENGINE, EngineSpec, build

    actions = []
    if cfg.rules is not None:
        try:
            from dicom_node.rules import RuleSet

            actions = [r.action for r in RuleSet.load(cfg.rules) if r.enabled]
        except Exception as exc:
            event(log, "warm_up_rules_unreadable", level=logging.WARNING, why=str(exc))
    built: list = []
    loaded: list = []
    for action in actions:
        spec = action.engine_spec().for_worker(device, str(cfg.cache_dir))
        if spec in built:
            continue
        built.append(spec)
        try:
            build(spec)
            loaded.append(spec)
        except Exception as exc:
            event(
                log,
                "engine_unavailable",
                level=logging.WARNING,
                engine=spec.name,
                checkpoint=spec.checkpoint,
                why=f"{type(exc).__name__}: {exc}",
            )
    if not built:
        build(EngineSpec(DEFAULT_ENGINE))
        loaded.append(EngineSpec(DEFAULT_ENGINE))
    seconds = time.perf_counter() - t0
    event(log, "worker_ready", engines=len(built) or 1, seconds=f"{seconds:.2f}")
    return seconds, loaded


def status_path(cfg: NodeConfig, index: int, tag: str = "") -> Path:
    """Where worker ``index`` of the supervisor ``tag`` describes itself for the health page."""
    return cfg.data_dir / "run" / (f"worker-{tag}-{index}.json" if tag else f"worker-{index}.json")


def _write_status(cfg: NodeConfig, index: int, tag: str = "", **facts) -> None:
    path = status_path(cfg, index, tag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**facts, "pid": os.getpid(), "updated_at": time.time()}))
        os.replace(tmp, path)
    except OSError as exc:  # the health page then shows less; the worker goes on
        event(log, "worker_status_unwritable", level=logging.WARNING, path=str(path), why=exc.strerror)


def _engine_facts(spec) -> dict:
    return {"engine": spec.name, "checkpoint": spec.checkpoint, "model_cfg": spec.model_cfg, "device": spec.device}


def run_worker(
    cfg: NodeConfig, index: int, device: str, notify: Callable[[str], None] | None = None, tag: str = ""
) -> int:
    """The worker loop (until SIGTERM or the parent dies)."""
    from inference.limits import set_input_limits

    set_input_limits(cfg.limits.input_limits())
    db = open_database(cfg)
    audit = AuditLog(cfg.audit_path, fsync=cfg.audit.fsync)
    owner = f"{owner_name(f'{index}.{tag}' if tag else index)}:{os.getpid()}"
    parent = os.getppid()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    event(log, "worker_started", worker=owner, device=device)
    seconds, loaded = warm_up(cfg, device)
    audit.write("worker_ready", worker=owner, device=device, seconds=round(seconds, 3))
    engines = [_engine_facts(s) for s in loaded]
    ready_at = time.time()

    def status(job_id: int | None) -> None:
        _write_status(
            cfg, index, tag, worker=index, device=device, engines=engines, ready_at=ready_at, job=job_id, owner=owner
        )

    status(None)
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else None
    while not stopping.is_set():
        if os.getppid() != parent:
            break
        job = claim_job(db, owner, cfg.jobs.lease_seconds)
        if job is None:
            if stdin_fd is not None:
                ready, _, _ = select.select([stdin_fd], [], [], cfg.workers.poll_seconds)
                if ready:
                    data = os.read(stdin_fd, 4096)
                    if not data:  # the supervisor closed our stdin: stop
                        break
            else:
                time.sleep(cfg.workers.poll_seconds)
            continue
        status(job.id)
        state = run_job(cfg, db, audit, job, owner, device)
        try:
            from dicom_node.rules import Action

            used = _engine_facts(Action.model_validate(job.action).engine_spec().for_worker(device, str(cfg.cache_dir)))
            if used not in engines:
                engines.append(used)
        except Exception:  # a rule the worker could not read: nothing new was loaded
            pass
        status(None)
        if notify is not None:
            notify(f"{state} {job.id}")
    event(log, "worker_stopped", worker=owner)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_node.worker")
    parser.add_argument("--config-json", required=True, help="the node's effective configuration (JSON)")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="", help="the supervising process (part of the lease owner)")
    args = parser.parse_args(argv)
    _set_parent_death_signal()
    from dicom_node.logs import setup_logging

    cfg = NodeConfig.model_validate_json(Path(args.config_json).read_text())
    setup_logging(cfg.logging.level, cfg.logging.format, cfg.logging.file)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines narrate every attribute it copies
    out = sys.stdout

    def notify(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    return run_worker(cfg, args.index, args.device, notify, tag=args.tag)


# ======================================================================================
# Supervisor (in the receiving process)
# ======================================================================================
def resolve_devices(devices: list[str]) -> list[str]:
    """Expand ``auto`` into one entry per visible NVIDIA GPU, or ``cpu`` without one."""
    out: list[str] = []
    for d in devices:
        if d != "auto":
            out.append(d)
            continue
        count = 0
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
                count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
            except (OSError, subprocess.SubprocessError):
                count = 0
        out.extend([f"cuda:{i}" for i in range(count)] or ["cpu"])
    return out


def supervisor_tag(role: str) -> str:
    """The name of one supervising process in its workers' lease owners: ``s<pid>`` for
    ``dicom-node serve``, ``w<pid>`` for ``dicom-node worker`` (letters and digits only:
    owner prefixes are matched with SQL LIKE)."""
    return f"{'s' if role == 'serve' else 'w'}{os.getpid()}"


def _owner_host_pid(owner: str) -> tuple[str, int | None]:
    """``<host>[/<node id>]:worker<index>[.<tag>]:<pid>`` -> (host, pid)."""
    host, _, rest = owner.partition(":")
    host = host.split("/", 1)[0]
    try:
        return host, int(rest.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return host, None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_owners(db: Database, now: float | None = None) -> set[str]:
    """Lease owners of running jobs that may still be working: their lease has not expired
    and they are on another host or are a live process on this one.

    ``dicom-node serve`` keeps their jobs at start (they belong to ``dicom-node worker``
    processes sharing the database); every other running job is handed back at once.
    """
    from dicom_node.jobs import expired_owners

    here = socket.gethostname()
    out = set()
    expired = set(expired_owners(db, now))
    for owner in running_owners(db):
        if owner in expired:
            continue
        host, pid = _owner_host_pid(owner)
        if host == here and (pid is None or not _pid_alive(pid)):
            continue
        out.add(owner)
    return out


def other_workers(cfg: NodeConfig, own_tag: str) -> list[dict]:
    """What the workers of other processes on this host and data_dir say of themselves
    (``run/worker-<tag>-<index>.json`` of a live process), for the health page; workers on
    other hosts write into their own data_dir and are not seen here."""
    out = []
    for path in sorted((cfg.data_dir / "run").glob("worker-*-*.json")):
        tag = path.name[len("worker-") :].rsplit("-", 1)[0]
        if tag == own_tag:
            continue
        try:
            facts = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = facts.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            continue
        out.append(
            {
                "worker": facts.get("worker"),
                "device": facts.get("device"),
                "pid": pid,
                "alive": True,
                "ready": True,
                "started_at": facts.get("ready_at"),
                "restarts": None,
                "engines": facts.get("engines", []),
                "job": facts.get("job"),
                "process": f"dicom-node worker {tag}",
            }
        )
    return out


def queue_wakeups(cfg: NodeConfig, db: Database, wake: Callable[[], None], stop: threading.Event) -> None:
    """WAKE-UP POINT: how a ``dicom-node worker`` process, or ``serve`` on a database shared
    with other hosts, learns that another process queued a job.

    Runs in a thread of that process until ``stop`` is set, calling ``wake`` (which wakes
    its idle workers) when a job is waiting. Today it polls the queue every
    ``workers.poll_seconds`` (the workers also poll on their own at that interval, so a
    missed wake-up costs at most one interval). On PostgreSQL it blocks on ``db.wait``
    (``LISTEN jobs``) instead.
    """
    while not stop.is_set():
        try:
            if db.is_postgresql:
                db.wait(["jobs"], cfg.workers.poll_seconds)
            elif stop.wait(cfg.workers.poll_seconds):
                break
            if has_pending_jobs(db):
                wake()
        except Exception as exc:  # the database is away for a moment: the next round tries again
            event(log, "queue_poll_failed", level=logging.WARNING, why=f"{type(exc).__name__}: {exc}")
            stop.wait(cfg.workers.poll_seconds)


class _WorkerHandle:
    def __init__(self, index: int, device: str, tag: str = "") -> None:
        self.index = index
        self.device = device
        self.tag = tag
        self.proc: subprocess.Popen | None = None
        self.failures = 0
        self.next_start = 0.0
        self.started_at = 0.0
        self.restarts = 0
        self.reader: threading.Thread | None = None

    @property
    def owner_prefix(self) -> str:
        return f"{owner_name(f'{self.index}.{self.tag}' if self.tag else self.index)}:"


class WorkerSupervisor:
    """Starts one worker process per device, restarts dead ones, relays notifications.

    It also hands back the jobs of *other* processes' workers whose lease expired (a
    ``dicom-node worker`` host that died or was cut off), so a supervisor with no workers
    of its own (``workers.devices: []`` in ``dicom-node serve``) still runs its watch.
    ``tag`` (:func:`supervisor_tag`) keeps its workers' lease owners apart from those of
    other processes sharing the database.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        db: Database,
        audit: AuditLog,
        config_json: Path,
        on_done: Callable[[int], None] | None = None,
        tag: str = "",
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.audit = audit
        self.config_json = config_json
        self.on_done = on_done
        self.tag = tag
        self.devices = resolve_devices(cfg.workers.devices)
        self.workers = [_WorkerHandle(i, d, tag) for i, d in enumerate(self.devices)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        for w in self.workers:
            self._spawn(w)
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, w: _WorkerHandle) -> None:
        cmd = [
            sys.executable,
            "-m",
            "dicom_node.worker",
            "--config-json",
            str(self.config_json),
            "--index",
            str(w.index),
            "--device",
            w.device,
            "--tag",
            w.tag,
        ]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        w.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(Path(__file__).resolve().parents[1])
        )
        w.started_at = time.time()
        w.reader = threading.Thread(target=self._read, args=(w, w.proc), name=f"worker{w.index}-out", daemon=True)
        w.reader.start()
        event(log, "worker_spawned", worker=w.index, device=w.device, pid=w.proc.pid)

    def _read(self, w: _WorkerHandle, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            parts = raw.decode("utf-8", "replace").split()
            if len(parts) == 2 and parts[0] in _REPORTS:
                if parts[0] == JobState.DONE and self.on_done is not None:
                    try:
                        self.on_done(int(parts[1]))
                    except Exception:
                        log.exception("on_done callback failed")

    def wake(self, *_args) -> None:
        """Tell idle workers that a job is waiting."""
        for w in self.workers:
            proc = w.proc
            if proc is not None and proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write(b"w")
                    proc.stdin.flush()
                except (BrokenPipeError, OSError, ValueError):
                    pass

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.time()
            for w in self.workers:
                proc = w.proc
                if proc is not None and proc.poll() is not None:
                    code = proc.returncode
                    why = f"worker {w.index} ({w.device}) exited with status {code}"
                    with self._lock:
                        w.proc = None
                    released = self._release(w, why)
                    mark_process_dead(proc.pid)
                    if not self._stop.is_set():
                        w.restarts += 1
                        metrics().worker_restarts.labels(str(w.index)).inc()
                    w.failures = w.failures + 1 if now - w.started_at < 60 else 1
                    delay = min(self.cfg.workers.restart_backoff_max_seconds, 2 ** (w.failures - 1))
                    w.next_start = now + delay
                    event(
                        log,
                        "worker_died",
                        level=logging.ERROR,
                        worker=w.index,
                        device=w.device,
                        status=code,
                        jobs_returned=",".join(f"{j}:{s}" for j, s in released) or "none",
                        restart_in=f"{delay:g}s",
                    )
                    self.audit.write("worker_died", worker=w.index, status=code, jobs=released)
                if w.proc is None and not self._stop.is_set() and now >= w.next_start:
                    self._spawn(w)
                    if has_pending_jobs(self.db):
                        self.wake()
            try:
                self._check_leases(now)
            except Exception:
                log.exception("lease check failed")

    def _release(self, w: _WorkerHandle, why: str) -> list[tuple[int, JobState]]:
        out = []
        for owner in running_owners(self.db, w.owner_prefix):
            out += release_owner(self.db, owner, why, self.cfg.jobs.max_attempts)
        return out

    def _check_leases(self, now: float) -> None:
        from dicom_node.jobs import expired_owners

        for owner in expired_owners(self.db, now):
            mine = [w for w in self.workers if owner.startswith(w.owner_prefix)]
            for w in mine:
                if w.proc is not None:
                    event(
                        log,
                        "worker_hung",
                        level=logging.ERROR,
                        worker=w.index,
                        note=f"lease expired (jobs.lease_seconds={self.cfg.jobs.lease_seconds:g}); killing it",
                    )
                    w.proc.kill()
            if not mine:
                self._reclaim(owner)

    def _reclaim(self, owner: str) -> None:
        """Hand back the jobs of another process's worker whose lease expired (its host died,
        was cut off, or its clock is far off: keep the hosts' clocks in step with NTP)."""
        why = f"the lease of {owner} expired (jobs.lease_seconds={self.cfg.jobs.lease_seconds:g}): its process stopped"
        released = release_owner(self.db, owner, why, self.cfg.jobs.max_attempts)
        if not released:
            return
        event(
            log,
            "lease_reclaimed",
            level=logging.WARNING,
            owner=owner,
            jobs=",".join(f"{j}:{s}" for j, s in released),
        )
        self.audit.write("lease_reclaimed", owner=owner, jobs=released)
        if any(s == JobState.PENDING for _, s in released):
            self.wake()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for w in self.workers:
            proc = w.proc
            if proc is None:
                continue
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
            proc.terminate()
        deadline = time.time() + timeout
        for w in self.workers:
            proc = w.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._release(w, "the node stopped while this job was running")
        for w in self.workers:
            if w.tag:
                status_path(self.cfg, w.index, w.tag).unlink(missing_ok=True)

    def alive(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.proc.poll() is None]

    def status(self) -> list[dict]:
        """Each worker as the health page shows it: device, process, restarts, and what the
        worker says of itself (engines loaded, current job) once it is ready."""
        out = []
        for w in self.workers:
            proc = w.proc
            alive = proc is not None and proc.poll() is None
            facts: dict = {}
            try:
                facts = json.loads(status_path(self.cfg, w.index, w.tag).read_text())
            except (OSError, ValueError):
                pass
            if not alive or facts.get("pid") != proc.pid:  # type: ignore[union-attr]
                facts = {}  # a previous process's description
            out.append(
                {
                    "worker": w.index,
                    "device": w.device,
                    "pid": proc.pid if alive else None,  # type: ignore[union-attr]
                    "alive": alive,
                    "ready": bool(facts),
                    "started_at": w.started_at or None,
                    "restarts": w.restarts,
                    "engines": facts.get("engines", []),
                    "job": facts.get("job"),
                    "process": None,
                }
            )
        return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
