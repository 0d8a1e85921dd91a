"""``dicom-node jobs list|show ID|retry ID``: the job queue of a node (reads its database)."""

from __future__ import annotations

import dataclasses
import json
import time

from dicom_node.cli import CommandError
from dicom_node.states import JobState


def register(sub) -> None:
    p = sub.add_parser("jobs", help="list, inspect and retry jobs")
    p.add_argument("-c", "--config", help="node.yaml (to find the data directory)")
    jsub = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    jsub.required = True
    ls = jsub.add_parser("list", help="recent jobs with their deliveries")
    ls.add_argument("--state", choices=[s.value for s in JobState])
    ls.add_argument("-n", "--limit", type=int, default=30)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    _config_option(ls)
    show = jsub.add_parser("show", help="one job: case, rule and why, result, deliveries")
    show.add_argument("id", type=int)
    show.set_defaults(func=run_show)
    _config_option(show)
    retry = jsub.add_parser("retry", help="run a failed job again")
    retry.add_argument("id", type=int)
    retry.set_defaults(func=run_retry)
    _config_option(retry)


def _config_option(parser) -> None:
    """``-c`` after the action too (``jobs list -c node.yaml``), without hiding one given before it."""
    import argparse

    parser.add_argument("-c", "--config", default=argparse.SUPPRESS, help="node.yaml (to find the data directory)")


def open_db(args):
    """The node's configuration and database, for every command that reads or changes the queue.

    An older schema is migrated (unless a node is running on it), a newer one refused,
    exactly as the node does at start.
    """
    from dicom_node.config import ConfigError, load_config
    from dicom_node.db import SchemaError, open_database

    try:
        cfg = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    if not cfg.database.is_postgresql and not cfg.db_path.exists():
        raise CommandError(f"no node database at {cfg.db_path} (has the node run with this configuration?)")
    try:
        return cfg, open_database(cfg)
    except SchemaError as exc:
        raise CommandError(str(exc)) from None


def _t(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def run_list(args) -> int:
    from dicom_node.jobs import list_jobs

    _cfg, db = open_db(args)
    rows = list_jobs(db, args.limit, args.state)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str))
        return 0
    if not rows:
        print("no jobs")
        return 0
    print(f"{'job':>5} {'case':>5} {'state':8} {'tries':>5} {'created':19} {'secs':>6} {'rule':18} deliveries / error")
    for r in rows:
        secs = f"{r.inference_seconds:.1f}" if r.inference_seconds else "-"
        tail = r.deliveries or ""
        if r.error:
            tail = (tail + " | " if tail else "") + r.error[:80]
        print(
            f"{r.id:>5} {r.case_id:>5} {r.state:8} {r.attempts:>5} {_t(r.created_at):19} "
            f"{secs:>6} {str(r.rule or '-')[:18]:18} {tail}"
        )
    return 0


def run_show(args) -> int:
    from dicom_node.jobs import JobError, job_detail

    _cfg, db = open_db(args)
    try:
        d = job_detail(db, args.id)
    except JobError as exc:
        raise CommandError(str(exc)) from None
    job, case = d.job, d.case
    print(f"job {job.id}: {job.state} (attempts {job.attempts})")
    print(
        f"  case {case.id}: {case.state}, patient {case.patient_ref}, {case.n_images or 0} images "
        f"({case.mode or '-'}), prompt RTSTRUCT {case.rtstruct_uid}"
    )
    print(
        f"  from {case.calling_aet or '-'} via {case.source}; created {_t(case.created_at)}, ready {_t(case.ready_at)}"
    )
    print(f"  rule: {job.rule or '-'}")
    for line in job.explanation:
        print(f"    {line}")
    action = job.action
    print(
        f"  action: engine {action.get('engine')}, mode {action.get('mode')}, "
        f"destinations {', '.join(action.get('destinations') or []) or 'none'}"
    )
    if job.error:
        print(f"  error: {job.error}")
    if job.result_path is not None:
        print(
            f"  result: {job.result_path} (SOP {job.result_sop_uid}), engine {job.engine}, "
            f"{job.inference_seconds or 0:.2f} s"
        )
    for s in d.sends:
        extra = f", last error: {s.last_error}" if s.last_error else ""
        print(
            f"  delivery {s.destination}: {s.state} after {s.attempts} attempt(s)"
            f"{', at ' + _t(s.sent_at) if s.sent_at else ''}{extra}"
        )
    return 0


def run_retry(args) -> int:
    from dicom_node.jobs import JobError, retry_job

    _cfg, db = open_db(args)
    try:
        retry_job(db, args.id)
    except JobError as exc:
        raise CommandError(str(exc)) from None
    print(f"job {args.id} is pending again; a worker of the running node will take it")
    return 0
