"""``dicom-node resend JOB [--destination NAME]``: deliver a job's result again."""

from __future__ import annotations

from dicom_node.cli import CommandError


def register(sub) -> None:
    p = sub.add_parser("resend", help="deliver a finished job's result again (e.g. after a dead letter)")
    p.add_argument("id", type=int, help="job number (dicom-node jobs list)")
    p.add_argument("--destination", help="only this destination (default: all of the job's)")
    p.add_argument("-c", "--config", help="node.yaml (to find the data directory)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.commands.jobs import open_db
    from dicom_node.jobs import JobError, resend_job

    _cfg, db = open_db(args)
    try:
        n = resend_job(db, args.id, args.destination)
    except JobError as exc:
        raise CommandError(str(exc)) from None
    print(f"job {args.id}: {n} deliver{'y' if n == 1 else 'ies'} queued; the running node sends within a second")
    return 0
