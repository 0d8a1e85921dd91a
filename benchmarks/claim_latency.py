"""Claim latency of the job queue: SQLite (the file in data_dir) vs PostgreSQL, in one run.

For each backend: ``--jobs`` jobs are queued one at a time while one worker (another
connection, in a thread) waits and claims; the latency is enqueue commit -> claim return.
The worker waits as the node's would: on SQLite (one host) it is woken in-process right
after the commit (the supervisor writes to its worker's stdin), with ``--poll`` seconds
as the fallback poll; on PostgreSQL it waits for ``NOTIFY jobs`` (``db.wait``, the wake-up
across hosts) and claims at once. Then
``claim_job`` calls per second on a full queue (one claimer). PostgreSQL is a cluster this
script starts in a temporary folder (as the tests do: Debian's postgresql package).

    python benchmarks/claim_latency.py [--jobs 200] [--poll 0.05]

Prints the medians and p95 of each and the ratios PostgreSQL / SQLite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dicom_node import jobs as q  # noqa: E402
from dicom_node.db import Database  # noqa: E402


def _enqueue(db, now: float) -> int:
    with db.tx() as c:
        cid = c.execute(
            """INSERT INTO cases (state, rtstruct_uid, rtstruct_sha256, prompt_path, n_refs, created_at,
                   last_progress_at) VALUES ('queued', '1.2', 'h', 'p', 1, ?, ?)""",
            (now, now),
        ).lastrowid
        job = q.create_job(c, cid, "r", {}, [], now)
        db.notify("jobs")
    return job


def latency(db, other, n: int, poll: float) -> list[float]:
    queued: dict[int, float] = {}
    got: dict[int, float] = {}
    done = threading.Event()
    local_wake = threading.Event()

    def worker():
        while not done.is_set():
            job = q.claim_job(other, "bench", 30)
            if job is None:
                if other.is_postgresql:
                    other.wait(["jobs"], 1.0)
                else:
                    local_wake.wait(poll)
                    local_wake.clear()
                continue
            got[job.id] = time.perf_counter()
            q.complete_job(
                other, job.id, "bench", result_path="r", result_sop_uid="1", result_series_uid="1",
                engine="x", inference_seconds=0, detail={}, deliveries=[],
            )  # fmt: skip

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    time.sleep(0.5)  # the worker is waiting (LISTEN registered)
    for _ in range(n):
        t0 = time.perf_counter()
        job = _enqueue(db, time.time())
        if not db.is_postgresql:
            local_wake.set()
        queued[job] = t0
        while job not in got:
            time.sleep(0.0005)
    done.set()
    with db.tx():
        db.notify("jobs")
    t.join(5)
    return [got[j] - queued[j] for j in queued]


def claims_per_second(db, n: int) -> float:
    now = time.time()
    for _ in range(n):
        _enqueue(db, now)
    t0 = time.perf_counter()
    k = 0
    while q.claim_job(db, "bench", 30) is not None:
        k += 1
    return k / (time.perf_counter() - t0)


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(0.95 * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--poll", type=float, default=0.5, help="SQLite worker's fallback poll (seconds)")
    args = ap.parse_args()
    from helpers.postgres import PostgresServer, pg_bindir

    bindir = pg_bindir()
    if bindir is None:
        print("PostgreSQL is not installed: apt-get install postgresql", file=sys.stderr)
        return 2
    from dicom_node.pg import PostgresDatabase

    pg = PostgresServer(bindir)
    pg.start()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = (Database(Path(tmp) / "a.db"), Database(Path(tmp) / "a.db"))
            url = pg.new_database()
            postgres = (PostgresDatabase(url, Path(tmp)), PostgresDatabase(url, Path(tmp)))
            for name, (db, other) in (("sqlite", sqlite), ("postgresql", postgres)):
                lat = latency(db, other, args.jobs, args.poll)
                cps = claims_per_second(db, args.jobs)
                med, p95 = _stats(lat)
                results[name] = (med, p95, cps)
                print(f"{name}: enqueue -> claim median {med * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms; "
                      f"claim_job {cps:.0f} calls/s ({args.jobs} jobs)")  # fmt: skip
                db.close()
                other.close()
    finally:
        pg.stop()
    s, p = results["sqlite"], results["postgresql"]
    print(f"ratio postgresql/sqlite: latency (median) {p[0] / s[0]:.2f}, claim_job calls/s {p[2] / s[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
