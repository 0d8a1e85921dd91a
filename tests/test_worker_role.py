"""``dicom-node worker``: inference workers in processes of their own, next to a ``dicom-node
serve`` that runs none (``workers.devices: []``), on the same data_dir's SQLite.

Real processes and dcmtk peers: storescu sends the case to serve, a worker process
segments it, serve's sender delivers it to a storescp. Worker processes are killed with
SIGKILL (a GPU host that dies) and stopped with SIGTERM."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from helpers import (
    CLI,
    REPO,
    NodeProcess,
    ProcessGroup,
    StoreSCP,
    delivered,
    free_port,
    phantom,
    port_open,
    storescu,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: a case whose classic inference lasts long enough to kill a worker in the middle of it
BIG = dict(seed=1, shape=(300, 128, 128))
#: a short lease, so that a dead worker process's job is handed back within seconds
LEASE = 5  # the smallest jobs.lease_seconds allows


class WorkerProcess(ProcessGroup):
    """``dicom-node worker -c CONFIG --device cpu`` in its own process group."""

    def __init__(self, config: Path, *extra: str) -> None:
        self.config = Path(config)
        self.extra = list(extra)
        self.log_path = self.config.parent / f"worker-{time.time_ns()}.log"
        self.proc = None

    def start(self, ready: bool = True) -> WorkerProcess:
        self._spawn(["worker", "-c", str(self.config), *self.extra], REPO)
        if ready:  # its worker has loaded its engines and looks for jobs
            wait_for(
                lambda: self.proc.poll() is not None or "worker_ready" in self.log_text(), 120, 0.1, "worker ready"
            )
            assert self.proc.poll() is None, f"the worker process exited:\n{self.log_text()}"
        return self

    @property
    def tag(self) -> str:
        return f"w{self.proc.pid}"

    def stop(self, timeout: float = 60.0) -> int | None:
        return super().stop(timeout)


@pytest.fixture
def tps(tmp_path):
    scp = StoreSCP(tmp_path / "tps").start()
    try:
        yield scp
    finally:
        scp.stop()


def role_config(tmp: Path, tps: StoreSCP | None = None, **overrides) -> Path:
    """serve runs no workers (``workers.devices: []``); worker processes take ``--device cpu``."""
    return write_config(
        tmp,
        destinations={"tps": tps.destination()} if tps is not None else None,
        workers={"devices": [], "poll_seconds": 0.5, "restart_backoff_max_seconds": 2},
        **overrides,
    )


def inference_starts(node: NodeProcess) -> list[dict]:
    return [e for e in node.audit() if e["event"] == "inference_start"]


def test_serve_without_workers_and_a_worker_process_deliver_a_case(tmp_path, tps):
    import httpx

    web_port = free_port()
    config = role_config(tmp_path / "node", tps, web={"enabled": True, "port": web_port})
    node = NodeProcess(config).start()
    worker = None
    try:
        assert "none (dicom-node worker processes)" in node.log_text()
        p = phantom(1)
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        # no local worker: the case is queued and stays so
        wait_for(lambda: node.jobs(), 60, 0.1, "the job to be queued")
        assert node.jobs()[0]["state"] == "pending"
        worker = WorkerProcess(config, "--device", "cpu").start()
        (result,) = delivered(node, tps)
        (job,) = node.jobs()
        assert job["state"] == "done" and job["attempts"] == 1
        (start,) = inference_starts(node)
        assert f".{worker.tag}:" in start["worker"]  # segmented by the worker process, not by serve
        assert pydicom.dcmread(result).SOPInstanceUID == job["result_sop_uid"]
        run = node.data_dir / "run"
        # each process has its own metrics and status files; serve's lock stays serve's
        assert (run / f"metrics-{worker.tag}").is_dir() and (run / "metrics").is_dir()
        assert (run / f"worker-{worker.tag}-0.json").is_file()
        assert int((node.data_dir / "node.lock").read_text()) == node.proc.pid
        # the health page's view: serve sees the other process's worker (same host, same data_dir)
        from dicom_node.config import load_config
        from dicom_node.worker import other_workers

        (seen,) = other_workers(load_config(config), f"s{node.proc.pid}")
        assert seen["pid"] != worker.proc.pid and seen["device"] == "cpu" and seen["job"] is None
        wait_for(lambda: port_open(web_port), 30, 0.1, "the web page")
        health = httpx.get(f"http://127.0.0.1:{web_port}/").text
        assert f"dicom-node worker {worker.tag}" in health and str(seen["pid"]) in health
        # a second case while the worker process waits: it is woken or polls, and delivers
        other = phantom(5)
        assert storescu([other["images"], other["prompt"]], node.port).returncode == 0
        delivered(node, tps, 2)
        assert worker.stop() == 0
        assert not (run / f"metrics-{worker.tag}").exists()
        assert not (run / f"worker-{worker.tag}-0.json").exists()
        assert node.alive()
    finally:
        if worker is not None:
            worker.stop()
        node.stop()


def test_kill9_of_the_worker_process_in_inference_the_other_completes_it(tmp_path, tps):
    config = role_config(tmp_path / "node", tps, jobs={"lease_seconds": LEASE})
    node = NodeProcess(config).start()
    workers = [WorkerProcess(config, "--device", "cpu").start() for _ in range(2)]
    try:
        p = phantom(**BIG)
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        (start,) = wait_for(lambda: inference_starts(node), 120, 0.01, "inference to start")
        (busy,) = [w for w in workers if f".{w.tag}:" in start["worker"]]
        (other,) = [w for w in workers if w is not busy]
        busy.kill9()  # the host of that worker process dies
        (job,) = node.jobs()
        assert job["state"] == "running", f"the job was {job['state']} when its worker process was killed"
        (result,) = delivered(node, tps)
        (job,) = node.jobs()
        assert job["state"] == "done" and job["attempts"] == 2
        starts = inference_starts(node)
        assert len(starts) == 2 and f".{other.tag}:" in starts[1]["worker"]
        reclaimed = [e for e in node.audit() if e["event"] == "lease_reclaimed"]
        assert [e["owner"] for e in reclaimed] == [start["worker"]]
        assert len(tps.files()) == 1
        assert pydicom.dcmread(result).SOPInstanceUID == job["result_sop_uid"]
        assert node.alive() and other.proc.poll() is None
    finally:
        for w in workers:
            w.stop()
        node.stop()


def test_sigterm_of_a_worker_process_finishes_or_hands_back_its_job(tmp_path, tps):
    config = role_config(tmp_path / "node", tps, jobs={"lease_seconds": 30})
    node = NodeProcess(config).start()
    # a stop timeout shorter than the inference: the job in hand is handed back at once
    worker = WorkerProcess(config, "--device", "cpu", "--stop-timeout", "0.5").start()
    later = None
    try:
        p = phantom(**BIG)
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        wait_for(lambda: inference_starts(node), 120, 0.01, "inference to start")
        assert worker.stop() == 0
        (job,) = node.jobs()
        assert job["state"] in ("pending", "done"), f"the job was left {job['state']}"
        assert job["lease_owner"] is None
        events = [e["event"] for e in node.audit()]
        assert "worker_process_stopped" in events
        # a new worker process takes it at once (not after the 30 s lease) and it is delivered
        later = WorkerProcess(config, "--device", "cpu").start()
        delivered(node, tps)
        (job,) = node.jobs()
        assert job["state"] == "done"
        assert len(tps.files()) == 1
    finally:
        worker.stop()
        if later is not None:
            later.stop()
        node.stop()


def test_serve_restart_leaves_a_live_worker_process_its_job(tmp_path, tps):
    config = role_config(tmp_path / "node", tps, jobs={"lease_seconds": 30})
    node = NodeProcess(config).start()
    worker = WorkerProcess(config, "--device", "cpu").start()
    try:
        p = phantom(**BIG)
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        (start,) = wait_for(lambda: inference_starts(node), 120, 0.01, "inference to start")
        node.kill9()
        node = NodeProcess(config).start()
        delivered(node, tps)
        (job,) = node.jobs()
        assert job["state"] == "done" and job["attempts"] == 1  # not taken back from the live worker
        assert len(inference_starts(node)) == 1
    finally:
        worker.stop()
        node.stop()


@pytest.mark.parametrize(
    "case",
    ["bad device", "no data_dir", "no database", "empty devices", "unreachable postgresql"],
)
def test_worker_with_a_bad_config_exits_2_with_one_sentence(tmp_path, case):
    tmp = tmp_path / "node"
    if case == "unreachable postgresql":
        from dicom_node.config import NodeConfig

        if "database" not in NodeConfig.model_fields:
            pytest.skip("needs the PostgreSQL database support (database: url)")
        config = write_config(
            tmp, workers={"devices": ["cpu"]}, database={"url": f"postgresql://stardust@127.0.0.1:{free_port()}/x"}
        )
        (tmp / "data").mkdir()
    elif case == "bad device":
        config = write_config(tmp, workers={"devices": ["gpu0"]})
    else:
        config = write_config(tmp, workers={"devices": [] if case == "empty devices" else ["cpu"]})
        if case == "no database":
            (tmp / "data").mkdir()
    extra = [] if case == "empty devices" else ["--device", "cpu"] if case != "bad device" else []
    proc = subprocess.run(
        [*CLI, "worker", "-c", str(config), *extra], capture_output=True, text=True, timeout=120, cwd=str(REPO)
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    expected = {
        "bad device": "gpu0",
        "no data_dir": "does not exist",
        "no database": "start dicom-node serve first",
        "empty devices": "workers.devices is empty",
        "unreachable postgresql": "database: cannot connect to postgresql://",
    }[case]
    assert expected in lines[0]
    assert not (tmp / "data" / "node.db").exists()  # a worker never creates the database


def test_postgresql_serve_on_one_host_and_a_worker_process_with_its_own_data_dir(tmp_path, tps, request):
    """The multi-host layout on one machine: serve and a worker process with separate local
    data_dirs, one shared_dir and one PostgreSQL; kill -9 of the worker process in
    inference, a second one (another "host") completes the job after the lease."""
    try:
        pg = request.getfixturevalue("postgres_server")
    except pytest.FixtureLookupError:
        pytest.skip("needs the PostgreSQL database support (database: url) and its test helpers")
    url = pg.new_database()
    shared = tmp_path / "shared"
    common = dict(shared_dir=str(shared), database={"url": url}, jobs={"lease_seconds": LEASE})
    serve_cfg = role_config(tmp_path / "receiver", tps, **common)
    node = NodeProcess(serve_cfg).start()
    configs = []
    for name in ("gpu1", "gpu2"):
        cfg = role_config(tmp_path / name, tps, **common)
        (tmp_path / name / "data").mkdir(parents=True)
        configs.append(cfg)
    workers = [WorkerProcess(configs[0], "--device", "cpu").start()]
    try:
        p = phantom(3)
        assert storescu([p["images"], p["prompt"]], node.port).returncode == 0
        (result,) = delivered_pg(url, tps)
        assert pydicom.dcmread(result).SeriesDescription  # a real RTSTRUCT at the TPS
        # the second "host", then a long case: kill -9 of the worker process running it
        workers.append(WorkerProcess(configs[1], "--device", "cpu").start())
        big = phantom(**BIG)
        assert storescu([big["images"], big["prompt"]], node.port).returncode == 0
        wait_for(lambda: len(pg_query(url, "SELECT id FROM jobs WHERE state='running'")) == 1, 120, 0.01, "inference")
        (running,) = pg_query(url, "SELECT lease_owner FROM jobs WHERE state='running'")
        (busy,) = [w for w in workers if f".{w.tag}:" in running["lease_owner"]]
        busy.kill9()
        delivered_pg(url, tps, 2)
        jobs = pg_query(url, "SELECT state, attempts FROM jobs ORDER BY id")
        assert [j["state"] for j in jobs] == ["done", "done"] and jobs[1]["attempts"] == 2
        assert len(tps.files()) == 2
    finally:
        for w in workers:
            w.stop()
        node.stop()


def pg_query(url: str, sql: str) -> list[dict]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(sql).fetchall()


def delivered_pg(url: str, tps: StoreSCP, n: int = 1) -> list[Path]:
    wait_for(
        lambda: sum(s["state"] == "sent" for s in pg_query(url, "SELECT state FROM sends")) >= n, 300, 0.2, "deliveries"
    )
    return tps.files()
