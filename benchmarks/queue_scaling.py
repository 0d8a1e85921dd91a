"""Queue scaling: cases per minute with 1 and 2 ``dicom-node worker`` processes on one queue.

For each worker count K: a fresh data directory, ``dicom-node serve`` with no workers of
its own (``workers.devices: []``) and K ``dicom-node worker --device cpu`` processes; once
every worker is ready, N phantom CT cases (classic engine, small phantoms, no
destinations) are sent with dcmtk ``storescu``: the images of each first, then all the
prompts in one association, so that all N cases are queued at its release while every
worker is idle. The rate is N over the time from the first job's start to the last job's
end (``jobs.started_at`` / ``finished_at``): the workers' start-up and the sending are not
counted. The ratio of the two rates is printed (2.0 is perfect scaling; with fewer free
cores than workers, or serve's own work on the same cores, it cannot be reached).

Each worker process is limited to ``--threads`` BLAS/OpenMP threads (default 1), so that
one worker does not already use every core and the figure measures the queue.

SQLite in the data directory by default; ``--database URL`` writes ``database: URL`` into
the node.yaml (PostgreSQL, once the node has that setting).

    .venv/bin/python benchmarks/queue_scaling.py [--cases 16] [--slices 60] [--size 192]
        [--workers 1 2] [--threads 1] [--database postgresql://...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLI = [sys.executable, "-c", "import sys; from dicom_node.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_config(folder: Path, database: str | None) -> Path:
    rules = folder / "rules.yaml"
    rules.write_text(
        yaml.safe_dump(
            {"version": 1, "rules": [{"name": "bench", "action": {"engine": "classic", "mode": "box2d"}}]},
            sort_keys=False,
        )
    )
    cfg = {
        "ae_title": "STARDUST",
        "data_dir": str(folder / "data"),
        "network": {"bind": "127.0.0.1", "port": free_port()},
        "access": {"calling_aets": ["STORESCU"], "networks": ["127.0.0.0/8"]},
        "storage": {"min_free_mb": 64},
        "cases": {"settle_seconds": 1},
        "jobs": {"lease_seconds": 60},
        "workers": {"devices": [], "poll_seconds": 0.2},
        "rules": str(rules),
        "logging": {"level": "WARNING"},
    }
    if database:
        cfg["database"] = {"url": database}
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def jobs(config: Path, after: int = 0) -> list[dict]:
    """The jobs' state and times, through the node's own database layer."""
    from dicom_node.config import load_config
    from dicom_node.db import open_database

    cfg = load_config(config)
    database = open_database(cfg)
    try:
        return [
            dict(r)
            for r in database.query(
                "SELECT id, state, started_at, finished_at FROM jobs WHERE id > ? ORDER BY id", (after,)
            )
        ]
    finally:
        database.close()


def storescu(port: int, paths: list[Path]) -> None:
    proc = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "STARDUST", "+sd", "+r", "127.0.0.1", str(port)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed: {proc.stderr[-1000:]}")


def _count(audit: Path, name: str) -> int:
    try:
        return sum(json.loads(line).get("event") == name for line in audit.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return 0


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(10)


def run_once(workdir: Path, cases: list[dict], n_workers: int, threads: int, database: str | None) -> dict:
    folder = workdir / f"workers-{n_workers}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = write_config(folder, database)
    port = yaml.safe_load(config.read_text())["network"]["port"]
    log = open(folder / "serve.log", "wb")
    serve = subprocess.Popen(
        [*CLI, "serve", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
    )
    workers: list[subprocess.Popen] = []
    after = 0
    try:
        wait(lambda: serve.poll() is not None or port_open(port), 120, "the node to listen")
        if serve.poll() is not None:
            raise SystemExit(f"dicom-node serve exited: {(folder / 'serve.log').read_text()[-2000:]}")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        env.update(MKL_NUM_THREADS=str(threads), NUMEXPR_NUM_THREADS=str(threads))
        for i in range(n_workers):
            wlog = open(folder / f"worker-{i}.log", "wb")
            workers.append(
                subprocess.Popen(
                    [*CLI, "worker", "-c", str(config), "--device", "cpu"],
                    stdout=wlog,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    env=env,
                    start_new_session=True,
                )
            )
        after = max([j["id"] for j in jobs(config)], default=0)  # a shared database keeps earlier runs' jobs
        audit = folder / "data" / "audit.jsonl"
        wait(lambda: _count(audit, "worker_ready") >= n_workers, 300, f"{n_workers} workers ready")
        # the images first (no case is ready without its prompt), then every prompt in one
        # association: all cases become ready at its release, with every worker idle
        for case in cases:
            storescu(port, [case["images"]])
        storescu(port, [case["prompt"] for case in cases])
        rows = wait(
            lambda: (
                (r := jobs(config, after))
                and len(r) == len(cases)
                and all(j["state"] in ("done", "failed") for j in r)
                and r
            ),
            3600,
            "every job to finish",
            0.5,
        )
        # a job the engine refuses (a phantom whose prompt finds nothing) ends failed: it still
        # went through the queue and a worker, and is counted, but said
        failed = sum(j["state"] != "done" for j in rows)
        first = min(j["started_at"] for j in rows if j["started_at"] is not None)
        last = max(j["finished_at"] for j in rows)
        seconds = last - first
        return {
            "workers": n_workers,
            "cases": len(rows),
            "failed": failed,
            "seconds": seconds,
            "per_minute": len(rows) * 60 / seconds,
        }
    finally:
        for w in workers:
            stop(w)
        stop(serve)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per worker process")
    parser.add_argument("--database", help="a postgresql:// URL instead of SQLite in the data directory")
    parser.add_argument("--workdir", type=Path, help="keep the data directories and logs here")
    args = parser.parse_args(argv)
    if shutil.which("storescu") is None:
        raise SystemExit("storescu not found: sudo apt-get install dcmtk")

    from dicom_node.phantom import write_phantom

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stardust-queue-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        shape = (args.slices, args.size, args.size)
        runs = {}
        for i, k in enumerate(args.workers):
            # a database URL is one database for every run: new cases (other seeds) for each run
            seeds = range(i * args.cases, (i + 1) * args.cases) if args.database else range(args.cases)
            runs[k] = [write_phantom(workdir / "phantoms" / f"ct-{s}", "CT", s, shape=shape) for s in seeds]
        print(f"cases: {args.cases} CT phantoms of {args.slices} slices of {args.size}x{args.size}, classic engine")
        print(
            f"database: {'PostgreSQL' if args.database else 'SQLite'}; {os.cpu_count()} CPUs; "
            f"{args.threads} thread(s) per worker process"
        )
        results = []
        for k in args.workers:
            r = run_once(workdir, runs[k], k, args.threads, args.database)
            results.append(r)
            note = f" ({r['failed']} refused by the engine)" if r["failed"] else ""
            print(
                f"{k} worker process(es): {r['cases']} cases in {r['seconds']:.1f} s: "
                f"{r['per_minute']:.1f} cases/min{note}"
            )
        if len(results) >= 2:
            base = results[0]
            for r in results[1:]:
                print(
                    f"ratio {r['workers']} / {base['workers']} worker processes: {r['per_minute'] / base['per_minute']:.2f}"
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
