"""The operator's command line against a running node: echo, send, jobs, resend."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import CLI, REPO, NodeProcess, StoreSCP, delivered, free_port, image_files, phantom, wait_for, write_config

pytestmark = pytest.mark.network


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_echo_send_jobs_resend(tmp_path):
    tps = StoreSCP(tmp_path / "tps").start()
    config = write_config(tmp_path / "node", destinations={"tps": tps.destination()})
    node = NodeProcess(config).start()
    try:
        out = cli("echo", "127.0.0.1", node.port, "--aec", "STARDUST")
        assert out.returncode == 0 and "C-ECHO success" in out.stdout
        out = cli("echo", "127.0.0.1", node.port, "--aec", "STARDUST", "--aet", "STRANGER")
        assert out.returncode == 2 and "rejected" in out.stderr
        out = cli("echo", "127.0.0.1", free_port(), "--aec", "X")
        assert out.returncode == 2 and "cannot connect" in out.stderr

        p = phantom(1)
        out = cli("send", p["images"], "127.0.0.1", node.port, "--aec", "STARDUST")
        assert out.returncode == 0, out.stderr
        assert f"sent {len(image_files(p))} of {len(image_files(p))} file(s)" in out.stdout
        out = cli("send", p["prompt"], "127.0.0.1", node.port, "--aec", "STARDUST")
        assert out.returncode == 0, out.stderr
        delivered(node, tps)

        out = cli("jobs", "-c", config, "list")
        assert out.returncode == 0 and "done" in out.stdout and "tps=sent" in out.stdout
        rows = json.loads(cli("jobs", "-c", config, "list", "--json").stdout)
        assert rows[0]["state"] == "done" and rows[0]["deliveries"] == "tps=sent"
        out = cli("jobs", "-c", config, "show", rows[0]["id"])
        assert out.returncode == 0
        assert "rule: test-default" in out.stdout and "delivery tps: sent" in out.stdout and "MATCH" in out.stdout
        assert cli("jobs", "-c", config, "show", 999).returncode == 2
        out = cli("jobs", "-c", config, "retry", rows[0]["id"])
        assert out.returncode == 2 and "resend" in out.stderr  # done jobs are resent, not re-run

        out = cli("resend", rows[0]["id"], "-c", config)
        assert out.returncode == 0 and "1 delivery queued" in out.stdout
        # the same result instance is sent again (storescp stores it under the same name)
        wait_for(lambda: sum(e["event"] == "sent" for e in node.audit()) == 2, 60, what="the resent result")
        assert node.sends()[0]["state"] == "sent" and len(tps.files()) == 1
    finally:
        node.stop()
        tps.stop()


def test_jobs_retry_runs_a_failed_job_again(tmp_path):
    tps = StoreSCP(tmp_path / "tps").start()
    config = write_config(tmp_path / "node", destinations={"tps": tps.destination()})
    node = NodeProcess(config).start()
    try:
        p = phantom(1)
        assert cli("send", p["images"], "127.0.0.1", node.port, "--aec", "STARDUST").returncode == 0
        # the rules file is broken by an edit: the node keeps the old rules and says so
        rules = tmp_path / "node" / "rules.yaml"
        good = rules.read_text()
        rules.write_text("rules: [this is not a rule]\n")
        assert cli("send", p["prompt"], "127.0.0.1", node.port, "--aec", "STARDUST").returncode == 0
        delivered(node, tps)
        assert "rules_reload_failed" in node.log_text()
        rules.write_text(good)
        # a job that fails (its images deleted from the store behind the node's back) can be retried
        with node.db() as conn:
            conn.execute("UPDATE jobs SET state='failed', error='simulated' WHERE id=1")
        out = cli("jobs", "-c", config, "retry", 1)
        assert out.returncode == 0, out.stderr
        wait_for(
            lambda: node.jobs()[0]["state"] == "done" and node.jobs()[0]["error"] is None, 120, 0.2, "the retried job"
        )
    finally:
        node.stop()
        tps.stop()


def test_serve_refuses_a_bad_config_and_a_second_instance(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("access: {calling_aets: [TPS]}\nnetwork: {port: 0}\n")
    out = cli("serve", "-c", bad)
    assert out.returncode == 2 and "network.port" in out.stderr
    config = write_config(tmp_path / "node")
    node = NodeProcess(config).start()
    try:
        out = cli("serve", "-c", config, "--port", free_port(), timeout=60)
        assert out.returncode == 2 and "another node is running" in out.stderr
    finally:
        node.stop()
