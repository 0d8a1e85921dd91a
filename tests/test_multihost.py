"""Two nodes (receiver + sender + local worker each), separate data_dirs, one shared_dir and
one PostgreSQL: cases sent across both receivers, some split between them (images to one,
the prompt to the other), are each delivered exactly once to one storescp; kill -9 of the
node whose worker runs a job: the job completes on the other node after the lease."""

from __future__ import annotations

import subprocess

import pydicom
import pytest
from helpers import CLI, NodeProcess, StoreSCP, phantom, storescu, wait_for, write_config

pytestmark = pytest.mark.network

N_CASES = 20


def _query(url: str, sql: str) -> list[dict]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(sql).fetchall()


def test_two_receivers_one_postgresql_every_case_delivered_once(tmp_path, postgres_server):
    url = postgres_server.new_database()
    tps = StoreSCP(tmp_path / "tps").start()
    nodes = []
    try:
        for name in ("a", "b"):
            cfg = write_config(
                tmp_path / name,
                destinations={"tps": tps.destination()},
                shared_dir=str(tmp_path / "shared"),
                database={"url": url},
                jobs={"lease_seconds": 10},
            )
            nodes.append(NodeProcess(cfg).start())
        a, b = nodes
        sent_prompts = {}
        for k in range(N_CASES):
            p = phantom(100 + k, "CT", shape=(24, 64, 64), spacing=(2.5, 6.0, 6.0))
            sent_prompts[pydicom.dcmread(p["prompt"], stop_before_pixels=True).SOPInstanceUID] = k
            if k % 4 == 3:  # split: images to one receiver, the prompt to the other
                first, second = (a, b) if k % 8 == 3 else (b, a)
                assert storescu([p["images"]], first.port).returncode == 0
                assert storescu([p["prompt"]], second.port).returncode == 0
            else:
                node = a if k % 2 == 0 else b
                assert storescu([p["images"], p["prompt"]], node.port).returncode == 0

        def all_sent():
            rows = _query(url, "SELECT state FROM sends")
            return len(rows) >= N_CASES and all(r["state"] == "sent" for r in rows)

        wait_for(all_sent, 600, 0.5, f"{N_CASES} deliveries")
        cases = _query(url, "SELECT rtstruct_uid, state FROM cases ORDER BY id")
        assert sorted(c["rtstruct_uid"] for c in cases) == sorted(sent_prompts)  # one case per prompt
        assert {c["state"] for c in cases} == {"done"}
        sends = _query(url, "SELECT job_id, state, attempts FROM sends ORDER BY id")
        assert len(sends) == N_CASES and len({s["job_id"] for s in sends}) == N_CASES
        jobs = _query(url, "SELECT state, lease_owner, attempts FROM jobs")
        assert len(jobs) == N_CASES and all(j["state"] == "done" and j["lease_owner"] is None for j in jobs)
        results = [pydicom.dcmread(f, stop_before_pixels=True) for f in tps.files()]
        assert len(results) == N_CASES  # exactly once each at the TPS
        assert len({r.SOPInstanceUID for r in results}) == N_CASES
        assert all(n.alive() for n in nodes)

        # kill -9 of the node that runs a (long) job: the other takes it after the lease
        big = phantom(7, "CT", shape=(200, 128, 128))
        assert storescu([big["images"], big["prompt"]], a.port).returncode == 0
        big_uid = pydicom.dcmread(big["prompt"], stop_before_pixels=True).SOPInstanceUID

        def running_on():
            for n in nodes:
                if any(e["event"] == "inference_start" and e.get("case") == N_CASES + 1 for e in n.audit()):
                    return n
            return None

        victim = wait_for(running_on, 300, 0.01, "inference of the long case to start")
        victim.kill9()
        survivor = b if victim is a else a
        (job,) = _query(url, f"SELECT * FROM jobs WHERE case_id = {N_CASES + 1}")
        assert job["state"] == "running", f"the job was {job['state']} when its node was killed"
        wait_for(
            lambda: _query(url, f"SELECT state FROM sends WHERE job_id = {job['id']}") == [{"state": "sent"}],
            600,
            0.5,
            "the long case delivered by the other node",
        )
        (job,) = _query(url, f"SELECT * FROM jobs WHERE id = {job['id']}")
        assert job["state"] == "done" and job["attempts"] == 2
        starts = [e for e in survivor.audit() if e["event"] == "inference_start" and e.get("case") == N_CASES + 1]
        assert len(starts) == 1  # the survivor ran it once
        results = [pydicom.dcmread(f, stop_before_pixels=True) for f in tps.files()]
        assert len(results) == N_CASES + 1 and len({r.SOPInstanceUID for r in results}) == N_CASES + 1
        (case,) = _query(url, f"SELECT rtstruct_uid, state FROM cases WHERE id = {N_CASES + 1}")
        assert case == {"rtstruct_uid": big_uid, "state": "done"}
        # the CLI of either host sees the whole deployment's jobs
        out = subprocess.run(
            [*CLI, "jobs", "-c", str(survivor.config), "list", "--limit", "100"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert sum("tps=sent" in line for line in out.stdout.splitlines()) == N_CASES + 1
    finally:
        for node in nodes:
            node.stop()
        tps.stop()
